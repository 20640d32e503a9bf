"""Split-KV decode attention over a static KV cache: kernel (interpreted) and twin against a float64 formula
and against plain SDPA at the dtype (the error yardstick), with left padding, grouped KV heads, several
queries per row (beams), ranges that are not multiples of the 64-column block, ALiBi and the log-sum-exp.
Columns outside a row's range hold NaN in the kernel tests: the kernel must never read them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_within_torch_error, interpreter, nan_out

from flamingo_fast.kernels.decode_attention import (
    BLOCK_N,
    decode_attention,
    decode_attention_ref,
    num_splits,
)
from flamingo_fast.runtime.attention import merge_attention_states

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def formula64(q, k, v, start, end, *, queries_per_row=1, slopes=None, query_column=None, scale=None):
    """Query by query in float64: keys [start[b], end[b]) of its row, KV head h // G -> (out, lse)."""
    N, Hq, d = q.shape
    B, Hkv = k.shape[:2]
    groups, scale = Hq // Hkv, d**-0.5 if scale is None else scale
    out = torch.zeros(N, Hq, d, dtype=torch.float64)
    lse = torch.full((N, Hq), float("-inf"), dtype=torch.float64)
    for n in range(N):
        b = n // queries_per_row
        lo = int(start[b if start.numel() > 1 else 0]) if start is not None else 0
        hi = min(int(end[b if end.numel() > 1 else 0]), k.shape[2])
        if hi <= lo:
            continue
        for h in range(Hq):
            kk, vv = k[b, h // groups, lo:hi].double(), v[b, h // groups, lo:hi].double()
            s = kk @ q[n, h].double() * scale
            if slopes is not None:
                qc = int(query_column[b if query_column.numel() > 1 else 0])
                s = s + float(slopes[h]) * (torch.arange(lo, hi, dtype=torch.float64) - qc)
            lse[n, h] = torch.logsumexp(s, 0)
            out[n, h] = torch.softmax(s, 0) @ vv
    return out, lse


def plain_sdpa(q, k, v, start, end, *, queries_per_row=1, slopes=None, query_column=None):
    """Today's decode path at the inputs' dtype: SDPA per query with GQA, a [B, S] mask (or ALiBi bias)."""
    N, Hq, d = q.shape
    B, Hkv, S, _ = k.shape
    cols = torch.arange(S)
    valid = (cols < end[:, None]) & (cols >= (start[:, None] if start is not None else 0))
    valid = valid.expand(B, S).repeat_interleave(queries_per_row, 0)  # per query
    kq, vq = k.repeat_interleave(queries_per_row, 0), v.repeat_interleave(queries_per_row, 0)
    mask = valid[:, None, None, :]
    if slopes is not None:
        qc = query_column.expand(B).repeat_interleave(queries_per_row, 0)
        bias = slopes[None, :, None] * (cols[None, None, :] - qc[:, None, None]).float()
        mask = bias.to(q.dtype)[:, :, None, :].masked_fill(~mask, float("-inf"))
    # NaN in the masked columns (the kernel tests' poison) would leak through p = 0 times NaN: zero them here
    kq = torch.where(valid[:, None, :, None], kq, 0.0)
    vq = torch.where(valid[:, None, :, None], vq, 0.0)
    out = F.scaled_dot_product_attention(q[:, :, None], kq, vq, attn_mask=mask, enable_gqa=Hq != Hkv)[:, :, 0]
    return torch.where(valid.any(1)[:, None, None], out, 0.0)


def make(B, R, Hkv, G, S, d, dtype, start, end, poison=True):
    """Fresh q, k, v; with `poison`, the cache columns outside each row's range are NaN."""
    q = torch.randn(B * R, Hkv * G, d).to(dtype)
    k, v = torch.randn(B, Hkv, S, d).to(dtype), torch.randn(B, Hkv, S, d).to(dtype)
    if poison:
        cols = torch.arange(S)
        outside = (cols >= end[:, None]) | (cols < (start[:, None] if start is not None else 0))
        outside = outside.expand(B, S)[:, None, :, None]
        k, v = k.masked_fill(outside, float("nan")), v.masked_fill(outside, float("nan"))
    return q, k, v


# (B, R, Hkv, G, S, d, start, end): left padding, GQA, beams, ranges that end inside a block and past it
CASES = {
    "mha-left-padding": (2, 1, 2, 1, 70, 16, [5, 0], [70, 70]),
    "gqa-bucket-tail": (2, 1, 2, 2, 130, 32, [0, 7], [67, 67]),
    "beams-gqa": (2, 3, 1, 4, 96, 16, [3, 11], [80, 80]),
    "one-column": (1, 1, 2, 1, 64, 64, [63], [64]),
    "head-dim-80": (1, 1, 2, 1, 70, 80, [2], [69]),  # GPT-NeoX 4B's head dim: not a power of two
}


@interpreter
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_formula_and_twin(case, dtype, splits):
    B, R, Hkv, G, S, d, start, end = CASES[case]
    start, end = torch.tensor(start, dtype=torch.int32), torch.tensor(end)
    q, k, v = make(B, R, Hkv, G, S, d, dtype, start, end)
    out, lse = decode_attention(q, k, v, start, end, queries_per_row=R, return_lse=True, splits=splits)
    ref, ref_lse = formula64(q, k, v, start, end, queries_per_row=R)
    assert_within_torch_error(out, ref, plain_sdpa(q, k, v, start, end, queries_per_row=R), dtype)
    assert_close(lse, ref_lse.float(), dtype=torch.float32)
    clean = make(B, R, Hkv, G, S, d, dtype, start, end, poison=False)  # the twin's columns must be finite
    twin, twin_lse = decode_attention_ref(*clean, start, end, queries_per_row=R, return_lse=True)
    kern, kern_lse = decode_attention(*clean, start, end, queries_per_row=R, return_lse=True, splits=splits)
    assert_close(kern, twin, dtype=dtype)
    assert_close(kern_lse, twin_lse, dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_twin_matches_formula(case, dtype):
    B, R, Hkv, G, S, d, start, end = CASES[case]
    start, end = torch.tensor(start), torch.tensor(end, dtype=torch.int32)
    q, k, v = make(B, R, Hkv, G, S, d, dtype, start, end, poison=False)
    ref, ref_lse = formula64(q, k, v, start, end, queries_per_row=R)
    yardstick = plain_sdpa(q, k, v, start, end, queries_per_row=R)
    assert_within_torch_error(decode_attention_ref(q, k, v, start, end, queries_per_row=R), ref, yardstick, dtype)
    out, lse = decode_attention_ref(q, k, v, start, end, queries_per_row=R, return_lse=True)
    assert_within_torch_error(out, ref, yardstick, dtype)
    assert_close(lse, ref_lse.float(), dtype=torch.float32)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alibi_kernel_and_twin(dtype):
    """MPT's bias slope * (key column - query column), per q head, with one query column for all rows."""
    B, R, Hkv, G, S, d = 2, 2, 2, 2, 90, 16
    start, end = torch.tensor([0, 9], dtype=torch.int32), torch.tensor([85])
    q, k, v = make(B, R, Hkv, G, S, d, dtype, start, end)
    slopes, qcol = torch.rand(Hkv * G) * 0.5, torch.tensor([84])
    kw = dict(queries_per_row=R, slopes=slopes, query_column=qcol)
    ref, ref_lse = formula64(q, k, v, start, end, **kw)
    yardstick = plain_sdpa(q, k, v, start, end, **kw)
    out, lse = decode_attention(q, k, v, start, end, queries_per_row=R, alibi_slopes=slopes, query_column=qcol,
                                return_lse=True, splits=2)
    assert_within_torch_error(out, ref, yardstick, dtype)
    assert_close(lse, ref_lse.float(), dtype=torch.float32)
    clean = make(B, R, Hkv, G, S, d, dtype, start, end, poison=False)
    ref = formula64(*clean, start, end, **kw)[0]
    twin = decode_attention_ref(*clean, start, end, queries_per_row=R, alibi_slopes=slopes, query_column=qcol)
    assert_within_torch_error(twin, ref, plain_sdpa(*clean, start, end, **kw), dtype)


@interpreter
def test_many_queries_per_kv_head_use_several_m_blocks_and_out_arguments():
    """R * G = 80 queries per (row, KV head) > 64: two M blocks; out= and lse= strided views, NaN-poisoned."""
    B, R, Hkv, G, S, d = 1, 20, 1, 4, 40, 16
    start, end = torch.tensor([2]), torch.tensor([37])
    q, k, v = make(B, R, Hkv, G, S, d, torch.float32, start, end)
    out, lse_buf = nan_out((B * R, Hkv * G, d), torch.float32), nan_out((B * R, Hkv * G), torch.float32)
    got, lse = decode_attention(q, k, v, start, end, queries_per_row=R, return_lse=True, out=out.view,
                                lse=lse_buf.view)
    assert got is out.view and lse is lse_buf.view
    ref, ref_lse = formula64(q, k, v, start, end, queries_per_row=R)
    assert_close(got, ref.float(), dtype=torch.float32)
    assert_close(lse, ref_lse.float(), dtype=torch.float32)
    out.assert_padding_intact()
    lse_buf.assert_padding_intact()


@interpreter
@pytest.mark.parametrize("splits", [1, 4])
def test_empty_ranges_give_zero_and_minus_infinity(splits):
    B, S, d = 3, 100, 16
    start, end = torch.tensor([50, 0, 7]), torch.tensor([50, 0, 200])  # empty, empty, [7, S) (end clipped)
    q, k, v = make(B, 1, 2, 1, S, d, torch.float32, start, end)
    for fn in (decode_attention, decode_attention_ref):
        kv = (k, v) if fn is decode_attention else (k.nan_to_num(0.0), v.nan_to_num(0.0))
        out, lse = fn(q, *kv, start, end, return_lse=True, splits=splits)
        assert torch.equal(out[:2], torch.zeros_like(out[:2])), fn.__name__
        assert bool((lse[:2] == float("-inf")).all()), fn.__name__
        ref, ref_lse = formula64(q, *kv, start, end)
        assert_close(out[2], ref[2].float(), dtype=torch.float32)
        assert_close(lse[2], ref_lse[2].float(), dtype=torch.float32)


@interpreter
def test_lse_merges_a_prefix_and_a_tail_into_attention_over_both():
    """The cascade: a row's prompt (shared by R beams) and each beam's own tail, merged by log-sum-exp,
    equal one attention over the concatenated keys."""
    B, R, Hkv, G, d = 2, 2, 2, 2, 32
    P, T = 75, 6
    q = torch.randn(B * R, Hkv * G, d)
    pk, pv = torch.randn(B, Hkv, P, d), torch.randn(B, Hkv, P, d)
    tk, tv = torch.randn(B * R, Hkv, T, d), torch.randn(B * R, Hkv, T, d)
    start, p_end, t_end = torch.tensor([4, 0]), torch.tensor([P]), torch.tensor([4])
    out_p, lse_p = decode_attention(q, pk, pv, start, p_end, queries_per_row=R, return_lse=True, splits=2)
    out_t, lse_t = decode_attention(q, tk, tv, None, t_end, return_lse=True)
    merged = merge_attention_states(out_p, lse_p, out_t, lse_t)
    keys = torch.cat([pk.repeat_interleave(R, 0)[:, :, :P], tk[:, :, :4]], dim=2)
    values = torch.cat([pv.repeat_interleave(R, 0)[:, :, :P], tv[:, :, :4]], dim=2)
    begin = start.repeat_interleave(R)
    ref = formula64(q, keys, values, begin, torch.tensor([P + 4]))[0]
    assert_close(merged, ref.float(), dtype=torch.float32)


def test_split_count_depends_on_shapes_only():
    assert num_splits(1, 32, 1, 512) == 512 // BLOCK_N  # 9B shape, batch 1: one block per split, 256 programs
    assert num_splits(8, 32, 1, 512) == 2  # batch 8: 256 programs already with 2
    assert num_splits(8, 32, 1, 64) == 1  # one block: nothing to split
    assert num_splits(300, 1, 1, 4096) == 1


def test_argument_errors_name_the_argument():
    q, k, v = torch.randn(4, 4, 16), torch.randn(2, 2, 10, 16), torch.randn(2, 2, 10, 16)
    end = torch.tensor([10])
    with pytest.raises(ValueError, match=r"q: 4 queries is not a multiple of queries_per_row=3"):
        decode_attention_ref(q, k, v, None, end, queries_per_row=3)
    with pytest.raises(ValueError, match=r"k: got shape \(2, 3, 10, 16\), expected \[B=2, Hkv dividing Hq=4"):
        decode_attention_ref(q, torch.randn(2, 3, 10, 16), torch.randn(2, 3, 10, 16), None, end, queries_per_row=2)
    with pytest.raises(ValueError, match=r"kv_end: got shape \(3,\), expected \[1\] \(all rows\) or \[2\]"):
        decode_attention_ref(q, k, v, None, torch.tensor([1, 2, 3]), queries_per_row=2)
    with pytest.raises(ValueError, match=r"kv_start: got dtype torch.float32"):
        decode_attention_ref(q, k, v, torch.zeros(2), end, queries_per_row=2)
    with pytest.raises(ValueError, match=r"alibi_slopes and query_column: give both"):
        decode_attention_ref(q, k, v, None, end, queries_per_row=2, alibi_slopes=torch.ones(4))
    with pytest.raises(ValueError, match=r"lse: got shape \(4, 3\), expected \(4, 4\)"):
        decode_attention_ref(q, k, v, None, end, queries_per_row=2, return_lse=True, lse=torch.empty(4, 3))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_at_the_9b_shape_and_under_graph_replay(dtype):
    """32 heads x 128, 8 rows, a 512-column bucket with 459 valid columns after left padding; the captured
    launch (auto split count) replayed after the range moved, against the twin and the formula."""
    B, Hkv, S, d = 8, 32, 512, 128
    start = torch.randint(0, 40, (B,), device="cuda")
    end = torch.tensor([459], device="cuda")
    q = torch.randn(B, Hkv, d, device="cuda", dtype=dtype)
    k = torch.randn(B, Hkv, S, d, device="cuda", dtype=dtype)
    v = torch.randn(B, Hkv, S, d, device="cuda", dtype=dtype)
    out = torch.empty_like(q)
    lse = torch.empty(B, Hkv, device="cuda")
    decode_attention(q, k, v, start, end, out=out, lse=lse, return_lse=True)  # warm-up (compiles)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, start, end, out=out, lse=lse, return_lse=True)
    end.fill_(460)
    graph.replay()
    torch.cuda.synchronize()
    ref, ref_lse = formula64(q.cpu(), k.cpu(), v.cpu(), start.cpu(), end.cpu())
    assert_within_torch_error(out.cpu(), ref, plain_sdpa(q.cpu(), k.cpu(), v.cpu(), start.cpu(), end.cpu()), dtype)
    assert_close(lse.cpu(), ref_lse.float(), dtype=torch.float32)
    twin, twin_lse = decode_attention_ref(q, k, v, start, end, return_lse=True)
    assert_close(out, twin, dtype=dtype)
    assert_close(lse, twin_lse, dtype=torch.float32)
