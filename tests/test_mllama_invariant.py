"""The batch-invariant mode of the Llama 3.2 Vision drop-in (`from_mllama(model, batch_invariant=True)`,
runtime/mllama_invariant.py) over transformers' own MllamaForConditionalGeneration and image processor (the
comparison environments: transformers 4.57 and 5.24). A row's tokens and logits are bitwise those of its prompt
processed alone (its own images, no left padding), whatever shares its batch (other image counts and tiles, a
text-only row), the image cache (cold, warm, off), a beam search's shared prompt instead of a plain call, and how
`score` packs its candidates into passes.

These assert torch.equal across calls of different shapes because the mode builds the invariance in (each row runs
the same calls on tensors of the same shapes). Every comparison of a case is made and the mismatches are reported
together. With batch_invariant=False (INVARIANT = False below), on the 2-core development CPU (torch 2.13, MKL, one
thread), under transformers 4.57 and 5.24 alike, these failed:
- by bits alone (the same values in exact arithmetic): row 1 (the batch's most images, no padding) alone against in
  the batch, greedy logits, the beams' first step and score (fp32, int8); the query alone against in a batch where
  it gets no padding slot (Triton); score in one-hypothesis passes against the default budget's (fp32, int8);
- by value too: the query and the text-only row where the batch gives them padding slots (fp32, int8: tokens or
  logits, forward, beams, score). transformers lets a token that sees no image (the text-only row, a BOS before
  the first image) attend to the padding slots the batch gives its row; the mode computes the row alone
  (runtime/mllama_invariant.py).
- bf16 (test_bf16_rows_alone, the 2-image row beside the query): the query alone against in the batch: its logits
  cold and warm, forward, the beams' first step and score (its greedy tokens held).
Held there: the batch warm against cold, the row alone cold against warm and against the cache off, the beams'
first step in the batch against the greedy call's (the same shapes: the default's image cache holds what the cold
call encoded), and row 1's forward (by luck of the BLAS).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from helpers import interpreter, record_beam_starts

pytest.importorskip("transformers", reason="needs transformers (make test-openflamingo)")
pytestmark = pytest.mark.comparison

from mllama_fixtures import BOS, FOUR, ONE, WIDE2, batch, build_mllama, random_image  # noqa: E402

import flamingo_fast  # noqa: E402
from flamingo_fast.generation.scoring import hypothesis_bytes  # noqa: E402
from flamingo_fast.runtime.mllama_inputs import MllamaImages  # noqa: E402

NAME = "gqa-llama3-4tiles"
CANDIDATES = [[5, 6, 7], [5, 6, 8], [9], [5, 10, 11, 12]]  # tries 2 wide at depth 2
# 0: the query, a 1-tile image after text; 1: images of 2 and 4 tiles, the first one first; 2: text only. Lengths 6,
# 9 and 3: 3, 0 and 6 pad tokens in the batch of all three.
ROWS = [[BOS, 5, 6, ONE, 7, 8], [BOS, WIDE2, 9, FOUR, 10, 11, 12, 13, 14], [BOS, 15, 16]]
INVARIANT = True  # False: the default mode, for the module docstring's record of what fails there


@functools.cache
def hf_model():
    return build_mllama(NAME, seed=3)


@functools.cache
def drop_in(weights: str | None = None, backend: str = "torch", context_cache_bytes: int = 1 << 30):
    return flamingo_fast.from_mllama(hf_model(), backend=backend, weights=weights, batch_invariant=INVARIANT,
                                     context_cache_bytes=context_cache_bytes)


@functools.cache
def pictures() -> list[list]:
    g = np.random.default_rng(0)
    return [[random_image(g, *item) for item in row if isinstance(item, tuple)] for row in ROWS]


@functools.cache
def inputs(rows: tuple[int, ...]) -> dict:
    """ROWS[r] for r in rows as the processor makes them together (the same pictures whatever the batch)."""
    return batch([ROWS[r] for r in rows], 4, pictures=[pictures()[r] for r in rows])


def assert_rows_invariant(runtime, rows: tuple[int, ...], monkeypatch, new: int = 3, score: bool = True,
                          cache_off=None) -> None:
    """Each row of inputs(rows) inside the batch (cold and warm image cache) == its prompt alone, cold and warm (and
    with the cache off): greedy tokens and logits, forward's logits, beam search's tokens and first-step logits,
    score; score in one-hypothesis passes == the default budget's."""
    x = inputs(rows)
    width = x["input_ids"].shape[1]
    gen = dict(max_new_tokens=new, eos_token_id=[], return_logits=True)
    beam_gen = dict(max_new_tokens=new, num_beams=2, eos_token_id=[])
    firsts = record_beam_starts(monkeypatch)  # the logits each beam search starts from
    failed = []

    def check(what: str, same: bool) -> None:
        if not same:
            failed.append(what)

    runtime.engine.clear_context_cache()
    ids, logits = runtime.generate(**x, **gen)
    warm_ids, warm_logits = runtime.generate(**x, **gen)
    check("batch warm == cold", torch.equal(warm_ids, ids) and torch.equal(warm_logits, logits))
    forward = runtime(**x).logits
    beam_ids = runtime.generate(**x, **beam_gen)
    batch_firsts = torch.cat(firsts)
    scores = runtime.score(**x, candidates=CANDIDATES) if score else None
    for b, r in enumerate(rows):
        row = inputs((r,))
        pad = width - row["input_ids"].shape[1]
        for runner in (runtime, cache_off) if cache_off is not None else (runtime,):
            runner.engine.clear_context_cache()
            for call in ("cold", "warm"):
                got_ids, got_logits = runner.generate(**row, **gen)
                what = f"row {r} alone ({call}, cache {'on' if runner is runtime else 'off'})"
                check(f"{what}: tokens", torch.equal(got_ids[0, width - pad:], ids[b, width:]))
                check(f"{what}: logits", torch.equal(got_logits[0], logits[b]))
        check(f"row {r}: forward", torch.equal(runtime(**row).logits[0], forward[b, pad:]))
        check(f"row {r}: forward's zeros at the padding", not forward[b, :pad].any())
        firsts.clear()
        check(f"row {r}: beams' tokens", torch.equal(runtime.generate(**row, **beam_gen)[0, width - pad:],
                                                     beam_ids[b, width:]))
        # the beams start from the plain call's logits, alone and inside the batch
        check(f"row {r}: beams' first step alone", torch.equal(firsts[0][0], logits[b, 0]))
        check(f"row {r}: beams' first step in the batch", torch.equal(batch_firsts[b], logits[b, 0]))
        if score:
            check(f"row {r}: score", torch.equal(runtime.score(**row, candidates=CANDIDATES)[0], scores[b]))
    if score:  # one hypothesis per pass (the least score_bytes allows) against the default budget's two
        engine = runtime.engine
        images = MllamaImages.of(x["pixel_values"], x["aspect_ratio_ids"], x["aspect_ratio_mask"],
                                 x["cross_attention_mask"])
        least = len(rows) * hypothesis_bytes(engine.config, engine.dtype, max(map(len, CANDIDATES)) - 1)
        narrow = engine.score(x["input_ids"], x["attention_mask"], images, CANDIDATES, score_bytes=least)
        check("score in one-hypothesis passes", torch.equal(narrow, scores))
    assert not failed, "mismatches: " + "; ".join(failed)


def test_fp32_rows_alone_equal_the_rows_in_a_batch_and_sampling_consumes_the_generator_row_by_row(monkeypatch):
    """The query, a row with 2 images of 2 and 4 tiles and a text-only row (3, 0 and 6 pad tokens), the image cache
    cold, warm and off; a first row's sampled tokens are those of the row alone."""
    assert_rows_invariant(drop_in(), (0, 1, 2), monkeypatch, cache_off=drop_in(context_cache_bytes=0))
    x, row = inputs((0, 1, 2)), inputs((0,))
    sampled = dict(max_new_tokens=4, do_sample=True, top_k=5, eos_token_id=[])
    batch_ids = drop_in().generate(**x, generator=torch.Generator().manual_seed(7), **sampled)
    first = drop_in().generate(**row, generator=torch.Generator().manual_seed(7), **sampled)
    assert torch.equal(batch_ids[0, x["input_ids"].shape[1]:], first[0, row["input_ids"].shape[1]:])


def test_int8_rows_alone(monkeypatch):
    """weights="int8": the text-only row beside the 2-image row, and the query after it."""
    assert_rows_invariant(drop_in("int8"), (2, 1, 0), monkeypatch)


@functools.cache
def drop_in_bf16():
    return flamingo_fast.from_mllama(build_mllama(NAME, seed=3).to(torch.bfloat16), batch_invariant=INVARIANT)


def test_bf16_rows_alone(monkeypatch):
    """bfloat16 weights and activations (the processor's float32 pixels as they come): the 2-image row beside the
    query, 2 new tokens."""
    assert drop_in_bf16().engine.dtype == torch.bfloat16
    assert_rows_invariant(drop_in_bf16(), (1, 0), monkeypatch, new=2)


@interpreter
def test_triton_interpreted_rows_alone(monkeypatch):
    """The Triton backend (interpreted): the query and the text-only row, 2 new tokens, no score."""
    assert_rows_invariant(drop_in(backend="triton"), (0, 2), monkeypatch, new=2, score=False)


def test_the_option_is_checked_and_a_padding_slot_seen_is_refused():
    with pytest.raises(ValueError, match="batch_invariant=1: expected True or False"):
        flamingo_fast.from_mllama(hf_model(), batch_invariant=1)
    x = dict(inputs((0, 1, 2)))
    cross = x["cross_attention_mask"].clone()
    cross[0, -1, 1, 0] = 1  # the query's last token sees its padding slot
    x["cross_attention_mask"] = cross
    runtime = flamingo_fast.from_mllama(hf_model(), backend="torch", batch_invariant=True)
    with pytest.raises(ValueError, match="batch_invariant=True: row 0's image slot 1 has aspect_ratio_id 0"):
        runtime.generate(**x, max_new_tokens=1)


def test_images_are_encoded_one_per_call(monkeypatch):
    """The vision tower (and so the K/V projections after it) sees one image per call, cold, so that an image's
    bits do not depend on what is encoded with it nor on the cache: on this CPU batched encodings happened to equal
    per-image ones at these shapes (also at bench/mllama_cpu.py's), on a GPU the library picks its algorithm by
    the shape. Warm, nothing is encoded."""
    runtime = flamingo_fast.from_mllama(hf_model(), backend="torch", batch_invariant=True)
    reference = runtime.engine.reference
    seen: list[int] = []
    encode = reference.vision_states

    def spy(pixels, *args):
        seen.append(pixels.shape[0])
        return encode(pixels, *args)

    monkeypatch.setattr(reference, "vision_states", spy)
    x = inputs((0, 1, 2))
    runtime(**x)
    assert seen == [1, 1, 1], seen  # the query's image and row 1's two; no padding slot
    runtime(**x)
    assert seen == [1, 1, 1], seen
