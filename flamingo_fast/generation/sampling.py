"""Next-token selection on the device, without host synchronisation: greedy, temperature, top-k, top-p.

Sampling uses the exponential-race trick: argmax(p / E) with E ~ Exp(1) i.i.d. draws index i with
probability p_i. It needs no `multinomial` and no host sync, and is reproducible with a seeded generator.
The reference and the fast runtime both call `select_next_token`, so with the same generator state they
draw the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..checks import check_int


@dataclass(frozen=True)
class SamplingOptions:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    top_p: float = 1.0  # 1.0 = no nucleus filtering

    def __post_init__(self) -> None:
        if not self.do_sample:  # greedy: the sampling options have no effect (as in Hugging Face's generate)
            return
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not self.temperature > 0 or self.temperature == float("inf"):
            raise ValueError(f"temperature={self.temperature!r}: expected a finite number > 0")
        check_int("top_k", self.top_k, 0, " (0 disables top-k)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: expected a number in (0, 1]")


def select_next_token(
    logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, V] logits -> [B] long token ids."""
    if not options.do_sample:
        return logits.argmax(dim=-1)
    # The max is subtracted first, so a tiny temperature cannot overflow to inf - inf = NaN: the scores stay
    # finite (0 at the best token, -inf or huge negatives elsewhere) and sampling tends to greedy.
    scores = logits.float()
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / options.temperature
    if options.top_k > 0:
        k = min(options.top_k, scores.shape[-1])
        kth_best = torch.topk(scores, k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth_best, float("-inf"))
    if options.top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=True)
        sorted_probs = sorted_scores.softmax(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the best always stays.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= options.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(dim=-1)
