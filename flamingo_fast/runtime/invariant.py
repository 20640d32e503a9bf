"""The batch-invariant mode (`batch_invariant=True`): every row of a call is computed alone.

    fast = FastFlamingo.from_reference(model, batch_invariant=True)
    ids = fast.generate(vision_x, lang_x, mask)     # row b's bits = those of row b alone, without its padding

A matmul's bits for one row depend on how many rows share the call, and even on the row's place in it (MKL's
and cuBLAS's algorithm and split of K follow the shape; so does the int8 kernel's split-K). No choice of tiles
over such libraries makes a batched call invariant, so this mode makes the calls themselves identical: a row's
computation runs the same sequence of ops on tensors of the same shapes, whatever else is in the batch.

- Each row runs as a batch of one, its left padding removed (fresh contiguous tensors), through the same
  prefill and decode functions as the default (prefill.py, decode.py), in static-cache row 0.
- Its images are encoded one per call (vision encoder, perceiver, media K/V: prefill.py), so the number of
  images in a call never changes an image's bits; the context cache stores those same per-image results.
- Its few-shot context (every token before its last `<image>`) always runs alone as its own prefill call before
  the rest of the prompt: on a cache hit it is staged from the cache instead, and with the cache off or on a miss
  it is computed the same way (context_cache.plan_contexts with `alone`: no copy out of the row afterwards).
  So cold, warm and cache-off calls run the same calls after the context.
- Beams: a row's hypotheses run together (the row alone), from the same prefill as a plain call, so the first
  step's logits are those of a greedy call. `score`: one hypothesis per pass whatever score_bytes allows, so a
  candidate's log-likelihood runs the steps of its own prefix only (score_bytes only bounds that pass).
- The outputs are assembled in the default's layout: the prompt with its left padding, new tokens padded with
  pad_token_id to the longest row; forward's logits at a row's left padding are 0 (the default computes them
  over masked inputs: they mean nothing). With `return_logits`, each row runs all max_new_tokens steps (feeding
  pad tokens after its stop, as a finished row does in a batch), so that its logits cover the batch's length.
- Sampling: one generator (the one given, or torch's global one) is consumed row after row, each row's draws
  from where the row before it left it (past the row's last kept draw, as sample_search restores it). A row's
  logits, and its draws given the generator's state, are invariant; which state it starts from depends on the
  rows before it, so sampled tokens are invariant only for a row that comes first (e.g. a query alone).

What stays shared is the runtime's own construction (its caches' capacities and options): the guarantee is for
one FastFlamingo, or equal ones. OpenFlamingo's generated-<image> behaviour couples a batch's rows by definition
and is refused with this mode (options.py); forward_with_state is refused (prefix_state.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..generation.scoring import hypotheses_per_row, hypothesis_bytes, score_candidates
from ..generation.search import Decoder, GenerationOptions, generate_ids
from ..masking import PromptImages
from .caches import TailKVCache
from .prefill import prefill_prompt

if TYPE_CHECKING:
    from ..timing import PhaseTimer
    from .runtime import FastFlamingo


@dataclass(frozen=True)
class Row:
    """One row of a call, alone: its inputs without its left padding (fresh tensors), and where they start."""

    vision_x: torch.Tensor | None  # [1, N, F, C, H, W]
    lang_x: torch.Tensor  # [1, T - start] long
    attention_mask: torch.Tensor  # [1, T - start]
    image_attention_mask: torch.Tensor | None  # [1, T - start, N] (IDEFICS layout)
    prompt: PromptImages
    start: int  # the row's left padding in the call


def rows_alone(fast: FastFlamingo, vision_x, lang_x, attention_mask, image_attention_mask) -> list[Row]:
    """The call's rows, each as a prompt of its own (inputs already checked)."""
    padding = (attention_mask.long().cumsum(dim=1) == 0).sum(dim=1).tolist()
    rows = []
    for b, start in enumerate(padding):
        vision = None if vision_x is None else vision_x[b:b + 1].clone()
        ids = lang_x[b:b + 1, start:].long().clone()
        mask = attention_mask[b:b + 1, start:].clone()
        seen = None if image_attention_mask is None else image_attention_mask[b:b + 1, start:].clone()
        rows.append(Row(vision, ids, mask, seen, fast.prompt_images(vision, ids, seen), start))
    return rows


def forward(fast: FastFlamingo, vision_x, lang_x, attention_mask, image_attention_mask) -> torch.Tensor:
    """FastFlamingo.forward, row by row -> logits [B, T, vocab] (0 at each row's left padding)."""
    out = None
    for b, row in enumerate(rows_alone(fast, vision_x, lang_x, attention_mask, image_attention_mask)):
        logits = prefill_prompt(fast.prefill_state, row.vision_x, row.lang_x, row.attention_mask, row.prompt,
                                all_logits=True)[0]
        if out is None:
            out = logits.new_zeros(lang_x.shape[0], lang_x.shape[1], logits.shape[-1])
        out[b, row.start:] = logits
    return out


class RecordingDecoder:
    """A decoder that keeps every step's logits (float32 copies), after the prompt's: the logits each token of
    the row was chosen from, also past the row's stop."""

    def __init__(self, decoder: Decoder, first_logits: torch.Tensor):
        self.decoder, self.logits = decoder, [first_logits.to(torch.float32, copy=True)]

    def fork(self, per_row: int, shared: bool | None = None) -> None:
        self.decoder.fork(per_row, shared)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self.decoder.step(tokens)
        self.logits.append(logits.to(torch.float32, copy=True))  # a graph's output buffer is reused
        return logits

    def reorder(self, index: torch.Tensor) -> None:
        self.decoder.reorder(index)


def generate(fast: FastFlamingo, vision_x, lang_x, attention_mask, image_attention_mask, options: GenerationOptions,
             generator: torch.Generator | None, timer: PhaseTimer | None, return_logits: bool):
    """FastFlamingo.generate_from_options, row by row (inputs checked) -> what the default returns."""
    rows = rows_alone(fast, vision_x, lang_x, attention_mask, image_attention_mask)

    def prefill_of(row: Row):
        return lambda: fast.prefill(row.vision_x, row.lang_x, row.attention_mask, row.prompt, timer)

    return generate_rows([(prefill_of(row), row.lang_x) for row in rows], lang_x, options, fast.config.lm.vocab_size,
                         generator, timer, return_logits, fast.stop_check_interval)


def generate_rows(rows: list[tuple[Callable[[], tuple[Decoder, torch.Tensor]], torch.Tensor]], lang_x: torch.Tensor,
                  options: GenerationOptions, vocab: int, generator: torch.Generator | None, timer: PhaseTimer | None,
                  return_logits: bool, stop_check_interval: int):
    """The search of generate_ids for each row alone, in order, then the outputs in the default's layout (module
    docstring). rows: per row of lang_x [B, T], (its prefill: () -> (decoder, first logits [1, vocab]), its prompt
    [1, T - its padding]); one `generator` consumed row after row -> ids [B * num_sequences, T + new] (and the
    float32 logits [B, new, vocab] with return_logits)."""
    if options.max_new_tokens == 0 or (return_logits and options.num_beams > 1):  # no model call, or its error
        return generate_ids(None, lang_x.long(), options, vocab, return_logits=return_logits)
    # with return_logits every row runs all steps (no early stop check), so its logits cover the batch's length
    interval = options.max_new_tokens if return_logits else stop_check_interval
    new_tokens, recorded = [], []
    for row_prefill, row_ids in rows:
        def prefill(row_prefill=row_prefill):
            decoder, first_logits = row_prefill()
            if not return_logits:
                return decoder, first_logits
            recorded.append(RecordingDecoder(decoder, first_logits))
            return recorded[-1], first_logits

        ids = generate_ids(prefill, row_ids, options, vocab, generator=generator, timer=timer,
                           stop_check_interval=interval)
        new_tokens.append(ids[:, row_ids.shape[1]:])
    length = max(t.shape[1] for t in new_tokens)
    prompt = lang_x.long().repeat_interleave(options.num_sequences, dim=0)
    out = torch.full((prompt.shape[0], prompt.shape[1] + length), options.pad_token_id, dtype=torch.long,
                     device=prompt.device)
    out[:, :prompt.shape[1]] = prompt
    for b, tokens in enumerate(new_tokens):
        out[b * len(tokens):(b + 1) * len(tokens), prompt.shape[1]:prompt.shape[1] + tokens.shape[1]] = tokens
    if not return_logits:
        return out
    return out, torch.cat([torch.stack(r.logits[:length], dim=1) for r in recorded])


def score(fast: FastFlamingo, vision_x, lang_x, attention_mask, image_attention_mask,
          candidates: list[tuple[int, ...]], normalize_length: bool, progress: bool | None) -> torch.Tensor:
    """FastFlamingo.score, row by row and one hypothesis per pass (inputs checked) -> [B, C] float32."""
    longest = max(len(t) for t in candidates)
    per_row = min(1, hypotheses_per_row(candidates, 1, fast.score_bytes,
                                        hypothesis_bytes(fast.config, fast.dtype, longest - 1)))
    scores = []
    for row in rows_alone(fast, vision_x, lang_x, attention_mask, image_attention_mask):
        first_logits = prefill_prompt(fast.prefill_state, row.vision_x, row.lang_x, row.attention_mask,
                                      row.prompt).float()
        tail = TailKVCache.allocate(fast.config, 1, longest - 1, fast.dtype, fast.device) if per_row else None
        decoder = fast.decoder(row.lang_x, row.attention_mask, row.prompt, graphs=False, tail=tail)
        scores.append(score_candidates(decoder, first_logits, candidates, 1, normalize_length, progress))
    return torch.cat(scores)
