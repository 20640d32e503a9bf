"""The eager reference of Llama 3.2 Vision (transformers' `MllamaForConditionalGeneration`): the ground truth the
Mllama runtime is checked against, itself checked against transformers 4.57 and 5.x (tests/test_mllama_reference.py).

    reference = MllamaReference.from_hf(model)        # shares the live model's tensors (views, nothing copied)
    logits = reference(input_ids, attention_mask, pixel_values, aspect_ratio_ids, aspect_ratio_mask,
                       cross_attention_mask)           # = model(**processor_outputs).logits

Our parameter names are transformers' below three prefixes (`vision_model.`, `multi_modal_projector.`,
`language_model.`) and `lm_head.`; `key_map_for(keys)` maps both Hugging Face layouts onto them (state_dict_keys).

The language model is Llama 3.1 (GQA, llama3 rotary scaling, an embedding with 8 rows more than the head). The
layers at `cross_attention_layers` have no self-attention; each is
    x = x + tanh(cross_attn_attn_gate) * o_proj(attention(q_norm(q_proj(RMSNorm(x))), k_norm(k_proj(v)), v_proj(v)))
    x = x + tanh(cross_attn_mlp_gate) * MLP(RMSNorm(x)) * row_sees_an_image
over the projected vision states v of the row's image slots (tokens_per_image each, padded tiles and padded image
slots included), masked by `cross_attention_mask` [B, T, images, tiles]: a token attends to the real tiles of the
images the processor marks for it (the latest group of adjacent `<|image|>` tokens, from the first of them on).

Rows that see no image (text before the first image, left padding, a text-only row in a batch with images): as
transformers 4.57 and 5.x do, the mask row is lifted (it attends to EVERY vision token of its row, padded tiles and
padded image slots included, with the attention gate applied) and only the MLP branch is zeroed. Meta's own
llama-models code (models/llama3/multimodal/model.py, CrossAttention.forward) also multiplies the attention output
by that row mask, so there such a row gets nothing from the cross-attention layer but its residual. A batch without
`pixel_values` skips the cross-attention layers entirely (both releases). Images without `cross_attention_mask` are
refused: transformers' result then depends on its attention implementation (SDPA's causal rule for a missing mask
masks vision tokens by index; eager attends to all).

Positions: from the attention mask (0 at each row's first real token), as transformers' generate computes them;
transformers' forward uses 0..T-1 for every row, which gives the same logits at real tokens (rotary attention
depends on position differences only) up to rounding.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from ..masking import positions_from_mask
from ..positions import llama3_inv_freq, rotary_cos_sin_from_inv_freq, rotary_inv_freq, self_attention_mask
from .lm import LlamaDecoderLayer, LlamaMLP, RMSNorm
from .mllama_config import MllamaConfig, MllamaTextConfig, mllama_config_from_hf
from .mllama_vision import MllamaVisionModel, empty_embedding

# Hugging Face's two checkpoint layouts -> ours, by prefix (first match wins).
KEY_MAPS = {
    # transformers >= 4.52 (MllamaForConditionalGeneration.model.*): live models of 4.57 and 5.x, new checkpoints
    "model": (("model.vision_model.", "vision_model."), ("model.multi_modal_projector.", "multi_modal_projector."),
              ("model.language_model.", "language_model."), ("lm_head.", "lm_head.")),
    # before 4.52 (and the released meta-llama checkpoints' safetensors): no `model.` level, the head in the LM
    "legacy": (("vision_model.", "vision_model."), ("multi_modal_projector.", "multi_modal_projector."),
               ("language_model.model.", "language_model."), ("language_model.lm_head.", "lm_head.")),
}


def key_layout(keys: Iterable[str]) -> str:
    """Which Hugging Face layout a set of state-dict keys is in ("model" or "legacy")."""
    keys = list(keys)
    if any(k.startswith("model.language_model.") for k in keys):
        return "model"
    if any(k.startswith("language_model.model.") for k in keys):
        return "legacy"
    raise ValueError(f"keys {keys[:5]}...: neither layout of MllamaForConditionalGeneration (model.language_model.* "
                     f"from transformers 4.52 on, language_model.model.* before)")


def our_key(name: str, layout: str) -> str:
    """A Hugging Face parameter name of `layout` -> the reference's (KeyError: maps to nothing)."""
    for theirs, ours in KEY_MAPS[layout]:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise KeyError(name)


def reference_state(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face names (either layout) -> ours, the same tensor objects. Unknown names are an error."""
    layout = key_layout(tensors)
    out, unknown = {}, []
    for name, tensor in tensors.items():
        try:
            out[our_key(name, layout)] = tensor
        except KeyError:
            unknown.append(name)
    if unknown:
        raise ValueError(f"state dict keys {unknown[:10]} map to nothing in flamingo_fast's Mllama layout "
                         f"({layout!r} layout)")
    return out


def installed_intermediate_from(model: nn.Module) -> str:
    """Which state of a local-encoder layer the installed transformers takes as an intermediate layer, read from
    the live model's own encoder (a probe of 8 tokens): "layer_output" when it records one state per layer (4.57,
    5.x), "layer_input" when it also records the encoder's input first (Meta's convention, older releases)."""
    import inspect

    encoder = model.model.vision_model.transformer
    weight = model.model.vision_model.patch_embedding.weight
    probe = torch.zeros(1, 8, weight.shape[0], dtype=weight.dtype, device=weight.device)
    kwargs = {"output_hidden_states": True} if "output_hidden_states" in inspect.signature(encoder.forward).parameters \
        else {}
    with torch.no_grad():
        states = encoder(probe, attention_mask=None, **kwargs).hidden_states
    layers = len(encoder.layers)
    if states is not None and len(states) in (layers, layers + 1):
        return "layer_output" if len(states) == layers else "layer_input"
    raise ValueError(f"model.model.vision_model.transformer: recorded {None if states is None else len(states)} "
                     f"hidden states for {layers} layers; expected {layers} (transformers 4.57, 5.x) or {layers + 1}")


class MllamaCrossAttentionLayer(nn.Module):
    """A decoder layer made of gated cross-attention and a gated MLP (transformers' names). Role accessors as the
    IDEFICS block's (attn_norm, queries, media_kv, attn_out, ff_norm, ff_body, attn_gate, ff_gate)."""

    def __init__(self, config: MllamaTextConfig, lm: LMConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.cross_attn = nn.Module()
        self.cross_attn.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=False)
        self.cross_attn.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.cross_attn.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.cross_attn.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=False)
        self.cross_attn.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.cross_attn.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.cross_attn_attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = LlamaMLP(lm)
        self.cross_attn_mlp_gate = nn.Parameter(torch.zeros(1))

    attn_norm_kind = ff_norm_kind = "rmsnorm"

    @property
    def attn_norm(self) -> nn.Module:
        return self.input_layernorm

    @property
    def ff_norm(self) -> nn.Module:
        return self.post_attention_layernorm

    @property
    def attn_gate(self) -> torch.Tensor:
        return self.cross_attn_attn_gate

    @property
    def ff_gate(self) -> torch.Tensor:
        return self.cross_attn_mlp_gate

    def queries(self, normed: torch.Tensor) -> torch.Tensor:
        """attn_norm(x) [B, T, D] -> q [B, T, H, dh], q_norm applied."""
        return self.cross_attn.q_norm(self.cross_attn.q_proj(normed).unflatten(-1, (self.heads, self.head_dim)))

    def media_kv(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected vision states [B, S, D] -> keys (k_norm applied), values [B, KV, S, dh]."""
        k = self.cross_attn.k_norm(self.cross_attn.k_proj(states).unflatten(-1, (self.kv_heads, self.head_dim)))
        v = self.cross_attn.v_proj(states).unflatten(-1, (self.kv_heads, self.head_dim))
        return k.transpose(1, 2), v.transpose(1, 2)

    def attn_out(self, attended: torch.Tensor) -> torch.Tensor:
        return self.cross_attn.o_proj(attended)

    def ff_body(self, normed: torch.Tensor) -> torch.Tensor:
        return self.mlp(normed)

    def forward(self, x: torch.Tensor, states: torch.Tensor, allowed: torch.Tensor,
                row_sees: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; states [B, S, D]; allowed [B, 1, T, S] bool; row_sees [B, T] bool -> [B, T, D]. Rows with
        no allowed key attend to every key, only their MLP branch is zeroed (transformers)."""
        b, t, _ = x.shape
        q = self.queries(self.input_layernorm(x)).transpose(1, 2)
        k, v = self.media_kv(states)
        groups = self.heads // self.kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~row_sees[:, None, :, None])
        x = x + self.cross_attn_attn_gate.tanh() * self.attn_out(out.transpose(1, 2).reshape(b, t, -1))
        ff = self.mlp(self.post_attention_layernorm(x)) * row_sees[..., None].to(x.dtype)
        return x + self.cross_attn_mlp_gate.tanh() * ff


def _lm_config(text: MllamaTextConfig) -> LMConfig:
    """The shapes LlamaDecoderLayer / LlamaMLP read (the self-attention layers are plain Llama layers)."""
    return LMConfig(family="llama", vocab_size=text.vocab_size, hidden_size=text.hidden_size,
                    num_layers=text.num_layers, num_heads=text.num_heads, num_kv_heads=text.num_kv_heads,
                    intermediate_size=text.intermediate_size, rms_norm_eps=text.rms_norm_eps,
                    rope_theta=text.rope_theta, max_position_embeddings=text.max_position_embeddings)


class MllamaTextModel(nn.Module):
    def __init__(self, config: MllamaTextConfig):
        super().__init__()
        self.config = config
        lm = _lm_config(config)
        self.embed_tokens = empty_embedding(config.embedding_rows, config.hidden_size)
        self.layers = nn.ModuleList(
            MllamaCrossAttentionLayer(config, lm) if i in config.cross_attention_layers else LlamaDecoderLayer(lm, i)
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def inv_freq(self, device) -> torch.Tensor:
        c = self.config
        inv = rotary_inv_freq(c.head_dim, c.rope_theta, device)
        s = c.rope_scaling
        if s is None:
            return inv
        return llama3_inv_freq(inv, s.factor, s.low_freq_factor, s.high_freq_factor,
                               s.original_max_position_embeddings)


class MllamaReference(nn.Module):
    """Llama 3.2 Vision, eager, in the dtype of its parameters. Build it from a live transformers model
    (`from_hf`: the same tensors) or from Hugging Face state dicts of either layout (`from_state`); built from a
    config alone its parameters are to be loaded (the embedding tables are left uninitialised)."""

    def __init__(self, config: MllamaConfig):
        super().__init__()
        self.config = config
        self.vision_model = MllamaVisionModel(config.vision)
        self.multi_modal_projector = nn.Linear(config.vision.vision_output_dim, config.text.hidden_size)
        self.language_model = MllamaTextModel(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)

    @classmethod
    def from_state(cls, config: MllamaConfig, tensors: Mapping[str, torch.Tensor]) -> MllamaReference:
        """Parameters ARE `tensors` (Hugging Face names, either layout; assigned, not copied), built on meta."""
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(reference_state(tensors), strict=True, assign=True)
        return model.eval()

    @classmethod
    def from_hf(cls, model: nn.Module, intermediate_from: str | None = None) -> MllamaReference:
        """A live transformers MllamaForConditionalGeneration -> the reference over its own tensors.
        intermediate_from: None reads the installed transformers' convention from the model
        (installed_intermediate_from)."""
        which = intermediate_from or installed_intermediate_from(model)
        config = mllama_config_from_hf(model.config.to_dict(), intermediate_from=which)
        return cls.from_state(config, model.state_dict(keep_vars=True))

    def vision_states(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask) -> torch.Tensor:
        """-> the projected vision states [B, images * tiles * num_patches, D] the cross-attention layers read."""
        out = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.multi_modal_projector(out).reshape(out.shape[0], -1, self.config.text.hidden_size)

    def key_mask(self, cross_attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, images, tiles] 0/1 -> allowed [B, 1, T, images * tiles * num_patches] bool, row_sees [B, T]."""
        if cross_attention_mask.dim() != 4 or not bool(((cross_attention_mask == 0) | (cross_attention_mask == 1))
                                                       .all()):
            raise ValueError(f"cross_attention_mask: got shape {tuple(cross_attention_mask.shape)}; expected the "
                             f"processor's 0/1 [batch, tokens, images, tiles] tensor")
        per_tile = cross_attention_mask.bool()
        allowed = per_tile.repeat_interleave(self.config.vision.num_patches, dim=3).flatten(2)
        return allowed[:, None], per_tile.flatten(2).any(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, aspect_ratio_ids: torch.Tensor | None = None,
                aspect_ratio_mask: torch.Tensor | None = None, cross_attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Hugging Face's arguments -> logits [B, T, vocab] in the parameters' dtype."""
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lm = self.language_model
        x = lm.embed_tokens(input_ids)
        positions = positions_from_mask(attention_mask) if position_ids is None else position_ids.expand(b, t)
        rope = rotary_cos_sin_from_inv_freq(positions, lm.inv_freq(x.device), x.dtype)
        causal = self_attention_mask(attention_mask, t)
        states = allowed = row_sees = None  # without images transformers skips the cross-attention layers
        if pixel_values is not None:
            if aspect_ratio_ids is None or aspect_ratio_mask is None:
                raise ValueError("pixel_values given without aspect_ratio_ids or aspect_ratio_mask; expected all three "
                                 "(the processor's outputs)")
            if cross_attention_mask is None:
                raise ValueError("pixel_values given without cross_attention_mask; expected the processor's mask "
                                 "(without it transformers' result depends on its attention implementation: SDPA "
                                 "masks vision tokens causally by index, eager attends to all)")
            states = self.vision_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask).to(x.dtype)
            allowed, row_sees = self.key_mask(cross_attention_mask[:, :t])
        for layer in lm.layers:
            if isinstance(layer, MllamaCrossAttentionLayer):
                if states is not None:
                    x = layer(x, states, allowed, row_sees)
            else:
                x = layer(x, rope, causal, None)
        return self.lm_head(lm.norm(x))


def state_dict_keys(layout: str, config: MllamaConfig) -> list[str]:
    """Every parameter name a Hugging Face checkpoint of `layout` ("model" or "legacy") holds for `config` (the
    inverse of our_key over the reference's names; for a loader's completeness check)."""
    with torch.device("meta"):
        names = list(MllamaReference(config).state_dict())
    inverse = {ours: theirs for theirs, ours in KEY_MAPS[layout]}
    out = []
    for name in names:
        prefix = next(p for p in inverse if name.startswith(p))
        out.append(inverse[prefix] + name[len(prefix):])
    return out

