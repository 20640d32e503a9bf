"""The decode step's per-call device state, and the CUDA-graph runner that replays the step.

The step takes its state as an argument (decode.decode_step: the layer wiring and the caches), and a graph
captures the buffers of the state it was captured with (StaticKVCache, MediaKVCache, TailKVCache): a cache is
allocated once and written in place, never replaced, and every `run` passes a state over the same buffers.
Swapping a cache object under a captured graph would make every replay silently read the old memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass
class DecodeInputs:
    """The decode step's inputs for H hypotheses (rows x hypotheses per row), as device tensors (static
    buffers when a CUDA graph replays the step)."""

    token: torch.Tensor  # [H] long
    rope_position: torch.Tensor  # [H] long: the token's position (rotary), counted from its row's first real token
    kv_column: torch.Tensor  # [1] long: the column of its own KV segment the token is written to: the static cache
    #                          row (one hypothesis per row) or its tail (several per row); the same for every row
    prompt_columns: torch.Tensor  # [1] long: the prompt's columns in the static cache (tails follow them)
    image_index: torch.Tensor  # [H] int32: 0-based image the token attends to, -1 = none
    row_images: torch.Tensor  # [H] int32: images in its row's prompt (the pre-image-bug mode reads them)

    @classmethod
    def dummy(cls, hypotheses: int, device) -> DecodeInputs:
        z = torch.zeros(hypotheses, dtype=torch.long, device=device)
        one = torch.zeros(1, dtype=torch.long, device=device)
        return cls(z, z.clone(), one, one.clone(), torch.full((hypotheses,), -1, dtype=torch.int32, device=device),
                   torch.zeros(hypotheses, dtype=torch.int32, device=device))

    def copy_from(self, other: DecodeInputs) -> None:
        """Copy `other` (H hypotheses) into the first H entries of these (static) buffers."""
        for f in fields(self):
            source = getattr(other, f.name)
            getattr(self, f.name)[: source.shape[0]].copy_(source)


class DecodeGraphs:
    """CUDA graphs of the decode step, one per (row bucket, hypotheses per row, tails or not, KV-length bucket),
    captured on first use.

    As in vLLM's runner: a warm-up run before each capture (Triton compilation and lazy cuBLAS set-up stay
    out of the graph), one memory pool shared by all graphs, inputs copied into static buffers before
    replay; the caches are read and written in place, never copied. KV-length buckets let short prompts
    read only the cache columns they can use instead of all `max_seq_len`.
    """

    def __init__(self, step: Callable[[Any, DecodeInputs, int, int, bool], torch.Tensor], max_batch_size: int,
                 max_seq_len: int, device: torch.device, kv_bucket: int = 256, max_hypotheses: int | None = None):
        self.step, self.max_seq_len, self.kv_bucket, self.device = step, max_seq_len, kv_bucket, device
        self.max_hypotheses = max_hypotheses  # the tail cache's rows: a bucket of hypotheses must fit in them
        self.row_buckets = sorted({min(2**i, max_batch_size) for i in range(max_batch_size.bit_length() + 1)})
        self.inputs: dict[tuple[int, int], DecodeInputs] = {}
        self.graphs: dict[tuple[int, int, bool, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.capture_seconds = 0.0

    def row_bucket(self, rows: int, per_row: int, tails: bool) -> int:
        """The smallest row bucket >= rows whose hypotheses (bucket x per_row) fit the tail cache; rows itself
        when none does (rows x per_row always fits: callers check it)."""
        fits = [b for b in self.row_buckets if b >= rows
                and (not tails or self.max_hypotheses is None or b * per_row <= self.max_hypotheses)]
        return fits[0] if fits else rows

    def run(self, state, inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool) -> torch.Tensor:
        """step(state, inputs, ...) by replay: captured on first use of its key, with `state` (the caches and
        wiring every later replay reads in place)."""
        hypotheses = inputs.token.shape[0]
        rows = self.row_bucket(hypotheses // per_row, per_row, tails)
        kv_len = min(-(-kv_len // self.kv_bucket) * self.kv_bucket, self.max_seq_len)
        if (rows, per_row) not in self.inputs:
            self.inputs[(rows, per_row)] = DecodeInputs.dummy(rows * per_row, self.device)
        static = self.inputs[(rows, per_row)]
        static.copy_from(inputs)
        key = (rows, per_row, tails, kv_len)
        if key not in self.graphs:
            self._capture(key, state, static)
        graph, logits = self.graphs[key]
        graph.replay()
        return logits[:hypotheses]

    def _capture(self, key: tuple[int, int, bool, int], state, static: DecodeInputs) -> None:
        start = time.perf_counter()
        _, per_row, tails, kv_len = key
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            # warm-up; rewrites the same cache column with the same values
            self.step(state, static, kv_len, per_row, tails)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.step(state, static, kv_len, per_row, tails)
        if self.pool is None:
            self.pool = graph.pool()
        self.graphs[key] = (graph, logits)
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - start
