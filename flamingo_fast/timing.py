"""Phase timing for generate(): what the profiler reads. Off (None) by default, and then costs nothing.

When a `PhaseTimer` is passed, generate() calls `lap(phase)` at each phase boundary; the timer synchronises
the device there (so a GPU phase is really finished) and records the wall time since the previous lap.
Phases: "vision" (encoder + resampler), "media_kv" (cross-attention K/V, fast path only), "prefill"
(prompt through the LM, first token chosen), "decode" (one per generated token after the first).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


@dataclass
class PhaseTimer:
    device: torch.device | str = "cpu"
    laps: dict[str, list[float]] = field(default_factory=dict)
    _last: float = 0.0

    def start(self) -> None:
        self._sync()
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps.setdefault(phase, []).append(now - self._last)
        self._last = now

    def total(self, phase: str) -> float:
        return sum(self.laps.get(phase, []))

    def _sync(self) -> None:
        if torch.device(self.device).type == "cuda":
            torch.cuda.synchronize(self.device)
