"""Llama 3.2 Vision's parameter counts written out from the architecture's description (not from the reference's
modules): what tests/test_mllama_config.py and tests/test_mllama_profile.py check the meta-device counts against."""

from __future__ import annotations

from flamingo_fast.reference.mllama_config import MllamaConfig


def closed_form(config: MllamaConfig) -> tuple[int, int, int]:
    """(parameters, quantized LM weights, their output rows) written out from the architecture's description."""
    v, t = config.vision, config.text
    d, p, tiles, tilings = v.hidden_size, v.num_patches, v.max_num_tiles, v.max_aspect_ratio_id + 1
    block = 4 * d * d + 2 * d * v.intermediate_size + v.intermediate_size + d + 4 * d  # attn, MLP + biases, 2 LNs
    vision = v.num_channels * v.patch_size**2 * d + d + (1 + p * d + tilings * tiles * p * d) \
        + 2 * (tilings * tiles * d + 1) + 4 * d + v.num_layers * block + v.num_global_layers * (block + 2)
    projector = v.vision_output_dim * t.hidden_size + t.hidden_size
    h, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    projections, mlp = 2 * h * h + 2 * h * kv, 3 * h * t.intermediate_size
    rows = 2 * h + 2 * kv + 2 * t.intermediate_size + h  # q, o, k, v, gate, up, down
    cross = len(t.cross_attention_layers)
    lm = t.num_layers * (projections + mlp + 2 * h) + cross * (2 * t.head_dim + 2) + (t.vocab_size + 8) * h + h
    head = t.vocab_size * h
    return vision + projector + lm + head, t.num_layers * (projections + mlp) + head, \
        t.num_layers * rows + t.vocab_size
