"""FastFlamingo against the reference: logits within tolerance, identical greedy tokens, same sampling."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import assert_close, assert_within_torch_error, random_batch

from flamingo_fast.config import from_name
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.runtime import FastFlamingo

TINY = from_name("tiny")
NEW_TOKENS = 20

# image positions per row, and row lengths: 0, 1, 2 and 5 images, text before the first image.
LAYOUTS = {
    0: [([], 9)],
    1: [([0], 12)],
    2: [([3, 9], 15)],
    5: [([0, 4, 8, 12, 16], 22)],
}


def build(immediate: bool = True, every: int = 1, seed: int = 0, **overrides):
    config = TINY.replace(only_attend_immediate_media=immediate, cross_attn_every_n_layers=every, **overrides)
    return build_reference(config, seed=seed)


def compare(model, fast, vision, lang_x, mask, new_tokens=NEW_TOKENS, **gen):
    assert_close(fast(vision, lang_x, mask), model(vision, lang_x, mask), dtype=torch.float32)
    ref_ids, ref_logits = model.generate(vision, lang_x, mask, max_new_tokens=new_tokens, return_logits=True, **gen)
    ids, logits = fast.generate(vision, lang_x, mask, max_new_tokens=new_tokens, return_logits=True, **gen)
    assert torch.equal(ids, ref_ids), f"tokens differ:\n{ids[:, lang_x.shape[1]:]}\n{ref_ids[:, lang_x.shape[1]:]}"
    assert_close(logits, ref_logits, dtype=torch.float32)


# Every image count in both modes at one cadence, and the other cadences at two images (not the full product,
# to keep CI short: the cadence only changes which layers hold a block).
CASES = [(images, immediate, 2) for images in sorted(LAYOUTS) for immediate in (True, False)] + [
    (2, immediate, every) for every in (1, 3) for immediate in (True, False)
]


@pytest.mark.parametrize("images, immediate, every", CASES)
def test_torch_backend_matches_reference(images, immediate, every):
    model = build(immediate, every, seed=images + 10 * every)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, LAYOUTS[images], num_images=images)
    compare(model, fast, vision, lang_x, mask, eos_token_id=[])


@pytest.mark.parametrize("immediate", [True, False])
def test_batch_with_different_image_counts_and_left_padding(immediate):
    model = build(immediate, every=2, seed=3)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=64)
    rows = [([0, 5, 9], 16), ([2], 7), ([], 11)]  # 3 images, 1 image (2 padding images), text-only
    vision, lang_x, mask = random_batch(model.config, rows, num_images=3)
    compare(model, fast, vision, lang_x, mask, eos_token_id=[])


def test_openflamingo_pre_image_bug_mode_matches_reference():
    model = build(immediate=False, every=1, seed=4, openflamingo_pre_image_bug=True)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([4, 9], 13), ([6], 10)], num_images=2)
    compare(model, fast, vision, lang_x, mask, eos_token_id=[])


def test_text_only_prompt_without_vision():
    model = build(seed=5)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    _, lang_x, mask = random_batch(model.config, [([], 8), ([], 5)], num_images=0)
    compare(model, fast, None, lang_x, mask, eos_token_id=[])


def test_stopping_matches_reference():
    model = build(seed=6)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64, stop_check_interval=3)
    vision, lang_x, mask = random_batch(model.config, [([0], 8), ([1], 8)], num_images=1)
    free = model.generate(vision, lang_x, mask, max_new_tokens=12, eos_token_id=[])
    stop = int(free[0, 10])  # a token row 0 emits, so generation stops early
    ref = model.generate(vision, lang_x, mask, max_new_tokens=12, eos_token_id=stop)
    got = fast.generate(vision, lang_x, mask, max_new_tokens=12, eos_token_id=stop)
    first_stop = int((ref[0, 8:] == stop).nonzero()[0]) + 8
    assert first_stop <= 10 and (ref[0, first_stop + 1 :] == model.config.pad_token_id).all()
    assert torch.equal(got, ref)


def test_sampling_with_the_same_seed_matches_reference():
    model = build(seed=7)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0, 6], 10), ([3], 10)], num_images=2)
    options = dict(max_new_tokens=12, do_sample=True, temperature=1.3, top_k=30, top_p=0.95, eos_token_id=[])
    ref = model.generate(vision, lang_x, mask, generator=torch.Generator().manual_seed(11), **options)
    a = fast.generate(vision, lang_x, mask, generator=torch.Generator().manual_seed(11), **options)
    b = fast.generate(vision, lang_x, mask, generator=torch.Generator().manual_seed(11), **options)
    assert torch.equal(a, b) and torch.equal(a, ref)


def test_sampling_several_sequences_per_row_matches_reference():
    """num_return_sequences=3 with sampling: each row forks into 3 hypotheses sharing its prompt (rows b * 3 + j,
    as transformers expands the batch), drawn from one generator; the reference runs the same search over its own
    decoder; the 3 samples of a row differ."""
    model = build(seed=7)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0, 6], 10), ([3], 10)], num_images=2)
    options = dict(max_new_tokens=8, do_sample=True, temperature=1.3, eos_token_id=[], num_return_sequences=3)
    ref = model.generate(vision, lang_x, mask, generator=torch.Generator().manual_seed(5), **options)
    got = fast.generate(vision, lang_x, mask, generator=torch.Generator().manual_seed(5), **options)
    assert got.shape == (6, lang_x.shape[1] + 8) and torch.equal(got, ref)
    assert torch.equal(got[:, :lang_x.shape[1]], lang_x.repeat_interleave(3, dim=0))
    for row in range(2):
        samples = {tuple(got[row * 3 + j, lang_x.shape[1]:].tolist()) for j in range(3)}
        assert len(samples) == 3
    with pytest.raises(ValueError, match=r"num_return_sequences=3: 2 rows x 3 hypotheses exceeds max_hypotheses=4"):
        FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64,
                                    max_hypotheses=4).generate(vision, lang_x, mask, **options)
    with pytest.raises(ValueError, match=r"num_return_sequences=2: expected an integer in \[1, num_beams=1\] "
                                         r"\(more only when sampling"):
        fast.generate(vision, lang_x, mask, max_new_tokens=2, num_return_sequences=2)


def test_requests_are_independent():
    model = build(seed=8)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=64)
    vision_a, ids_a, mask_a = random_batch(model.config, [([0, 4, 8, 12], 20)] * 3, num_images=4)
    vision_b, ids_b, mask_b = random_batch(model.config, [([2], 9), ([0], 6)], num_images=1)
    alone = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=64)
    expected = alone.generate(vision_b, ids_b, mask_b, max_new_tokens=10, eos_token_id=[])
    fast.generate(vision_a, ids_a, mask_a, max_new_tokens=25, eos_token_id=[])
    assert torch.equal(fast.generate(vision_b, ids_b, mask_b, max_new_tokens=10, eos_token_id=[]), expected)


def test_padding_images_are_not_encoded(monkeypatch):
    model = build(seed=9)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0, 5], 9), ([1], 9)], num_images=4)
    seen = []
    original = model.vision_encoder.forward
    def counting_forward(images):
        seen.append(images.shape[0])
        return original(images)

    monkeypatch.setattr(model.vision_encoder, "forward", counting_forward)
    vision[1, 1:] = float("nan")  # row 1 uses one image: its other three are padding and must not be read
    vision[0, 2:] = float("nan")
    ids = fast.generate(vision, lang_x, mask, max_new_tokens=4, eos_token_id=[])
    assert seen == [3], f"encoded {seen} images; expected the 3 that rows use, in one batch"
    assert ids.shape == (2, 13)


def test_dtype_conversion_leaves_the_reference_alone():
    model = build(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = FastFlamingo.from_reference(model, backend="torch", dtype=torch.bfloat16, max_batch_size=2, max_seq_len=32)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) and after[k].dtype == torch.float32 for k, v in before.items())
    converted = fast.model.state_dict()
    assert all(converted[k].dtype == torch.bfloat16 and torch.equal(converted[k], v.to(torch.bfloat16))
               for k, v in before.items())
    # the converted instance runs: its logits are as close to a float64 reference as the bf16 reference's own
    vision, lang_x, mask = random_batch(model.config, [([0, 4], 12), ([2], 9)], num_images=2)
    reference64 = copy.deepcopy(model).double()(vision.double(), lang_x, mask)
    reference16 = copy.deepcopy(model).to(torch.bfloat16)(vision, lang_x, mask)
    real = mask.bool()
    assert_within_torch_error(fast(vision, lang_x, mask)[real], reference64[real], reference16[real], torch.bfloat16)
    assert fast.generate(vision, lang_x, mask, max_new_tokens=3, eos_token_id=[]).shape == (2, 15)
    shared = FastFlamingo.from_reference(model, backend="torch", max_batch_size=1, max_seq_len=32)
    assert shared.model.lang_encoder.lm_head.weight is model.lang_encoder.lm_head.weight


def test_capacity_and_option_errors():
    model = build(seed=2)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=24, max_images=2)
    vision, lang_x, mask = random_batch(model.config, [([0], 10)] * 3, num_images=1)
    with pytest.raises(ValueError, match=r"lang_x: batch 3 exceeds max_batch_size=2"):
        fast.generate(vision, lang_x, mask, max_new_tokens=2)
    expected = r"max_new_tokens=20: prompt length 10 \+ max_new_tokens = 30 exceeds max_seq_len=24"
    with pytest.raises(ValueError, match=expected):
        fast.generate(vision[:1], lang_x[:1], mask[:1], max_new_tokens=20)
    vision, lang_x, mask = random_batch(model.config, [([0, 2, 4], 10)], num_images=3)
    with pytest.raises(ValueError, match=r"lang_x: a row has 3 <image> tokens; expected at most max_images=2"):
        fast.generate(vision, lang_x, mask, max_new_tokens=2)
    buggy = FastFlamingo.from_reference(build(immediate=False, seed=2, openflamingo_pre_image_bug=True),
                                        backend="torch", max_batch_size=2, max_seq_len=24, max_images=2)
    one_token = random_batch(model.config, [([4], 10)], num_images=3)  # one <image>, three images given
    with pytest.raises(ValueError, match=r"lang_x: a row has 3 images to encode \(the pre-image bug mode"):
        buggy.generate(*one_token, max_new_tokens=2)
    with pytest.raises(ValueError, match=r"backend='cuda': expected one of \('triton', 'torch'\)"):
        FastFlamingo.from_reference(model, backend="cuda")
    with pytest.raises(ValueError, match=r"max_batch_size=0: expected an integer >= 1"):
        FastFlamingo.from_reference(model, backend="torch", max_batch_size=0)
    with pytest.raises(ValueError, match=r"lang_x: row 0 has 3 <image> tokens but vision_x holds 1"):
        fast.generate(vision[:, :1], lang_x, mask, max_new_tokens=2)


@pytest.mark.interpreter
@pytest.mark.parametrize("immediate", [True, False])
def test_triton_backend_matches_reference(immediate):
    """The Triton kernels, interpreted on the CPU, inside the whole runtime (on a GPU: compiled)."""
    model = build(immediate, every=2, seed=12)
    fast = FastFlamingo.from_reference(model, backend="triton", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0, 5], 11), ([2], 8)], num_images=2)
    compare(model, fast, vision, lang_x, mask, new_tokens=8, eos_token_id=[])


# ---------------------------------------------------------------------------------------------- CUDA only


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_replay_equals_eager_and_reference(dtype):
    model = build(immediate=True, every=2, seed=13).cuda()
    vision, lang_x, mask = random_batch(model.config, [([0, 5, 9], 14), ([2], 8), ([], 6)], num_images=3)
    vision, lang_x, mask = vision.cuda(), lang_x.cuda(), mask.cuda()
    eager = FastFlamingo.from_reference(model, dtype=dtype, cuda_graphs=False, max_batch_size=4, max_seq_len=128)
    graphed = FastFlamingo.from_reference(model, dtype=dtype, cuda_graphs=True, max_batch_size=4, max_seq_len=128)
    a, la = eager.generate(vision, lang_x, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], return_logits=True)
    b, lb = graphed.generate(vision, lang_x, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], return_logits=True)
    assert graphed.graphs is not None and graphed.graphs.graphs, "no CUDA graph was captured"
    assert torch.equal(a, b)
    assert_close(lb, la, dtype=torch.float32)
    if dtype == torch.float32:
        ref, lr = model.generate(vision, lang_x, mask, max_new_tokens=NEW_TOKENS, eos_token_id=[], return_logits=True)
        assert torch.equal(b, ref)
        torch.testing.assert_close(lb, lr, atol=2e-3, rtol=2e-3)  # tf32 matmuls in the Triton dots


@pytest.mark.cuda
def test_cuda_graph_requests_are_independent_and_memory_is_flat():
    model = build(seed=14).cuda()
    fast = FastFlamingo.from_reference(model, max_batch_size=4, max_seq_len=64)
    vision_a, ids_a, mask_a = (t.cuda() for t in random_batch(model.config, [([0, 4, 8], 16)] * 4, num_images=3))
    vision_b, ids_b, mask_b = (t.cuda() for t in random_batch(model.config, [([1], 7), ([0], 5)], num_images=1))
    alone = FastFlamingo.from_reference(model, max_batch_size=4, max_seq_len=64)
    expected = alone.generate(vision_b, ids_b, mask_b, max_new_tokens=8, eos_token_id=[])
    fast.generate(vision_a, ids_a, mask_a, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(fast.generate(vision_b, ids_b, mask_b, max_new_tokens=8, eos_token_id=[]), expected)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(1000):
        fast.generate(vision_b, ids_b, mask_b, max_new_tokens=4, eos_token_id=[])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before, f"allocated grew from {before} to {torch.cuda.memory_allocated()}"
