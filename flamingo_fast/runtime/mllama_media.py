"""Llama 3.2 Vision's media K/V: the vision tower once per image, each cross-attention layer's keys and values
once per image, and an image cache across calls.

    media = encode_media(reference, cross_layers, images, tokens, cache)     # -> MllamaMedia

Every image slot of every row is encoded (a token that sees no image attends to all of its row's vision tokens,
padded slots included, as transformers does), each slot on its own: pixel_values[b, i] with its aspect-ratio id
and mask row. The slots' keys and values are laid out as the segment kernels read them, [cross layers, B, KV heads,
slots * tiles * tile_len, head_dim]; cross_attention_mask becomes per-token tile ranges (layers.segment_tile_ranges).

The image cache (a ContextCache's "image" entries, byte-budgeted, least recently used first out): a slot's keys and
values [cross layers, KV heads, tiles * tile_len, head_dim] keyed by the digest of its pixels (context_cache.
image_digests), its aspect-ratio id and mask row. Few-shot prompts that repeat their demonstration images encode
only the new ones; the padded slots of a batch share one entry. Only images are cached, not the text of a context:
under transformers' rule a token before a row's first image attends to every vision token of the row, the query's
image included, so a context's self-attention keys and values depend on the images after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference.mllama import MllamaReference
from .context_cache import ContextCache, image_digests
from .layers import segment_tile_ranges
from .mllama_inputs import MllamaImages


@dataclass
class MllamaMedia:
    """The media K/V of one call and who sees what."""

    keys: torch.Tensor  # [cross layers, B, KV heads, slots * tiles * tile_len, head_dim]
    values: torch.Tensor
    tile_start: torch.Tensor  # [B, T] int32 (ALL_TILES: every tile of the row)
    tile_end: torch.Tensor  # [B, T] int32
    tile_valid: torch.Tensor  # [B, slots * tiles] bool
    row_sees: torch.Tensor  # [B, T] bool: the token sees an image (else its MLP branch is zeroed)
    tile_len: int


def _slot_kv(reference: MllamaReference, cross_layers: list[int], pixels: torch.Tensor, ids: torch.Tensor,
             masks: torch.Tensor, dtype: torch.dtype, timer=None) -> tuple[torch.Tensor, torch.Tensor]:
    """M image slots ([M, tiles, C, H, W], [M], [M, tiles]) -> keys, values [cross layers, M, KV heads,
    tiles * tile_len, head_dim]; `timer` (a PhaseTimer) laps "vision" after the tower and projector."""
    states = reference.vision_states(pixels[:, None].to(dtype), ids[:, None], masks[:, None]).to(dtype)
    if timer is not None:
        timer.lap("vision")
    layers = reference.language_model.layers
    kv = [layers[i].media_kv(states) for i in cross_layers]
    return torch.stack([k for k, _ in kv]), torch.stack([v for _, v in kv])


def encode_media(reference: MllamaReference, cross_layers: list[int], images: MllamaImages, tokens: int,
                 cache: ContextCache, dtype: torch.dtype, alone: bool = False, timer=None) -> MllamaMedia:
    """The module docstring's steps for one call's images (checked: runtime/mllama_inputs.py). alone: the slots to
    encode go through the vision tower and the K/V projections one per call (the batch-invariant mode: an image's
    bits then do not depend on how many are encoded with it, and a cached image is bitwise the uncached one).
    `timer` (a PhaseTimer, the profiler's) laps "vision" (the cache look-up and the new images' tower and projector)
    and "media_kv" (their cross-attention K/V, the cache write and the layout)."""
    pixels = images.pixel_values
    b, slots = pixels.shape[:2]
    flat_pixels = pixels.flatten(0, 1)
    flat_ids, flat_masks = images.aspect_ratio_ids.flatten(0, 1), images.aspect_ratio_mask.flatten(0, 1)
    if cache.budget:
        digests = image_digests(flat_pixels)
        keys_of = [(d, i, tuple(m)) for d, i, m in zip(digests, flat_ids.tolist(), flat_masks.tolist(), strict=True)]
        found = {key: entry for key in dict.fromkeys(keys_of) if (entry := cache.get("image", key)) is not None}
    else:
        keys_of, found = list(range(b * slots)), {}
    first_of = {}
    for n, key in enumerate(keys_of):  # the slots to encode: the first of each key the cache does not hold
        if key not in found:
            first_of.setdefault(key, n)
    if first_of:
        new = list(first_of.values())
        parts = []
        for group in ([[n] for n in new] if alone else [new]):
            index = torch.tensor(group, device=pixels.device)
            parts.append(_slot_kv(reference, cross_layers, flat_pixels[index], flat_ids[index], flat_masks[index],
                                  dtype, timer))
        keys, values = parts[0] if len(parts) == 1 else (torch.cat([k for k, _ in parts], dim=1),
                                                         torch.cat([v for _, v in parts], dim=1))
        for j, key in enumerate(first_of):
            found[key] = cache.put("image", key, keys[:, j].clone(), values[:, j].clone()) if cache.budget else \
                SimpleEntry(keys[:, j], values[:, j])
    elif timer is not None:  # every image cached: no tower ran
        timer.lap("vision")
    order = [found[key] for key in keys_of]
    x, kv_heads, per_slot, head_dim = order[0].keys.shape

    def laid_out(part: str) -> torch.Tensor:  # [X, B * slots, KV, S1, dh] -> [X, B, KV, slots * S1, dh]
        stacked = torch.stack([getattr(entry, part) for entry in order], dim=1)
        return stacked.view(x, b, slots, kv_heads, per_slot, head_dim).transpose(2, 3) \
            .reshape(x, b, kv_heads, slots * per_slot, head_dim)

    start, end, valid = segment_tile_ranges(images.cross_attention_mask[:, :tokens], check=True)
    if timer is not None:
        timer.lap("media_kv")
    return MllamaMedia(laid_out("keys"), laid_out("values"), start, end, valid, start >= 0,
                       reference.config.vision.num_patches)


@dataclass
class SimpleEntry:
    """A slot's keys and values when the cache is off."""

    keys: torch.Tensor
    values: torch.Tensor
