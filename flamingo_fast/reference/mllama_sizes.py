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


def mllama_weight_bytes(config: MllamaConfig) -> dict[str, int]:
    """{"bf16": bytes, "int8": bytes} of the model's weights (see the module docstring for what int8 quantizes)."""
    with torch.device("meta"):
        model = MllamaReference(config)
    total = sum(p.numel() for p in model.parameters())
    linears = [m.weight for m in model.language_model.layers.modules() if isinstance(m, nn.Linear)]
    linears.append(model.lm_head.weight)
    quantized = sum(w.numel() for w in linears)
    rows = sum(w.shape[0] for w in linears)
    return {"bf16": 2 * total, "int8": quantized + 4 * rows + 2 * (total - quantized)}


def mllama_fits(config: MllamaConfig) -> dict[str, dict[str, int]]:
    """{card: {format: bytes left after the weights (negative: they do not fit)}}."""
    weights = mllama_weight_bytes(config)
    return {card: {fmt: memory - size for fmt, size in weights.items()} for card, memory in CARDS.items()}
