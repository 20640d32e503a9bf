"""Rank classification: the log-likelihood of each candidate continuation after each row's prompt.

    score[b, c] = sum_j log p(candidates[c][j] | prompt_b + candidates[c][:j])     (the mean with normalize_length)

exactly what OpenFlamingo's `get_rank_classifications` computes with one cached forward per class name. Here
the prompt is prefilled once per row and the candidates run through the search interface (search.py), as a
trie over their tokens: one decode step per trie level, for all rows and all nodes of that level at once.

- The first token of every candidate is scored from the prompt's last logits: a 1-token candidate costs no
  step at all.
- A node of depth d (a prefix of d tokens that some candidate continues) is one hypothesis at step d: its
  last token goes in, the logits of every candidate's next token through it come out. Candidates that share
  leading tokens share those steps; duplicates cost nothing.
- Hypotheses share their row's prompt KV and media K/V (the decoder's shared mode); level d+1 reorders the
  tails of level d to its nodes' parents.
- Passes: the candidates are taken in sorted order and cut into chunks so that no level of a chunk's trie
  holds more than `per_row` nodes; each chunk is one pass, forked again from the prompt. FastFlamingo sizes
  `per_row` from a byte budget (`score_bytes`, hypotheses_per_row): as many hypotheses as the budget holds, at
  most the widest level of the whole trie, so that candidate lists that fit take one pass.

Why wide passes (measured on the `small` preset, CPU, 1 thread, 2026-12-04): a step costs a fixed part (every
weight read once, ~70-85 ms) plus a part per hypothesis (its GEMM rows, 3-5 ms from 16 to 4,096 hypotheses per
step, 86% of it in mm: compute-bound, so wider never got slower per hypothesis). 200 random candidates at batch 4
make 404 trie nodes per row whatever the pass size, so only the number of steps changes; one process, budgets
alternated, median of 5 (load 3-4 on 2 cores): 8.4 s at 8 hypotheses per row (80 steps, the old default
max_hypotheses // B), 7.5 s at 24 (28 steps), 6.2 s at 49 (16), 5.2 s at 98 (8), 4.1 s at 162 (one pass, 4 steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..checks import is_int
from ..config import FlamingoConfig
from ..timing import ProgressBar
from .search import Decoder

# FastFlamingo(score_bytes=...)'s default: the memory one scoring pass may hold (hypothesis_bytes each). 512 MiB is
# one pass for 200 candidates at batch 4 on the `small` preset (648 hypotheses of 0.65 MiB, float32): 4.1 s against
# 5.2 s at 256 MiB and 8.4 s with the old 8 per row (module docstring); the process's RSS rose by 312 MiB during
# such a call (the bound counts 421). 1,000 candidates at 512 MiB take 4 passes (16 steps): 19.4 s, against 19.1 s in
# one pass at 2 GiB (one call each, same process): 4x the memory for 1.5%. bench/RESULTS.md: the ratio to OpenFlamingo.
DEFAULT_SCORE_BYTES = 512 << 20


def check_candidates(candidates, vocab_size: int, media_token_id: int) -> list[tuple[int, ...]]:
    """A list of token-id lists -> tuples; an error names the candidate and what is wrong."""
    if isinstance(candidates, torch.Tensor) or not isinstance(candidates, Sequence) or not len(candidates):
        raise ValueError(f"candidates: got {type(candidates).__name__}; expected a non-empty list of token-id lists")
    out = []
    for i, candidate in enumerate(candidates):
        if isinstance(candidate, torch.Tensor) or (type(candidate).__module__ == "numpy"
                                                   and hasattr(candidate, "tolist")):
            candidate = candidate.tolist()  # a 1-D tensor or numpy array -> its ids (2-D: lists, refused below)
        if not isinstance(candidate, Sequence) or isinstance(candidate, str) or not len(candidate):
            raise ValueError(f"candidates[{i}]={candidate!r}: expected a non-empty list of token ids (a list, "
                             f"tuple, 1-D tensor or 1-D numpy array of integers)")
        tokens = []
        for token in candidate:
            if hasattr(token, "__index__") and not isinstance(token, bool):
                token = token.__index__()
            if not is_int(token) or not 0 <= token < vocab_size:
                raise ValueError(f"candidates[{i}]={list(candidate)!r}: token {token!r} is not an id in "
                                 f"[0, {vocab_size})")
            if token == media_token_id:
                raise ValueError(f"candidates[{i}]={list(candidate)!r}: holds <image> ({media_token_id}); "
                                 f"expected text tokens only")
            tokens.append(token)
        out.append(tuple(tokens))
    return out


@dataclass
class TrieLevel:
    """The nodes of one depth d >= 1 of a chunk's trie, and what each step reads off their logits."""

    tokens: list[int]  # [M] the last token of each node (the step's input)
    parents: list[int]  # [M] the node's parent among the previous level's nodes (unused at depth 1)
    reads: list[tuple[int, int, int]]  # (candidate, node, next token): log p(next | node) adds to candidate


def trie_levels(chunk: Sequence[tuple[int, tuple[int, ...]]]) -> list[TrieLevel]:
    """(candidate index, tokens) pairs -> the levels d = 1 .. longest - 1 of their trie (internal nodes only)."""
    longest = max(len(tokens) for _, tokens in chunk)
    levels, previous = [], {}
    for depth in range(1, longest):
        nodes: dict[tuple[int, ...], int] = {}
        reads = []
        for index, tokens in chunk:
            if len(tokens) > depth:
                node = nodes.setdefault(tokens[:depth], len(nodes))
                reads.append((index, node, tokens[depth]))
        prefixes = list(nodes)
        levels.append(TrieLevel([p[-1] for p in prefixes], [previous.get(p[:-1], 0) for p in prefixes], reads))
        previous = nodes
    return levels


def chunks(candidates: list[tuple[int, ...]], per_row: int) -> list[list[tuple[int, tuple[int, ...]]]]:
    """Sorted candidates cut so that no trie level of a chunk holds more than `per_row` nodes."""
    order = sorted(range(len(candidates)), key=lambda i: candidates[i])
    out: list[list[tuple[int, tuple[int, ...]]]] = []
    current: list[tuple[int, tuple[int, ...]]] = []
    nodes: list[set[tuple[int, ...]]] = []
    for i in order:
        tokens = candidates[i]
        new = [tokens[:d] for d in range(1, len(tokens))]
        fits = all(d - 1 >= len(nodes) or p in nodes[d - 1] or len(nodes[d - 1]) < per_row
                   for d, p in enumerate(new, start=1))
        if current and not fits:
            out.append(current)
            current, nodes = [], []
        current.append((i, tokens))
        for d, prefix in enumerate(new, start=1):
            if d - 1 == len(nodes):
                nodes.append(set())
            nodes[d - 1].add(prefix)
    out.append(current)
    return out


def widest_level(candidates: list[tuple[int, ...]]) -> int:
    """The most nodes any level d >= 1 of the candidates' trie holds: the widest step of one pass over them all
    (0 when every candidate is one token, which needs no step)."""
    longest = max(len(tokens) for tokens in candidates)
    return max((len({tokens[:d] for tokens in candidates if len(tokens) > d}) for d in range(1, longest)), default=0)


def hypothesis_bytes(config: FlamingoConfig, dtype: torch.dtype, tail_len: int) -> int:
    """An upper bound of the memory one scoring hypothesis holds during a step: its tail's keys and values
    (TailKVCache, `tail_len` columns) and as much again (a reorder gathers into a temporary), its logits in
    `dtype` and two float32 copies (the float logits, their log-softmax), and its MLP activations."""
    lm, itemsize = config.lm, dtype.itemsize
    tail = 2 * lm.num_layers * lm.num_kv_heads * tail_len * lm.head_dim * itemsize
    return 2 * tail + lm.vocab_size * (itemsize + 8) + 4 * lm.intermediate_size * itemsize


def hypotheses_per_row(candidates: list[tuple[int, ...]], rows: int, score_bytes: int, per_hypothesis: int) -> int:
    """A pass's hypotheses per row: as many as `score_bytes` holds for `rows` rows (`per_hypothesis` bytes each),
    at most the trie's widest level (no more than one pass needs); 0 when no candidate needs a step."""
    widest = widest_level(candidates)
    fit = score_bytes // (rows * per_hypothesis)
    if widest and fit < 1:
        longest = max(len(tokens) for tokens in candidates)
        raise ValueError(f"score_bytes={score_bytes}: a scoring pass needs at least one hypothesis per row, "
                         f"{rows} rows x {per_hypothesis} bytes (candidates of up to {longest} tokens); expected at "
                         f"least {rows * per_hypothesis}")
    return min(widest, fit)


def score_candidates(decoder: Decoder, first_logits: torch.Tensor, candidates: list[tuple[int, ...]],
                     per_row: int, normalize_length: bool = False, progress: bool | None = None) -> torch.Tensor:
    """-> [B, C] float32 log-likelihoods (module docstring). first_logits [B, vocab] after each row's prompt;
    at most `per_row` hypotheses per row in one step. `progress`: None shows a bar once scoring has taken more
    than 3 s, True from the start, False never."""
    rows = first_logits.shape[0]
    device = first_logits.device
    first = torch.log_softmax(first_logits.float(), dim=-1)
    scores = first[:, [tokens[0] for tokens in candidates]].clone()  # [B, C]
    row_offset = torch.arange(rows, device=device)[:, None]
    work = [(chunk, levels) for chunk in chunks(candidates, per_row) if (levels := trie_levels(chunk))]
    bar = ProgressBar(sum(len(levels) for _, levels in work), enabled=progress is not False,
                      after_seconds=0.0 if progress else 3.0)
    for number, (_, levels) in enumerate(work):
        previous = 0  # nodes of the level before, per row
        for depth, level in enumerate(levels, start=1):
            count = len(level.tokens)
            if depth == 1:
                decoder.fork(count, shared=True)
            else:  # hypothesis b * count + j continues its parent b * previous + parents[j]
                parents = torch.tensor(level.parents, device=device)
                decoder.reorder((row_offset * previous + parents).flatten())
            tokens = torch.tensor(level.tokens, device=device).repeat(rows)
            log_probs = torch.log_softmax(decoder.step(tokens).float(), dim=-1).view(rows, count, -1)
            index, node, token = (torch.tensor(col, device=device) for col in zip(*level.reads, strict=True))
            scores.index_add_(1, index, log_probs[:, node, token])
            previous = count
            bar.step(f"scoring: chunk {number + 1}/{len(work)}, level {depth}")
    if normalize_length:
        scores = scores / torch.tensor([len(t) for t in candidates], device=device, dtype=torch.float32)
    return scores
