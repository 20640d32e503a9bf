"""The batch-invariant mode of Llama 3.2 Vision (`from_mllama(model, batch_invariant=True)`): every row computed alone.

    runtime = flamingo_fast.from_mllama(model, batch_invariant=True)
    ids = runtime.generate(**processor(images=images, text=prompts, return_tensors="pt"))
    # row b's tokens and logits = those of prompts[b] processed and run alone, bit for bit

The construction is runtime/invariant.py's (which says why no choice of tiles makes a batched matmul invariant):
a row's computation runs the same calls on tensors of the same shapes, whatever shares its batch.

- Each row runs as a batch of one through the default's own prefill and decode (mllama_runtime.py), its left
  padding removed and its image slots cut to its own images (fresh tensors): those whose aspect_ratio_id is not 0,
  the processor's padding id. A row without images runs without pixel_values, as the processor makes it alone.
  That is also a difference in value, not only in bits: in transformers' batched forward a token that sees no image
  (a text-only row, the tokens before a row's first image) attends to every vision token of its row, the padding
  slots the batch gave it included, so its result depends on the other rows' image counts. Here it is always that
  of the row alone. A padding slot that the cross_attention_mask lets a token see is refused.
- The images to encode go through the vision tower and the cross-attention K/V projections one per call
  (mllama_media.encode_media with `alone`); the image cache stores those same results, so a cached image is bitwise
  the uncached one: cold, warm and cache-off calls run the same calls after the images.
- Beams: a row's hypotheses run together (the row alone), from the same prefill as a plain call, so the first
  step's logits are those of a greedy call. `score`: one hypothesis per pass whatever score_bytes allows.
- The outputs are assembled in the default's layout (invariant.generate_rows): the prompt with its left padding,
  new tokens padded with the pad token to the longest row; forward's logits at a row's left padding are 0. With
  `return_logits` each row runs all max_new_tokens steps.
- Sampling, as invariant.py: one generator (the one given, or torch's global one) consumed row after row. A row's
  logits are invariant, its draws given the generator's state too; the state it starts from depends on the rows
  before it, so sampled tokens are invariant only for a row that comes first (e.g. a query alone).

The guarantee is for one runtime (its image cache's entries are computed in this mode), or equal ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..generation.scoring import score_candidates
from ..generation.search import GenerationOptions
from .invariant import generate_rows
from .mllama_inputs import MllamaImages

if TYPE_CHECKING:
    from .mllama_runtime import MllamaRuntime


@dataclass(frozen=True)
class MllamaRow:
    """One row of a call, alone: its tokens without the left padding, its own image slots (None: no image)."""

    input_ids: torch.Tensor  # [1, T - start] long
    attention_mask: torch.Tensor  # [1, T - start]
    images: MllamaImages | None
    start: int  # the row's left padding in the call


def rows_alone(input_ids: torch.Tensor, attention_mask: torch.Tensor, images: MllamaImages | None
               ) -> list[MllamaRow]:
    """The call's rows (inputs checked: mllama_inputs.check_mllama_call), each as the processor makes it alone."""
    padding = (attention_mask.cumsum(dim=1) == 0).sum(dim=1).tolist()
    rows = []
    for b, start in enumerate(padding):
        row_images = None
        if images is not None:
            own = images.aspect_ratio_ids[b] != 0
            padding_slots = (~own).nonzero()[:, 0]
            seen = images.cross_attention_mask[b][:, padding_slots].flatten(1).any(dim=0)  # [padding slots * tiles]
            if bool(seen.any()):
                slot = int(padding_slots[int(seen.nonzero()[0]) // images.cross_attention_mask.shape[-1]])
                raise ValueError(f"batch_invariant=True: row {b}'s image slot {slot} has aspect_ratio_id 0 (the "
                                 f"processor's padding slot) but cross_attention_mask lets tokens see it; expected "
                                 f"padding slots no token sees (the processor's output), or batch_invariant=False")
            if bool(own.any()):
                index = own.nonzero()[:, 0]
                row_images = MllamaImages(images.pixel_values[b:b + 1, index].clone(),
                                          images.aspect_ratio_ids[b:b + 1, index].clone(),
                                          images.aspect_ratio_mask[b:b + 1, index].clone(),
                                          images.cross_attention_mask[b:b + 1, start:][:, :, index].clone())
        rows.append(MllamaRow(input_ids[b:b + 1, start:].clone(), attention_mask[b:b + 1, start:].clone(),
                              row_images, start))
    return rows


def logits(runtime: MllamaRuntime, input_ids, attention_mask, images) -> torch.Tensor:
    """MllamaRuntime.logits, row by row -> [B, T, vocab] (0 at each row's left padding)."""
    out = None
    for b, row in enumerate(rows_alone(input_ids, attention_mask, images)):
        row_logits = runtime.prefill(row.input_ids, row.attention_mask, row.images, 1, all_positions=True)[1][0]
        if out is None:
            out = row_logits.new_zeros(input_ids.shape[0], input_ids.shape[1], row_logits.shape[-1])
        out[b, row.start:] = row_logits
    return out


def generate(runtime: MllamaRuntime, input_ids, attention_mask, images, options: GenerationOptions,
             generator: torch.Generator | None, timer, return_logits: bool):
    """MllamaRuntime.generate_from_options, row by row -> what the default returns."""
    rows = rows_alone(input_ids, attention_mask, images)

    def prefill_of(row: MllamaRow):
        return lambda: runtime.prefill(row.input_ids, row.attention_mask, row.images, options.max_new_tokens)

    return generate_rows([(prefill_of(row), row.input_ids) for row in rows], input_ids, options,
                         runtime.config.lm.vocab_size, generator, timer, return_logits, runtime.stop_check_interval)


def score(runtime: MllamaRuntime, input_ids, attention_mask, images, candidates: list[tuple[int, ...]],
          normalize_length: bool) -> torch.Tensor:
    """MllamaRuntime.score, row by row and one hypothesis per pass -> [B, C] float32."""
    longest = max(len(t) for t in candidates)
    scores = []
    for row in rows_alone(input_ids, attention_mask, images):
        decoder, first = runtime.prefill(row.input_ids, row.attention_mask, row.images, longest - 1)
        scores.append(score_candidates(decoder, first.float(), candidates, 1, normalize_length, progress=False))
    return torch.cat(scores)
