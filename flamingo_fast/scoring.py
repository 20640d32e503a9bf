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
- Chunks: the candidates are taken in sorted order and cut so that no level of a chunk's trie holds more than
  `per_row` nodes; that bounds the tail memory (per_row x rows x longest candidate). Each chunk forks again
  from the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .search import Decoder
from .timing import ProgressBar


def check_candidates(candidates, vocab_size: int, media_token_id: int) -> list[tuple[int, ...]]:
    """A list of token-id lists -> tuples; an error names the candidate and what is wrong."""
    if isinstance(candidates, torch.Tensor) or not isinstance(candidates, Sequence) or not len(candidates):
        raise ValueError(f"candidates: got {type(candidates).__name__}; expected a non-empty list of token-id lists")
    out = []
    for i, candidate in enumerate(candidates):
        if isinstance(candidate, torch.Tensor):
            candidate = candidate.tolist()
        if not isinstance(candidate, Sequence) or isinstance(candidate, str) or not len(candidate):
            raise ValueError(f"candidates[{i}]={candidate!r}: expected a non-empty list of token ids")
        tokens = []
        for token in candidate:
            if hasattr(token, "__index__") and not isinstance(token, bool):
                token = token.__index__()
            if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token < vocab_size:
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
        fits = all(len(nodes[d - 1] | {p}) <= per_row if d - 1 < len(nodes) else True
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
