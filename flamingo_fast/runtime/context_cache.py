"""The few-shot context cache: content-addressed, byte-budgeted, least recently used first out.

Two kinds of entries share one budget and one recency order:
- an image: its cross-attention keys/values in every gated layer, [X, H, n_latents, dh] each, keyed by a digest of
  the image tensor's bytes (taken on its device) with its shape and dtype;
- a context: the self-attention keys/values of every decoder layer over a row's demonstrations,
  [layers, H_kv, L, hd] each, keyed by its token ids and the digests of the images its `<image>` tokens refer to.
  A row's context is everything before its last `<image>` (the query's image and question follow it); its keys
  and values depend only on those tokens and images, with positions counted from the row's first real token, so
  left padding never changes them.
Queries are never inserted (thousands of them would evict the context). Entries are plain tensors; this module
runs no model code. Not thread-safe by itself: FastFlamingo calls it under its lock.

`plan_contexts` decides, for one call, which rows' contexts hit, which to compute and which to store, and which
image slots the call reads (ContextPlan); prefill.py carries the plan out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..masking import PromptImages


@dataclass
class CacheStats:
    context_hits: int = 0
    context_misses: int = 0
    image_hits: int = 0
    image_misses: int = 0
    evictions: int = 0
    bytes: int = 0
    budget: int = 0
    contexts: int = 0
    images: int = 0


_WEIGHTS: dict[tuple[int, torch.device], torch.Tensor] = {}


def image_digests(images: torch.Tensor, chunk: int = 16) -> list[tuple]:
    """images [N, ...] -> one hashable key per image, computed on the images' device `chunk` images at a time,
    one host sync for the batch: its raw bytes read as int32 words, and two sums of the words times fixed
    pseudo-random odd int32 weights (products wrap modulo 2^32; the int64 sums are exact), with shape and dtype.
    An odd weight is invertible modulo 2^32, so changing any single word always changes both sums; distinct
    images collide only by chance, about once in 2^64. (Two int32 passes: 5x faster than int64 products on the
    2-core CPU, 10 ms for 132 images of 224 px.)"""
    n = images.shape[0]
    raw = images.contiguous().view(n, -1).view(torch.uint8)
    aligned = raw.shape[1] % 4 == 0 and raw.storage_offset() % 4 == 0
    words = raw.view(torch.int32) if aligned else raw.to(torch.int32)  # else one word per byte: slower, as exact
    length = words.shape[1]
    key = (length, words.device)
    if key not in _WEIGHTS:
        g = torch.Generator().manual_seed(20261129)
        odd = torch.randint(-(2**30), 2**30, (2, length), generator=g, dtype=torch.int32) * 2 + 1
        _WEIGHTS[key] = odd.to(words.device)
    weights = _WEIGHTS[key]
    sums = torch.cat([torch.stack([(part * w).sum(dim=-1, dtype=torch.int64) for w in weights], dim=1)
                      for part in words.split(chunk)])  # [N, 2]
    tail = (tuple(images.shape[1:]), str(images.dtype))
    return [(a, b, *tail) for a, b in sums.tolist()]


@dataclass
class _Entry:
    keys: torch.Tensor
    values: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


@dataclass
class ContextCache:
    """LRU over images and contexts under `budget` bytes (0: nothing is ever stored)."""

    budget: int
    entries: OrderedDict = field(default_factory=OrderedDict)  # ("image" | "context", key) -> _Entry
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.stats.budget = self.budget

    def get(self, kind: str, key) -> _Entry | None:
        entry = self.entries.get((kind, key))
        if entry is not None:
            self.entries.move_to_end((kind, key))
        name = "context" if kind == "context" else "image"
        field_name = f"{name}_{'hits' if entry is not None else 'misses'}"
        setattr(self.stats, field_name, getattr(self.stats, field_name) + 1)
        return entry

    def put(self, kind: str, key, keys: torch.Tensor, values: torch.Tensor) -> _Entry:
        """Store (a copy is the caller's business: the tensors are kept as given). An entry larger than the
        whole budget is returned but not stored; older entries are evicted until the new one fits."""
        entry = _Entry(keys, values)
        if entry.nbytes > self.budget or (kind, key) in self.entries:
            return self.entries.get((kind, key), entry)
        while self.stats.bytes + entry.nbytes > self.budget:
            (old_kind, _), old = self.entries.popitem(last=False)
            self._account(old_kind, old, -1)
            self.stats.evictions += 1
        self.entries[(kind, key)] = entry
        self._account(kind, entry, +1)
        return entry

    def _account(self, kind: str, entry: _Entry, sign: int) -> None:
        self.stats.bytes += sign * entry.nbytes
        if kind == "context":
            self.stats.contexts += sign
        else:
            self.stats.images += sign

    def clear(self) -> None:
        self.entries.clear()
        self.stats.bytes = self.stats.contexts = self.stats.images = 0


@dataclass
class ContextPlan:
    """How one call's rows use the context cache (plan_contexts).

    context_end  per row: where its context ends; == its real start: no context
    spans        row -> (real start, context key) of each context staged from the cache before the prompt runs
                 (cached, or computed once, alone, when several rows share it); a key is (token ids, what each
                 token sees, the keys of the images it sees)
    cached       context key -> cache entry, for the contexts already cached (computed ones are added)
    copy_out     row -> context key of a missing context that only this row has: it runs with its prompt and
                 is copied out of the row afterwards
    store        image keys to keep in the cache: the contexts' images, never the queries'
    start        the first column the prompt runs from (columns before it are staged)
    needed       per row, the image slots this call reads
    """

    context_end: list[int]
    spans: dict[int, tuple]
    cached: dict
    copy_out: dict[int, tuple]
    store: set
    start: int
    needed: list[list[int]]


def plan_contexts(cache: ContextCache, lang_x: torch.Tensor, attention_mask: torch.Tensor, prompt: PromptImages,
                  image_keys: list[list], reuse: bool, immediate: bool, alone: bool = False) -> ContextPlan:
    """With `reuse`, a row's context (every token before the first one that sees its last image: its last
    `<image>`) is taken from the cache when its tokens, what each of them sees, and its images were seen
    before; a missing context that several rows share is computed once, alone; one that a single row has runs
    with its prompt and is copied out afterwards (`alone`: it is computed alone too, as the batch-invariant
    mode needs); both are stored. In the `immediate` mode a row whose context was cached needs only the images
    its remaining tokens see. Looks the contexts up (counted as hits/misses)."""
    batch, prompt_len = lang_x.shape
    context_end = [0] * batch  # per row: where its context ends; == real start: no context
    spans: dict[int, tuple] = {}  # row -> (real start, context key)
    if reuse:
        ids, sight = lang_x.tolist(), prompt.image_index.tolist()
        real_start = (attention_mask.long().cumsum(dim=1) == 0).sum(dim=1).tolist()
        for b in range(batch):
            context_end[b] = real_start[b]
            last = prompt.visible[b][-1] if prompt.visible[b] else None
            last_image = next((t for t in range(real_start[b], prompt_len) if sight[b][t] == last), None)
            if last_image is not None and last_image > real_start[b]:
                context_end[b] = last_image
                seen = sight[b][real_start[b]:last_image]
                spans[b] = (real_start[b], (tuple(ids[b][real_start[b]:last_image]), tuple(seen),
                                            tuple(image_keys[b][:max(seen) + 1])))
    store = {k for _, key in spans.values() for k in key[2]}  # context images are kept, never queries
    # Contexts already cached. A missing one that several rows share is computed, once, alone; one that a
    # single row has runs with the rest of its prompt and is copied out of its row afterwards.
    cached, rows_of = {}, {}
    for b, (_, key) in spans.items():
        rows_of.setdefault(key, []).append(b)
    for key in rows_of:
        entry = cache.get("context", key)
        if entry is not None:
            cached[key] = entry
    copy_out = {} if alone else {rows[0]: key for key, rows in rows_of.items()
                                 if key not in cached and len(rows) == 1}
    for b in copy_out:
        context_end[b] = spans.pop(b)[0]
    start = min(context_end)
    # Image slots this call reads: all of them, except that (immediate mode) a row whose context is cached
    # reads only the images of its tokens from `start` on (the query's).
    image_index = prompt.image_index[:, start:].tolist() if cached else None
    needed = []
    for b in range(batch):
        if immediate and b in spans and spans[b][1] in cached:
            needed.append(sorted({i for i in image_index[b] if i >= 0}))
        else:
            needed.append(prompt.visible[b])
    return ContextPlan(context_end, spans, cached, copy_out, store, start, needed)
