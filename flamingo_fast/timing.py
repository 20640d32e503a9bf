"""Phase timing for generate(): what the profiler reads. Off (None) by default, and then costs nothing.

When a `PhaseTimer` is passed, generate() calls `lap(phase)` at each phase boundary; the timer synchronises
the device there (so a GPU phase is really finished) and records the wall time since the previous lap.
Phases: "vision" (encoder + resampler), "media_kv" (the new images' cross-attention K/V, the context cache's
image look-up and the media cache write: fast path only; the reference projects its K/V in prefill), "prefill"
(prompt through the LM, first token chosen), "decode" (one per generated token after the first).
"""

from __future__ import annotations

import sys
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


class ProgressBar:
    """A one-line progress bar on stderr: redrawn in place on a terminal, one line per step otherwise.
    With `after_seconds`, nothing is drawn until that much time has passed (short work stays quiet)."""

    def __init__(self, total: int, stream=None, width: int = 24, enabled: bool = True, after_seconds: float = 0.0):
        self.total, self.done, self.width, self.enabled = total, 0, width, enabled
        self.stream = stream if stream is not None else sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()
        self.after_seconds = after_seconds

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled or time.perf_counter() - self.started < self.after_seconds:
            return
        filled = self.width * self.done // max(self.total, 1)
        elapsed = time.perf_counter() - self.started
        line = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {elapsed:6.1f}s  {label}"
        if self.tty:
            self.stream.write("\r\033[K" + line + ("\n" if self.done >= self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
