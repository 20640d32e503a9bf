"""Handles to a prompt's state in FastFlamingo: what the OpenFlamingo drop-in returns as `past_key_values`.

    logits, handle = fast.forward_with_state(vision_x, lang_x, mask)             # the prompt, kept
    logits2, handle2 = fast.forward_with_state(None, new_ids, None, past=handle)  # only new_ids run
    logits3, handle3 = fast.forward_with_state(None, other_ids, None, past=handle)  # handle is unchanged

OpenFlamingo's evaluation (EvalModel.get_rank_classifications with use_cache=True) prefills the prompt once, then
for every class name feeds its tokens one per call, each call extending the previous call's past_key_values and
every class starting again from the prompt's. Its own cache object grows in place, so every class after the first
is scored against the previous classes' tokens too; here extending a handle never changes it, so every class gets
the values of the uncached forward.

A handle (PrefixState) is a segment of a sequence's self-attention KV:
- the prompt's (a root): it owns a copy of the prompt's keys/values [layers, B, H_kv, T, hd], its attention mask,
  and its rows' media K/V (every cross-attention layer's, for the images the prompt has) and the image each new
  token attends to (the row's last, as in cached decoding; docs/semantics.md);
- an extension: it owns only its new tokens' keys/values and references its parent (the chain's mask grows with
  it; new tokens are never padding).
Running a handle stages its chain into the runtime's static cache (rows [0, B), columns [0, end)) and its media
into the media cache, then runs only the new tokens (prefill.prefill_columns from column `end`). Staging
skips the leading handles already in place: `Staged` records which chain the caches hold and the caches' version
counters (every in-place write bumps them), so any other call in between (generate, score, forward) is seen and
the chain is copied in again. In OpenFlamingo's per-class loop nothing is copied: the prompt stays in place and
each token's KV is already where the next call reads it.

How many may be alive: any number; each owns its memory (`nbytes`: a root ~ its prompt's KV + its images' media
K/V, an extension its new tokens' KV) and frees it when the caller drops it, as Hugging Face's cache objects do:
the runtime remembers which chain its caches hold by weak references only.
Errors, each naming past_key_values: anything that is not a handle (a tuple of tensors, a transformers Cache), a
handle of another FastFlamingo (a drop-in's `.to()` that moves its tensors builds a new one), and a stale handle:
one made from media cached by the drop-in's cache_media() after uncache_media() (or a new cache_media()) released
them, when OpenFlamingo's own cached path stops working too.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from ..validation import check_prompt
from .prefill import prefill_columns, prefill_prompt


@dataclass(eq=False)
class MediaSession:
    """Images cached by the drop-in's cache_media(), read by forward(vision_x=None) until uncache_media()."""

    vision_x: torch.Tensor
    alive: bool = True


@dataclass(eq=False)
class PrefixState:
    """One segment of a sequence's KV (module docstring). The root holds the media and the new tokens' image."""

    owner: object  # the FastFlamingo that made it
    parent: PrefixState | None
    keys: torch.Tensor  # [layers, B, H_kv, n, hd]: this segment's columns [end - n, end)
    values: torch.Tensor
    attention_mask: torch.Tensor  # [B, end] long: the whole chain's, up to this segment's end
    session: MediaSession | None
    media_keys: torch.Tensor | None = None  # root: [xattn_layers, B, H, num_images * latents, dh]
    media_values: torch.Tensor | None = None
    decode_image: torch.Tensor | None = None  # root: [B] int32, the 0-based image new tokens see (-1 none)
    num_images: int = 0  # root: the media cache slots spanned
    root: PrefixState = field(init=False)

    def __post_init__(self) -> None:
        self.root = self if self.parent is None else self.parent.root

    @property
    def end(self) -> int:
        """Columns of the sequence up to and including this segment."""
        return self.attention_mask.shape[1]

    @property
    def start(self) -> int:
        return self.end - self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        """Memory this handle owns (not its parents')."""
        owned = [self.keys, self.values, self.attention_mask]
        if self.parent is None:
            owned += [self.media_keys, self.media_values]
        return sum(t.numel() * t.element_size() for t in owned)

    def chain(self) -> list[PrefixState]:
        """Root first, this handle last."""
        out, state = [], self
        while state is not None:
            out.append(state)
            state = state.parent
        return out[::-1]


@dataclass(eq=False)
class Staged:
    """Which chain the runtime's caches hold, and their version counters right after it was put there. The chain
    is held by weak references: the runtime never keeps a handle (and its KV and media K/V) alive after the caller
    dropped it; a dropped handle is simply no longer in place."""

    chain: list[weakref.ref]
    kv_keys: torch.Tensor
    kv_version: int
    media_keys: torch.Tensor
    media_version: int


def _version(tensor: torch.Tensor) -> int | None:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor has no version counter: never taken as unchanged
        return None


class StagedChain:
    """A runtime's record of which chain its caches hold (`runtime.staged_prefix`, written only here)."""

    def __init__(self) -> None:
        self.staged: Staged | None = None

    def record(self, runtime, chain: list[PrefixState]) -> None:
        kv, media = runtime.kv_cache.keys, runtime.media_cache.keys
        self.staged = Staged([weakref.ref(state) for state in chain], kv, _version(kv), media, _version(media))

    def in_place(self, runtime) -> list[PrefixState]:
        """The chain the caches still hold ([] when anything wrote to them since, or they were replaced)."""
        staged = self.staged
        kv, media = runtime.kv_cache.keys, runtime.media_cache.keys
        if staged is None or staged.kv_keys is not kv or staged.media_keys is not media:
            return []
        versions = (_version(kv), _version(media))
        if None in versions or versions != (staged.kv_version, staged.media_version):
            return []
        chain = [ref() for ref in staged.chain]
        return [] if None in chain else chain


def check_handle(runtime, past) -> PrefixState:
    if not isinstance(past, PrefixState):
        raise ValueError(f"past_key_values: got {type(past).__name__}; expected the handle that this model's "
                         f"forward(..., use_cache=True) returned (flamingo_fast keeps the keys/values itself)")
    if past.owner is not runtime:
        raise ValueError("past_key_values: a handle made by another model (or by this one before `.to()` moved "
                         "it); expected one that this model's forward(..., use_cache=True) returned")
    if past.root.session is not None and not past.root.session.alive:
        raise ValueError("past_key_values: stale: made from media cached by cache_media(), which uncache_media() "
                         "(or a later cache_media()) released; expected a handle made since")
    return past


def _new_tokens_mask(past: PrefixState, lang_x: torch.Tensor, attention_mask) -> torch.Tensor:
    """The chain's mask with the new tokens' ones appended. `attention_mask` may be None, the new tokens' [B, n]
    or the whole sequence's [B, end + n] (Hugging Face's convention); new tokens must be real (all ones)."""
    batch, new = lang_x.shape
    if attention_mask is not None:
        shapes = ((batch, new), (batch, past.end + new))
        if tuple(attention_mask.shape) not in shapes:
            raise ValueError(f"attention_mask: got shape {tuple(attention_mask.shape)} with past_key_values; "
                             f"expected None, the new tokens' {shapes[0]} or the whole sequence's {shapes[1]}")
        tail = attention_mask[:, -new:]
        if not bool((tail == 1).all()):
            raise ValueError("attention_mask: a new token is masked; with past_key_values the new tokens must be "
                             "real (all ones): padding belongs on the left of the prompt")
        if attention_mask.shape[1] != new and not torch.equal(
                attention_mask[:, :past.end].long().cpu(), past.attention_mask.cpu()):
            raise ValueError("attention_mask: its first columns differ from past_key_values' prompt mask; "
                             "expected the prompt's mask followed by ones")
    ones = torch.ones(batch, new, dtype=torch.long, device=past.attention_mask.device)
    return torch.cat([past.attention_mask, ones], dim=1)


def forward_with_state(runtime, vision_x, lang_x, attention_mask, past: PrefixState | None,
                       session: MediaSession | None) -> tuple[torch.Tensor, PrefixState]:
    """FastFlamingo.forward_with_state under its lock (module docstring)."""
    if runtime.options.batch_invariant:
        raise ValueError("forward_with_state (past_key_values, use_cache=True) with batch_invariant=True: not "
                         "supported; expected batch_invariant=False, or forward, generate and score")
    if past is None:
        return _run_prompt(runtime, vision_x, lang_x, attention_mask, session)
    return _run_extension(runtime, check_handle(runtime, past), lang_x, attention_mask)


def _run_prompt(runtime, vision_x, lang_x, attention_mask, session):
    attention_mask, prompt = check_prompt(runtime.config, vision_x, lang_x, attention_mask)
    prompt = runtime.prompt_images(vision_x, lang_x, None, prompt)
    runtime.check_capacity(lang_x, prompt, None)
    logits = prefill_prompt(runtime.prefill_state, vision_x, lang_x.long(), attention_mask, prompt, all_logits=True)
    batch, length = lang_x.shape
    num_images = max(prompt.slots)
    span = num_images * runtime.media_cache.num_latents
    kv, media = runtime.kv_cache, runtime.media_cache
    state = PrefixState(runtime, None, kv.keys[:, :batch, :, :length].clone(),
                        kv.values[:, :batch, :, :length].clone(), attention_mask.clone(), session,
                        media.keys[:, :batch, :, :span].clone(), media.values[:, :batch, :, :span].clone(),
                        prompt.decode_image.clone(), num_images)
    runtime.staged_prefix.record(runtime, [state])
    return logits, state


def _run_extension(runtime, past: PrefixState, lang_x, attention_mask):
    config = runtime.config
    batch = past.attention_mask.shape[0]
    if not isinstance(lang_x, torch.Tensor) or lang_x.dim() != 2 or lang_x.shape[0] != batch or not lang_x.shape[1] \
            or lang_x.dtype not in (torch.int64, torch.int32):
        got = tuple(lang_x.shape) if isinstance(lang_x, torch.Tensor) else type(lang_x).__name__
        raise ValueError(f"lang_x: got {got} with past_key_values; expected the new token ids only, "
                         f"[{batch}, n >= 1] int64 (past_key_values holds {batch} rows)")
    vocab = config.lm.vocab_size
    if int(lang_x.min()) < 0 or int(lang_x.max()) >= vocab:
        raise ValueError(f"lang_x: token ids span [{int(lang_x.min())}, {int(lang_x.max())}]; expected ids in "
                         f"[0, {vocab})")
    if bool((lang_x == config.media_token_id).any()):
        raise ValueError(f"lang_x: holds <image> ({config.media_token_id}) with past_key_values; new tokens attend "
                         f"to the prompt's last image: expected text tokens only")
    new = lang_x.shape[1]
    total = past.end + new
    if total > runtime.kv_cache.max_seq_len:
        raise ValueError(f"past_key_values: {past.end} columns + {new} new tokens = {total} exceed max_seq_len="
                         f"{runtime.kv_cache.max_seq_len} of this FastFlamingo")
    mask = _new_tokens_mask(past, lang_x, attention_mask).to(runtime.device)
    chain = past.chain()
    in_place = runtime.staged_prefix.in_place(runtime)
    kept = 0
    while kept < min(len(chain), len(in_place)) and chain[kept] is in_place[kept]:
        kept += 1
    kv, media, root = runtime.kv_cache, runtime.media_cache, past.root
    if kept == 0:  # the prompt's media too: nothing of this chain is in place
        span = root.media_keys.shape[3]
        media.keys[:, :batch, :, :span] = root.media_keys
        media.values[:, :batch, :, :span] = root.media_values
    for state in chain[kept:]:
        kv.keys[:, :batch, :, state.start:state.end] = state.keys
        kv.values[:, :batch, :, state.start:state.end] = state.values
    ids = torch.cat([lang_x.new_zeros(batch, past.end), lang_x], dim=1).long().to(runtime.device)  # [0, end) unread
    image_index = root.decode_image.to(runtime.device)[:, None].expand(batch, total)
    logits = prefill_columns(runtime.prefill_state, ids, mask, image_index, root.num_images, all_logits=True,
                             start=past.end)
    state = PrefixState(runtime, past, kv.keys[:, :batch, :, past.end:total].clone(),
                        kv.values[:, :batch, :, past.end:total].clone(), mask, None)
    runtime.staged_prefix.record(runtime, chain + [state])
    return logits, state

