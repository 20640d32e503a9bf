"""The search strategies without any model: a toy decoder whose logits are a seeded function of each
hypothesis's history. Beam search (vectorised) against its plain twin, against an exhaustive search, and the
greedy/sampling loop's stop handling."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from flamingo_fast.generation.search import (
    GenerationOptions,
    beam_search,
    beam_search_ref,
    generation_options,
    sample_search,
)


class ToyDecoder:
    """logits(history) = a seeded random vector of the whole token history (prompt row included), with the
    stop tokens boosted so that hypotheses end at many different steps. Records every call."""

    def __init__(self, rows: int, vocab: int, seed: int, stops=(), stop_boost: float = 1.5, sharpness: float = 2.0):
        self.vocab, self.seed, self.stops, self.boost, self.sharpness = vocab, seed, stops, stop_boost, sharpness
        self.history = [[-1 - b] for b in range(rows)]  # each row's "prompt" is just its row id
        self.calls: list[str] = []

    def logits(self) -> torch.Tensor:
        out = []
        for h in self.history:
            g = torch.Generator().manual_seed(hash((self.seed, *h)) % 2**31)
            row = torch.randn(self.vocab, generator=g) * self.sharpness
            row[list(self.stops)] += self.boost
            out.append(row)
        return torch.stack(out)

    def fork(self, per_row: int) -> None:
        self.calls.append(f"fork({per_row})")
        self.history = [list(h) for h in self.history for _ in range(per_row)]

    def reorder(self, index: torch.Tensor) -> None:
        self.calls.append("reorder")
        self.history = [list(self.history[i]) for i in index.tolist()]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls.append("step")
        for h, t in zip(self.history, tokens.tolist(), strict=True):
            h.append(t)
        return self.logits()


def options(**kw) -> GenerationOptions:
    base = dict(max_new_tokens=6, stop_ids=(0,), pad_token_id=5)
    return GenerationOptions(**{**base, **kw})


def run(search, rows, vocab, seed, opts, **kw):
    decoder = ToyDecoder(rows, vocab, seed, opts.stop_ids)
    return search(decoder, decoder.logits(), opts, **kw), decoder


BEAM_CASES = [
    dict(num_beams=n, length_penalty=lp, early_stopping=es)
    for n, lp, es in itertools.product((2, 3, 4), (-2.0, 0.0, 1.0), (False, True, "never"))
]


@pytest.mark.parametrize("case", BEAM_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_beam_search_matches_its_plain_twin(case):
    for seed, rows, vocab, stops, new in ((1, 3, 11, (0,), 7), (2, 2, 9, (0, 3), 5), (3, 1, 16, (2,), 9)):
        for k in sorted({1, case["num_beams"]}):
            opts = options(**case, max_new_tokens=new, stop_ids=stops, num_return_sequences=k,
                           min_new_tokens=seed % 3)
            (fast, _), (plain, _) = run(beam_search, rows, vocab, seed, opts), run(beam_search_ref, rows, vocab, seed,
                                                                                   opts)
            assert torch.equal(fast.tokens, plain.tokens), f"seed {seed} k {k}:\n{fast.tokens}\n{plain.tokens}"
            torch.testing.assert_close(fast.scores, plain.scores, rtol=1e-5, atol=1e-5)
            assert fast.tokens.shape[0] == rows * k
            assert (fast.scores.view(rows, k).diff(dim=1) <= 0).all(), "each row's sequences come best first"


def test_hypotheses_finish_at_different_steps_and_are_padded():
    opts = options(num_beams=3, num_return_sequences=3, max_new_tokens=8, stop_ids=(0,))
    result, _ = run(beam_search, 3, 11, 1, opts)
    lengths = set()
    for row in result.tokens.tolist():
        end = row.index(0) + 1 if 0 in row else len(row)
        lengths.add(end)
        assert all(t == opts.pad_token_id for t in row[end:]), f"not padded after its stop token: {row}"
    assert len(lengths) > 1, f"the toy decoder should make hypotheses end at different steps: {result.tokens}"


def _exhaustive(vocab: int, seed: int, stops, new: int, lp: float, k: int):
    """Every sequence that ends at a stop token or at `new` tokens, scored as beam search scores a finished
    hypothesis: sum of log-softmax / length ** lp. -> the best k (tokens, score)."""
    scored = []
    for length in range(1, new + 1):
        for seq in itertools.product(range(vocab), repeat=length):
            if any(t in stops for t in seq[:-1]) or (length < new and seq[-1] not in stops):
                continue
            decoder = ToyDecoder(1, vocab, seed, stops)
            total = 0.0
            logits = decoder.logits()
            for t in seq:
                total += float(torch.log_softmax(logits[0].float(), -1)[t])
                logits = decoder.step(torch.tensor([t]))
            scored.append((total / length**lp, list(seq)))
    scored.sort(key=lambda s: -s[0])
    return scored[:k]


@pytest.mark.parametrize("lp", [0.0, 1.0, -2.0])
def test_wide_beam_search_is_exhaustive(lp):
    """With more beams than partial sequences nothing is pruned, so the result must be the true top-k of the
    scoring formula (with early_stopping='never' and length_penalty <= 0 the early stop is a bound; with
    length_penalty > 0 'never' scores the bound at max length)."""
    vocab, new, k = 4, 3, 3
    opts = options(num_beams=64, num_return_sequences=k, max_new_tokens=new, stop_ids=(0,), length_penalty=lp,
                   early_stopping="never")
    for search in (beam_search, beam_search_ref):
        result, _ = run(search, 1, vocab, 7, opts)
        expected = _exhaustive(vocab, 7, (0,), new, lp, k)
        for j, (score, seq) in enumerate(expected):
            row = result.tokens[j].tolist()
            assert row[: len(seq)] == seq and all(t == opts.pad_token_id for t in row[len(seq):]), (search, j)
            assert math.isclose(float(result.scores[j]), score, rel_tol=1e-5), (search, j)


def test_deferred_stop_checks_do_not_change_beams():
    opts = options(num_beams=3, num_return_sequences=2, max_new_tokens=12, stop_ids=(0, 1), early_stopping=False)
    every, d1 = run(beam_search, 2, 9, 4, opts)
    deferred, _ = run(beam_search, 2, 9, 4, opts, stop_check_interval=8)
    assert torch.equal(every.tokens, deferred.tokens) and torch.equal(every.scores, deferred.scores)
    assert d1.calls.count("step") < 11, "the search should have stopped before max_new_tokens"
    assert d1.calls[0] == "fork(3)" and d1.calls[1:3] == ["reorder", "step"]


def test_greedy_search_trims_to_the_step_every_row_stopped():
    opts = options(max_new_tokens=10, stop_ids=(0,))
    (every, _), (deferred, d) = run(sample_search, 3, 7, 5, opts), run(sample_search, 3, 7, 5, opts,
                                                                       stop_check_interval=4)
    assert torch.equal(every[0], deferred[0])
    tokens = every[0]
    stopped_at = [row.index(0) if 0 in row else None for row in tokens.tolist()]
    assert None not in stopped_at, f"every row of this toy case stops: {tokens}"
    assert tokens.shape[1] == max(stopped_at) + 1, "the output ends right at the step the last row stopped"
    for row, end in zip(tokens.tolist(), stopped_at, strict=True):
        assert all(t == opts.pad_token_id for t in row[end + 1:])
    assert d.calls[0] == "fork(1)" and "reorder" not in d.calls


def test_min_new_tokens_holds_stop_tokens_back_exactly_that_long():
    for minimum in (0, 1, 3):
        opts = options(max_new_tokens=8, stop_ids=(0,), min_new_tokens=minimum)
        decoder = ToyDecoder(4, 5, 9, (0,), stop_boost=6.0)  # stop tokens dominate: greedy stops at once
        tokens, _ = sample_search(decoder, decoder.logits(), opts)
        first_stop = [row.index(0) for row in tokens.tolist()]
        assert first_stop == [minimum] * 4, (minimum, tokens)


def test_a_reused_seeded_generator_is_left_where_a_check_at_every_step_leaves_it():
    opts = options(max_new_tokens=12, stop_ids=(0,), do_sample=True, temperature=0.7)
    states = []
    for interval in (1, 8):
        generator = torch.Generator().manual_seed(3)
        decoder = ToyDecoder(2, 6, 2, (0,), stop_boost=2.5)
        first, _ = sample_search(decoder, decoder.logits(), opts, generator, stop_check_interval=interval)
        decoder = ToyDecoder(2, 6, 2, (0,), stop_boost=2.5)
        second, _ = sample_search(decoder, decoder.logits(), opts, generator, stop_check_interval=interval)
        states.append((first, second, generator.get_state()))
    assert states[0][0].shape[1] < 12, "the first call must stop early for this test to mean anything"
    assert torch.equal(states[0][0], states[1][0]) and torch.equal(states[0][1], states[1][1])
    assert torch.equal(states[0][2], states[1][2])


class _Config:
    class lm:  # noqa: N801
        vocab_size = 50

    eoc_token_id, eos_token_id, pad_token_id = 48, 2, 49


def test_options_are_checked_by_name():
    def bad(match, **kw):
        with pytest.raises(ValueError, match=match):
            generation_options(_Config, **kw)

    bad(r"num_beams=0: expected an integer >= 1", num_beams=0)
    bad(r"num_return_sequences=3: expected an integer in \[1, num_beams=2\]", num_beams=2, num_return_sequences=3)
    bad(r"early_stopping='sometimes'", num_beams=2, early_stopping="sometimes")
    bad(r"length_penalty=nan", num_beams=2, length_penalty=float("nan"))
    bad(r"do_sample=True with num_beams=2: beam sampling is not supported", num_beams=2, do_sample=True)
    bad(r"max_new_tokens=True: expected an integer >= 0", max_new_tokens=True)
    bad(r"top_k=2.5: expected an integer >= 0", do_sample=True, top_k=2.5)
    bad(r"pad_token_id=-1: expected a token id in \[0, 50\)", pad_token_id=-1)
    bad(r"pad_token_id=1000000000", pad_token_id=10**9)
    bad(r"eos_token_id=True: expected a token id", eos_token_id=True)
    bad(r"eos_token_id=50: expected a token id in \[0, 50\)", eos_token_id=[3, 50])
    # sampling options have no effect without sampling, and beam options none with one beam: accepted
    assert generation_options(_Config, temperature=0.0, top_k=2.5).temperature == 0.0
    assert generation_options(_Config, length_penalty=-2.0, early_stopping=True).num_beams == 1
    # ids as 0-d tensors and numpy integers, as tokenizers hand them out
    import numpy as np

    assert generation_options(_Config, eos_token_id=torch.tensor(7)).stop_ids == (7,)
    assert generation_options(_Config, eos_token_id=np.int64(7), pad_token_id=np.int32(3)).stop_ids == (7,)
    assert generation_options(_Config).stop_ids == (48, 2)
    assert generation_options(_Config, eos_token_id=[]).stop_ids == ()


def test_rows_that_can_no_longer_improve_take_no_new_hypotheses():
    """With length_penalty > 0 a longer hypothesis can outscore the early-stop bound; once a row has been
    judged unable to improve, Hugging Face takes no more finished hypotheses into it even though the batch
    goes on. Many rows and seeds, so some rows stop long before others."""
    for seed in range(12):
        opts = options(num_beams=2, max_new_tokens=10, stop_ids=(0,), length_penalty=2.0, num_return_sequences=2)
        (fast, _), (plain, _) = run(beam_search, 5, 7, 100 + seed, opts), run(beam_search_ref, 5, 7, 100 + seed, opts)
        assert torch.equal(fast.tokens, plain.tokens), seed
        torch.testing.assert_close(fast.scores, plain.scores, rtol=1e-5, atol=1e-5)
