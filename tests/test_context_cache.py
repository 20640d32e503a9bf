"""The few-shot context cache: warm, cold and off give the same results; contexts and images are reused by
content (never by tensor identity), computed once per call, kept under the byte budget, least recently used
first out; queries are never stored."""

from __future__ import annotations

import pytest
import torch
from few_shot import FAMILIES, build, few_shot_batch
from helpers import assert_close

from flamingo_fast.runtime import prefill
from flamingo_fast.runtime.runtime import FastFlamingo


def fast_pair(model, **options):
    on = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=96, **options)
    off = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=96, context_cache_bytes=0)
    return on, off


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_warm_cold_and_off_agree(family):
    model = build(family, seed=len(family))
    on, off = fast_pair(model)
    vision, lang_x, mask = few_shot_batch(model.config, 3, [2, 5, 3])
    expected, expected_logits = model.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=[],
                                               return_logits=True)
    encoded = []
    encode = on.model.vision_encoder.forward
    for impl in (off, on, on):  # off, then cold, then warm
        on.model.vision_encoder.forward = lambda x: encoded.append(x.shape[0]) or encode(x)
        ids, logits = impl.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=[], return_logits=True)
        on.model.vision_encoder.forward = encode
        assert torch.equal(ids, expected)
        assert_close(logits, expected_logits, dtype=torch.float32)
    stats = on.context_cache_stats()
    assert (stats.contexts, stats.context_hits, stats.context_misses) == (1, 1, 1), stats
    assert stats.images == 3, "the 3 demonstration images are stored, never the queries"
    assert encoded == [3 * 4, 3 + 3, 3], "off: every row's images; cold: demonstrations once + queries; warm: queries"
    assert off.context_cache_stats().contexts == 0
    # beams and scoring go through the same prefill
    beams = dict(max_new_tokens=5, num_beams=3, eos_token_id=[])
    assert torch.equal(on.generate(vision, lang_x, mask, **beams), model.generate(vision, lang_x, mask, **beams))
    cands = [[5], [7, 8], [9, 10, 11]]
    assert_close(on.score(vision, lang_x, mask, candidates=cands), model.score(vision, lang_x, mask, candidates=cands),
                 dtype=torch.float32)


@pytest.mark.parametrize("immediate", [True, False])
def test_both_masking_modes(immediate):
    model = build(seed=3, only_attend_immediate_media=immediate)
    on, _ = fast_pair(model)
    vision, lang_x, mask = few_shot_batch(model.config, 2, [4, 1])
    expected = model.generate(vision, lang_x, mask, max_new_tokens=5, eos_token_id=[])
    for _ in range(2):
        assert torch.equal(on.generate(vision, lang_x, mask, max_new_tokens=5, eos_token_id=[]), expected)
    assert on.context_cache_stats().context_hits == 1


def test_rows_of_one_call_compute_a_shared_context_once(monkeypatch):
    model = build(seed=4)
    on, _ = fast_pair(model)
    computed, encoded = [], []
    original = prefill.compute_context
    monkeypatch.setattr(prefill, "compute_context", lambda *a, **k: computed.append(1) or original(*a, **k))
    vision, lang_x, mask = few_shot_batch(model.config, 4, [3, 6, 2, 4])
    expected = model.generate(vision, lang_x, mask, max_new_tokens=4, eos_token_id=[])
    encode = on.model.vision_encoder.forward
    on.model.vision_encoder.forward = lambda x: encoded.append(x.shape[0]) or encode(x)
    assert torch.equal(on.generate(vision, lang_x, mask, max_new_tokens=4, eos_token_id=[]), expected)
    assert len(computed) == 1
    assert encoded == [4 + 4], "the 4 shared demonstration images once, and each row's query image"
    on.model.vision_encoder.forward = encode
    # a different query batch on the same context: nothing computed again
    vision2, lang_x2, mask2 = few_shot_batch(model.config, 4, [5, 5], query_seed=9)
    assert torch.equal(on.generate(vision2, lang_x2, mask2, max_new_tokens=4, eos_token_id=[]),
                       model.generate(vision2, lang_x2, mask2, max_new_tokens=4, eos_token_id=[]))
    assert len(computed) == 1


def test_content_not_identity_a_refilled_tensor_gets_fresh_results():
    model = build(seed=5)
    on, off = fast_pair(model)
    vision, lang_x, mask = few_shot_batch(model.config, 2, [3, 3])
    on.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=[])
    vision[:, 0] = torch.randn_like(vision[0, 0])  # the caller refills a demonstration image in place
    expected, expected_logits = off.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=[],
                                             return_logits=True)
    for _ in range(2):  # the new content misses, then hits
        ids, logits = on.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=[], return_logits=True)
        assert torch.equal(ids, expected)
        assert_close(logits, expected_logits, dtype=torch.float32)
    stats = on.context_cache_stats()
    assert (stats.contexts, stats.context_misses, stats.context_hits) == (2, 2, 1), stats
    assert stats.images == 3, "the two first images and the refilled one"


def test_demonstrations_drawn_from_a_pool_reuse_their_images():
    """Different contexts that share images: the images are encoded once."""
    model = build(seed=6)
    on, _ = fast_pair(model)
    size = model.config.vision.image_size
    pool = torch.randn(3, 1, 3, size, size)
    calls = [few_shot_batch(model.config, 2, [3], context_seed=seed, demo_images=pool[picks])
             for seed, picks in ((0, [0, 1]), (1, [1, 2]), (2, [2, 0]))]
    expected = [model.generate(*call, max_new_tokens=3, eos_token_id=[]) for call in calls]
    encoded = []
    original = on.model.vision_encoder.forward
    on.model.vision_encoder.forward = lambda x: encoded.append(x.shape[0]) or original(x)
    for call, ids in zip(calls, expected, strict=True):
        assert torch.equal(on.generate(*call, max_new_tokens=3, eos_token_id=[]), ids)
    assert encoded == [3, 2, 1], "pool images 0, 1 and the query; then pool image 2 and the query; the query"


def test_byte_budget_lru_and_clear():
    model = build(seed=7)
    probe, _ = fast_pair(model)
    vision, lang_x, mask = few_shot_batch(model.config, 2, [3])
    probe.generate(vision, lang_x, mask, max_new_tokens=2, eos_token_id=[])
    one_call = probe.context_cache_stats().bytes  # one context and its two images
    budget = int(one_call * 1.5)
    on = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=96,
                                     context_cache_bytes=budget)
    for seed in range(4):
        vision, lang_x, mask = few_shot_batch(model.config, 2, [3], context_seed=seed)
        expected = model.generate(vision, lang_x, mask, max_new_tokens=3, eos_token_id=[])
        assert torch.equal(on.generate(vision, lang_x, mask, max_new_tokens=3, eos_token_id=[]), expected)
        stats = on.context_cache_stats()
        assert stats.bytes <= budget, stats
    assert stats.evictions > 0 and stats.budget == budget
    # the most recent context is still there; the first one was evicted
    vision, lang_x, mask = few_shot_batch(model.config, 2, [3], context_seed=3)
    on.generate(vision, lang_x, mask, max_new_tokens=2, eos_token_id=[])
    assert on.context_cache_stats().context_hits == 1
    on.clear_context_cache()
    stats = on.context_cache_stats()
    assert (stats.bytes, stats.contexts, stats.images) == (0, 0, 0)
    tiny = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=96, context_cache_bytes=10)
    assert torch.equal(tiny.generate(vision, lang_x, mask, max_new_tokens=3, eos_token_id=[]),
                       model.generate(vision, lang_x, mask, max_new_tokens=3, eos_token_id=[]))
    assert tiny.context_cache_stats().bytes == 0, "an entry larger than the budget is used but never stored"
    with pytest.raises(ValueError, match=r"context_cache_bytes=-1: expected an integer >= 0"):
        FastFlamingo.from_reference(model, backend="torch", context_cache_bytes=-1)


def test_pre_image_bug_mode_never_keys_contexts():
    model = build(seed=8, only_attend_immediate_media=False, openflamingo_pre_image_bug=True)
    on, _ = fast_pair(model)
    vision, lang_x, mask = few_shot_batch(model.config, 2, [3, 1])
    for _ in range(2):
        assert torch.equal(on.generate(vision, lang_x, mask, max_new_tokens=4, eos_token_id=[]),
                           model.generate(vision, lang_x, mask, max_new_tokens=4, eos_token_id=[]))
    assert on.context_cache_stats().contexts == 0


def test_prefix_contexts_changed_pixel_changed_token_and_mixed_rows():
    """Each call's warm result equals the reference: a context that extends a cached one and the reverse, one
    pixel changed in place in a context image, one token changed mid-context, and a batch mixing rows that
    share the context, a row with another context and a text-only row."""
    model = build(seed=9)
    on, _ = fast_pair(model)
    config = model.config

    def check(vision, lang_x, mask):
        expected, expected_logits = model.generate(vision, lang_x, mask, max_new_tokens=5, eos_token_id=[],
                                                   return_logits=True)
        for _ in range(2):  # as it comes (cold or partly warm), then warm
            ids, logits = on.generate(vision, lang_x, mask, max_new_tokens=5, eos_token_id=[], return_logits=True)
            assert torch.equal(ids, expected)
            assert_close(logits, expected_logits, dtype=torch.float32)

    size = config.vision.image_size
    demos = torch.randn(3, 1, 3, size, size)
    short = few_shot_batch(config, 2, [3, 4], demo_images=demos[:2])
    longer = few_shot_batch(config, 3, [3, 4], demo_images=demos)
    check(*short)
    check(*longer)  # extends the cached 2-shot context (same first demonstrations, same seed for their text)
    check(*short)  # and back
    vision, lang_x, mask = few_shot_batch(config, 2, [3, 4], demo_images=demos[:2].clone())
    check(vision, lang_x, mask)
    vision[:, 1, 0, 0, 5, 5] += 0.5  # one pixel of one context image, in place in the same tensor
    check(vision, lang_x, mask)
    lang_x = lang_x.clone()
    middle = 3 if mask[0, 0] else int((mask[0] == 0).sum()) + 3
    lang_x[:, middle] = (lang_x[:, middle] + 1) % config.eoc_token_id  # one caption token mid-context
    check(vision, lang_x, mask)
    # mixed batch: two rows share the context, one has another context, one is text only (no image at all)
    vision_a, lang_a, _ = few_shot_batch(config, 2, [3, 2], demo_images=demos[:2])
    vision_b, lang_b, _ = few_shot_batch(config, 2, [2], context_seed=5)
    text_only = torch.randint(3, config.eoc_token_id, (1, 7))
    rows = [lang_a[0], lang_a[1], lang_b[0], text_only[0]]
    longest = max(len(r) for r in rows)
    lang_x = torch.stack([torch.cat([torch.full((longest - len(r),), config.pad_token_id), r]) for r in rows])
    mask = torch.stack([torch.cat([torch.zeros(longest - len(r)), torch.ones(len(r))]).long() for r in rows])
    vision = torch.cat([vision_a, vision_b, torch.zeros_like(vision_b)])
    check(vision, lang_x, mask)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_warm_equals_cold(dtype):
    model = build(seed=10).to(device="cuda", dtype=dtype)
    graphed = FastFlamingo.from_reference(model, max_batch_size=4, max_seq_len=96)
    plain = FastFlamingo.from_reference(model, max_batch_size=4, max_seq_len=96, context_cache_bytes=0,
                                        cuda_graphs=False)
    vision, lang_x, mask = (t.cuda() for t in few_shot_batch(model.config, 3, [2, 5, 3]))
    vision = vision.to(dtype)
    expected = plain.generate(vision, lang_x, mask, max_new_tokens=8, eos_token_id=[])
    for _ in range(3):  # cold, then warm twice
        assert torch.equal(graphed.generate(vision, lang_x, mask, max_new_tokens=8, eos_token_id=[]), expected)
    assert graphed.context_cache_stats().context_hits == 2


def test_image_digests_see_every_bit_and_nothing_else():
    from flamingo_fast.runtime.context_cache import image_digests

    images = torch.randn(6, 1, 3, 8, 8)
    keys = image_digests(images)
    assert len(set(keys)) == 6 and keys == image_digests(images.clone())
    for index in ((0, 0, 0, 0, 0), (3, 0, 2, 7, 7), (5, 0, 1, 4, 3)):
        changed = images.clone()
        changed[index] = torch.nextafter(changed[index], torch.tensor(float("inf")))  # one ULP, one word
        assert [i for i, (a, b) in enumerate(zip(keys, image_digests(changed), strict=True)) if a != b] == [index[0]]
    odd = torch.randn(4, 5, 7, dtype=torch.bfloat16)  # 70 bytes per image: not whole int32 words
    shifted = torch.cat([torch.zeros(1, 5, 7, dtype=torch.bfloat16), odd])[1:]  # unaligned storage offset
    assert image_digests(odd) == image_digests(shifted)
    assert image_digests(odd.float())[0] != image_digests(odd)[0], "dtype is part of the key"
