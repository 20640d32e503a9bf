"""The baselines: the same weights run by the libraries flamingo_fast replaces, for the profiler and the tests.

- `to_openflamingo`: a reference Flamingo -> an open_flamingo `Flamingo` (open_clip ViT, Hugging Face LM with
  FlamingoLMMixin) whose parameters are the reference's own tensors; `OpenFlamingoBaseline` runs its generate
  (and its evaluation's scoring loop) behind flamingo_fast's phase timer.
- `to_idefics`: a reference of the IDEFICS layout -> transformers' IdeficsForVisionText2Text on the same
  tensors; `IdeficsBaseline` runs its generate behind the same timer.
- `EvalModelCalls`: OpenFlamingo's evaluation's model calls (EvalModel), on either model.
- `TimedHFGenerate`: the timing both share.

Needs open_flamingo / open_clip / transformers only when called (imported inside the functions).
"""

from __future__ import annotations

import re
import types
from collections.abc import Sequence

import torch
from torch import nn

from ..config import FlamingoConfig, LMConfig
from ..dropins.idefics import our_name
from ..dropins.openflamingo_state_dict import IGNORED, LAYERS_ATTR, canonical_name
from ..reference.model import Flamingo
from ..timing import PhaseTimer

# ----------------------------------------------------------------------------------------------------------
# OpenFlamingo running our weights
# ----------------------------------------------------------------------------------------------------------


def _hf_lm(lm: LMConfig, config: FlamingoConfig):
    import transformers

    tokens = dict(vocab_size=lm.vocab_size, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                  pad_token_id=config.pad_token_id, max_position_embeddings=lm.max_position_embeddings)
    if lm.family == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads, rms_norm_eps=lm.rms_norm_eps,
            rope_theta=lm.rope_theta, tie_word_embeddings=lm.tie_word_embeddings, **tokens))
    if lm.family == "gpt_neox":
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
            hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads, layer_norm_eps=lm.layer_norm_eps, rotary_pct=lm.rotary_pct,
            rotary_emb_base=lm.rope_theta, use_parallel_residual=lm.parallel_residual,
            tie_word_embeddings=lm.tie_word_embeddings, **tokens))
    if lm.qk_ln or lm.bias or lm.intermediate_size != 4 * lm.hidden_size:
        raise ValueError("lm: transformers' MptForCausalLM has no qk_ln, no biases and a 4x MLP; this MPT "
                         "(MosaicGPT-style) has no OpenFlamingo baseline without its remote code")
    if not float(lm.alibi_bias_max).is_integer():
        raise ValueError(f"lm.alibi_bias_max={lm.alibi_bias_max}: transformers' MptConfig takes an integer")
    max_len = tokens.pop("max_position_embeddings")
    return transformers.MptForCausalLM(transformers.MptConfig(
        d_model=lm.hidden_size, n_heads=lm.num_heads, n_layers=lm.num_layers, max_seq_len=max_len,
        layer_norm_epsilon=lm.layer_norm_eps, attn_config={"alibi": True, "clip_qkv": lm.clip_qkv,
                                                           # an int, as transformers 5's config checks
                                                           "alibi_bias_max": int(lm.alibi_bias_max)}, **tokens))


@torch.no_grad()
def to_openflamingo(reference: Flamingo) -> nn.Module:
    """The same model as `reference` as an open_flamingo `Flamingo` (open_clip ViT, Hugging Face LM extended
    with FlamingoLMMixin), its parameters the reference's own tensors. Needs open_flamingo, open_clip and
    transformers (`make setup-openflamingo`); builds nothing from the network."""
    import types

    from ..compat import OptionalMaskMixin, import_torchvision

    import_torchvision()  # open_clip imports it; beside a CPU torch it needs compat's help
    from open_clip.transformer import QuickGELU, VisionTransformer
    from open_flamingo.src.flamingo import Flamingo as OpenFlamingo
    from open_flamingo.src.flamingo_lm import FlamingoLMMixin
    from open_flamingo.src.helpers import GatedCrossAttentionBlock, PerceiverResampler
    from open_flamingo.src.utils import extend_instance

    config = reference.config
    p = config.perceiver
    v, lm = config.vision, config.lm
    device = reference.lang_encoder.output_head.weight.device
    layout = lm.family
    with torch.device(device):
        vit = VisionTransformer(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                                heads=v.heads, mlp_ratio=v.mlp_ratio,
                                act_layer=QuickGELU if v.act == "quick_gelu" else nn.GELU, output_tokens=True)
        lang = _hf_lm(lm, config)
        extend_instance(lang, FlamingoLMMixin)
        extend_instance(lang, OptionalMaskMixin)  # transformers 5's generate drops an all-ones mask
        lang.set_decoder_layers_attr_name(LAYERS_ATTR[layout])
        model = OpenFlamingo(types.SimpleNamespace(visual=vit), lang, config.eoc_token_id, config.media_token_id,
                             vis_dim=v.width, cross_attn_every_n_layers=config.cross_attn_every_n_layers)
        # OpenFlamingo's Flamingo fixes the resampler and blocks at their released shapes; our presets may not
        model.perceiver = PerceiverResampler(dim=v.width, depth=p.depth, dim_head=p.dim_head, heads=p.heads,
                                             num_latents=p.num_latents, ff_mult=p.ff_mult)
        lang.gated_cross_attn_layers = nn.ModuleList(
            GatedCrossAttentionBlock(dim=lm.hidden_size, dim_visual=v.width, dim_head=config.xattn_dim_head,
                                     heads=config.xattn_heads, ff_mult=config.xattn_ff_mult,
                                     only_attend_immediate_media=config.only_attend_immediate_media)
            if i in config.xattn_layer_indices else None for i in range(lm.num_layers))
        lang.init_flamingo_layers(False)  # OpenFlamingo's way to re-wire changed gated blocks into its layers
    ours = reference.state_dict(keep_vars=True)
    ignored = [re.compile(p) for p in IGNORED]
    head = next(n for n, m in lang.named_children() if m is lang.get_output_embeddings())
    theirs = {}
    for name in model.state_dict():
        source = canonical_name(name, layout)
        if layout == "gpt_neox" and name == f"lang_encoder.{head}.weight":
            source = "lang_encoder.embed_out.weight"  # the head by its role: transformers 5 names it lm_head
        if source in ours:
            theirs[name] = ours[source]
        elif not any(p.match(source) for p in ignored):
            raise ValueError(f"{name}: no tensor of the reference maps to this OpenFlamingo parameter")
    model.load_state_dict(theirs, strict=False, assign=True)
    return model.to(dtype=reference.lang_encoder.output_head.weight.dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# transformers' own IDEFICS on the reference's tensors
# ----------------------------------------------------------------------------------------------------------


def hf_idefics_config(config: FlamingoConfig):
    """transformers' IdeficsConfig for a FlamingoConfig of the IDEFICS layout."""
    import transformers

    if config.layout != "idefics":
        raise ValueError(f"config.layout={config.layout!r}: expected 'idefics'")
    v, p, lm = config.vision, config.perceiver, config.lm
    return transformers.IdeficsConfig(
        vocab_size=lm.vocab_size - lm.additional_vocab_size, additional_vocab_size=lm.additional_vocab_size,
        hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
        num_attention_heads=lm.num_heads, rms_norm_eps=lm.rms_norm_eps, hidden_act="silu",
        cross_layer_interval=config.cross_attn_every_n_layers, qk_layer_norms=config.xattn_qk_norm,
        alpha_type="vector" if config.xattn_gate_per_channel else "float", use_resampler=True,
        tie_word_embeddings=lm.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
        vision_config=dict(embed_dim=v.width, image_size=v.image_size, patch_size=v.patch_size,
                           num_hidden_layers=v.layers, num_attention_heads=v.heads, intermediate_size=v.mlp_width,
                           hidden_act=v.act, layer_norm_eps=v.layer_norm_eps, num_channels=v.in_channels),
        perceiver_config=dict(use_resampler=True, resampler_n_latents=p.num_latents, resampler_depth=p.depth,
                              resampler_n_heads=p.heads, resampler_head_dim=p.dim_head,
                              qk_layer_norms_perceiver=p.qk_norm),
    )


@torch.no_grad()
def to_idefics(reference: Flamingo) -> nn.Module:
    """The same model as `reference` (IDEFICS layout) as transformers' IdeficsForVisionText2Text, its parameters
    the reference's own tensors (the unused `post_layernorm` keeps its fresh LayerNorm init). Needs transformers;
    builds nothing from the network."""
    from ..compat import import_torchvision_if_installed

    import_torchvision_if_installed()  # transformers' IDEFICS imports it where installed (compat: beside a CPU torch)
    import transformers

    config = reference.config
    weight = reference.lang_encoder.output_head.weight
    with torch.device(weight.device):
        model = transformers.IdeficsForVisionText2Text(hf_idefics_config(config))
    ours = reference.state_dict(keep_vars=True)
    theirs = {name: ours[our_name(name, config)] for name in model.state_dict() if our_name(name, config)}
    model.load_state_dict(theirs, strict=False, assign=True)
    return model.to(dtype=weight.dtype).eval()


# ----------------------------------------------------------------------------------------------------------
# The timed baselines
# ----------------------------------------------------------------------------------------------------------


class TimedHFGenerate:
    """A Hugging Face generate behind flamingo_fast's phase timer: "vision" (lapped by a forward hook of the
    baseline's, on the first forward only), "prefill" (the first token) and "decode" (each later token), these two
    lapped by a stopping criterion that never stops. `eos_token_id=[]` (never stop) becomes
    `min_new_tokens=max_new_tokens`, which Hugging Face implements by suppressing the eos tokens."""

    def __init__(self) -> None:
        self._timer: PhaseTimer | None = None
        self._laps = 0

    def _lap_vision(self) -> None:
        if self._timer is not None and self._laps == 0:
            self._timer.lap("vision")

    def _timed(self, generate, max_new_tokens: int, eos_token_id, timer: PhaseTimer | None) -> torch.Tensor:
        """generate(stopping_criteria=..., **eos options) -> ids, timed."""
        import transformers

        baseline = self

        class LapPerToken(transformers.StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                if baseline._timer is not None:
                    baseline._timer.lap("prefill" if baseline._laps == 0 else "decode")
                baseline._laps += 1
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        options = {}
        if eos_token_id is not None and list(eos_token_id if not isinstance(eos_token_id, int) else [0]) == []:
            options["min_new_tokens"] = max_new_tokens
        elif eos_token_id is not None:
            options["eos_token_id"] = eos_token_id
        self._timer, self._laps = timer, 0
        if timer is not None:
            timer.start()
        try:
            with torch.no_grad():
                return generate(stopping_criteria=transformers.StoppingCriteriaList([LapPerToken()]), **options)
        finally:
            self._timer = None


class OpenFlamingoBaseline(TimedHFGenerate):
    """OpenFlamingo's own `generate` on the same weights, with flamingo_fast's phase timer (TimedHFGenerate;
    "vision" is open_clip + the perceiver, timed by a hook on the perceiver)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        model.perceiver.register_forward_hook(lambda *args: self._lap_vision())

    @torch.no_grad()
    def score(self, vision_x, lang_x, attention_mask=None, candidates: Sequence[Sequence[int]] = (),
              normalize_length: bool = False) -> torch.Tensor:
        """OpenFlamingo's `get_rank_classifications` with `use_cache=True`, as its evaluation code runs it
        (open_flamingo/eval/models/open_flamingo.py): cache the media, one forward over the prompt that keeps
        its past_key_values, then one cached forward per candidate over the candidate's tokens, and the sum (or
        mean) of their log-softmax. -> [B, C] float32. The prompt's cache is copied for each candidate: the
        evaluation code was written for the tuple caches of older transformers, which a forward never changed;
        transformers 4.57's Cache objects grow in place."""
        import copy

        model = self.model
        batch = lang_x.shape[0]
        mask = torch.ones_like(lang_x) if attention_mask is None else attention_mask
        model.uncache_media()
        model.cache_media(input_ids=lang_x, vision_x=vision_x)
        try:
            prompt = model(vision_x=None, lang_x=lang_x, attention_mask=mask, clear_conditioned_layers=False,
                           use_cache=True)
            out = []
            for candidate in candidates:
                tokens = torch.tensor(candidate, device=lang_x.device).expand(batch, -1)
                step = model(vision_x=None, lang_x=tokens, attention_mask=torch.cat([mask, torch.ones_like(tokens)], 1),
                             clear_conditioned_layers=False, past_key_values=copy.deepcopy(prompt.past_key_values),
                             use_cache=True)
                log_probs = torch.log_softmax(torch.cat([prompt.logits, step.logits], dim=1), dim=-1)
                n = len(candidate)
                picked = log_probs[:, -n - 1:-1].gather(2, tokens[:, :, None]).squeeze(-1)
                out.append(picked.sum(dim=1) / n if normalize_length else picked.sum(dim=1))
        finally:
            model.uncache_media()
        return torch.stack(out, dim=1).float()

    def generate(self, vision_x, lang_x, attention_mask=None, max_new_tokens: int = 20, *, eos_token_id=None,
                 timer: PhaseTimer | None = None, num_beams: int = 1) -> torch.Tensor:
        return self._timed(
            lambda **options: self.model.generate(vision_x, lang_x, attention_mask=attention_mask,
                                                  max_new_tokens=max_new_tokens, num_beams=num_beams, **options),
            max_new_tokens, eos_token_id, timer)


class IdeficsBaseline(TimedHFGenerate):
    """transformers' IdeficsForVisionText2Text.generate on the reference's weights, behind the profiler's call
    (vision_x [B, N, 1, C, H, W], lang_x, attention_mask, image_attention_mask) with flamingo_fast's phase timer
    (TimedHFGenerate): "vision" is the vision tower and perceiver of the first forward, timed by a hook on the
    perceiver; a perceiver that transformers re-runs at every step, as 5.x does, counts as decode."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        model.model.perceiver_resampler.register_forward_hook(lambda *args: self._lap_vision())

    def generate(self, vision_x, lang_x, attention_mask=None, max_new_tokens: int = 20, *, eos_token_id=None,
                 timer: PhaseTimer | None = None, num_beams: int = 1,
                 image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self._timed(
            lambda **options: self.model.generate(
                input_ids=lang_x, attention_mask=attention_mask, pixel_values=vision_x[:, :, 0],
                image_attention_mask=image_attention_mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
                do_sample=False, **options),
            max_new_tokens, eos_token_id, timer)


# ----------------------------------------------------------------------------------------------------------
# OpenFlamingo's evaluation calls
# ----------------------------------------------------------------------------------------------------------


def _unwrapped(model: nn.Module) -> nn.Module:
    """What OpenFlamingo's `unwrap_model` returns: a DataParallel / DistributedDataParallel's module."""
    return model.module if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


class EvalModelCalls:
    """The model calls of OpenFlamingo's evaluation (open_flamingo/eval/models/open_flamingo.py, `EvalModel`),
    in its order and with its arguments, on token ids instead of strings (no tokenizer) and in float32 (its
    autocast is a no-op then). `model`: OpenFlamingo's Flamingo, the drop-in, or either wrapped in DDP, as
    `EvalModel.model` may be; like EvalModel, `__call__` calls `model` itself and the rest `unwrap_model(model)`.
    For tests and bench/score_cpu.py."""

    def __init__(self, model: nn.Module):
        self.model = model

    def get_outputs(self, vision_x, lang_x, attention_mask, min_generation_length: int, max_generation_length: int,
                    num_beams: int, length_penalty: float) -> torch.Tensor:
        """Captioning and VQA: beam search inside inference mode -> the new tokens only [B, n]."""
        with torch.inference_mode():
            out = _unwrapped(self.model).generate(vision_x, lang_x, attention_mask,
                                                  min_new_tokens=min_generation_length,
                                                  max_new_tokens=max_generation_length, num_beams=num_beams,
                                                  length_penalty=length_penalty)
        return out[:, lang_x.shape[1]:]

    def get_rank_classifications(self, vision_x, lang_x, attention_mask, class_ids: Sequence[Sequence[int]],
                                 use_cache: bool, normalize_length: bool) -> torch.Tensor:
        """ImageNet / Hateful Memes: every class name's log-likelihood after every row -> [B, C]. With use_cache:
        cache_media, one forward over the prompt that keeps its past_key_values, then per class `__call__`'s
        one-token-per-call loop from that same precomputed state; without: one full forward per class."""
        batch = lang_x.shape[0]
        if use_cache:
            self.cache_media(input_ids=lang_x, vision_x=vision_x)
            precomputed = self(vision_x=None, lang_x=lang_x, attention_mask=attention_mask,
                               clear_conditioned_layers=False, use_cache=True)
            precomputed_logits, precomputed_pkvs = precomputed.logits, precomputed.past_key_values
        else:
            precomputed_pkvs = None
        overall = []
        for class_name in class_ids:
            tokens = torch.tensor([list(class_name)], device=lang_x.device).repeat(batch, 1)
            count = tokens.shape[1]
            if use_cache:
                call_ids, call_mask, call_vision = tokens, None, None
            else:
                call_ids = torch.cat([lang_x, tokens], dim=1)
                call_mask = torch.cat([attention_mask, torch.ones_like(tokens).bool()], dim=1)
                call_vision = vision_x
            outputs = self(vision_x=call_vision, lang_x=call_ids, attention_mask=call_mask,
                           clear_conditioned_layers=not use_cache, past_key_values=precomputed_pkvs)
            logits = torch.cat([precomputed_logits, outputs.logits], dim=1) if use_cache else outputs.logits
            picked = torch.log_softmax(logits, dim=-1)[:, -count - 1:-1].gather(2, tokens[:, :, None]).squeeze(-1)
            overall.append(picked.mean(dim=1) if normalize_length else picked.sum(dim=1))
        self.uncache_media()
        return torch.vstack(overall).T.cpu()

    def __call__(self, lang_x, vision_x, attention_mask, past_key_values=None, clear_conditioned_layers=False,
                 use_cache=False):
        """One forward; with past_key_values, one call per token of lang_x, each extending the previous call's
        past_key_values (attention_mask sliced per token, or None)."""
        if past_key_values is None:
            with torch.inference_mode():
                return self.model(vision_x=vision_x, lang_x=lang_x, attention_mask=attention_mask,
                                  clear_conditioned_layers=clear_conditioned_layers, past_key_values=None,
                                  use_cache=use_cache)
        logits = []
        for index in range(lang_x.shape[1]):
            mask = None if attention_mask is None else attention_mask[:, index:index + 1]
            with torch.inference_mode():
                outputs = self.model(vision_x=vision_x, lang_x=lang_x[:, index:index + 1], attention_mask=mask,
                                     clear_conditioned_layers=False, past_key_values=past_key_values,
                                     use_cache=True)
            past_key_values = outputs.past_key_values
            logits.append(outputs.logits)
        return types.SimpleNamespace(logits=torch.cat(logits, dim=1), past_key_values=past_key_values)

    def cache_media(self, input_ids, vision_x) -> None:
        _unwrapped(self.model).cache_media(input_ids=input_ids, vision_x=vision_x)

    def uncache_media(self) -> None:
        _unwrapped(self.model).uncache_media()
