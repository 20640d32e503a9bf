"""The batch-invariant mode (`batch_invariant=True`, runtime/invariant.py): a row's tokens and logits are bitwise
those of the row alone, whatever shares its batch, its left padding, the context cache (cold, warm or off), a
beam search's prompt instead of a plain call, and how `score` packs its candidates into passes.

These assert torch.equal across calls of different shapes because the mode builds the invariance in: every row
runs the same calls on tensors of the same shapes. The default mode (batch_invariant=False) promises only the
tolerance table's row there (docs/semantics.md); run with it on the 2-core development CPU (torch 2.13, MKL, 1
thread), these failed: a row alone against the row in a batch (greedy logits: every case, the IDEFICS drop-in
under transformers 4.57 included: test_batch_invariant_idefics.py; forward), a beam
search's first-step logits in a batch against the plain call's alone (every case), score alone against the batch
(bf16, int8, IDEFICS) and in one-hypothesis passes against wider ones (every case), the batch warm against cold
(IDEFICS int8), the row alone warm against cold (Triton). The row alone with the cache off against on held there,
by luck of the BLAS. Families x dtypes x backends: each axis covered at least once, not the full product.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from builders import IDEFICS_TINY, idefics_batch
from few_shot import build, few_shot_batch
from helpers import interpreter, record_beam_starts

from flamingo_fast.dropins.openflamingo import OpenFlamingoRuntime
from flamingo_fast.generation.scoring import hypothesis_bytes
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.runtime import FastFlamingo

CANDIDATES = [[5, 6, 7], [5, 6, 8], [9], [5, 10, 11, 12]]  # tries 2 wide at depth 2


def runtime(model, backend: str = "torch", dtype=None, weights=None, **options) -> FastFlamingo:
    return FastFlamingo.from_reference(model, backend=backend, dtype=dtype, weights=weights, max_batch_size=3,
                                       max_seq_len=96, max_tail_len=8, batch_invariant=True, **options)


def sibling(fast: FastFlamingo, **changes) -> FastFlamingo:
    """Another runtime over the same (converted, quantized) model, with some options changed."""
    return FastFlamingo(fast.model, options=dataclasses.replace(fast.options, **changes))


def alone(inputs: tuple, extra: dict, b: int) -> tuple[tuple, dict, int]:
    """Row b of a batch as a call of its own, without its left padding -> (inputs, extra, its padding)."""
    vision, ids, mask = inputs
    pad = int((mask[b] == 0).sum())
    row = (vision[b:b + 1] if vision is not None else None, ids[b:b + 1, pad:], mask[b:b + 1, pad:])
    return row, {k: v[b:b + 1, pad:] for k, v in extra.items()}, pad


def assert_rows_invariant(fast: FastFlamingo, inputs: tuple, extra: dict, monkeypatch, rows=(0, 1),
                          new: int = 3, beams: bool = True, score: bool = True, cache_off: bool = False) -> None:
    """Each of `rows` inside the batch (cold and warm context cache) == alone, cold and warm (and with the cache off):
    greedy tokens and logits, beam search's tokens and first-step logits, score (and score in one-hypothesis
    passes against wider ones)."""
    gen = dict(max_new_tokens=new, eos_token_id=[], return_logits=True, **extra)
    fast.clear_context_cache()
    ids, logits = fast.generate(*inputs, **gen)
    warm_ids, warm_logits = fast.generate(*inputs, **gen)  # the context staged from the cache
    assert torch.equal(warm_ids, ids) and torch.equal(warm_logits, logits), "batch: warm"  # fails by default (idefics)
    width = inputs[1].shape[1]
    firsts = record_beam_starts(monkeypatch)  # the logits each beam search starts from
    beam_gen = dict(max_new_tokens=new, num_beams=2, eos_token_id=[], **extra)
    beam_ids = fast.generate(*inputs, **beam_gen) if beams else None
    batch_firsts = torch.cat(firsts) if beams else None
    scores = fast.score(*inputs, candidates=CANDIDATES, **extra) if score else None
    runners = [fast, sibling(fast, context_cache_bytes=0)] if cache_off else [fast]
    for b in rows:
        row, row_extra, pad = alone(inputs, extra, b)
        for runner in runners:
            runner.clear_context_cache()
            for call in ("cold", "warm"):
                got_ids, got_logits = runner.generate(*row, **{**gen, **row_extra})
                what = f"row {b} alone ({call}, cache {'on' if runner is fast else 'off'})"
                assert torch.equal(got_ids[0, width - pad:], ids[b, width:]), what  # fails in the default mode
                assert torch.equal(got_logits[0], logits[b]), what  # fails in the default mode
        if beams:
            firsts.clear()
            got = fast.generate(*row, **{**beam_gen, **row_extra})
            assert torch.equal(got[:, width - pad:], beam_ids[b:b + 1, width:]), f"row {b}: beams"
            # the beams start from the plain call's logits: alone, and inside the batch (fails in the default mode)
            assert torch.equal(firsts[0][0], logits[b, 0]) and torch.equal(batch_firsts[b], logits[b, 0])
        if score:
            got = fast.score(*row, candidates=CANDIDATES, **row_extra)
            assert torch.equal(got[0], scores[b]), f"row {b}: score"  # fails in the default mode
    if score:  # one hypothesis per pass (the least score_bytes allows) against the default budget's two
        rows_count = inputs[1].shape[0]
        narrow = sibling(fast, score_bytes=rows_count * hypothesis_bytes(fast.config, fast.dtype, 3))
        assert torch.equal(narrow.score(*inputs, candidates=CANDIDATES, **extra), scores)


FAMILY_CASES = [
    pytest.param("llama_gqa", None, None, id="llama-float32"),
    pytest.param("mpt", torch.bfloat16, None, id="mpt-bfloat16"),
    pytest.param("gpt_neox", None, "int8", id="gpt_neox-int8"),
]


@pytest.mark.parametrize("family, dtype, weights", FAMILY_CASES)
def test_a_row_alone_equals_the_row_in_a_batch_cold_warm_beams_and_score(family, dtype, weights, monkeypatch):
    """Three rows sharing 2 demonstrations, their queries of 3, 6 and 1 tokens (so 3, 0 and 5 pad tokens)."""
    fast = runtime(build(family, seed=3), dtype=dtype, weights=weights)
    inputs = few_shot_batch(fast.config, 2, [3, 6, 1], context_seed=5, query_seed=6)
    assert_rows_invariant(fast, inputs, {}, monkeypatch, rows=(0, 2), cache_off=family == "llama_gqa")


def test_idefics_layout_int8_rows_alone(monkeypatch):
    """The IDEFICS layout (processor-style image_attention_mask, a `</s>` in a prompt, 2, 1 and 0 images), int8."""
    fast = runtime(build_reference(IDEFICS_TINY, seed=2), weights="int8")
    vision, ids, mask, image_mask = idefics_batch([["image", ("text", 3), "eos", "image", ("text", 2)],
                                                   [("text", 2), "image", ("text", 4)], [("text", 5)]], 2, seed=3)
    assert_rows_invariant(fast, (vision, ids, mask), {"image_attention_mask": image_mask}, monkeypatch,
                          rows=(1, 2))


@interpreter
def test_triton_interpreted_rows_alone(monkeypatch):
    """The Triton backend (interpreted): 2 rows, 1 demonstration, greedy and beams."""
    fast = runtime(build("llama_gqa", seed=4), backend="triton")
    inputs = few_shot_batch(fast.config, 1, [1, 3], context_seed=7, query_seed=8)
    assert_rows_invariant(fast, inputs, {}, monkeypatch, rows=(0,), new=2, score=False)


def test_forward_rows_alone_and_zero_logits_at_padding():
    fast = runtime(build("llama_gqa", seed=5))
    vision, ids, mask = few_shot_batch(fast.config, 1, [2, 5, 3], context_seed=1, query_seed=2)
    logits = fast(vision, ids, mask)
    for b in range(3):
        row, _, pad = alone((vision, ids, mask), {}, b)
        assert torch.equal(fast(*row)[0], logits[b, pad:])  # fails in the default mode
        assert not logits[b, :pad].any()


def test_stops_and_sampling_keep_the_default_layout():
    """Rows that stop at different steps: tokens padded with pad_token_id after each stop, logits for the
    batch's length (a stopped row keeps running on pad tokens, as in a batch); sampling consumes one generator
    row after row, so the first row's draws are those of the row alone."""
    fast = runtime(build("llama_gqa", seed=6))
    inputs = few_shot_batch(fast.config, 1, [2, 4, 1], context_seed=3, query_seed=4)
    width, pad_id = inputs[1].shape[1], fast.config.pad_token_id
    stop = int(fast.generate(*inputs, max_new_tokens=6, eos_token_id=[])[0, width + 1])  # row 0 stops by step 2
    ids, logits = fast.generate(*inputs, max_new_tokens=6, eos_token_id=stop, return_logits=True)
    new = ids[:, width:]
    ends = [int((row == stop).nonzero()[0]) + 1 if (row == stop).any() else 6 for row in new]
    assert ends[0] <= 2 and new.shape[1] == max(ends) == logits.shape[1] and logits.shape[0] == 3
    for b, end in enumerate(ends):
        assert (new[b, end:] == pad_id).all()
    row, _, _ = alone(inputs, {}, 0)
    row_ids, row_logits = fast.generate(*row, max_new_tokens=6, eos_token_id=stop, return_logits=True)
    assert torch.equal(row_ids[0, row[1].shape[1]:], new[0, :ends[0]]) and row_logits.shape[1] == ends[0]
    assert torch.equal(logits[0, :ends[0]], row_logits[0])
    sampled = dict(max_new_tokens=4, do_sample=True, top_k=5, eos_token_id=[])
    batch = fast.generate(*inputs, generator=torch.Generator().manual_seed(7), **sampled)
    first = fast.generate(*row, generator=torch.Generator().manual_seed(7), **sampled)
    assert torch.equal(batch[0, width:], first[0, row[1].shape[1]:])


def test_the_option_is_checked_refuses_what_couples_rows_and_survives_a_drop_in_rebuild():
    model = build("llama_gqa", seed=7)
    with pytest.raises(ValueError, match="batch_invariant=1: expected True or False"):
        FastFlamingo.from_reference(model, batch_invariant=1)
    coupled = build_reference(model.config.replace(openflamingo_generated_image_bug=True), seed=7)
    with pytest.raises(ValueError, match="batch_invariant=True with openflamingo_generated_image_bug=True"):
        FastFlamingo.from_reference(coupled, batch_invariant=True)
    fast = runtime(model)
    vision, ids, mask = few_shot_batch(fast.config, 1, [2], context_seed=1, query_seed=2)
    with pytest.raises(ValueError, match="forward_with_state .* with batch_invariant=True"):
        fast.forward_with_state(vision, ids, mask)
    drop_in = OpenFlamingoRuntime(fast, model, None, {})
    drop_in.to(torch.bfloat16)  # rebuilt over the converted tensors, with the options it was built with
    rebuilt = drop_in.fast
    assert rebuilt is not fast and rebuilt.options.batch_invariant and rebuilt.prefill_state.batch_invariant

