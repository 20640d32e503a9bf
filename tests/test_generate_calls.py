"""Generate calls as users make them, on the reference and the fast runtime: concurrent threads on one instance,
extreme temperatures, a custom pad token with rows that stop early, the dtype of returned logits."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import INTERPRETER_MARKS, assert_close, random_batch

from flamingo_fast.config import from_name
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.runtime import FastFlamingo

TINY = from_name("tiny")


def test_two_threads_on_one_instance_get_their_own_tokens():
    model = build_reference(TINY, seed=1)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    requests = [random_batch(model.config, [([0, 4], 10 + i), ([1], 7)], num_images=2) for i in range(4)]
    expected = [model.generate(*r, max_new_tokens=12, eos_token_id=[]) for r in requests]
    got: dict[tuple[int, int], torch.Tensor] = {}

    def worker(thread: int) -> None:
        for rep in range(3):
            for i in (thread, thread + 2):
                got[(i, rep + 3 * thread)] = fast.generate(*requests[i], max_new_tokens=12, eos_token_id=[])

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 12
    assert fast.context_cache_stats().context_hits > 0, "the calls went through the shared context cache"
    wrong = [key for key, ids in got.items() if not torch.equal(ids, expected[key[0]])]
    assert not wrong, f"{len(wrong)} of 12 concurrent calls returned another request's tokens: {wrong}"


def test_a_tiny_temperature_tends_to_greedy_instead_of_nan():
    model = build_reference(TINY, seed=2)
    with torch.no_grad():  # logits of a trained model's size (tens), which overflow when divided by 1e-38
        model.lang_encoder.output_head.weight.mul_(50.0)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0], 9), ([2], 9)], num_images=1)
    greedy, logits = model.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=[], return_logits=True)
    assert logits.abs().max() > 3.5, "logits / 1e-38 must overflow float32 for this test to mean anything"
    assert (greedy[:, 9:] != 0).any(), "greedy must not produce token 0 everywhere, or the test proves nothing"
    for impl in (model, fast):
        cold = impl.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=[], do_sample=True,
                             temperature=1e-38, generator=torch.Generator().manual_seed(0))
        assert torch.equal(cold, greedy)


def test_custom_pad_token_after_an_early_stop():
    model = build_reference(TINY, seed=3)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64,
                                       stop_check_interval=4)
    vision, lang_x, mask = random_batch(model.config, [([0], 9), ([2], 9)], num_images=1)
    free = model.generate(vision, lang_x, mask, max_new_tokens=10, eos_token_id=[])
    stop = int(free[0, 9 + 1])  # row 0 stops at its second token at the latest
    end = free[0, 9:].tolist().index(stop)
    assert stop not in free[1, 9:].tolist() or free[1, 9:].tolist().index(stop) > end, "row 1 must run longer"
    pad = 7 if stop != 7 else 8
    expected = model.generate(vision, lang_x, mask, max_new_tokens=10, eos_token_id=stop, pad_token_id=pad)
    got = fast.generate(vision, lang_x, mask, max_new_tokens=10, eos_token_id=stop, pad_token_id=pad)
    assert torch.equal(got, expected)
    assert got[0, 9 + end] == stop and (got[0, 9 + end + 1:] == pad).all(), got[0, 9:]
    assert got.shape[1] > 9 + end + 1, "row 1 must still be generating after row 0 stopped"


def test_returned_logits_are_float32_for_both_at_bf16():
    model = build_reference(TINY, seed=4, dtype=torch.bfloat16)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=1, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0], 9)], num_images=1)
    for new in (0, 3):
        for impl in (model, fast):
            _, logits = impl.generate(vision.bfloat16(), lang_x, mask, max_new_tokens=new, eos_token_id=[],
                                      return_logits=True)
            assert logits.dtype == torch.float32 and logits.shape == (1, new, model.config.lm.vocab_size)


def _generated_image_case():
    """A model whose greedy continuation of row 0 generates `<image>` (its third new token), with
    openflamingo_generated_image_bug=True -> (model, (vision, lang_x, mask), the reference's ids)."""
    config = TINY.replace(openflamingo_generated_image_bug=True)
    model = build_reference(config, seed=5)
    vision, lang_x, mask = random_batch(config, [([0, 4, 8], 12), ([1], 6)], num_images=3)
    free = model.generate(vision, lang_x, mask, max_new_tokens=10, eos_token_id=[])[:, 12:]
    with torch.no_grad():  # the model generates <image> where row 0's third token would be
        head = model.lang_encoder.output_head.weight
        head[config.media_token_id] = 1.5 * head[int(free[0, 2])]
    expected = model.generate(vision, lang_x, mask, max_new_tokens=10, eos_token_id=[])
    assert config.media_token_id in expected[:, 12:-1]
    return model, (vision, lang_x, mask), expected


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=INTERPRETER_MARKS)])
def test_generated_image_flag_fast_matches_reference(backend):
    model, (vision, lang_x, mask), expected = _generated_image_case()
    fast = FastFlamingo.from_reference(model, backend=backend, max_batch_size=2, max_seq_len=32)
    assert torch.equal(fast.generate(vision, lang_x, mask, max_new_tokens=10, eos_token_id=[]), expected)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=INTERPRETER_MARKS)])
def test_generated_image_flag_with_beams_fast_matches_reference(backend):
    """Beam search with openflamingo_generated_image_bug on a batch whose middle row shows no image: some of the
    first two rows' beams generate `<image>`. The fast path (one image index per hypothesis in
    the decode cross-attention, the state kept by batch slot through reorders, every row's first image read)
    returns the reference's tokens, cold, and warm on the same rows in another order, their contexts from the
    context cache (another row's images in the media cache slots they left)."""
    config = TINY.replace(openflamingo_generated_image_bug=True)
    model = build_reference(config, seed=8)
    vision, lang_x, mask = random_batch(config, [([0, 4, 8], 12), ([], 6), ([1, 3], 7)], num_images=3)
    gen = dict(max_new_tokens=3, num_beams=3, length_penalty=-2.0, eos_token_id=[config.eoc_token_id],
               num_return_sequences=3)
    free = model.generate(vision, lang_x, mask, **gen)[:, 12:]
    with torch.no_grad():  # <image> competes with the first row's first hypothesis' second token
        head = model.lang_encoder.output_head.weight
        head[config.media_token_id] = 1.2 * head[int(free[0, 1])]
    expected = model.generate(vision, lang_x, mask, **gen)
    media = (expected[:, 12:-1] == config.media_token_id).view(3, 3, -1).any(dim=2)
    assert media[0].any() and media[1].any() and not media[1].all() and not media[2].any(), media
    fast = FastFlamingo.from_reference(model, backend=backend, max_batch_size=3, max_seq_len=32)
    got = fast.generate(vision, lang_x, mask, **gen)
    assert torch.equal(got, expected), f"fast:\n{got[:, 12:]}\nreference:\n{expected[:, 12:]}"
    if backend == "torch":  # interpreted Triton: the cold call only (~10 s)
        order = torch.tensor([1, 2, 0])
        rolled = (vision[order], lang_x[order], mask[order])
        expected = model.generate(*rolled, **gen)
        assert torch.equal(fast.generate(*rolled, **gen), expected), "warm"
        assert fast.context_cache_stats().context_hits == 2
        # greedy on the same warm rows, logits compared: the first row's generated <image> turns it to its first
        # image, which its cached context shows but its query does not
        expected, expected_logits = model.generate(*rolled, max_new_tokens=4, eos_token_id=[], return_logits=True)
        assert config.media_token_id in expected[2, 12:-1].tolist()
        got, logits = fast.generate(*rolled, max_new_tokens=4, eos_token_id=[], return_logits=True)
        assert fast.context_cache_stats().context_hits == 4
        assert torch.equal(got, expected)
        assert_close(logits, expected_logits)


def test_generated_image_flag_changes_logits_only_after_the_generated_image():
    model, (vision, lang_x, mask), expected = _generated_image_case()
    config = model.config
    default = build_reference(TINY, seed=5)
    default.load_state_dict(model.state_dict())
    _, flag_logits = model.generate(vision, lang_x, mask, max_new_tokens=10, eos_token_id=[], return_logits=True)
    _, own_logits = default.generate(vision, lang_x, mask, max_new_tokens=10, eos_token_id=[], return_logits=True)
    first = int((expected[:, 12:] == config.media_token_id).any(dim=0).nonzero()[0])  # the step that generated it
    assert torch.equal(flag_logits[:, : first + 1], own_logits[:, : first + 1]), "same until <image> is an input"
    assert (flag_logits[:, first + 1:] - own_logits[:, first + 1:]).abs().max() > 1e-3, "the flag must matter"

    with pytest.raises(ValueError, match=r"openflamingo_generated_image_bug=True: supported with "
                                         r"only_attend_immediate_media=True"):
        TINY.replace(openflamingo_generated_image_bug=True, only_attend_immediate_media=False)
