"""The profiler for Llama 3.2 Vision (transformers' MllamaForConditionalGeneration): the mllama-* presets.

    flamingo-fast profile --preset mllama-11b --device meta            # weight bytes, what fits; nothing runs

`count_mllama_weights` (`--device meta`): no model is built but the reference on the meta device (no memory, no
transformers): per batch and implementation row, the weight bytes of reference/mllama_sizes.py ("hf": the model in
the activation dtype; "fast" shares it, "fast-int8" computes with the int8 copy of the language model's Linears and
head), the caches a call allocates at the sweep's capacity (self-attention K/V of the longest prompt + new tokens,
the cross-attention K/V of its images), and how many 4-tile images' cross-attention K/V fit beside the weights on
each card (report.format_weights).

Prompt for k shots, per row: `<|begin_of_text|>` then k times `<|image|>` + caption, then the query `<|image|>` +
question; k shots use k + 1 images (prompts.mllama_prompt_length).
"""

from __future__ import annotations

import torch

from ..reference.mllama_sizes import (
    mllama_image_kv_bytes,
    mllama_self_kv_bytes,
    mllama_weight_bytes_by_dtype,
)
from .profile_options import ProfileOptions
from .prompts import mllama_prompt_length
from .report import WeightRow

PROMPT = ("<|begin_of_text|> + shots x (<|image|> caption) + <|image|> question; shots + 1 images of "
          "max_num_tiles tiles")


def _variants(options: ProfileOptions) -> list[tuple[str, str | None]]:
    """(row label, weight format) per row: hf once, fast once per --weights format (fast, fast-bf16, fast-int8)."""
    rows = []
    for impl in options.impls:
        if impl == "fast":
            rows += [("fast" if w == "none" else f"fast-{w}", w) for w in options.weights]
        else:
            rows.append((impl, None))
    return rows


def capacity(options: ProfileOptions) -> tuple[int, int]:
    """(positions, images) per row of the sweep's largest call: the longest prompt + new tokens, shots + 1."""
    longest = mllama_prompt_length(max(options.shots), options.caption_tokens, options.question_tokens)
    return longest + options.new_tokens, max(options.shots) + 1


def count_mllama_weights(options: ProfileOptions) -> list[WeightRow]:
    """`--device meta` with an mllama-* preset: the module docstring's rows; nothing is allocated, nothing runs."""
    if torch.device(options.device).type != "meta" or not options.is_mllama:
        raise ValueError(f"device={options.device!r}, preset={options.preset!r}: count_mllama_weights counts an "
                         f"mllama-* preset on the meta device; expected device='meta' and such a preset")
    config, dtype = options.mllama_config, options.torch_dtype
    positions, images = capacity(options)
    image_kv = mllama_image_kv_bytes(config, dtype)
    own = mllama_weight_bytes_by_dtype(config, None, dtype)
    int8 = mllama_weight_bytes_by_dtype(config, "int8", dtype) if "int8" in options.weights else None
    rows = []
    for batch in options.batch:
        caches = batch * (mllama_self_kv_bytes(config, positions, dtype) + images * image_kv)
        for label, weights in _variants(options):
            held = int8 if weights == "int8" else own
            rows.append(WeightRow(label, batch, weights, dict(held), caches, positions, images,
                                  image_kv_bytes=image_kv))
    return rows


def weights_note(options: ProfileOptions) -> str:
    """What the Llama 3.2 Vision meta table's numbers are (report.format_weights prints it under the table)."""
    text = options.mllama_config.text
    note = ("weight bytes: reference/mllama_sizes.py, counted on the meta device (hf: every parameter in the "
            f"activation dtype, {options.dtype}; fast shares the same tensors; fast-int8: the language model's "
            "Linears and head as int8 with a float32 scale per output row, the rest unchanged). caches: what one "
            "call allocates at the capacity above, in both implementations: the self-attention K/V of "
            f"{text.num_layers - len(text.cross_attention_layers)} layers and each image's cross-attention K/V. "
            "GB left: a card's nominal memory minus weights and caches; activations, fast's image cache (1 GiB by "
            "default) and the CUDA context come on top.")
    if "int8" in options.weights:
        note += (" from_mllama(model, weights='int8') keeps the live model (its float weights) registered beside "
                 "its int8 copy, so today a process holds the bf16 row's bytes + the int8 matrices; the int8 row is "
                 "what the runtime computes with.")
    return note


def image_kv_note(options: ProfileOptions) -> str:
    config = options.mllama_config
    text, vision = config.text, config.vision
    per_layer = mllama_image_kv_bytes(config, options.torch_dtype) // len(text.cross_attention_layers)
    return (f"images: the cross-attention K/V of one image of {vision.max_num_tiles} tiles ({text.num_kv_heads} KV "
            f"heads x {text.head_dim} x {vision.tokens_per_image} vision tokens ({vision.max_num_tiles} x "
            f"{vision.num_patches}) x 2 (K and V) x {options.torch_dtype.itemsize} B = {per_layer / 2**20:.1f} MiB per "
            f"layer, {len(text.cross_attention_layers)} cross-attention layers); images beside the weights: the "
            f"card's nominal memory minus the weights, divided by that (no text K/V, no activations)")


def profile_mllama(options: ProfileOptions, progress: bool = True, on_row=None):
    raise NotImplementedError(f"preset={options.preset!r} on device={options.device!r}: the timed Llama 3.2 Vision "
                              f"profile is not built yet; expected device='meta'")
