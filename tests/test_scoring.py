"""Rank classification: the reference's `score` against a no-cache formula (a full forward over prompt +
candidate), the fast path against the reference on both backends, the trie and its chunks, bad input. Against
OpenFlamingo's own per-class loop: test_openflamingo.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import assert_close, interpreter, random_batch

from flamingo_fast.config import from_name
from flamingo_fast.generation.scoring import (
    DEFAULT_SCORE_BYTES,
    chunks,
    hypotheses_per_row,
    hypothesis_bytes,
    trie_levels,
    widest_level,
)
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.runtime import FastFlamingo

TINY = from_name("tiny")
ROWS = [([0, 5, 9], 16), ([2], 7), ([], 11)]  # 3 images, 1 image (2 padding images), text only; left-padded


def candidates_with_shared_prefixes(vocab: int = 90, seed: int = 0) -> list[list[int]]:
    """1 to 8 tokens; shared first tokens, a candidate that is a prefix of another, duplicates."""
    g = torch.Generator().manual_seed(seed)
    out = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (1, 2, 3, 5, 8, 1, 4)]
    out += [out[3][:2] + [7], out[3][:4], out[4][:6] + [11, 12], list(out[2]), [out[3][0]]]
    return out


def formula(model, vision, lang_x, mask, candidates, normalize_length=False) -> torch.Tensor:
    """score[b, c] from one full forward per (row, candidate) over prompt + candidate: no cache, no trie."""
    out = torch.zeros(lang_x.shape[0], len(candidates), dtype=torch.float64)
    for c, cand in enumerate(candidates):
        tokens = torch.tensor(cand).expand(lang_x.shape[0], -1)
        ids = torch.cat([lang_x, tokens], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
        with torch.no_grad():
            log_probs = model(vision, ids, full_mask).double().log_softmax(-1)
        n, t = len(cand), lang_x.shape[1]
        picked = log_probs[:, t - 1: t - 1 + n].gather(2, tokens[:, :, None]).squeeze(-1)
        out[:, c] = picked.sum(dim=1) / (n if normalize_length else 1)
    return out


def build(family: str = "llama", seed: int = 0):
    lm = {"llama": TINY.lm, "mpt": dataclasses.replace(TINY.lm, family="mpt", alibi=True, tie_word_embeddings=True,
                                                          num_kv_heads=4, intermediate_size=256)}[family]
    return build_reference(TINY.replace(lm=lm), seed=seed)


@pytest.mark.parametrize("normalize_length", [False, True])
def test_reference_score_is_the_full_forward_formula(normalize_length):
    model = build(seed=1)
    vision, lang_x, mask = random_batch(model.config, ROWS, num_images=3)
    candidates = candidates_with_shared_prefixes()
    got = model.score(vision, lang_x, mask, candidates=candidates, normalize_length=normalize_length)
    assert got.dtype == torch.float32 and got.shape == (3, len(candidates))
    assert_close(got, formula(model, vision, lang_x, mask, candidates, normalize_length).float(), dtype=torch.float32)


def spy_steps(fast: FastFlamingo) -> list[tuple[int, int]]:
    """Records (hypotheses, tail cache rows) of every decode step `fast` runs from now on."""
    steps = []
    original = fast.run_decode_step

    def spy(inputs, kv_len, per_row, tails, graphs=True, tail=None):
        steps.append((inputs.token.shape[0], 0 if tail is None else tail.max_hypotheses))
        return original(inputs, kv_len, per_row, tails, graphs, tail)

    fast.run_decode_step = spy
    return steps


@pytest.mark.parametrize("family", ["llama", "mpt"])
def test_fast_score_matches_reference_with_small_passes(family):
    """score_bytes for 2 hypotheses per row of 3 rows (and a byte short of 3): the candidates run in many
    passes, none wider than the budget."""
    model = build(family, seed=2)
    candidates = candidates_with_shared_prefixes(seed=3)
    per_hypothesis = hypothesis_bytes(model.config, torch.float32, max(len(c) for c in candidates) - 1)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=64,
                                       score_bytes=3 * 3 * per_hypothesis - 1)
    vision, lang_x, mask = random_batch(model.config, ROWS, num_images=3)
    assert len(chunks([tuple(c) for c in candidates], 2)) >= 3
    steps = spy_steps(fast)
    for normalize_length in (False, True):
        expected = model.score(vision, lang_x, mask, candidates=candidates, normalize_length=normalize_length)
        got = fast.score(vision, lang_x, mask, candidates=candidates, normalize_length=normalize_length)
        assert_close(got, expected, dtype=torch.float32)
    assert max(hypotheses for hypotheses, _ in steps) == 6 and {rows for _, rows in steps} == {6}
    duplicate = [i for i, c in enumerate(candidates) if candidates.index(c) != i]
    assert duplicate and all(torch.equal(got[:, i], got[:, candidates.index(candidates[i])]) for i in duplicate)
    # generate after scoring on the same instance: scoring leaves nothing behind that a call reads
    assert torch.equal(fast.generate(vision, lang_x, mask, max_new_tokens=5, eos_token_id=[]),
                       model.generate(vision, lang_x, mask, max_new_tokens=5, eos_token_id=[]))


@interpreter
def test_triton_interpreted_score_matches_reference():
    model = build(seed=4)
    fast = FastFlamingo.from_reference(model, backend="triton", max_batch_size=2, max_seq_len=48, max_hypotheses=8,
                                       max_tail_len=8)
    vision, lang_x, mask = random_batch(model.config, [([0, 5], 12), ([2], 8)], num_images=2)
    candidates = candidates_with_shared_prefixes(seed=5)[:8]
    assert_close(fast.score(vision, lang_x, mask, candidates=candidates),
                 model.score(vision, lang_x, mask, candidates=candidates), dtype=torch.float32)


def test_one_token_candidates_need_no_step():
    model = build(seed=6)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0], 9), ([1], 6)], num_images=1)
    steps = []
    original = fast.run_decode_step
    fast.run_decode_step = lambda *a, **k: steps.append(1) or original(*a, **k)
    got = fast.score(vision, lang_x, mask, candidates=[[5], [9], [5], [40]])
    assert not steps, "1-token candidates are read off the prompt's last logits"
    first = model.generate(vision, lang_x, mask, max_new_tokens=1, return_logits=True)[1][:, 0].log_softmax(-1)
    assert_close(got, first[:, [5, 9, 5, 40]], dtype=torch.float32)


def test_default_options_score_many_candidates_in_one_pass():
    """Default options (max_hypotheses 4 x max_batch_size = 8: the old passes held 4 hypotheses per row): 60
    candidates of 1 to 9 tokens, longer than max_tail_len + 1, run in one pass, one step per trie level, and equal
    the reference; scoring leaves the beams' tail cache alone, and beams and scoring after it still agree."""
    model = build(seed=11)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64, max_tail_len=4)
    assert fast.score_bytes == DEFAULT_SCORE_BYTES
    vision, lang_x, mask = random_batch(model.config, [([0, 5], 13), ([1], 7)], num_images=2)
    g = torch.Generator().manual_seed(12)
    lengths = torch.randint(1, 10, (60,), generator=g).tolist()
    candidates = [torch.randint(3, 90, (n,), generator=g).tolist() for n in lengths]
    candidates += [candidates[0] + [4, 5], candidates[1][:1] + [6]]  # shared prefixes
    tokens = [tuple(c) for c in candidates]
    longest = max(len(c) for c in candidates)
    assert longest > 4 + 1 and widest_level(tokens) > 4 and len(chunks(tokens, 4)) > 1
    steps = spy_steps(fast)
    got = fast.score(vision, lang_x, mask, candidates=candidates)
    assert [hypotheses for hypotheses, _ in steps] == [2 * len(level.tokens) for level in trie_levels(list(
        enumerate(tokens)))]  # one pass: every level once
    assert {rows for _, rows in steps} == {2 * widest_level(tokens)}
    assert_close(got, model.score(vision, lang_x, mask, candidates=candidates), dtype=torch.float32)
    assert fast.tail_cache is None
    beams = dict(max_new_tokens=4, num_beams=3, eos_token_id=[])
    assert torch.equal(fast.generate(vision, lang_x, mask, **beams), model.generate(vision, lang_x, mask, **beams))
    assert_close(fast.score(vision, lang_x, mask, candidates=candidates), got, dtype=torch.float32)


def test_score_bytes_is_checked_and_respected():
    model = build(seed=13)
    for bad in (0, -5, 1.5, True, "1", None):
        with pytest.raises(ValueError, match=rf"score_bytes={bad!r}: expected an integer >= 1"):
            FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64, score_bytes=bad)
    vision, lang_x, mask = random_batch(model.config, [([0], 11), ([1], 8)], num_images=1)
    candidates = candidates_with_shared_prefixes(seed=14)
    tokens = [tuple(c) for c in candidates]
    per_hypothesis = hypothesis_bytes(model.config, torch.float32, max(len(t) for t in tokens) - 1)
    expected = model.score(vision, lang_x, mask, candidates=candidates)
    for per_row in (1, 2, 3):
        budget = 2 * per_row * per_hypothesis + per_hypothesis  # short of one more per row
        fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64,
                                           score_bytes=budget)
        steps = spy_steps(fast)
        assert_close(fast.score(vision, lang_x, mask, candidates=candidates), expected, dtype=torch.float32)
        assert max(hypotheses for hypotheses, _ in steps) == 2 * per_row
        assert {rows for _, rows in steps} == {2 * per_row} and 2 * per_row * per_hypothesis <= budget
        assert len(steps) == sum(len(trie_levels(part)) for part in chunks(tokens, per_row))
    fast.score_bytes = 2 * per_hypothesis - 1
    with pytest.raises(ValueError, match=rf"score_bytes={2 * per_hypothesis - 1}: a scoring pass needs at least one "
                                         rf"hypothesis per row, 2 rows x {per_hypothesis} bytes"):
        fast.score(vision, lang_x, mask, candidates=candidates)
    one_token = [[5], [9], [40]]  # no step, no tail: any budget serves
    assert_close(fast.score(vision, lang_x, mask, candidates=one_token),
                 model.score(vision, lang_x, mask, candidates=one_token), dtype=torch.float32)


def test_hypotheses_per_row_and_hypothesis_bytes():
    cands = [(4, 5, 6), (4, 5), (4, 7), (9,), (4, 5, 6), (8, 1, 2, 3)]
    assert widest_level(cands) == 2 and widest_level([(1,), (2,)]) == 0
    assert hypotheses_per_row(cands, 3, 3 * 10 * 7, 10) == 2  # the trie's widest level, not the budget's 7
    assert hypotheses_per_row(cands, 3, 3 * 10 * 2 - 1, 10) == 1
    assert hypotheses_per_row([(1,), (2,)], 3, 1, 10) == 0
    lm = TINY.lm  # tails: keys + values, counted twice; logits: float32 + two float32 copies; the MLP
    tail = 2 * lm.num_layers * lm.num_kv_heads * 5 * lm.head_dim
    assert hypothesis_bytes(TINY, torch.float32, 5) == 4 * (2 * tail + 3 * lm.vocab_size + 4 * lm.intermediate_size)
    assert hypothesis_bytes(TINY, torch.bfloat16, 5) == 2 * (2 * tail + 5 * lm.vocab_size + 4 * lm.intermediate_size)


def test_trie_levels_and_chunks():
    cands = [(4, 5, 6), (4, 5), (4, 7), (9,), (4, 5, 6), (8, 1, 2, 3)]
    levels = trie_levels(list(enumerate(cands)))
    assert [level.tokens for level in levels] == [[4, 8], [5, 1], [2]]  # (4,), (8,); (4, 5), (8, 1); (8, 1, 2)
    assert levels[1].parents == [0, 1] and levels[2].parents == [1]
    assert sorted(levels[0].reads) == [(0, 0, 5), (1, 0, 5), (2, 0, 7), (4, 0, 5), (5, 1, 1)]
    for per_row in (1, 2, 3):
        parts = chunks(cands, per_row)
        assert sorted(i for part in parts for i, _ in part) == list(range(len(cands)))
        for part in parts:
            assert all(len(level.tokens) <= per_row for level in trie_levels(part))


def test_bad_candidates_are_named():
    model = build(seed=7)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64, max_tail_len=4)
    vision, lang_x, mask = random_batch(model.config, [([0], 9)], num_images=1)
    media, vocab = model.config.media_token_id, model.config.lm.vocab_size
    for impl in (model, fast):
        for bad, match in (([], r"candidates: got list; expected a non-empty list"),
                           ([[3], []], r"candidates\[1\]=\[\]: expected a non-empty list of token ids"),
                           ([[3, vocab]], rf"candidates\[0\]=\[3, {vocab}\]: token {vocab} is not an id"),
                           ([[-1]], r"candidates\[0\]=\[-1\]: token -1 is not an id"),
                           ([[3, media]], rf"candidates\[0\]=\[3, {media}\]: holds <image>"),
                           (["cat"], r"candidates\[0\]='cat': expected a non-empty list of token ids")):
            with pytest.raises(ValueError, match=match):
                impl.score(vision, lang_x, mask, candidates=bad)
    right_padded = torch.ones_like(mask)
    right_padded[0, -1] = 0
    for impl in (model, fast):
        with pytest.raises(ValueError, match=r"attention_mask: row 0 is right-padded"):
            impl.score(vision, lang_x, right_padded, candidates=[[3]])
