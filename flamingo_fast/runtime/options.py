"""FastFlamingo's construction options: one frozen dataclass, checked once.

    options = RuntimeOptions(max_batch_size=4, max_seq_len=256)   # checked here (what needs no model)
    fast = FastFlamingo(model, options=options)                   # or FastFlamingo(model, max_batch_size=4, ...)
    resolved = options.resolve(model.config, device)              # "auto" and None filled in, checked against the model

A FastFlamingo keeps the options as given (`fast.options`: "auto" and None stay so), so that a drop-in rebuilt
after `.to` (dropins/module.py) resolves them again for the moved model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from ..checks import check_int
from ..config import FlamingoConfig
from ..generation.scoring import DEFAULT_SCORE_BYTES
from .decode import resolve_decode_paths
from .layers import BACKENDS, check_backend


@dataclass(frozen=True)
class RuntimeOptions:
    """max_batch_size, max_seq_len (None: the model's max positions), max_images: the caches' sizes.
    cuda_graphs: capture the decode step on CUDA. stop_check_interval: decode steps between host looks at the
    stop flags. max_hypotheses (None: 4 x max_batch_size) and max_tail_len: beam search's tail cache.
    context_cache_bytes: the context cache's budget (0 disables it). decode_paths: which of decode.DECODE_PATHS
    to use (None: the backend's default). score_bytes: the memory one pass of `score` may hold. backend: "auto"
    (Triton on CUDA, torch elsewhere), "triton" or "torch". batch_invariant: every entry point computes each row
    alone, so that a row's tokens and logits are bitwise independent of its batch, its left padding, the context
    cache and score's passes (invariant.py; docs/semantics.md "What is exact" says what it costs)."""

    backend: str = "auto"
    max_batch_size: int = 8
    max_seq_len: int | None = None
    max_images: int = 33
    cuda_graphs: bool = True
    stop_check_interval: int = 8
    max_hypotheses: int | None = None
    max_tail_len: int = 64
    context_cache_bytes: int = 1 << 30
    decode_paths: object = None
    score_bytes: int = DEFAULT_SCORE_BYTES
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.batch_invariant, bool):
            raise ValueError(f"batch_invariant={self.batch_invariant!r}: expected True or False")
        if self.backend != "auto" and self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: expected one of {BACKENDS}")
        for name in ("max_batch_size", "max_seq_len", "max_images", "stop_check_interval", "max_hypotheses",
                     "max_tail_len"):
            value = getattr(self, name)
            if value is not None or name not in ("max_seq_len", "max_hypotheses"):  # None: resolved from the model
                check_int(name, value, 1)
        check_int("context_cache_bytes", self.context_cache_bytes, 0, " (0 disables it)")
        check_int("score_bytes", self.score_bytes, 1, " (the bytes one scoring pass may hold)")

    def resolve(self, config: FlamingoConfig, device: torch.device) -> RuntimeOptions:
        """These options for a model of `config` on `device`: backend "auto" -> "triton" on CUDA, else "torch";
        max_seq_len None -> the model's max positions; max_hypotheses None -> 4 x max_batch_size; decode_paths ->
        the frozenset in use (decode.resolve_decode_paths). Checks what depends on the model: the backend's
        shape limits, Triton off CUDA (unless TRITON_INTERPRET=1), max_seq_len within the max positions."""
        backend = self.backend
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
        check_backend(config, backend)
        if self.batch_invariant and config.openflamingo_generated_image_bug:
            raise ValueError("batch_invariant=True with openflamingo_generated_image_bug=True: that behaviour couples "
                             "the rows of a batch by definition; expected one of them False")
        if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' with the model on {device}: expected a CUDA device (or TRITON_INTERPRET=1 "
                f"to run the kernels in Triton's interpreter); use backend='torch' on the CPU"
            )
        positions = config.lm.max_position_embeddings
        max_seq_len = positions if self.max_seq_len is None else self.max_seq_len
        if max_seq_len > positions:
            raise ValueError(f"max_seq_len={max_seq_len}: expected at most the model's max positions {positions}")
        max_hypotheses = 4 * self.max_batch_size if self.max_hypotheses is None else self.max_hypotheses
        return dataclasses.replace(self, backend=backend, max_seq_len=max_seq_len, max_hypotheses=max_hypotheses,
                                   decode_paths=resolve_decode_paths(backend, self.decode_paths))
