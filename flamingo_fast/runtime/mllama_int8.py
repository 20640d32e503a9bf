"""Weight-only int8 for Llama 3.2 Vision (runtime/quantize.py's format: symmetric, one scale per output row).

    quantized = int8_reference(reference)        # a new MllamaReference; `reference` is left as it is

The language model's Linears are quantized, layer by layer: each self-attention layer's q/k/v and gate/up as one
int8 matrix each (row views of it, quantize.quantize_block), each cross-attention layer's q/k/v/o and MLP, and the
output head. The vision tower, the projector, the embedding and the norms keep the reference's tensors (shared, not
copied): they run once per image or cost nothing per token. The float weights of the quantized layers are held by
the reference's owner only (the live transformers model); the copy holds none of them.
"""

from __future__ import annotations

import torch

from ..reference.mllama import MllamaCrossAttentionLayer, MllamaReference
from .quantize import Int8Linear, quantize_block, quantize_per_channel


@torch.no_grad()
def int8_reference(reference: MllamaReference) -> MllamaReference:
    """A MllamaReference over `reference`'s tensors whose language-model Linears are Int8Linear (module docstring);
    bind their matmul with quantize.bind_int8_linears before use."""
    dtype = reference.language_model.embed_tokens.weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"weights='int8' with a {dtype} model: expected float32, float16 or bfloat16 weights")
    with torch.device("meta"):
        copy = MllamaReference(reference.config)
    copy.load_state_dict(reference.state_dict(keep_vars=True), strict=True, assign=True)  # the same tensors
    copy.eval()
    for layer in copy.language_model.layers:
        quantize_block(layer, "llama", decoder_layer=not isinstance(layer, MllamaCrossAttentionLayer))
    copy.lm_head = Int8Linear(*quantize_per_channel(copy.lm_head.weight))
    return copy
