"""Split-KV decode attention (flash-decoding) over a static KV cache: one new query per hypothesis against
the valid columns of its row's cache, read in place, with grouped KV heads and optional ALiBi; returns the
output and, on request, the log-sum-exp that a cascade (prefix + tail, ../flamingo_fast/runtime/attention.py) merges.

Semantics. Query n (of N = B * R; R = queries_per_row, the hypotheses that share row b = n // R) and head h
(of Hq = Hkv * G) attends to the keys of row b, KV head h // G, at the columns [kv_start[b], kv_end[b]) (both
clipped to [0, S)): no mask tensor, only a range per row. Left padding is what lies before kv_start; the
columns from kv_end on (the rest of a static cache or of a CUDA-graph length bucket) are never read.

    scores[j] = scale * q . k_j  (+ slope[h] * (j - query_column) with ALiBi)
    out       = softmax(scores) @ v                      (0 when the range is empty)
    lse       = log(sum_j exp(scores[j]))                 (natural log, float32; -inf when empty)

Two launches (one when a single split is enough):
1. `_decode_attention_kernel`, grid (B, Hkv * M_BLOCKS, num_splits): the R * G queries that read one (row,
   KV head) meet its keys as one [BLOCK_M, d] x [d, BLOCK_N] matrix product (Hydragen's form: the cache is
   read once per row, not once per query head or beam); split s owns the columns [s * chunk, (s+1) * chunk)
   and runs an online softmax over the part of them inside the row's range. With one split it writes the
   final output; otherwise a float32 partial (output, log2-sum-exp) per split.
2. `_decode_attention_combine_kernel`, grid (N, Hq): merges the splits' partials by their log-sum-exps.

Splits exist because a decode step has few (row, KV head) pairs (32 at the 9B shape, batch 1): without them
32 programs would use 32 of the H200's 132 SMs. `num_splits` (host side, from static shapes only) aims at
about two programs per SM; a CUDA graph captures the choice for its length bucket.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flamingo_fast.kernels._common import (
    check_out,
    check_tensor,
    dot_dtype,
    is_interpreted,
    resolve_scale,
    rows_of_queries,
    tl_dtype,
    to_output,
)

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256  # any d between (GPT-NeoX 4B has 80): padded to a power of two, masked
BLOCK_N = 64  # key columns per iteration: one 64-row tile, as in the other attention kernels
MAX_BLOCK_M = 64  # queries per program; more (e.g. many scored candidates x groups) use several M blocks
NUM_WARPS = 4
# float32 (exact "ieee" FMA dots) at d 128, measured with bench/compile_report.py (stack bytes = spills):
# N64 4 warps spills on sm_80 (168-184 B), N32 4 warps on sm_90 (312-328 B), M64 rows on sm_80 even at N32
# 8 warps (104 B); N32 x M16 with 8 warps fits both (64-80 registers).
FP32_PARAMS = (32, 8, 16)
COMBINE_WARPS = 4  # the combine holds [splits, d] float32: 64 x 128 in 1 warp spills (255 registers + stack)
# Programs a launch aims at: two per SM of an H100/H200 (132 SMs). Fixed, not read from the device, so the
# choice depends on shapes only (the same in eager and captured steps).
TARGET_PROGRAMS = 264
MAX_SPLITS = 64
_INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _decode_attention_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, slopes_ptr, qcol_ptr,
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    S, queries_per_row, groups, chunk, num_splits, qk_scale_log2,
    stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_ks, stride_kd,
    stride_vb, stride_vh, stride_vs, stride_vd,
    stride_sb, stride_eb, stride_cb,
    stride_on, stride_oh, stride_od,
    stride_ln, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    M_BLOCKS: tl.constexpr, SPLIT: tl.constexpr, HAS_START: tl.constexpr, ALIBI: tl.constexpr,
    RETURN_LSE: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: the queries of (row b, KV head hk, M block mb) against the columns of split s.

    grid = (B, Hkv * M_BLOCKS, num_splits)      SPLIT: num_splits > 1 (a constexpr, so that the split count
                                                itself is a plain argument and compiles once)
    q          [N, Hq, HEAD_DIM]       any strides; N = B * R, Hq = Hkv * G
    k, v       [B, Hkv, S, HEAD_DIM]   any strides (the static cache, or a slice of it)
    start, end [B] (stride 0: one for all rows) int32/int64: the row's key range [start, end)
    slopes     [Hq] float32, qcol [B] (stride 0 allowed) int: ALiBi only
    out        [N, Hq, HEAD_DIM] OUT_DTYPE; lse [N, Hq] float32 (RETURN_LSE)      written without SPLIT
    part_out   [N, Hq, num_splits, HEAD_DIM] f32, part_lse [N, Hq, num_splits] f32   written with SPLIT

    Query tile row m (of R * G) is query r = m // G of the row, head g = m % G of the group; d is padded to
    BLOCK_D (a power of two) with masked loads:

        Q [BLOCK_M, d] (rows past R * G masked)     columns lo .. hi of split s, BLOCK_N at a time:
        S = Q @ K[cols]^T * scale * log2(e) (+ ALiBi * log2(e)), -inf outside [lo, hi)
        online softmax in base 2 (m_i, l_i), acc += P @ V[cols]          (fp32 accumulators)
    """
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1) // M_BLOCKS
    mb = tl.program_id(1) % M_BLOCKS
    split = tl.program_id(2)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    m_valid = offs_m < queries_per_row * groups
    n = b * queries_per_row + offs_m // groups  # [BLOCK_M] query index
    head = hk * groups + offs_m % groups  # [BLOCK_M] query head

    lo = tl.full([], 0, dtype=tl.int64)
    if HAS_START:
        lo = tl.maximum(tl.load(start_ptr + b * stride_sb).to(tl.int64), 0)
    hi = tl.minimum(tl.load(end_ptr + b * stride_eb).to(tl.int64), S)
    lo = tl.maximum(lo, split * chunk)
    hi = tl.minimum(hi, (split + 1) * chunk)

    q = tl.load(q_ptr + n[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None] & d_valid[None, :], other=0.0).to(DOT_DTYPE)
    if ALIBI:
        slope = tl.load(slopes_ptr + head, mask=m_valid, other=0.0).to(tl.float32) * 1.4426950408889634
        qcol = tl.load(qcol_ptr + b * stride_cb).to(tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: no NaN when nothing is attended
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for c0 in range(lo, hi, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        c_valid = cols < hi
        kv_mask = c_valid[:, None] & d_valid[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask,
                    other=0.0).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
        if ALIBI:
            s += slope[:, None] * (cols.to(tl.float32)[None, :] - qcol)
        s = tl.where(c_valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        m_i = m_new
    attended = l_i > 0
    o = acc / tl.where(attended, l_i, 1.0)[:, None]
    lse2 = tl.where(attended, m_i + tl.log2(tl.where(attended, l_i, 1.0)), float("-inf"))
    if not SPLIT:
        tl.store(out_ptr + n[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 to_output(o, OUT_DTYPE), mask=m_valid[:, None] & d_valid[None, :])
        if RETURN_LSE:
            tl.store(lse_ptr + n * stride_ln + head * stride_lh, lse2 * 0.6931471805599453, mask=m_valid)
    else:
        # partials: contiguous [N, Hq, num_splits, HEAD_DIM] and [N, Hq, num_splits]
        row = (n * (groups * tl.num_programs(1) // M_BLOCKS) + head) * num_splits + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=m_valid[:, None] & d_valid[None, :])
        tl.store(part_lse_ptr + row, lse2, mask=m_valid)


@triton.jit
def _decode_attention_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, lse_ptr, num_splits,
    stride_on, stride_oh, stride_od, stride_ln, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    RETURN_LSE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: query n, head h. grid = (N, Hq). The splits' partials (part_out [N, Hq, num_splits, d] and
    part_lse [N, Hq, num_splits] base-2, contiguous; num_splits <= BLOCK_S) -> out [N, Hq, d] (OUT_DTYPE),
    lse [N, Hq] (natural log).

        w_s = 2^(lse_s - max_s lse_s);  out = sum_s w_s * out_s / sum_s w_s;  lse = max + log2(sum_s w_s)
    Empty splits carry lse -inf (weight 0); all empty: out 0, lse -inf."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = n * tl.num_programs(1) + h
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    s_valid = offs_s < num_splits
    lse_s = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_valid, other=float("-inf"))
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse_s - m_safe)  # 0 for empty splits
    total = tl.sum(w, axis=0)
    parts = tl.load(part_out_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + n * stride_on + h * stride_oh + offs_d * stride_od, to_output(o, OUT_DTYPE), mask=d_valid)
    if RETURN_LSE:
        lse = tl.where(total > 0, (m_safe + tl.log2(tl.where(total > 0, total, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        tl.store(lse_ptr + n * stride_ln + h * stride_lh, lse)


def launch_params(dtype: torch.dtype) -> tuple[int, int, int]:
    """(BLOCK_N key columns per iteration, num_warps, the largest BLOCK_M) for `dtype`."""
    return FP32_PARAMS if dtype == torch.float32 else (BLOCK_N, NUM_WARPS, MAX_BLOCK_M)


def num_splits(rows: int, kv_heads: int, m_blocks: int, columns: int, block: int = BLOCK_N) -> int:
    """Splits of the key columns for a launch of rows x kv_heads x m_blocks programs over `columns` columns:
    enough for about TARGET_PROGRAMS programs, at most one per `block` columns, at most MAX_SPLITS. A function
    of static shapes only."""
    programs = max(rows * kv_heads * m_blocks, 1)
    blocks = max(triton.cdiv(columns, block), 1)
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, programs), blocks, MAX_SPLITS))


def _row_index(name: str, t, rows: int, device) -> None:
    check_tensor(name, t, ndim=1, dtypes=_INDEX_DTYPES, device=device)
    if t.shape[0] not in (1, rows):
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected [1] (all rows) or [{rows}] (one per row)")


def _check_inputs(q, k, v, kv_start, kv_end, scale, queries_per_row, alibi_slopes, query_column, out, lse):
    """Shared argument checks (shapes and dtypes only: nothing here reads device memory). -> (rows, groups,
    scale)."""
    check_tensor("q", q, ndim=3)
    N, Hq, d = q.shape
    rows = rows_of_queries(N, queries_per_row)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    B, Hkv, S, dk = k.shape
    if B != rows or dk != d or Hkv < 1 or Hq % Hkv:
        raise ValueError(f"k: got shape {tuple(k.shape)}, expected [B={rows}, Hkv dividing Hq={Hq}, S, d={d}] "
                         f"(q is {tuple(q.shape)}, queries_per_row={queries_per_row})")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: got shape {tuple(v.shape)}, expected {tuple(k.shape)} (the shape of k)")
    if kv_start is not None:
        _row_index("kv_start", kv_start, rows, q.device)
    _row_index("kv_end", kv_end, rows, q.device)
    if (alibi_slopes is None) != (query_column is None):
        raise ValueError("alibi_slopes and query_column: give both (ALiBi) or neither")
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, ndim=1, dtypes=(torch.float32,), device=q.device)
        if alibi_slopes.shape[0] != Hq:
            raise ValueError(f"alibi_slopes: got shape {tuple(alibi_slopes.shape)}, expected [{Hq}] (one per q head)")
        _row_index("query_column", query_column, rows, q.device)
    scale = resolve_scale(scale, d)
    if out is not None:  # q's dtype, or float32 (a cascade merges partial outputs before rounding them)
        check_out(out, (N, Hq, d), torch.float32 if out.dtype == torch.float32 else q.dtype, q.device)
    if lse is not None:
        check_out(lse, (N, Hq), torch.float32, q.device, name="lse")
    return rows, Hq // Hkv, scale


def _stride0(t: torch.Tensor) -> int:
    return 0 if t.shape[0] == 1 else t.stride(0)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor,
    *,
    scale: float | None = None,
    queries_per_row: int = 1,
    alibi_slopes: torch.Tensor | None = None,
    query_column: torch.Tensor | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Split-KV decode attention (Triton). See the module docstring.

    q [N, Hq, d] (N = B * queries_per_row), k, v [B, Hkv, S, d] (q's dtype, any strides), kv_start (None: 0)
    and kv_end [B] or [1] int32/int64 (the key range of each row, or of all rows), alibi_slopes [Hq] float32
    with query_column [B] or [1] (ALiBi: slope * (key column - query column)). Returns out [N, Hq, d] in q's
    dtype (into `out` when given, which may also be float32), and lse [N, Hq] float32 with `return_lse` (into
    `lse` when given).
    `splits` overrides `num_splits`. CUDA-graph safe: no sync, and the split count depends on shapes only."""
    rows, groups, scale = _check_inputs(q, k, v, kv_start, kv_end, scale, queries_per_row, alibi_slopes,
                                        query_column, out, lse)
    N, Hq, d = q.shape
    _, Hkv, S, _ = k.shape
    if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim {d}, expected {MIN_HEAD_DIM} to {MAX_HEAD_DIM}")
    if q.device.type != "cuda" and not is_interpreted():
        raise ValueError(f"q: on {q.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): "
                         "use decode_attention_ref on this device")
    if out is None:
        out = torch.empty(N, Hq, d, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(N, Hq, dtype=torch.float32, device=q.device)
    if N == 0:
        return (out, lse) if return_lse else out
    per_kv_head = queries_per_row * groups
    block, num_warps, max_block_m = launch_params(q.dtype)
    block_m = max(16, min(max_block_m, triton.next_power_of_2(per_kv_head)))
    m_blocks = triton.cdiv(per_kv_head, block_m)
    if splits is None:
        splits = num_splits(rows, Hkv, m_blocks, S, block)
    if not isinstance(splits, int) or not 1 <= splits <= MAX_SPLITS:
        raise ValueError(f"splits: got {splits!r}, expected an integer from 1 to {MAX_SPLITS}, or None")
    chunk = triton.cdiv(triton.cdiv(max(S, 1), splits), block) * block
    if splits > 1:
        part_out = torch.empty(N, Hq, splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(N, Hq, splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # valid pointers, never written
    lse_arg = lse if return_lse else out
    start_arg = kv_start if kv_start is not None else kv_end
    slopes_arg = alibi_slopes if alibi_slopes is not None else out
    qcol_arg = query_column if query_column is not None else kv_end
    _decode_attention_kernel[(rows, Hkv * m_blocks, splits)](
        q, k, v, start_arg, kv_end, slopes_arg, qcol_arg, out, lse_arg, part_out, part_lse,
        S, queries_per_row, groups, chunk, splits, scale * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), _stride0(start_arg), _stride0(kv_end), _stride0(qcol_arg),
        *out.stride(), *(lse.stride() if return_lse else (0, 0)),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=block, M_BLOCKS=m_blocks,
        SPLIT=splits > 1, HAS_START=kv_start is not None, ALIBI=alibi_slopes is not None, RETURN_LSE=return_lse,
        DOT_DTYPE=dot_dtype(q.dtype), OUT_DTYPE=tl_dtype(out.dtype), num_warps=num_warps,
    )
    if splits > 1:
        _decode_attention_combine_kernel[(N, Hq)](
            part_out, part_lse, out, lse_arg, splits, *out.stride(), *(lse.stride() if return_lse else (0, 0)),
            HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d),
            BLOCK_S=max(2, triton.next_power_of_2(splits)), RETURN_LSE=return_lse,
            OUT_DTYPE=tl_dtype(out.dtype), num_warps=COMBINE_WARPS,
        )
    return (out, lse) if return_lse else out


def decode_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_start: torch.Tensor | None,
    kv_end: torch.Tensor,
    *,
    scale: float | None = None,
    queries_per_row: int = 1,
    alibi_slopes: torch.Tensor | None = None,
    query_column: torch.Tensor | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `decode_attention` (same signature; `splits` is accepted and ignored); free of host syncs.

    The R * G queries that share a (row, KV head) attend together, as one [R * G, d] x [S, d] product (no
    K/V repeated per query head). The key range becomes a [B, S] boolean (the twin may build one; the kernel
    does not). Without `return_lse` one scaled_dot_product_attention in q's dtype (today's decode path does
    the same); with it, float32 matmuls and a logsumexp."""
    rows, groups, scale = _check_inputs(q, k, v, kv_start, kv_end, scale, queries_per_row, alibi_slopes,
                                        query_column, out, lse)
    N, Hq, d = q.shape
    B, Hkv, S, _ = k.shape
    R = queries_per_row
    if out is None:
        out = torch.empty(N, Hq, d, dtype=q.dtype, device=q.device)
    if return_lse and lse is None:
        lse = torch.empty(N, Hq, dtype=torch.float32, device=q.device)
    if N == 0:
        return (out, lse) if return_lse else out
    columns = torch.arange(S, device=q.device)
    valid = columns < kv_end[:, None]  # [B or 1, S]
    if kv_start is not None:
        valid = valid & (columns >= kv_start[:, None])
    valid = valid.expand(B, S)
    q_rows = q.view(B, R, Hkv, groups, d).permute(0, 2, 1, 3, 4).reshape(B, Hkv, R * groups, d)
    bias = None
    if alibi_slopes is not None:  # [B, Hkv, R * G, S], query rows ordered (r, g)
        distance = (columns[None, :] - query_column[:, None]).to(torch.float32).expand(B, S)
        slopes = alibi_slopes.view(Hkv, 1, groups).expand(Hkv, R, groups).reshape(Hkv, R * groups)
        bias = slopes[None, :, :, None] * distance[:, None, None, :]
    attended = valid.any(dim=1)  # [B]

    def to_queries(t: torch.Tensor) -> torch.Tensor:  # [B, Hkv, R * G, ...] -> [N, Hq, ...]
        rest = t.shape[3:]
        return t.reshape(B, Hkv, R, groups, *rest).transpose(1, 2).reshape(N, Hq, *rest)

    if not return_lse:
        mask = valid[:, None, None, :]
        if bias is not None:
            mask = bias.to(q.dtype).masked_fill(~mask, float("-inf"))
        o = torch.nn.functional.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask, scale=scale)
        o = torch.where(attended[:, None, None, None], o, 0.0)
        out.copy_(to_queries(o))
        return out
    scores = (q_rows.float() @ k.float().transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    row_lse = torch.logsumexp(scores, dim=-1)  # -inf where nothing is attended
    safe = torch.where(attended[:, None, None], row_lse, 0.0)
    o = torch.exp(scores - safe[..., None]) @ v.float()
    out.copy_(to_queries(o))
    lse.copy_(to_queries(row_lse))
    return out, lse
