"""Whether the weights a runtime computes with changed since it last looked: a fingerprint checked at every call.

    watch = WeightWatch(model)       # at construction
    change = watch.check()           # each call: None, "updated" (in place) or "moved" (a tensor's storage replaced)

The runtime shares its model's tensors, and what it caches across calls (the context cache's contexts and images)
was computed from their values. The fingerprint is, per parameter and buffer, its data pointer and its version
counter (`tensor._version`, which every in-place write bumps: `optimizer.step()`, `copy_`, `load_state_dict`, an
in-place op under `torch.no_grad()`; views share their base's counter, so a write through the fused LLaMA q/k/v
views of fused_weights.py counts as well).

- "updated": the same storages, some written in place. What was cached from the old values is stale (the runtime
  empties its context cache); everything else reads the tensors live.
- "moved": a tensor's data pointer changed (`param.data = other`, the live model's own `.to()` / `.half()`, or
  another runtime fusing the same model's LLaMA projections). A runtime that holds nothing over the old storages
  (no fused projections, no CUDA graphs) and whose dtypes and devices still hold reads the new ones: it only empties
  its context cache. Otherwise the drop-ins rebuild their runtime, and a bare FastFlamingo refuses the call.

Not seen: a write through `tensor.data` (`p.data.copy_(x)`: `.data` is a tensor with its own version counter), a
Parameter replaced by assignment in a module the runtime does not hold (`layer.weight = nn.Parameter(...)` on the
live model: the runtime keeps the old one), and inference tensors (built under `torch.inference_mode()`, which keep
no version counter). The check costs one pass over the tensors in Python (README: measured per call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor keeps no version counter: its writes cannot be seen
        return -1


class WeightWatch:
    """The fingerprint of `model`'s parameters and buffers, and the comparison with their state now."""

    def __init__(self, model: nn.Module):
        self.tensors = [*model.parameters(), *model.buffers()]
        self.fingerprint = self._fingerprint()
        self.kinds = self._kinds()

    def _kinds(self) -> list[tuple]:
        return [(t.dtype, t.device) for t in self.tensors]

    def kinds_changed(self) -> bool:
        """A tensor's dtype or device differs from the fingerprint's (checked only once a storage was replaced)."""
        return self._kinds() != self.kinds

    def _fingerprint(self) -> list[tuple[int, int]]:
        return [(t.data_ptr(), _version(t)) for t in self.tensors]

    def moved(self) -> bool:
        """A tensor's storage was replaced since the fingerprint was taken (its data pointer changed)."""
        return [t.data_ptr() for t in self.tensors] != [ptr for ptr, _ in self.fingerprint]

    def check(self) -> str | None:
        """None (unchanged), "updated" (written in place; the fingerprint is renewed) or "moved" (renew() it once
        the caller has dealt with it)."""
        now = self._fingerprint()
        if now == self.fingerprint:
            return None
        if any(a[0] != b[0] for a, b in zip(now, self.fingerprint, strict=True)):
            return "moved"
        self.fingerprint = now
        return "updated"

    def renew(self) -> None:
        self.fingerprint, self.kinds = self._fingerprint(), self._kinds()

    def settle(self, stale_after_move: Callable[[], bool], clear: Callable[[], None]) -> None:
        """What a runtime does at every entry point (FastFlamingo, under its lock): weights written in place since
        the last call `clear` the caches computed from the old values (the context cache: its contexts and images;
        every other cache is recomputed per call); so does a replaced storage that the runtime reads afresh, and
        one it does not (`stale_after_move()`) is an error (the drop-ins rebuild their runtime instead)."""
        change = self.check()
        if change == "moved" and not stale_after_move():
            self.renew()
            change = "updated"
        if change == "updated":
            clear()
        elif change == "moved":
            raise ValueError("model: a tensor of the model this FastFlamingo runs was replaced since it was built "
                             "(`param.data = ...`, or the model's own `.to()` / `.half()`); expected the same "
                             "tensors, updated in place (copy_, optimizer.step(), load_state_dict): build a new "
                             "FastFlamingo")
