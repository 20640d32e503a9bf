"""Beam search through the models: {beam_search, beam_search_ref} x {reference decoder, fast decoder}, on the
torch backend and on Triton's interpreter, for each LM family, with left padding and hypotheses that finish at
different steps. The search semantics themselves are tested without a model in test_search.py; against
Hugging Face's own beam search (through the real OpenFlamingo) in test_openflamingo.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import interpreter, random_batch

from flamingo_fast.config import from_name
from flamingo_fast.generation.search import beam_search, beam_search_ref, generation_options
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.runtime import FastFlamingo

TINY = from_name("tiny")
FAMILIES = {
    "llama_gqa": dict(num_kv_heads=2),
    "mpt": dict(family="mpt", alibi=True, tie_word_embeddings=True, num_kv_heads=4, intermediate_size=256),
    "gpt_neox": dict(family="gpt_neox", num_kv_heads=4, rotary_pct=0.5, parallel_residual=True),
}
ROWS = [([0, 5, 9], 16), ([2], 7), ([], 11)]  # 3 images, 1 image (2 padding images), text only; left-padded


def build(family: str, seed: int, **overrides):
    lm = dataclasses.replace(TINY.lm, **FAMILIES[family])
    return build_reference(TINY.replace(lm=lm, cross_attn_every_n_layers=2, **overrides), seed=seed)


def stop_ids_the_beams_produce(model, vision, lang_x, mask) -> list[int]:
    """Random weights rarely produce `<|endofchunk|>`: take two tokens that greedy decoding produces early, so
    that beams end at different steps."""
    free = model.generate(vision, lang_x, mask, max_new_tokens=4, eos_token_id=[])[:, lang_x.shape[1]:]
    return sorted({int(free[0, 1]), int(free[1, 2])})


def run_all(model, fast, vision, lang_x, mask, **gen):
    """The same beam search four ways (both searches over both decoders); returns the reference's result."""
    expected = model.generate(vision, lang_x, mask, **gen)
    got = fast.generate(vision, lang_x, mask, **gen)
    new = lang_x.shape[1]
    assert torch.equal(got, expected), f"fast vs reference:\n{got[:, new:]}\n{expected[:, new:]}"
    options = generation_options(model.config, **gen)
    # model.generate is beam_search_ref over the reference decoder, fast.generate beam_search over the fast one
    for search, prefill in ((beam_search_ref, None), (beam_search, model.prefill)):
        if prefill is None:  # the plain search over the fast decoder
            with fast.lock:
                prompt = fast.prompt_images(vision, lang_x, None)
                decoder, logits = fast.prefill(vision, lang_x, mask, prompt)
                result = search(decoder, logits, options)
        else:
            decoder, logits = prefill(vision, lang_x, mask)
            result = search(decoder, logits, options)
        ids = torch.cat([lang_x.repeat_interleave(options.num_sequences, 0), result.tokens], dim=1)
        assert torch.equal(ids, expected), f"{search.__name__} over {'reference' if prefill else 'fast'} decoder"
    return expected


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_fast_beams_match_the_reference(family):
    model = build(family, seed=len(family))
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, ROWS, num_images=3)
    stops = stop_ids_the_beams_produce(model, vision, lang_x, mask)
    ends = set()
    for beams, penalty, early in ((3, -2.0, False), (2, 1.0, True), (4, 0.0, "never")):
        ids = run_all(model, fast, vision, lang_x, mask, max_new_tokens=8, num_beams=beams, length_penalty=penalty,
                      early_stopping=early, num_return_sequences=2, eos_token_id=stops)
        assert ids.shape[0] == 3 * 2
        for row in ids[:, lang_x.shape[1]:].tolist():
            ends.add(next((i for i, t in enumerate(row) if t in stops), len(row)))
    assert len(ends) > 1, "hypotheses should finish at different steps"


def test_beams_in_the_pre_image_bug_mode():
    model = build("llama_gqa", seed=4, only_attend_immediate_media=False, openflamingo_pre_image_bug=True)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([4, 9], 13), ([6], 10)], num_images=2)
    run_all(model, fast, vision, lang_x, mask, max_new_tokens=5, num_beams=3, eos_token_id=[])


@interpreter
def test_triton_kernels_interpreted_give_the_same_beams():
    model = build("llama_gqa", seed=5)
    fast = FastFlamingo.from_reference(model, backend="triton", max_batch_size=2, max_seq_len=48)
    vision, lang_x, mask = random_batch(model.config, [([0, 5], 12), ([2], 8)], num_images=2)
    stops = stop_ids_the_beams_produce(model, vision, lang_x, mask)
    expected = model.generate(vision, lang_x, mask, max_new_tokens=6, num_beams=3, length_penalty=-2.0,
                              eos_token_id=stops)
    assert torch.equal(fast.generate(vision, lang_x, mask, max_new_tokens=6, num_beams=3, length_penalty=-2.0,
                                     eos_token_id=stops), expected)


def test_beam_capacity_and_option_errors():
    model = build("llama_gqa", seed=6)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64, max_hypotheses=4,
                                       max_tail_len=6)
    vision, lang_x, mask = random_batch(model.config, [([0], 8), ([1], 8)], num_images=1)
    with pytest.raises(ValueError, match=r"num_beams=3: 2 rows x 3 hypotheses exceeds max_hypotheses=4"):
        fast.generate(vision, lang_x, mask, max_new_tokens=4, num_beams=3)
    with pytest.raises(ValueError, match=r"max_new_tokens=7 with num_beams=2: the hypotheses keep at most "
                                         r"max_tail_len=6"):
        fast.generate(vision, lang_x, mask, max_new_tokens=7, num_beams=2)
    with pytest.raises(ValueError, match=r"return_logits=True with num_beams=2: not supported"):
        fast.generate(vision, lang_x, mask, max_new_tokens=4, num_beams=2, return_logits=True)
    # the prompt of a beam search needs no room for the new tokens in the static cache
    long_fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=1, max_seq_len=8)
    out = long_fast.generate(vision[:1], lang_x[:1], mask[:1], max_new_tokens=6, num_beams=2, eos_token_id=[])
    assert torch.equal(out, model.generate(vision[:1], lang_x[:1], mask[:1], max_new_tokens=6, num_beams=2,
                                           eos_token_id=[]))


def test_greedy_after_beams_and_beams_after_greedy_on_one_instance():
    """The tail cache and the static cache serve both kinds of call on one instance, in any order."""
    model = build("mpt", seed=7)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, ROWS, num_images=3)
    for gen in (dict(num_beams=1), dict(num_beams=3), dict(num_beams=1), dict(num_beams=2, num_return_sequences=2)):
        assert torch.equal(fast.generate(vision, lang_x, mask, max_new_tokens=5, eos_token_id=[], **gen),
                           model.generate(vision, lang_x, mask, max_new_tokens=5, eos_token_id=[], **gen))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_beams_equal_eager_beams(dtype):
    model = build("llama_gqa", seed=8).to(device="cuda", dtype=dtype)
    eager = FastFlamingo.from_reference(model, max_batch_size=3, max_seq_len=64, cuda_graphs=False)
    graphed = FastFlamingo.from_reference(model, max_batch_size=3, max_seq_len=64)
    vision, lang_x, mask = (t.cuda() for t in random_batch(model.config, ROWS, num_images=3))
    for beams in (2, 3):
        gen = dict(max_new_tokens=10, num_beams=beams, length_penalty=-2.0, num_return_sequences=2)
        assert torch.equal(graphed.generate(vision, lang_x, mask, **gen), eager.generate(vision, lang_x, mask, **gen))
    assert any(key[2] for key in graphed.graphs.graphs), "no beam decode step was captured"
    if dtype == torch.float32:
        gen = dict(max_new_tokens=10, num_beams=3, length_penalty=-2.0)
        assert torch.equal(graphed.generate(vision, lang_x, mask, **gen), model.generate(vision, lang_x, mask, **gen))


def test_graph_row_buckets_never_exceed_the_tail_cache():
    """CUDA graphs pad the rows to a bucket; with tails, bucket x beams must still fit max_hypotheses (the rule
    is plain Python, so it is checked here; the graphs themselves need a GPU)."""
    from flamingo_fast.runtime.graphs import DecodeGraphs

    graphs = DecodeGraphs(lambda *a: None, max_batch_size=8, max_seq_len=64, device="cpu", max_hypotheses=10)
    assert graphs.row_buckets == [1, 2, 4, 8]
    assert graphs.row_bucket(3, 1, tails=False) == 4  # one hypothesis per row: the static cache's rows
    assert graphs.row_bucket(3, 3, tails=True) == 3  # 4 x 3 = 12 > 10: no padding
    assert graphs.row_bucket(2, 3, tails=True) == 2 and graphs.row_bucket(1, 4, tails=True) == 1
    assert graphs.row_bucket(3, 2, tails=True) == 4  # 4 x 2 = 8 fits
    for rows in range(1, 9):
        for per_row in range(1, 11):
            if rows * per_row <= 10:
                bucket = graphs.row_bucket(rows, per_row, tails=True)
                assert rows <= bucket and bucket * per_row <= 10


def test_beam_search_laps_the_timer_like_greedy():
    """The profiler's TTFT is vision + media K/V + prefill: both searches lap "prefill" at the first token."""
    from flamingo_fast.timing import PhaseTimer

    model = build("llama_gqa", seed=9)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0], 8), ([1], 8)], num_images=1)
    for impl in (model, fast):
        timer = PhaseTimer()
        impl.generate(vision, lang_x, mask, max_new_tokens=5, num_beams=2, eos_token_id=[], timer=timer)
        assert len(timer.laps["vision"]) == 1 and len(timer.laps["prefill"]) == 1, (impl, timer.laps)
        assert len(timer.laps["decode"]) == 4, (impl, timer.laps)
