"""Fused rotary + K/V cache write of a decode step: kernel (interpreted) and twin against the reference's
apply_rotary in float64 (and plain torch at the dtype as the error yardstick), full and partial rotary, no
rotary (ALiBi), grouped KV heads, strided views as the runtime passes them; the caches are NaN-poisoned
buffers of which only the written column may change."""

from __future__ import annotations

import pytest
import torch
from helpers import Padded, assert_close, assert_within_torch_error, interpreter, nan_out

from flamingo_fast.kernels.rotary_kv_write import rotary_kv_write, rotary_kv_write_ref
from flamingo_fast.positions import apply_rotary, rotary_cos_sin

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def inputs(N, Hq, Hkv, d, rotary, dtype):
    """q, k, v as strided views of one fused projection output [N, (Hq + 2 Hkv) * d] (the runtime's layout),
    cos/sin [N, rotary] from random positions (None without rotary)."""
    qkv = torch.randn(N, (Hq + 2 * Hkv) * d).to(dtype)
    q = qkv[:, : Hq * d].view(N, Hq, d)
    k = qkv[:, Hq * d: (Hq + Hkv) * d].view(N, Hkv, d)
    v = qkv[:, (Hq + Hkv) * d:].view(N, Hkv, d)
    if not rotary:
        return q, k, v, None, None
    cos, sin = rotary_cos_sin(torch.randint(0, 300, (N, 1)), rotary, 10000.0, dtype)
    return q, k, v, cos[:, 0, 0], sin[:, 0, 0]


def rotate(x, cos, sin, dtype=None):
    """The reference's apply_rotary on [N, H, d] (float64 when dtype is None, else at `dtype`)."""
    if cos is None:
        return x.double() if dtype is None else x
    cast = (lambda t: t.double()) if dtype is None else (lambda t: t)
    return apply_rotary(cast(x)[:, :, None], cast(cos)[:, None, None], cast(sin)[:, None, None])[:, :, 0]


CASES = {"llama-gqa": (3, 4, 2, 16, 16), "neox-partial": (2, 4, 4, 32, 8), "mpt-alibi": (2, 4, 4, 16, 0),
         "9b-head": (1, 2, 2, 128, 128)}


def check(fn, case, dtype, column_kind):
    N, Hq, Hkv, d, rotary = CASES[case]
    S = 9
    q, k, v, cos, sin = inputs(N, Hq, Hkv, d, rotary, dtype)
    # the caches: [N, Hkv, S, d] views of NaN-padded buffers whose rows are stored [N, S, Hkv, d]
    k_cache = Padded(torch.full((N, Hkv, S, d), float("nan"), dtype=dtype), order=(0, 2, 1, 3))
    v_cache = Padded(torch.full((N, Hkv, S, d), float("nan"), dtype=dtype), order=(0, 2, 1, 3))
    column = torch.tensor([5]) if column_kind == "one" else torch.tensor([0, 8, 3][:N], dtype=torch.int32)
    out = nan_out((N, Hq, d), dtype)
    got = fn(q, k, v, cos, sin, k_cache.view, v_cache.view, column, out=out.view)
    assert got is out.view
    assert_within_torch_error(got, rotate(q, cos, sin), rotate(q, cos, sin, dtype), dtype)
    cols = column.expand(N)
    rows = torch.arange(N)
    written_k, written_v = k_cache.view[rows, :, cols], v_cache.view[rows, :, cols]  # [N, Hkv, d]
    assert_within_torch_error(written_k, rotate(k, cos, sin), rotate(k, cos, sin, dtype), dtype)
    assert torch.equal(written_v, v)
    others = torch.ones(N, S, dtype=torch.bool)
    others[rows, cols] = False
    assert bool(k_cache.view.isnan().permute(0, 2, 1, 3)[others].all()), "a column other than `column` was written"
    assert bool(v_cache.view.isnan().permute(0, 2, 1, 3)[others].all()), "a column other than `column` was written"
    for buffer in (k_cache, v_cache, out):
        buffer.assert_padding_intact()
    return got, written_k


@interpreter
@pytest.mark.parametrize("column_kind", ["one", "per-row"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_rotates_and_writes_one_column(case, dtype, column_kind):
    torch.manual_seed(1)
    q_kernel, k_kernel = check(rotary_kv_write, case, dtype, column_kind)
    torch.manual_seed(1)
    q_twin, k_twin = check(rotary_kv_write_ref, case, dtype, column_kind)
    # the same float32 formula rounded once: interpreted, the kernel and the twin agree bit for bit
    assert torch.equal(q_kernel, q_twin)
    assert torch.equal(k_kernel, k_twin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_twin_rotates_and_writes_one_column(case, dtype):
    check(rotary_kv_write_ref, case, dtype, "one")


@interpreter
def test_without_rotary_and_without_out_q_is_returned_and_only_the_cache_written():
    q, k, v, _, _ = inputs(2, 4, 2, 16, 0, torch.float32)
    k_cache, v_cache = torch.zeros(2, 2, 6, 16), torch.zeros(2, 2, 6, 16)
    for fn in (rotary_kv_write, rotary_kv_write_ref):
        assert fn(q, k, v, None, None, k_cache, v_cache, torch.tensor([4])) is q
        assert torch.equal(k_cache[:, :, 4], k) and torch.equal(v_cache[:, :, 4], v)


@interpreter
def test_a_column_outside_the_cache_writes_nothing():
    q, k, v, cos, sin = inputs(2, 2, 2, 16, 16, torch.float32)
    for fn in (rotary_kv_write, rotary_kv_write_ref):
        k_cache, v_cache = torch.zeros(2, 2, 6, 16), torch.zeros(2, 2, 6, 16)
        fn(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([6, -1]))
        assert not k_cache.any() and not v_cache.any(), fn.__name__


def test_argument_errors_name_the_argument():
    q, k, v, cos, sin = inputs(2, 4, 2, 16, 16, torch.float32)
    cache = torch.zeros(2, 2, 6, 16)
    col = torch.tensor([1])
    with pytest.raises(ValueError, match=r"cos and sin: give both"):
        rotary_kv_write_ref(q, k, v, cos, None, cache, cache.clone(), col)
    with pytest.raises(ValueError, match=r"cos: got shape \(2, 7\), expected \[N=2, R\] with R even"):
        rotary_kv_write_ref(q, k, v, cos[:, :7], sin[:, :7], cache, cache.clone(), col)
    with pytest.raises(ValueError, match=r"k_cache: got shape \(2, 4, 6, 16\), expected \[N=2, Hkv=2, S, d=16\]"):
        rotary_kv_write_ref(q, k, v, cos, sin, torch.zeros(2, 4, 6, 16), cache, col)
    with pytest.raises(ValueError, match=r"column: got shape \(3,\), expected \[1\] \(all rows\) or \[2\]"):
        rotary_kv_write_ref(q, k, v, cos, sin, cache, cache.clone(), torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"k: got shape \(2, 3, 16\), expected \[N=2, Hkv dividing Hq=4, d=16\]"):
        rotary_kv_write_ref(q, torch.zeros(2, 3, 16), torch.zeros(2, 3, 16), cos, sin, cache, cache.clone(), col)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernel_equals_twin_under_graph_replay(dtype):
    """The 9B shape (32 heads x 128, batch 8), captured once and replayed after the column moved."""
    N, H, d, S = 8, 32, 128, 64
    q, k, v, cos, sin = (t.cuda() if t is not None else None for t in inputs(N, H, H, d, d, dtype))
    caches = [torch.zeros(N, H, S, d, dtype=dtype, device="cuda") for _ in range(4)]
    column = torch.tensor([3], device="cuda")
    out = torch.empty_like(q)
    rotary_kv_write(q, k, v, cos, sin, caches[0], caches[1], column, out=out)  # warm-up (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rotary_kv_write(q, k, v, cos, sin, caches[0], caches[1], column, out=out)
    column.fill_(40)
    graph.replay()
    torch.cuda.synchronize()
    expected = rotary_kv_write_ref(q, k, v, cos, sin, caches[2], caches[3], column)
    assert_close(out, expected, dtype=dtype)
    assert_close(caches[0][:, :, 40], caches[2][:, :, 40], dtype=dtype)
    assert torch.equal(caches[1][:, :, 40], v)
