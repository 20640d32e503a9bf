"""A prompt, before decoding: its images' media K/V, its cached context staged, the rest through the layers.

    1. vision: only the images some token of a row sees are encoded, all rows' as one batch (images already in
       the context cache are not); resampled by the kernel-backed perceiver.
    2. media K/V: every cross-attention layer's keys/values of all images, once (MediaKVCache).
    3. prefill: the prompt through the LM (segment-indexed cross-attention kernel, SDPA self-attention), its
       keys/values written into the StaticKVCache; logits only for the last position. Contexts found in the
       context cache (context_cache.plan_contexts says which) are copied into their rows' columns first.

Functions of explicit state, as the decode step is (decode.py): `PrefillState` holds everything prefill reads
(the caches, the layer wiring layers.LayerStack, the vision encoder and perceiver); FastFlamingo
(runtime.py) owns one. Prefill is never captured in a CUDA graph; the decode step is.

    logits = prefill_prompt(state, vision_x, lang_x, attention_mask, prompt)     # images, contexts, the prompt
    logits = prefill_columns(state, lang_x, attention_mask, image_index, num_images, start=end)   # the LM only
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import masking
from ..config import FlamingoConfig
from ..positions import alibi_attention_bias, rotary_cos_sin, self_attention_mask
from ..timing import PhaseTimer
from .caches import MediaKVCache, StaticKVCache
from .context_cache import ContextCache, image_digests, plan_contexts
from .layers import FastPerceiverResampler, LayerStack


@dataclass(frozen=True)
class PrefillState:
    """What prefill reads besides its inputs. The caches are allocated once and written in place."""

    config: FlamingoConfig
    vision_encoder: nn.Module
    perceiver: FastPerceiverResampler
    stack: LayerStack
    kv: StaticKVCache
    media: MediaKVCache
    context_cache: ContextCache
    dtype: torch.dtype  # the images' dtype for the vision encoder
    device: torch.device
    # OpenFlamingo's all-previous mode with the pre-image bug (config.openflamingo_pre_image_bug): every image
    # given is encoded, and contexts are never reused
    pre_image_bug: bool
    # the batch-invariant mode (invariant.py): images are encoded one per call, and a row's context always runs
    # alone before the rest of its prompt (cache hit, miss or off: the same calls)
    batch_invariant: bool = False


def _image_keys(state: PrefillState, vision_x, counts: list[int]) -> list[list]:
    """Per row, a content key for each of its first counts[b] images (image_digests, read in place, one host
    sync per row); None for every image when the cache is off (then no two images are taken as equal)."""
    if state.context_cache.budget == 0 or vision_x is None:
        return [[None] * n for n in counts]
    return [image_digests(vision_x[b, :n]) if n else [] for b, n in enumerate(counts)]


def _encode(state: PrefillState, images: torch.Tensor, timer: PhaseTimer | None):
    """images [n, F, C, H, W] through the vision encoder, the perceiver and every gated layer's to_kv, as one
    batch -> (keys, values) [n, X, H, NL, dh]."""
    patch_tokens = state.vision_encoder(images.flatten(0, 1).to(state.dtype))
    latents = state.perceiver(patch_tokens.view(1, len(images), images.shape[1], *patch_tokens.shape[1:]))[0]
    if timer is not None:  # the reference's vision phase ends here too: it projects to_kv in prefill
        timer.lap("vision")
    kv = [block.media_kv(latents[None]) for block in state.stack.xattn.values()]  # per layer [1, H, n*NL, dh]

    def per_image(t):  # [X, H, n * NL, dh] -> [n, X, H, NL, dh]
        return t.unflatten(2, (len(images), state.media.num_latents)).permute(2, 0, 1, 3, 4)

    return per_image(torch.stack([k[0] for k, _ in kv])), per_image(torch.stack([v[0] for _, v in kv]))


def _fill_media(state: PrefillState, vision_x, needed: list[list[int]], keys: list[list], store: set,
                timer: PhaseTimer | None) -> None:
    """Media K/V cache: image slot i of row b for every i in needed[b]. Each distinct image is taken from the
    context cache or, when missing, encoded (one batch through the vision encoder, the perceiver and every
    gated layer's to_kv; one image per call in the batch-invariant mode); the new ones whose key is in `store`
    (context images, never queries) are kept."""
    pairs = [(b, i) for b, slots in enumerate(needed) for i in slots]
    cache = state.context_cache
    entries: dict = {}  # key (or the pair itself with the cache off) -> (keys, values) [X, H, NL, dh]
    missing: dict = {}  # key -> the first (b, i) that holds it
    for b, i in pairs:
        key = keys[b][i] if keys[b][i] is not None else (b, i)
        if key in entries or key in missing:
            continue
        entry = cache.get("image", key) if keys[b][i] is not None else None
        if entry is not None:
            entries[key] = (entry.keys, entry.values)
        else:
            missing[key] = (b, i)
    if missing:
        where = list(missing.values())
        images = vision_x[[b for b, _ in where], [i for _, i in where]]  # [n, F, C, H, W]
        # batch-invariant: one image per call, each a fresh tensor, so that no image's bits depend on the others
        groups = [images[m:m + 1].clone() for m in range(len(where))] if state.batch_invariant else [images]
        encoded = [_encode(state, group, timer) for group in groups]
        new_keys = torch.cat([k for k, _ in encoded]) if len(encoded) > 1 else encoded[0][0]
        new_values = torch.cat([v for _, v in encoded]) if len(encoded) > 1 else encoded[0][1]
        for m, key in enumerate(missing):
            entries[key] = (new_keys[m], new_values[m])
            if key in store:
                cache.put("image", key, new_keys[m].clone(), new_values[m].clone())
    elif timer is not None:
        timer.lap("vision")
    if pairs:
        chosen = [entries[keys[b][i] if keys[b][i] is not None else (b, i)] for b, i in pairs]
        rows = torch.tensor([b for b, _ in pairs], device=state.device)
        slots = torch.tensor([i for _, i in pairs], device=state.device)
        state.media.write_images(rows, slots, torch.stack([k for k, _ in chosen]),
                                 torch.stack([v for _, v in chosen]))
    if timer is not None:
        timer.lap("media_kv")


def prefill_prompt(state: PrefillState, vision_x, lang_x, attention_mask, prompt: masking.PromptImages,
                   timer: PhaseTimer | None = None, all_logits: bool = False, reuse: bool = True) -> torch.Tensor:
    """Images, then the prompt through the LM into the static cache -> logits (of the last position, or of
    every position with `all_logits`).

    With `reuse` (generate and score, the cache on, not the pre-image-bug mode), a row's context (every token
    before the first one that sees its last image: its last `<image>`) is taken from the context cache when
    its tokens, what each of them sees, and its images were seen before;
    a missing context that several rows share is computed once, alone; one that a single row has runs with
    its prompt and is copied out afterwards; both are stored (context_cache.plan_contexts). Contexts are
    copied into their rows' cache columns and only the rest of the prompt runs: the columns from the earliest
    row's query on. In the immediate mode a row whose context was cached needs only the images its remaining
    tokens see."""
    alone = state.batch_invariant  # contexts split off even with the cache off, and never copied out
    reuse = (alone or reuse and state.context_cache.budget > 0) and not state.pre_image_bug and not all_logits
    slots = prompt.slots
    keys = _image_keys(state, vision_x, slots)
    # a row whose context is cached reads only its query's images, unless a generated <image> may turn it to
    # its first image (openflamingo_generated_image_bug): then every image it shows
    query_images_only = state.config.only_attend_immediate_media and not state.config.openflamingo_generated_image_bug
    plan = plan_contexts(state.context_cache, lang_x, attention_mask, prompt, keys, reuse, query_images_only,
                         alone)
    _fill_media(state, vision_x, plan.needed, keys, plan.store, timer)
    num_images = max(slots)
    kv, context_end = state.kv, plan.context_end
    for b, (first, key) in plan.spans.items():  # stage each cached (or computed) context in its row
        entry = plan.cached.get(key)
        if entry is None:
            end = context_end[b]
            entry = plan.cached[key] = compute_context(state, key, b, lang_x[b:b + 1, first:end],
                                                       prompt.image_index[b:b + 1, first:end], len(key[2]))
        kv.keys[:, b, :, first:context_end[b]] = entry.keys
        kv.values[:, b, :, first:context_end[b]] = entry.values
    logits = prefill_columns(state, lang_x, attention_mask, prompt.image_index, num_images, all_logits=all_logits,
                             start=plan.start)
    for b, key in plan.copy_out.items():
        first, length = context_end[b], len(key[0])
        state.context_cache.put("context", key, kv.keys[:, b, :, first:first + length].clone(),
                                kv.values[:, b, :, first:first + length].clone())
    return logits


def compute_context(state: PrefillState, key, row: int, context_ids: torch.Tensor, image_index: torch.Tensor,
                    images: int):
    """Run one row's context alone (static-cache row `row`, whose media are already in place) and store its
    keys/values in the context cache (or keep them for this call only when they exceed the budget)."""
    length = context_ids.shape[1]
    prefill_columns(state, context_ids, torch.ones_like(context_ids), image_index, images, row=row, logits=False)
    kv = state.kv
    return state.context_cache.put("context", key, kv.keys[:, row, :, :length].clone(),
                                   kv.values[:, row, :, :length].clone())


def prefill_columns(state: PrefillState, lang_x, attention_mask, image_index: torch.Tensor, num_images: int,
                    all_logits: bool = False, start: int = 0, row: int | None = None,
                    logits: bool = True) -> torch.Tensor | None:
    """The prompt's columns [start, T) through the LM; columns [0, start) are already in the static cache
    (staged contexts). image_index [B, T] int32: the image each token sees; num_images: the media cache's
    slots to span. `row`: run one prompt in that static/media cache row instead of rows [0, B)."""
    stack = state.stack
    lm, model = stack.lm, stack.lang_encoder
    batch, prompt_len = lang_x.shape
    rows = slice(0, batch) if row is None else slice(row, row + 1)
    kv = state.kv
    kv.key_valid[rows].zero_()
    kv.key_valid[rows, :prompt_len] = attention_mask.bool()
    positions = masking.positions_from_mask(attention_mask)[:, start:]
    image_index = image_index[:, start:]
    x = model.embed_tokens(lang_x[:, start:])
    queries = prompt_len - start
    rope = None if lm.alibi else rotary_cos_sin(positions, lm.rotary_dim, lm.rope_theta, x.dtype)
    padded = not bool(attention_mask.all())
    allowed = self_attention_mask(attention_mask, queries)
    if lm.alibi:  # an additive bias cannot be combined with is_causal: always a full mask
        mask = alibi_attention_bias(allowed, stack.alibi_slopes, x.dtype)
    else:
        mask = allowed if padded or start else None
    causal = mask is None
    gqa = lm.num_heads != lm.num_kv_heads
    span = num_images * state.media.num_latents

    def cross(idx, x, h):
        slot = stack.xattn_slot[idx]
        keys = state.media.keys[slot, rows, :, :span] if num_images else None
        values = state.media.values[slot, rows, :, :span] if num_images else None
        return stack.xattn[idx].prefill(x, h, keys, values, image_index, stack.input_norms[idx])

    def attend(idx, q, k, v):
        kv.keys[idx, rows, :, start:prompt_len] = k
        kv.values[idx, rows, :, start:prompt_len] = v
        keys, values = kv.keys[idx, rows, :, :prompt_len], kv.values[idx, rows, :, :prompt_len]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    h = stack.layers(x, rope, cross, attend)
    if not logits:
        return None
    return model.output_head(h if all_logits else h[:, -1])
