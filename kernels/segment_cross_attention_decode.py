"""Segment cross-attention for cached decoding (flash-decoding): one new query per hypothesis against the vision
K/V of its row's tile range, read in place, split over fixed-size key chunks and merged by log-sum-exp.

Semantics: those of `segment_cross_attention` (segment_cross_attention.py) for one token per row: row b's new
token sees the tiles j in [tile_start[b], tile_end[b]) with tile_valid[b, j] (Mllama: generated tokens see the
last row of the cross_attention_mask), tile_start[b] < 0 (`ALL_TILES`) = every tile of the row, invalid ones
included (a row whose last mask row is empty: transformers attends it to all its vision tokens); an empty
range gives exactly 0. The R = queries_per_row queries n = b * R + r (a row's beam hypotheses or scored
candidates) all read row b's K/V and range: the cache is never copied per hypothesis, and the R x G queries
that share a KV head (G = H / Hkv) meet its keys as one matrix product, so K/V are read once per row and KV head.

Splits. Split s of a row takes the keys [lo + s * split_keys, lo + (s+1) * split_keys) of the row's own range
(lo = tile_start * tile_stride), with split_keys fixed (SPLIT_KEYS = 256): the number of splits launched is
cdiv(S, split_keys), a function of the cache's key count only, and a row's split boundaries depend on its own
range only. Batch invariance follows: a row's result never depends on the batch size, on the other rows'
ranges or on the cache's capacity S (a split count chosen from the batch, to fill the GPU, would move the
boundaries and change the rounding with the batch). The combine merges a row's splits one after the other
in split order: the empty splits that a larger S adds have weight exactly 0 and change no bit; with one
non-empty split the result equals the single-split launch bit for bit. The price: at batch 1 a 1-tile image
(1601 keys) keeps 7 splits x Hkv programs busy (56 for 8 KV heads; the launch's other splits exit at once), a
4-tile image 26 x 8 = 208, whatever the GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flamingo_fast.kernels import decode_attention as _decode_attention
from flamingo_fast.kernels._common import (
    check_out,
    check_shape,
    check_tensor,
    dot_dtype,
    is_interpreted,
    resolve_scale,
    rows_of_queries,
    tl_dtype,
    to_output,
)
from flamingo_fast.kernels.segment_cross_attention import (
    check_row_spans,
    check_tiles,
    clamp_tile_ranges,
    inverse_stride,
    tile_of,
)

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# Keys per split: 4 blocks of 64. A 4-tile 560-px image (6,404 keys) gives 26 splits, so 8 KV heads fill 208
# programs at batch 1 (H100/H200: 132 SMs); the fp32 partials a split writes (G x d x 4 B = 2 KiB at G 4, d
# 128) are 1.6% of the 128 KiB of K/V it reads.
SPLIT_KEYS = 256
# Software-pipeline depth: triton's default 3 spills 16 B on sm_80 (bf16, d 128, one split); 2 fits (128 registers).
NUM_STAGES = 2
COMBINE_WARPS = 1
# The twin on CPU tensors gathers each row's own keys (one host sync, free there) instead of masking the whole
# cache; tests set it False to run the GPU path (sync-free, dense) on the CPU too.
GATHER_ON_CPU = True  # the combine holds one [d] float32 vector per program


@triton.jit
def _segment_cross_attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, valid_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    n_tiles, tile_len, tile_stride, inv_stride, split_keys, num_splits, queries_per_row, qk_scale_log2,
    stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_eb, stride_wb, stride_wj,
    stride_on, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    M_BLOCKS: tl.constexpr, SPLIT: tl.constexpr, DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: the R x GROUP queries of (row b, KV head hk) in M block mb, against split s of the row's keys.

    grid = (B, Hkv * M_BLOCKS, num_splits)      SPLIT: num_splits > 1 (constexpr; the count itself is an argument)
    q            [N, H, HEAD_DIM]        any strides; N = B * R, H = Hkv * GROUP; query tile row m (of R * GROUP)
                                         is query n = b * R + m // GROUP, head hk * GROUP + m % GROUP
    k, v         [B, Hkv, S, HEAD_DIM]   any strides; tile j owns rows [j*tile_stride, j*tile_stride + tile_len)
    start, end   [B] int32               the row's tile range (start < 0: every tile)
    valid        [B, n_tiles] uint8
    out          [N, H, HEAD_DIM] OUT_DTYPE                        written without SPLIT
    part_out     [N, H, num_splits, HEAD_DIM] f32, part_lse [N, H, num_splits] f32 (log2)   written with SPLIT
                 (part_out only for splits that attended a key; an empty split writes lse = -inf)

        keys of split s: [lo + s*split_keys, lo + (s+1)*split_keys) ∩ [lo, end * tile_stride), lo = start*tile_stride
        for tile j among them, if valid[j] or every tile is seen (else no load, no dot):
            key blocks from max(pos, tile start), BLOCK_N at a time (a block may run on into the next tile,
            whose keys it takes when that tile is needed; `pos` then skips them), keys of tiles not needed
            and padding rows masked out of the loads
            S = Q @ K^T * scale * log2(e); online softmax in base 2, fp32; acc += P @ V
    """
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1) // M_BLOCKS
    mb = tl.program_id(1) % M_BLOCKS
    split = tl.program_id(2)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < queries_per_row * GROUP
    n = b * queries_per_row + offs_m // GROUP
    head = hk * GROUP + offs_m % GROUP

    start = tl.load(start_ptr + b * stride_sb)
    end = tl.load(end_ptr + b * stride_eb)
    every = start < 0
    every_i = every.to(tl.int32)
    start = tl.where(every, 0, tl.minimum(start, n_tiles))
    end = tl.where(every, n_tiles, tl.minimum(tl.maximum(end, 0), n_tiles))
    key_lo = start * tile_stride + split * split_keys
    key_hi = tl.minimum(key_lo + split_keys, end * tile_stride)

    q = tl.load(q_ptr + n[:, None] * stride_qn + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=m_valid[:, None], other=0.0).to(DOT_DTYPE)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    valid_base = valid_ptr + b * stride_wb
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: no NaN when nothing is attended
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pos = key_lo
    for j in range(key_lo // tile_stride, tl.minimum(end, tl.cdiv(key_hi, tile_stride))):
        valid_j = tl.load(valid_base + j * stride_wj).to(tl.int32)
        needed = tl.maximum(valid_j, every_i) > 0
        tile0 = j * tile_stride
        begin = tl.maximum(pos, tile0)
        stop = tl.where(needed, tl.minimum(tile0 + tile_len, key_hi), begin)
        for n0 in range(begin, stop, BLOCK_N):
            cols = n0 + offs_n
            key_tile = tile_of(cols, tile_stride, inv_stride)
            key_in = (cols - key_tile * tile_stride < tile_len) & (cols < key_hi)
            key_valid = tl.load(valid_base + key_tile * stride_wj, mask=key_in, other=0).to(tl.int32)
            key_load = key_in & (tl.maximum(key_valid, every_i) > 0)  # a vector compare: the interpreter
            # rejects masks that mix in a scalar bool
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=key_load[:, None],
                        other=0.0).to(DOT_DTYPE)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=key_load[:, None],
                        other=0.0).to(DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
            s = tl.where(key_load[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
            m_i = m_new
        pos = tl.where(needed, begin + tl.cdiv(stop - begin, BLOCK_N) * BLOCK_N, pos)

    attended = l_i > 0
    o = acc / tl.where(attended, l_i, 1.0)[:, None]
    if not SPLIT:
        tl.store(out_ptr + n[:, None] * stride_on + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 to_output(o, OUT_DTYPE), mask=m_valid[:, None])
    else:
        heads = GROUP * (tl.num_programs(1) // M_BLOCKS)
        row = (n * heads + head) * num_splits + split  # contiguous partials
        lse2 = tl.where(attended, m_i + tl.log2(tl.where(attended, l_i, 1.0)), float("-inf"))
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o, mask=(m_valid & attended)[:, None])
        tl.store(part_lse_ptr + row, lse2, mask=m_valid)


@triton.jit
def _segment_decode_combine_kernel(
    part_out_ptr, part_lse_ptr, out_ptr, num_splits,
    stride_on, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: query n, head h. grid = (N, H). Merges the splits' partials (part_out [N, H, num_splits, d],
    part_lse [N, H, num_splits] in log2, contiguous) into out [N, H, d] (OUT_DTYPE), one split after the
    other in split order (a fixed order whatever num_splits is):

        m' = max(m, lse_s);  acc = acc * 2^(m - m') + 2^(lse_s - m') * out_s;  l likewise;  out = acc / l
    Empty splits (lse -inf) are skipped: their part_out is never read. All empty: out 0."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    row = n * tl.num_programs(1) + h
    offs_d = tl.arange(0, HEAD_DIM)
    m = tl.full([], float("-inf"), dtype=tl.float32)
    l_sum = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for s in range(num_splits):
        lse = tl.load(part_lse_ptr + row * num_splits + s)
        if lse > float("-inf"):
            part = tl.load(part_out_ptr + (row * num_splits + s) * HEAD_DIM + offs_d)
            m_new = tl.maximum(m, lse)
            alpha = tl.exp2(m - m_new)
            w = tl.exp2(lse - m_new)
            acc = acc * alpha + w * part
            l_sum = l_sum * alpha + w
            m = m_new
    o = acc / tl.where(l_sum > 0, l_sum, 1.0)
    tl.store(out_ptr + n * stride_on + h * stride_oh + offs_d * stride_od, to_output(o, OUT_DTYPE))


def _check_inputs(q, k, v, tile_start, tile_end, tile_valid, tile_len, tile_stride, scale, out, queries_per_row,
                  split_keys):
    """Shared argument checks (shapes and dtypes only: nothing here reads device memory) -> (rows, groups,
    tile_stride, scale)."""
    check_tensor("q", q, ndim=3)
    N, H, d = q.shape
    rows = rows_of_queries(N, queries_per_row)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    B, Hkv, S, dk = k.shape
    if B != rows or dk != d or Hkv < 1 or H % Hkv:
        raise ValueError(f"k: got shape {tuple(k.shape)}, expected [B={rows}, Hkv dividing H={H}, S, d={d}] "
                         f"(q is {tuple(q.shape)}, queries_per_row={queries_per_row})")
    check_shape("v", v, tuple(k.shape), "the shape of k")
    for name, t in (("tile_start", tile_start), ("tile_end", tile_end)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape(name, t, (rows,), "one per row of k")
    tile_stride = check_tiles(tile_valid, tile_len, tile_stride, S, rows, q.device)
    if split_keys is not None and (isinstance(split_keys, bool) or not isinstance(split_keys, int)
                                   or split_keys < 1):
        raise ValueError(f"split_keys: got {split_keys!r}, expected None or a positive int")
    scale = resolve_scale(scale, d)
    if out is not None:
        check_out(out, (N, H, d), q.dtype, q.device)
    return rows, H // Hkv, tile_stride, scale


def segment_cross_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tile_start: torch.Tensor,
    tile_end: torch.Tensor,
    tile_valid: torch.Tensor,
    *,
    tile_len: int,
    tile_stride: int | None = None,
    scale: float | None = None,
    queries_per_row: int = 1,
    out: torch.Tensor | None = None,
    split_keys: int | None = None,
) -> torch.Tensor:
    """Decode-step segment cross-attention (Triton). See the module docstring.

    q [N, H, d] (N = B * queries_per_row; d in 16/32/64/128), k, v [B, Hkv, S, d] (the cached vision K/V, q's
    dtype, any strides; Hkv divides H), tile_start, tile_end [B] int32 (one range per row), tile_valid [B,
    n_tiles] bool, tile_len keys per tile stored every tile_stride rows (default tile_len). Returns [N, H, d]
    in q's dtype, into `out` when given. `split_keys` overrides SPLIT_KEYS (a multiple of the key block is
    rounded up to). CUDA-graph safe: no sync; the launch depends on shapes only.
    """
    rows, groups, tile_stride, scale = _check_inputs(q, k, v, tile_start, tile_end, tile_valid, tile_len,
                                                     tile_stride, scale, out, queries_per_row, split_keys)
    N, H, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {d}, expected one of {SUPPORTED_HEAD_DIMS}")
    if q.device.type != "cuda" and not is_interpreted():
        raise ValueError(f"q: on {q.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): "
                         "use segment_cross_attention_decode_ref on this device")
    if out is None:
        out = torch.empty(N, H, d, dtype=q.dtype, device=q.device)
    check_row_spans(k=k, v=v)  # q and out: one [H, d] per query, far below
    if N == 0:
        return out
    n_tiles = tile_valid.shape[1]
    if n_tiles == 0:
        return out.zero_()
    block_n, num_warps, max_block_m = _decode_attention.launch_params(q.dtype)
    per_kv_head = queries_per_row * groups
    block_m = max(16, min(max_block_m, triton.next_power_of_2(per_kv_head)))
    m_blocks = triton.cdiv(per_kv_head, block_m)
    chunk = triton.cdiv(split_keys or SPLIT_KEYS, block_n) * block_n
    splits = num_splits(S, chunk)
    if splits > 1:
        part_out = torch.empty(N, H, splits, d, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(N, H, splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # valid pointers, never written
    valid = tile_valid.view(torch.uint8)
    _segment_cross_attention_decode_kernel[(rows, Hkv * m_blocks, splits)](
        q, k, v, tile_start, tile_end, valid, out, part_out, part_lse,
        n_tiles, tile_len, tile_stride, inverse_stride(tile_stride), chunk, splits, queries_per_row,
        scale * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), tile_start.stride(0), tile_end.stride(0), *valid.stride(),
        *out.stride(),
        HEAD_DIM=d, GROUP=groups, BLOCK_M=block_m, BLOCK_N=block_n, M_BLOCKS=m_blocks, SPLIT=splits > 1,
        DOT_DTYPE=dot_dtype(q.dtype), OUT_DTYPE=tl_dtype(q.dtype), num_warps=num_warps, num_stages=NUM_STAGES,
    )
    if splits > 1:
        _segment_decode_combine_kernel[(N, H)](
            part_out, part_lse, out, splits, *out.stride(),
            HEAD_DIM=d, OUT_DTYPE=tl_dtype(q.dtype), num_warps=COMBINE_WARPS,
        )
    return out


def num_splits(keys: int, split_keys: int = SPLIT_KEYS) -> int:
    """Splits launched for a cache of `keys` key rows: cdiv(keys, split_keys), at least 1. The key count only:
    never the batch (see the module docstring: batch invariance)."""
    return max(1, triton.cdiv(keys, split_keys))


def segment_cross_attention_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tile_start: torch.Tensor,
    tile_end: torch.Tensor,
    tile_valid: torch.Tensor,
    *,
    tile_len: int,
    tile_stride: int | None = None,
    scale: float | None = None,
    queries_per_row: int = 1,
    out: torch.Tensor | None = None,
    split_keys: int | None = None,
) -> torch.Tensor:
    """Torch twin of `segment_cross_attention_decode` (same signature; `split_keys` is checked and ignored); free
    of host syncs (CUDA-graph safe).

    The R x G queries of a (row, KV head) attend together in fp32, as one [R * G, d] x [keys, d] product, over:
    - on a GPU (no host sync, for CUDA graphs): the whole cache with a [B, S] key mask (a tile in range, valid or
      every tile seen, not padding), K/V zeroed outside it (slots there may hold garbage, even NaN): O(S) per
      query, where the kernel reads only the range;
    - on the CPU (GATHER_ON_CPU; a host sync costs nothing there): each row's own keys, gathered: O(range),
      like the kernel. Measured: bench/segment_decode_cpu.py."""
    rows, groups, tile_stride, scale = _check_inputs(q, k, v, tile_start, tile_end, tile_valid, tile_len,
                                                     tile_stride, scale, out, queries_per_row, split_keys)
    N, H, d = q.shape
    B, Hkv, S, _ = k.shape
    R = queries_per_row
    if out is None:
        out = torch.empty(N, H, d, dtype=q.dtype, device=q.device)
    if N == 0:
        return out
    n_tiles = tile_valid.shape[1]
    if n_tiles == 0:
        return out.zero_()
    qq = q.reshape(B, R, Hkv, groups, d).permute(0, 2, 1, 3, 4).reshape(B, Hkv, R * groups, d).float()
    if GATHER_ON_CPU and q.device.type == "cpu":
        o = _gathered_rows(qq, k, v, tile_start, tile_end, tile_valid, tile_len, tile_stride, scale)
        return out.copy_(o.view(B, Hkv, R, groups, d).permute(0, 2, 1, 3, 4).reshape(N, H, d))
    start, end = clamp_tile_ranges(tile_start.long(), tile_end.long(), n_tiles)
    every = tile_start < 0
    cols = torch.arange(S, device=q.device)
    key_tile = cols // tile_stride
    in_tile = (cols - key_tile * tile_stride < tile_len) & (key_tile < n_tiles)
    key_valid = tile_valid[:, key_tile.clamp(max=n_tiles - 1)]  # [B, S]
    allowed = in_tile & (key_tile >= start[:, None]) & (key_tile < end[:, None]) & (key_valid | every[:, None])
    keep = allowed[:, None, :, None]
    kk = torch.where(keep, k, 0).float()
    vv = torch.where(keep, v, 0).float()
    o = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=allowed[:, None, None, :], scale=scale)
    o = torch.where(allowed.any(dim=1)[:, None, None, None], o, 0.0)  # a row that attends nothing: exactly 0
    o = o.view(B, Hkv, R, groups, d).permute(0, 2, 1, 3, 4).reshape(N, H, d)
    return out.copy_(o)


def _gathered_rows(qq, k, v, tile_start, tile_end, tile_valid, tile_len: int, tile_stride: int, scale: float):
    """qq [B, Hkv, M, d] fp32 against each row's own keys (the tiles of its range that it attends, gathered) ->
    [B, Hkv, M, d] fp32, 0 for a row that attends nothing. One host sync (the ranges)."""
    n_tiles = tile_valid.shape[1]
    starts, ends, valid = tile_start.tolist(), tile_end.tolist(), tile_valid.tolist()
    offsets = torch.arange(tile_len)
    o = torch.zeros_like(qq)
    for b, (s, e) in enumerate(zip(starts, ends, strict=True)):
        tiles = range(n_tiles) if s < 0 else [j for j in range(max(s, 0), min(e, n_tiles)) if valid[b][j]]
        if not tiles:
            continue
        rows = (torch.tensor(list(tiles))[:, None] * tile_stride + offsets).flatten()
        o[b] = F.scaled_dot_product_attention(qq[b], k[b].index_select(1, rows).float(),
                                              v[b].index_select(1, rows).float(), scale=scale)
    return o
