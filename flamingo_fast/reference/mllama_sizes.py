"""Weight bytes of the Llama 3.2 Vision layout, counted on the meta device (no memory), and which cards hold them.

    mllama_weight_bytes(mllama_from_name("mllama-11b"))  # {"bf16": ..., "int8": ...}
    mllama_fits(...)                                     # per card and format: the bytes left after the weights

bf16: every parameter in 2 bytes. int8 (the runtime's weights="int8"): the language model's Linear weights
(self-attention and cross-attention projections, both MLPs) and the output head as int8 with one float32 scale per
output row; everything else (the vision tower, the projector, the embedding, norms, gates) stays bf16. Weights only:
the self-attention KV cache, the images' cross-attention K/V (25 MiB per 4-tile image and layer for the 11B in bf16)
and the activations need the rest.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .mllama import MllamaReference
from .mllama_config import MllamaConfig

# Memory a card reports (nvidia-smi's total), in bytes.
CARDS = {
    "H100 80GB": 81559 * 2**20,
    "H200 141GB": 143771 * 2**20,
    "24GB card": 24 * 2**30,
}


def mllama_parameter_count(config: MllamaConfig) -> int:
    with torch.device("meta"):
        model = MllamaReference(config)
    return sum(p.numel() for p in model.parameters())


@functools.cache
def _counts(config: MllamaConfig) -> tuple[int, int, int]:
    """(parameters, elements of the int8-quantized matrices, their output rows), counted on the meta device."""
    with torch.device("meta"):
        model = MllamaReference(config)
    total = sum(p.numel() for p in model.parameters())
    linears = [m.weight for m in model.language_model.layers.modules() if isinstance(m, nn.Linear)]
    linears.append(model.lm_head.weight)
    return total, sum(w.numel() for w in linears), sum(w.shape[0] for w in linears)


def mllama_weight_bytes_by_dtype(config: MllamaConfig, weights: str | None = None,
                                 dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """The weights' bytes by dtype name, as bytes_by_dtype names them: weights None (the model's own, every
    parameter in `dtype`) -> {"bfloat16": ...}; "int8" -> {"int8": matrices, "float32": one scale per output row,
    "bfloat16": the rest} (the module docstring says what int8 quantizes)."""
    if weights not in (None, "int8"):
        raise ValueError(f"weights={weights!r}: expected None (the model's own dtype) or 'int8'")
    total, quantized, rows = _counts(config)
    size, name = dtype.itemsize, str(dtype).removeprefix("torch.")
    if weights is None:
        return {name: size * total}
    out = {"int8": quantized, "float32": 4 * rows}
    out[name] = out.get(name, 0) + size * (total - quantized)  # float32 models: the scales' dtype too
    return out


def mllama_weight_bytes(config: MllamaConfig) -> dict[str, int]:
    """{"bf16": bytes, "int8": bytes} of the model's weights (see the module docstring for what int8 quantizes)."""
    return {"bf16": sum(mllama_weight_bytes_by_dtype(config).values()),
            "int8": sum(mllama_weight_bytes_by_dtype(config, "int8").values())}


def mllama_image_kv_bytes(config: MllamaConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of one image's cross-attention keys and values over every cross-attention layer: KV heads x head_dim x
    (max_num_tiles x num_patches) vision tokens x 2 (K and V) x the dtype's size, per layer (padded tiles included:
    every slot is projected; 8 x 128 x 6404 x 2 x 2 B = 25 MiB per layer for the released models in bf16)."""
    text = config.text
    per_layer = text.num_kv_heads * text.head_dim * config.vision.tokens_per_image * 2 * dtype.itemsize
    return per_layer * len(text.cross_attention_layers)


def mllama_self_kv_bytes(config: MllamaConfig, positions: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the self-attention keys and values of `positions` tokens of one row (the layers that are not
    cross-attention layers)."""
    text = config.text
    layers = text.num_layers - len(text.cross_attention_layers)
    return layers * text.num_kv_heads * text.head_dim * positions * 2 * dtype.itemsize


def mllama_fits(config: MllamaConfig) -> dict[str, dict[str, int]]:
    """{card: {format: bytes left after the weights (negative: they do not fit)}}."""
    weights = mllama_weight_bytes(config)
    return {card: {fmt: memory - size for fmt, size in weights.items()} for card, memory in CARDS.items()}


@functools.cache
def _decode_parameters(config: MllamaConfig) -> int:
    """Parameters a decode step reads: every language-model layer but the cross-attention layers' k_proj, v_proj
    and k_norm (the images' K/V are computed once per image), the final norm, the head, and one embedding row."""
    with torch.device("meta"):
        model = MllamaReference(config)
    lm = model.language_model
    once = {id(p) for name, p in lm.layers.named_parameters()
            if any(part in name for part in ("cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.k_norm"))}
    layers = sum(p.numel() for p in lm.layers.parameters() if id(p) not in once)
    return layers + sum(p.numel() for p in lm.norm.parameters()) + model.lm_head.weight.numel() \
        + config.text.hidden_size


def mllama_decode_read_bytes(config: MllamaConfig, batch: int, context: float, images: int,
                             dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes one decode step must read at least, weights in `dtype`: the decode weights (_decode_parameters), the
    self-attention K/V of `context` positions and the cross-attention K/V of `images` images per row (every tile
    slot: mllama_image_kv_bytes); bench/mllama_gpu.py divides it by the measured copy bandwidth (the floor)."""
    weights = _decode_parameters(config) * dtype.itemsize
    per_row = mllama_self_kv_bytes(config, 1, dtype) * context + images * mllama_image_kv_bytes(config, dtype)
    return int(weights + batch * per_row)
