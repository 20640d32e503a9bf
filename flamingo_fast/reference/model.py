"""The eager PyTorch reference of Flamingo: the ground truth every fast path is tested against.

Written to read like the paper and to behave exactly like OpenFlamingo (docs/semantics.md):

    images -> CLIP-style ViT (patch tokens, class token dropped) -> Perceiver Resampler (64 latents / image)
    text   -> decoder-only LM (LLaMA, MPT or GPT-NeoX); before every `cross_attn_every_n_layers`-th layer a
              gated tanh cross-attention block lets each token attend to the latents of its own image.

Parameter names follow OpenFlamingo's state dict (`perceiver.layers.0.0.to_q.weight`,
`lang_encoder.gated_cross_attn_layers.3.attn_gate`, ...), the vision tower follows open_clip's, and each LM
family follows its Hugging Face model (`lang_encoder.model.*` LLaMA, `lang_encoder.transformer.*` MPT,
`lang_encoder.gpt_neox.*` GPT-NeoX), fused weights in their native layout, so checkpoints map onto this model
tensor for tensor (flamingo_fast/dropins/openflamingo_state_dict.py holds the explicit name maps). No state is
kept on modules between calls: the decode KV cache is an explicit `ReferenceKVCache` object.

This file holds the whole model (`Flamingo`), its LM with the gated blocks inserted (`FlamingoLM`), the
reference decoder that generation/search.py drives, and the builders. The parts live by component: the vision
towers and perceivers in media.py, the gated cross-attention blocks in xattn.py, the LM families and the KV cache
in lm.py; the position math, which the runtime shares, in ../positions.py.

This model is deliberately slow where OpenFlamingo is slow: cross-attention is dense over all images and
masked, and its keys/values are recomputed from the latents at every decode step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .. import masking
from ..config import FlamingoConfig
from ..generation.scoring import check_candidates, score_candidates
from ..generation.search import GenerationOptions, KeywordGenerate, generate_ids
from ..positions import alibi_attention_bias, alibi_slopes, rotary_cos_sin, self_attention_mask
from ..timing import PhaseTimer
from ..validation import check_generate_options, check_inputs
from .lm import (
    DecoupledEmbedding,
    DecoupledLinear,
    GPTNeoXModel,
    LlamaModel,
    MptModel,
    ReferenceKVCache,
    RMSNorm,
)
from .media import (
    IdeficsPerceiverResampler,
    IdeficsVisionTransformer,
    PerceiverResampler,
    VisionSelfAttention,
    VisionTransformer,
)
from .xattn import GatedCrossAttentionBlock, IdeficsGatedCrossAttentionBlock

# ----------------------------------------------------------------------------------------------------------
# The language model with gated cross-attention blocks
# ----------------------------------------------------------------------------------------------------------


class FlamingoLM(nn.Module):
    """The decoder with gated cross-attention blocks inserted before every n-th layer.

    The decoder sits under its Hugging Face attribute (`model` LLaMA, `transformer` MPT, `gpt_neox`
    GPT-NeoX) with its output head (`lm_head`; `embed_out` for GPT-NeoX; MPT's is tied to `transformer.wte`);
    `embed_tokens`, `layers`, `final_norm` and `output_head` name the same modules for every family."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        self.config = config
        lm = config.lm
        if lm.family == "llama":
            self.model = LlamaModel(lm)
            added = lm.additional_vocab_size
            self.lm_head = DecoupledLinear(lm.hidden_size, lm.vocab_size - added, added) if added \
                else nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        elif lm.family == "mpt":
            self.transformer = MptModel(lm)
            self.lm_head = nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        else:
            self.gpt_neox = GPTNeoXModel(lm)
            self.embed_out = nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        if lm.tie_word_embeddings or lm.family == "mpt":
            self.output_head.weight = self.embed_tokens.weight
            if lm.additional_vocab_size:
                self.output_head.additional_fc.weight = self.embed_tokens.additional_embedding.weight
        block = IdeficsGatedCrossAttentionBlock if config.layout == "idefics" else GatedCrossAttentionBlock
        self.gated_cross_attn_layers = nn.ModuleDict({str(i): block(config) for i in config.xattn_layer_indices})

    @property
    def embed_tokens(self) -> nn.Embedding:
        family = self.config.lm.family
        return self.model.embed_tokens if family == "llama" else self.transformer.wte if family == "mpt" \
            else self.gpt_neox.embed_in

    @property
    def layers(self) -> nn.ModuleList:
        family = self.config.lm.family
        return self.model.layers if family == "llama" else self.transformer.blocks if family == "mpt" \
            else self.gpt_neox.layers

    @property
    def final_norm(self) -> nn.Module:
        family = self.config.lm.family
        return self.model.norm if family == "llama" else self.transformer.norm_f if family == "mpt" \
            else self.gpt_neox.final_layer_norm

    @property
    def output_head(self) -> nn.Module:
        return self.embed_out if self.config.lm.family == "gpt_neox" else self.lm_head

    def position_inputs(self, positions: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype):
        """-> (rope, mask) for the decoder layers: rotary (cos, sin) and the boolean mask, or for ALiBi
        models no rope and an additive float mask."""
        lm = self.config.lm
        if lm.alibi:
            slopes = alibi_slopes(lm.num_heads, lm.alibi_bias_max, allowed.device)
            return None, alibi_attention_bias(allowed, slopes, dtype)
        return rotary_cos_sin(positions, lm.rotary_dim, lm.rope_theta, dtype), allowed

    def forward(
        self,
        input_ids: torch.Tensor,
        media: torch.Tensor | None,
        sight: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        cache: ReferenceKVCache | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [B, T]; key_valid [B, T_total] over cache + new tokens -> logits. `sight`: what
        each token sees, in the layout's form: text_time [B, T] (OpenFlamingo: the 1-based image, 0 = none) or
        the image_attention_mask [B, T, N] bool (IDEFICS)."""
        x = self.embed_tokens(input_ids)
        rope, mask = self.position_inputs(positions, self_attention_mask(key_valid, input_ids.shape[1]), x.dtype)
        for idx, layer in enumerate(self.layers):
            if str(idx) in self.gated_cross_attn_layers:
                x = self.gated_cross_attn_layers[str(idx)](x, media, sight)
            x = layer(x, rope, mask, cache)
        return self.output_head(self.final_norm(x))


# ----------------------------------------------------------------------------------------------------------
# Flamingo
# ----------------------------------------------------------------------------------------------------------


class Flamingo(KeywordGenerate, nn.Module):
    """Reference Flamingo: `forward(vision_x, lang_x, attention_mask) -> logits` and `generate(...)`.

    vision_x: [B, T_img, F, C, H, W] float images (or None for text-only prompts); lang_x: [B, T] token ids
    with `<image>` marking where each image sits; attention_mask: [B, T] 0/1, left padding. In the IDEFICS
    layout every call also takes `image_attention_mask` [B, T, T_img] (0/1, the processor's): which images each
    token sees; generated tokens see what the last prompt token sees.
    """

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        self.config = config
        p = config.perceiver
        if config.layout == "idefics":
            self.vision_encoder = IdeficsVisionTransformer(config.vision)
            self.perceiver = IdeficsPerceiverResampler(config.vision_dim, p)
        else:
            self.vision_encoder = VisionTransformer(config.vision)
            self.perceiver = PerceiverResampler(config.vision_dim, p.depth, p.dim_head, p.heads, p.num_latents,
                                                p.ff_mult)
        self.lang_encoder = FlamingoLM(config)
        self.apply(_init_linear_and_embedding)

    def sight(self, lang_x: torch.Tensor, image_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """What each prompt token sees, in FlamingoLM's form (checked inputs)."""
        if self.config.layout == "idefics":
            return image_attention_mask.bool()
        return masking.text_time(lang_x, self.config.media_token_id)

    def encode_vision(self, vision_x: torch.Tensor) -> torch.Tensor:
        """[B, T_img, F, C, H, W] -> latents [B, T_img, num_latents, D_vision]. No images (T_img = 0): no
        latents, which the cross-attention treats as no media."""
        b, t, f = vision_x.shape[:3]
        if t == 0:
            dtype = self.perceiver.latents.dtype
            return vision_x.new_zeros(b, 0, self.config.perceiver.num_latents, self.config.vision_dim, dtype=dtype)
        dtype = self.perceiver.latents.dtype
        tokens = self.vision_encoder(vision_x.reshape(b * t * f, *vision_x.shape[3:]).to(dtype))
        return self.perceiver(tokens.view(b, t, f, tokens.shape[1], tokens.shape[2]))

    def forward(
        self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> logits [B, T, vocab]."""
        attention_mask = check_inputs(self.config, vision_x, lang_x, attention_mask, image_attention_mask)
        media = self.encode_vision(vision_x) if vision_x is not None else None
        return self.lang_encoder(lang_x, media, self.sight(lang_x, image_attention_mask),
                                 masking.positions_from_mask(attention_mask), attention_mask)

    @torch.no_grad()
    def prefill(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor,
                timer: PhaseTimer | None = None, image_attention_mask: torch.Tensor | None = None,
                ) -> tuple[ReferenceDecoder, torch.Tensor]:
        """Encode the images, run the prompt once -> (decoder over the cached prompt, float32 logits [B, vocab]
        of each row's last token). Inputs already checked."""
        config = self.config
        media = self.encode_vision(vision_x) if vision_x is not None and vision_x.shape[1] else None
        if timer is not None:
            timer.lap("vision")
        cache = ReferenceKVCache.empty(config.lm.num_layers)
        positions = masking.positions_from_mask(attention_mask)
        sight = self.sight(lang_x, image_attention_mask)
        logits = self.lang_encoder(lang_x, media, sight, positions, attention_mask, cache)[:, -1]
        if config.layout == "idefics":  # generated tokens see what the last prompt token sees
            decode_sight = sight[:, -1]
        else:  # the last image of the row (1-based)
            decode_sight = masking.images_per_row(lang_x, config.media_token_id)
        image_token = config.media_token_id if config.openflamingo_generated_image_bug else None
        decoder = ReferenceDecoder(self.lang_encoder, cache, media, decode_sight, positions[:, -1], attention_mask,
                                   image_token)
        return decoder, logits.float()

    @torch.no_grad()
    def generate_from_options(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor,
                              attention_mask: torch.Tensor | None, options: GenerationOptions, *,
                              generator: torch.Generator | None = None, timer: PhaseTimer | None = None,
                              return_logits: bool = False, image_attention_mask: torch.Tensor | None = None,
                              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`generate` with its options already checked (GenerationOptions, built once by the caller)."""
        config = self.config
        attention_mask = check_inputs(config, vision_x, lang_x, attention_mask, image_attention_mask)
        check_generate_options(config, lang_x, attention_mask, options.max_new_tokens, options.min_new_tokens)
        lang_x = lang_x.long()
        return generate_ids(lambda: self.prefill(vision_x, lang_x, attention_mask, timer, image_attention_mask),
                            lang_x, options, config.lm.vocab_size, generator=generator, timer=timer,
                            return_logits=return_logits, plain=True)

    @torch.no_grad()
    def score(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
              candidates: Sequence[Sequence[int]] = (), normalize_length: bool = False,
              image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood of every candidate continuation after every row -> [B, C] float32: the sum over the
        candidate's tokens (the mean with `normalize_length`) of log p(token | prompt + its earlier tokens).
        Candidate tokens attend to the last image of their row, like generated tokens (generation/scoring.py)."""
        attention_mask = check_inputs(self.config, vision_x, lang_x, attention_mask, image_attention_mask)
        tokens = check_candidates(candidates, self.config.lm.vocab_size, self.config.media_token_id)
        check_generate_options(self.config, lang_x, attention_mask, max(len(t) for t in tokens))
        decoder, first_logits = self.prefill(vision_x, lang_x.long(), attention_mask,
                                             image_attention_mask=image_attention_mask)
        return score_candidates(decoder, first_logits, tokens, len(tokens), normalize_length, progress=False)


class ReferenceDecoder:
    """The search interface (flamingo_fast/generation/search.py) over the reference's grown-by-concatenation cache, done
    plainly: forking repeats every row's cache and media, reordering gathers whole caches."""

    def __init__(self, lm: FlamingoLM, cache: ReferenceKVCache, media: torch.Tensor | None, image: torch.Tensor,
                 position: torch.Tensor, key_valid: torch.Tensor, generated_image_token: int | None = None):
        self.lm, self.cache, self.media = lm, cache, media
        self.image, self.position, self.key_valid = image, position, key_valid  # [H], [H], [H, T so far]
        self.generated_image_token = generated_image_token  # set: OpenFlamingo's generated-<image> behaviour
        self.prompt = (list(cache.keys), list(cache.values), media, image, position, key_valid)  # fork restarts here

    def _select(self, index: torch.Tensor) -> None:
        self.cache.keys = [k.index_select(0, index) for k in self.cache.keys]
        self.cache.values = [v.index_select(0, index) for v in self.cache.values]
        self.media = self.media.index_select(0, index) if self.media is not None else None
        self.image, self.position = self.image[index], self.position[index]
        self.key_valid = self.key_valid[index]

    def fork(self, per_row: int, shared: bool | None = None) -> None:
        """Each prompt row becomes `per_row` hypotheses with empty tails (`shared` changes nothing here)."""
        keys, values, self.media, self.image, self.position, self.key_valid = self.prompt
        self.cache.keys, self.cache.values = list(keys), list(values)
        rows = torch.arange(self.position.shape[0], device=self.position.device)
        self._select(rows.repeat_interleave(per_row))

    def reorder(self, index: torch.Tensor) -> None:
        image = self.image
        self._select(index)
        self.image = masking.image_after_reorder(image, index, self.generated_image_token is not None)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every generated token belongs to the last image of its row's prompt (`image`, 1-based; IDEFICS: the
        last prompt token's image_attention_mask row, [H, N]), unless OpenFlamingo's generated-<image> behaviour
        is asked for (config.openflamingo_generated_image_bug)."""
        if self.generated_image_token is not None:
            self.image = masking.image_after_generated_tokens(tokens, self.image, self.generated_image_token)
        self.key_valid = torch.cat([self.key_valid, torch.ones_like(self.key_valid[:, :1])], dim=1)
        self.position = self.position + 1
        logits = self.lm(tokens[:, None], self.media, self.image[:, None], self.position[:, None], self.key_valid,
                         self.cache)
        return logits[:, -1].float()


def _init_linear_and_embedding(module: nn.Module) -> None:
    """A small, LLaMA-like initialisation, so random models have sane activations at every depth."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, VisionSelfAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
    elif isinstance(module, (DecoupledEmbedding, DecoupledLinear)):
        nn.init.normal_(module.weight, std=0.02)


def randomize_gates(model: Flamingo, generator: torch.Generator | None = None, low: float = 0.3, high: float = 1.2):
    """Give every tanh gate a random nonzero value with random sign (OpenFlamingo's zero init hides a broken
    branch). Random-weight benchmarks and every test use this."""
    with torch.no_grad():
        for block in model.lang_encoder.gated_cross_attn_layers.values():
            for gate in (block.attn_gate, block.ff_gate):  # [1], or [D] per channel (IDEFICS "vector")
                magnitude = low + (high - low) * torch.rand(gate.shape, generator=generator)
                sign = torch.where(torch.rand(gate.shape, generator=generator) < 0.5, 1.0, -1.0)
                gate.copy_(sign * magnitude)


def build_reference(config: FlamingoConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Flamingo:
    """A random-weight reference model with nonzero gates, seeded, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = Flamingo(config)  # built where it will run: a 9B model initialises in seconds on a GPU
    randomize_gates(model, generator)
    if config.layout == "idefics":  # norms at exactly 1 would hide a norm applied with the wrong weight
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    module.weight.mul_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
    return model.to(dtype=dtype).eval()


def build_reference_from_state(config: FlamingoConfig, tensors: Mapping[str, torch.Tensor]) -> Flamingo:
    """A reference Flamingo whose parameters ARE `tensors` (assigned, not copied): built on the meta device."""
    with torch.device("meta"):
        model = Flamingo(config)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval()
