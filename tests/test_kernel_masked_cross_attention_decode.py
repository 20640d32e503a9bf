"""Decode-step masked cross-attention: one query per row against the row's cached media K/V, read in place.
Kernel (interpreted) and twin against a float64 formula; unused cache slots hold NaN garbage that must never
be read; a GPU test replays the kernel and the twin under CUDA-graph capture."""

from __future__ import annotations

import pytest
import torch
from helpers import Padded, assert_close, assert_within_torch_error, interpreter, nan_out

from flamingo_fast.kernels.masked_cross_attention import masked_cross_attention
from flamingo_fast.kernels.masked_cross_attention_decode import (
    masked_cross_attention_decode,
    masked_cross_attention_decode_ref,
)

NL = 64
D_HEAD = 64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = {"immediate": (False, False), "all-previous": (True, False), "all-previous+bug": (True, True)}


def decode_formula64(q, k, v, image_index, *, num_latents=NL, attend_previous=False, pre_image_attends_all=False,
                     num_images=None, scale=None):
    """Row by row in float64: the keys the row's image rule allows, softmax, weighted values."""
    B, H, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros(B, H, d, dtype=torch.float64, device=q.device)
    for b in range(B):
        i = int(image_index[b])
        if i >= 0:
            keys = slice(0 if attend_previous else i * num_latents, (i + 1) * num_latents)
        elif attend_previous and pre_image_attends_all and int(num_images[b]) > 0:
            out[b] = v[b, :, : int(num_images[b]) * num_latents].double().mean(dim=1)
            continue
        else:
            continue
        kk, vv = k[b, :, keys].double(), v[b, :, keys].double()
        w = torch.softmax((kk @ q[b].double()[:, :, None])[..., 0] * scale, dim=-1)
        out[b] = (w[:, :, None] * vv).sum(dim=1)
    return out


def decode_plain_torch(q, k, v, image_index, *, num_latents=NL, attend_previous=False, pre_image_attends_all=False,
                       num_images=None, scale=None):
    """The same rule with plain torch ops at the inputs' dtype (the error yardstick)."""
    B, H, d = q.shape
    scale = d**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(B):
        i = int(image_index[b])
        if i >= 0:
            keys = slice(0 if attend_previous else i * num_latents, (i + 1) * num_latents)
            w = ((q[b, :, None, :] * scale) @ k[b, :, keys].transpose(-1, -2)).softmax(dim=-1)
            out[b] = (w @ v[b, :, keys])[:, 0]
        elif attend_previous and pre_image_attends_all and int(num_images[b]) > 0:
            out[b] = v[b, :, : int(num_images[b]) * num_latents].mean(dim=1)
    return out


def make_cache(images_per_row, capacity_images, H=2, dtype=torch.float32, seed=0, device="cpu", extra_slots=5):
    """q [B, H, d]; K/V caches [B, H, capacity, d] whose slots past each row's images are NaN garbage."""
    g = torch.Generator().manual_seed(seed)
    B = len(images_per_row)
    capacity = capacity_images * NL + extra_slots  # not a multiple of NL: the tail is never an image
    q = torch.randn(B, H, D_HEAD, generator=g)
    k = torch.randn(B, H, capacity, D_HEAD, generator=g)
    v = torch.randn(B, H, capacity, D_HEAD, generator=g)
    for b, n in enumerate(images_per_row):
        k[b, :, n * NL:] = float("nan")
        v[b, :, n * NL:] = float("nan")
    num_images = torch.tensor(images_per_row, dtype=torch.int32)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), num_images.to(device)


ROWS = [0, 1, 3, 6, 2, 3]  # images per row; capacity 6 images


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", list(MODES))
def test_kernel_and_twin_match_formula(mode, dtype):
    attend_previous, pre_bug = MODES[mode]
    q, k, v, num_images = make_cache(ROWS, 6, dtype=dtype)
    image_index = (num_images - 1).to(torch.int32)  # the token belongs to its row's last image
    image_index[4] = 0  # not the last image: immediate mode must read image 0 of that row
    image_index[5] = -1  # a row with images but a token before them (pre-image bug: uniform over 3 images)
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=pre_bug, num_images=num_images,
                  scale=None if dtype != torch.float16 else 0.1)
    inputs = [Padded(q), Padded(k), Padded(v), Padded(image_index)]
    out = nan_out(tuple(q.shape), dtype)
    result = masked_cross_attention_decode(*(p.view for p in inputs), out=out.view, **kwargs)
    assert result.data_ptr() == out.view.data_ptr()
    for p in [*inputs, out]:
        p.assert_padding_intact()
    ref64 = decode_formula64(q, k, v, image_index, **kwargs)
    plain = decode_plain_torch(q, k, v, image_index, **kwargs)
    assert_within_torch_error(result, ref64, plain, dtype)
    twin = masked_cross_attention_decode_ref(*(p.view for p in inputs), **kwargs)
    assert_within_torch_error(twin, ref64, plain, dtype)
    assert_close(result, twin, dtype)
    assert bool((result[0] == 0).all()) and bool((twin[0] == 0).all())  # a row without images: exactly 0


@interpreter
@pytest.mark.parametrize("attend_previous", [False, True])
def test_decode_matches_prefill_kernel_on_the_same_cache(attend_previous):
    """The decode kernel on a cache equals the prefill kernel run on that row's used keys with T = 1."""
    q, k, v, num_images = make_cache([4, 2], 5)
    image_index = (num_images - 1).to(torch.int32)
    decoded = masked_cross_attention_decode(q, k, v, image_index, attend_previous=attend_previous)
    for b in range(2):
        n = int(num_images[b]) * NL
        prefill = masked_cross_attention(q[b:b + 1, :, None], k[b:b + 1, :, :n], v[b:b + 1, :, :n],
                                         image_index[b:b + 1, None], attend_previous=attend_previous)
        assert_close(decoded[b], prefill[0, :, 0])


@interpreter
def test_index_beyond_capacity_is_clamped():
    q, k, v, _ = make_cache([2, 2], 2, extra_slots=0)
    image_index = torch.tensor([5, 1], dtype=torch.int32)  # a caller's error: only 2 images fit
    kp, vp = Padded(k), Padded(v)
    result = masked_cross_attention_decode(q, kp.view, vp.view, image_index)
    twin = masked_cross_attention_decode_ref(q, kp.view, vp.view, image_index)
    expected = decode_formula64(q, k, v, torch.tensor([1, 1])).float()  # row 0 reads the last image that fits
    assert_close(result, expected)
    assert_close(twin, expected)


BAD_INPUTS = [
    ("q rank 4", lambda a: a.update(q=a["q"][:, :, None]), "q"),
    ("k dtype", lambda a: a.update(k=a["k"].double()), "k"),
    ("k batch", lambda a: a.update(k=a["k"][:1]), "k"),
    ("v shape", lambda a: a.update(v=a["v"][:, :, :64]), "v"),
    ("index int64", lambda a: a.update(image_index=a["image_index"].long()), "image_index"),
    ("index [B, 1]", lambda a: a.update(image_index=a["image_index"][:, None]), "image_index"),
    ("bug without num_images", lambda a: a.update(attend_previous=True, pre_image_attends_all=True), "num_images"),
    ("num_images int64", lambda a: a.update(num_images=torch.tensor([1, 2])), "num_images"),
    ("num_images wrong B", lambda a: a.update(num_images=torch.tensor([1], dtype=torch.int32)), "num_images"),
    ("out wrong shape", lambda a: a.update(out=torch.empty(2, 2, 32)), "out"),
]


@pytest.mark.parametrize("fn", [masked_cross_attention_decode, masked_cross_attention_decode_ref],
                         ids=["kernel", "twin"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fn, case):
    _, change, name = case
    q, k, v, num_images = make_cache([1, 2], 2)
    args = dict(q=q, k=k, v=v, image_index=(num_images - 1).to(torch.int32))
    change(args)
    q, k, v, index = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("image_index")
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(q, k, v, index, **args)


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_real_sizes_bf16(mode):
    attend_previous, pre_bug = MODES[mode]
    rows = [32, 1, 8, 0, 17, 32, 5, 2]
    q, k, v, num_images = make_cache(rows, 32, H=8, dtype=torch.bfloat16, device="cuda")
    image_index = (num_images - 1).to(torch.int32)
    image_index[2] = -1
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=pre_bug, num_images=num_images)
    ref64 = decode_formula64(q, k, v, image_index, **kwargs)
    plain = decode_plain_torch(q, k, v, image_index, **kwargs)
    assert_within_torch_error(masked_cross_attention_decode(q, k, v, image_index, **kwargs), ref64, plain,
                              torch.bfloat16)
    assert_within_torch_error(masked_cross_attention_decode_ref(q, k, v, image_index, **kwargs), ref64, plain,
                              torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("fn", [masked_cross_attention_decode, masked_cross_attention_decode_ref],
                         ids=["kernel", "twin"])
@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_cuda_graph_replay_matches_eager(fn, mode):
    """Captured once, replayed with new queries and new per-row image indices: same as eager calls. The
    capture itself fails if the op syncs with the host or allocates outside the graph's pool."""
    attend_previous, pre_bug = MODES[mode]
    q, k, v, num_images = make_cache([4, 1, 3, 0], 4, H=8, dtype=torch.bfloat16, device="cuda")
    q_static, index_static, counts_static = q.clone(), (num_images - 1).to(torch.int32), num_images.clone()
    out_static = torch.empty_like(q)
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=pre_bug)

    def step():
        fn(q_static, k, v, index_static, num_images=counts_static, out=out_static, **kwargs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compilation stays out of the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        q_static.copy_(torch.randn_like(q))
        index_static.copy_(torch.tensor([3 - trial, 0, -1 + trial, -1], dtype=torch.int32, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        eager = fn(q_static, k, v, index_static, num_images=counts_static, **kwargs)
        if fn is masked_cross_attention_decode:  # the same kernel on the same inputs: the same bits
            torch.testing.assert_close(out_static, eager, rtol=0, atol=0)
        else:  # the twin's SDPA may pick another backend when captured
            assert_close(out_static, eager)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_several_queries_per_row_read_their_rows_cache(mode, impl):
    """queries_per_row R: query b is a query of row b // R and attends to that row's image; the same as R
    copies of each row's cache with one query each (the float64 formula over the expanded cache)."""
    if impl == "kernel" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    attend_previous, bug = MODES[mode]
    R = 3
    q_rows, k, v, counts = make_cache(ROWS, 6, seed=11)
    index = (counts - 1).to(torch.int32)
    index[2] = 0  # a row that attends to an earlier image than its last
    q = torch.randn(len(ROWS) * R, q_rows.shape[1], D_HEAD, generator=torch.Generator().manual_seed(12))
    op = masked_cross_attention_decode if impl == "kernel" else masked_cross_attention_decode_ref
    got = op(q, k, v, index, attend_previous=attend_previous, pre_image_attends_all=bug,
             num_images=counts if bug else None, queries_per_row=R)
    expected = decode_formula64(q, k.repeat_interleave(R, 0), v.repeat_interleave(R, 0), index.repeat_interleave(R),
                                attend_previous=attend_previous, pre_image_attends_all=bug,
                                num_images=counts.repeat_interleave(R))
    assert_close(got, expected.float(), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"image_index: .*\[6\]: one per row of k"):
        op(q, k, v, index.repeat_interleave(R), queries_per_row=R)
    with pytest.raises(ValueError, match=r"q: 18 queries is not a multiple of queries_per_row=4"):
        op(q, k, v, index, queries_per_row=4)


@pytest.mark.parametrize("impl", ["kernel", "twin"])
def test_one_image_per_query(impl):
    """index_per_query: the R queries of a row read its cache, each attending to its own image (-1: exactly 0);
    the same as R copies of the row's cache with one query each. Immediate mode only."""
    if impl == "kernel" and __import__("os").environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    R = 3
    q_rows, k, v, counts = make_cache(ROWS, 6, seed=13)
    index = torch.tensor([[-1, -1, -1], [0, -1, 0], [2, 0, -1], [5, 1, 3], [-1, 1, 0], [0, 2, 1]], dtype=torch.int32)
    index = index.flatten()  # within each row's images (row 0 has none)
    q = torch.randn(len(ROWS) * R, q_rows.shape[1], D_HEAD, generator=torch.Generator().manual_seed(14))
    op = masked_cross_attention_decode if impl == "kernel" else masked_cross_attention_decode_ref
    got = op(q, k, v, index, queries_per_row=R, index_per_query=True)
    expected = decode_formula64(q, k.repeat_interleave(R, 0), v.repeat_interleave(R, 0), index)
    assert_close(got, expected.float(), dtype=torch.float32)
    assert bool((got[index == -1] == 0).all())
    with pytest.raises(ValueError, match=r"image_index: .*\[18\]: one per query \(index_per_query=True\)"):
        op(q, k, v, index[::R], queries_per_row=R, index_per_query=True)
    with pytest.raises(ValueError, match=r"index_per_query=True with attend_previous=True"):
        op(q, k, v, index, queries_per_row=R, index_per_query=True, attend_previous=True)
