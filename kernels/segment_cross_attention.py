"""Segment cross-attention for prefill: text queries attend to the vision tokens of a contiguous range of image
tiles of their own row (Llama 3.2 Vision's cross-attention), with grouped KV heads.

Layout. A row's vision keys are laid out image after image, tile after tile: tile j (of n_tiles = images x
max_tiles, j = image * max_tiles + tile) owns the key rows [j * tile_stride, j * tile_stride + tile_len) of
k / v [B, Hkv, S, d]; rows between tile_len and tile_stride (padding, e.g. 1601 keys stored in 1608 rows) are
never read. (transformers drops the vision tower's padding to a multiple of 8 before the projector, so its
cross-attention sees 1601 keys per 560-px tile: tile_len 1601, whatever tile_stride a cache chooses.)
`tile_valid[b, j]` says whether tile j of row b is a real tile (an image's padded tiles and a row's padded
images are not).

Semantics, for token t of row b with `tile_start[b, t] = s`, `tile_end[b, t] = e` (both int32):
- s >= 0: the token attends to the keys of the tiles j in [s, e) with tile_valid[b, j] (Mllama: the tiles of
  the most recent group of adjacent images, the image token included, and of those only the real tiles);
  e <= s (or no valid tile in the range) gives exactly 0, never NaN.
- s < 0 (`ALL_TILES`): the token attends to every key of every tile of the row, invalid tiles included.
  That is transformers' rule for a token whose cross_attention_mask row is all 0 (text before the first
  image, text-only rows, left padding): it resets such a mask row to all-visible; the caller zeroes the
  layer's MLP output for those tokens, not this op.
- s and e are clamped to [0, n_tiles] (kernel and twin alike): nothing is read out of bounds.
`tile_ranges_from_mask` turns a processor's cross_attention_mask [B, T, images, max_tiles] into this form.

Query head h reads KV head h // G (G = H / Hkv, GQA); the G query heads of one KV head are processed together,
so K/V are never repeated per query head. Softmax and accumulation in fp32, output in q's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flamingo_fast.kernels._common import (
    attention_launch_params,
    check_out,
    check_shape,
    check_tensor,
    dot_dtype,
    is_interpreted,
    resolve_scale,
    tl_dtype,
    to_output,
)

ALL_TILES = -1  # a tile_start that means "every tile of the row, invalid ones included"
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
MAX_TILE_ROWS = 2**22  # key rows per row of k (`tile_of` is exact below it): 650 images of 4 tiles of 1608 rows
_INT_DTYPES = (torch.int32,)


@triton.jit
def tile_of(cols, tile_stride, inv_stride):
    """cols // tile_stride for int32 `cols` in [0, MAX_TILE_ROWS), `inv_stride` = fp32(1 / tile_stride), without
    an integer division (a div.s32 by a runtime value is a multi-instruction sequence in SASS, per element, and
    the kernels take one per key of every block). The truncated fp32 product is never above the quotient there
    (for c = k*s - 1 it is at most k - 0.5/s: both roundings together move it by less than k * 2**-23 < 0.5/s),
    and at most one below it (c = k*s gives k - 1 for 355 of the strides 1-3000, e.g. 41): one compare
    corrects it."""
    t = (cols.to(tl.float32) * inv_stride).to(tl.int32)
    return tl.where(cols >= (t + 1) * tile_stride, t + 1, t)


def inverse_stride(tile_stride: int) -> float:
    """The fp32 value of 1 / tile_stride, as a Python float: what the kernels multiply by on a GPU, and what the
    interpreter (which computes with float64 scalars) must be given to round the same way."""
    return float(torch.tensor(1.0 / tile_stride, dtype=torch.float32))


@triton.jit
def _segment_cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, start_ptr, end_ptr, valid_ptr, out_ptr,
    T, n_tiles, tile_len, tile_stride, inv_stride, qk_scale_log2,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_sb, stride_st, stride_eb, stride_et, stride_wb, stride_wj,
    stride_ob, stride_oh, stride_ot, stride_od,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: BLOCK_M // GROUP consecutive tokens x the GROUP query heads of KV head hk, of row b: one
    [BLOCK_M, d] query tile (row m = token m // GROUP, head hk * GROUP + m % GROUP) against the keys of the
    tiles its tokens see, read once for all GROUP heads.

    grid = (cdiv(T, BLOCK_M // GROUP), Hkv, B)
    q            [B, H, T, HEAD_DIM]          any strides, H = Hkv * GROUP
    k, v         [B, Hkv, S, HEAD_DIM]        any strides; tile j owns rows [j*tile_stride, j*tile_stride+tile_len)
    start, end   [B, T] int32                 the token's tile range (start < 0: every tile of the row)
    valid        [B, n_tiles] uint8           1 = a real tile
    out          [B, H, T, HEAD_DIM]          any strides, OUT_DTYPE

    Tiling:
        lo, hi = min start, max end over the block's tokens (0, n_tiles with an every-tile token)
        for tile j in [lo, hi): skip it (no load, no dot) unless some token's range holds j and (valid[j]
                                or some token sees every tile)
            for key blocks n0 from max(pos, j*tile_stride) to j*tile_stride + tile_len, BLOCK_N at a time
                (a block may run on into tile j+1, j+2: when those are needed their keys are taken here
                 and `pos` skips them later, so a run of adjacent tiles costs no partial block per tile;
                 padding rows, and keys of invalid tiles unless some token sees every tile, are masked out
                 of the loads)
                S = Q @ K^T * scale * log2(e); S[m, n] = -inf unless key n's tile is in token m's range
                and (valid or token m sees every tile); online softmax (base 2, fp32), acc += P @ V
        out = acc / l, exactly 0 for a token that accepted no key (l == 0)

    Why this grid: the range changes only where a new group of image tokens starts, so consecutive tokens
    share it and per-token ranges cost only masking; packing the GROUP heads of a KV head into the 64 query
    rows keeps a 64-row tensor-core tile (wgmma's minimum) while the block spans only 64 / GROUP tokens (16
    for Mllama's 32 / 8 heads): fewer blocks straddle a range change, and a straddling block visits the union
    of two ranges. Query blocks are the fastest grid axis, so the blocks that read the same K/V run together.
    """
    tl.static_assert(BLOCK_M >= 16)
    tl.static_assert(BLOCK_N >= 16)
    tl.static_assert(GROUP <= BLOCK_M)
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    pid_t = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = pid_t * TOKENS + offs_m // GROUP
    head = hk * GROUP + offs_m % GROUP
    m_valid = (offs_m < TOKENS * GROUP) & (tok < T)

    start = tl.load(start_ptr + b * stride_sb + tok * stride_st, mask=m_valid, other=0)
    end = tl.load(end_ptr + b * stride_eb + tok * stride_et, mask=m_valid, other=0)
    every = (start < 0) & m_valid
    start = tl.where(every, 0, tl.minimum(start, n_tiles))
    end = tl.where(every, n_tiles, tl.minimum(tl.maximum(end, 0), n_tiles))
    start = tl.where(m_valid, start, n_tiles)  # rows past the block's tokens: an empty range
    end = tl.where(m_valid, end, 0)
    lo = tl.min(start, axis=0)
    hi = tl.max(end, axis=0)
    any_every = tl.max(every.to(tl.int32), axis=0)

    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=m_valid[:, None], other=0.0,
    ).to(DOT_DTYPE)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    valid_base = valid_ptr + b * stride_wb

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a token with no key never gives NaN
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    pos = lo * tile_stride  # keys below pos were taken already
    for j in range(lo, hi):
        covered = tl.max(((start <= j) & (j < end)).to(tl.int32), axis=0)
        valid_j = tl.load(valid_base + j * stride_wj).to(tl.int32)
        needed = (covered > 0) & ((valid_j > 0) | (any_every > 0))
        tile0 = j * tile_stride
        begin = tl.maximum(pos, tile0)
        stop = tl.where(needed, tile0 + tile_len, begin)  # a tile that is not needed: no iteration
        for n0 in range(begin, stop, BLOCK_N):
            cols = n0 + offs_n
            key_tile = tile_of(cols, tile_stride, inv_stride)
            key_in = (cols - key_tile * tile_stride < tile_len) & (key_tile < hi)
            key_valid_i = tl.load(valid_base + key_tile * stride_wj, mask=key_in, other=0).to(tl.int32)
            key_valid = key_valid_i > 0
            key_load = key_in & (tl.maximum(key_valid_i, any_every) > 0)  # a vector compare: the interpreter
            # rejects masks that mix in a scalar bool
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=key_load[:, None],
                        other=0.0).to(DOT_DTYPE)
            v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=key_load[:, None],
                        other=0.0).to(DOT_DTYPE)
            s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
            accept = (start[:, None] <= key_tile[None, :]) & (key_tile[None, :] < end[:, None])
            accept = accept & key_load[None, :] & (key_valid[None, :] | every[:, None])
            s = tl.where(accept, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
            m_i = m_new
        pos = tl.where(needed, begin + tl.cdiv(stop - begin, BLOCK_N) * BLOCK_N, pos)

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + b * stride_ob + head[:, None] * stride_oh + tok[:, None] * stride_ot + offs_d[None, :] * stride_od,
        to_output(o, OUT_DTYPE),
        mask=m_valid[:, None],
    )


def check_tiles(tile_valid, tile_len, tile_stride, keys: int, rows: int, device) -> int:
    """Checks of the tile layout shared by the prefill and decode ops -> tile_stride (tile_len when None)."""
    check_tensor("tile_valid", tile_valid, ndim=2, dtypes=(torch.bool,), device=device)
    if tile_valid.shape[0] != rows:
        raise ValueError(f"tile_valid: got shape {tuple(tile_valid.shape)}, expected [B={rows}, n_tiles]")
    if isinstance(tile_len, bool) or not isinstance(tile_len, int) or tile_len < 1:
        raise ValueError(f"tile_len: got {tile_len!r}, expected a positive int")
    if tile_stride is None:
        tile_stride = tile_len
    if isinstance(tile_stride, bool) or not isinstance(tile_stride, int) or tile_stride < tile_len:
        raise ValueError(f"tile_stride: got {tile_stride!r}, expected None or an int >= tile_len={tile_len}")
    n_tiles = tile_valid.shape[1]
    if n_tiles * tile_stride > MAX_TILE_ROWS:
        raise ValueError(f"tile_valid: {n_tiles} tiles every {tile_stride} rows, expected at most {MAX_TILE_ROWS} key "
                         "rows per row of k (the kernels find a key's tile with fp32 arithmetic, exact below that)")
    needed = (n_tiles - 1) * tile_stride + tile_len if n_tiles else 0
    if keys < needed:
        raise ValueError(f"k: {keys} keys per row, expected at least {needed} ({n_tiles} tiles of {tile_len} keys "
                         f"every {tile_stride} rows)")
    return tile_stride


def check_row_spans(**tensors: torch.Tensor) -> None:
    """The kernels index within a batch row with int32 offsets (the row's base is int64): each tensor's elements
    past its first dim must lie within 2**31 of the row's first (about 2 million keys at Hkv x d = 1024)."""
    for name, t in tensors.items():
        span = sum((size - 1) * abs(stride) for size, stride in zip(t.shape[1:], t.stride()[1:], strict=True))
        if span >= 2**31:
            raise ValueError(f"{name}: shape {tuple(t.shape)} with strides {t.stride()} spans {span} elements in one "
                             "batch row; the Triton kernel's offsets within a row are int32: expected below 2**31")


def _check_inputs(q, k, v, tile_start, tile_end, tile_valid, tile_len, tile_stride, scale, out):
    """Shared argument checks of the launcher and the twin -> (groups, tile_stride, scale)."""
    check_tensor("q", q, ndim=4)
    B, H, T, d = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    Bk, Hkv, S, dk = k.shape
    if Bk != B or dk != d or Hkv < 1 or H % Hkv:
        raise ValueError(f"k: got shape {tuple(k.shape)}, expected [B={B}, Hkv dividing H={H}, S, d={d}] "
                         f"(q is {tuple(q.shape)})")
    check_shape("v", v, tuple(k.shape), "the shape of k")
    for name, t in (("tile_start", tile_start), ("tile_end", tile_end)):
        check_tensor(name, t, ndim=2, dtypes=_INT_DTYPES, device=q.device)
        check_shape(name, t, (B, T), "[B, T] of q")
    tile_stride = check_tiles(tile_valid, tile_len, tile_stride, S, B, q.device)
    scale = resolve_scale(scale, d)
    if out is not None:
        check_out(out, (B, H, T, d), q.dtype, q.device)
    return H // Hkv, tile_stride, scale


def _new_out(q: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] laid out as [B, T, H, d], so the caller reshapes to [B, T, H*d] without a copy."""
    B, H, T, d = q.shape
    return torch.empty(B, T, H, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def segment_cross_attention(
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Segment cross-attention (Triton). See the module docstring.

    q [B, H, T, d] (d in 16/32/64/128), k, v [B, Hkv, S, d] (Hkv divides H; q's dtype: fp32, fp16 or bf16; any
    strides), tile_start, tile_end [B, T] int32, tile_valid [B, n_tiles] bool, tile_len keys per tile stored
    every tile_stride rows (default tile_len). Returns [B, H, T, d] in q.dtype (fp32 accumulation), into `out`
    when given (any strides), else allocated with a [B, T, H, d] memory layout. No host sync.
    """
    groups, tile_stride, scale = _check_inputs(q, k, v, tile_start, tile_end, tile_valid, tile_len, tile_stride,
                                               scale, out)
    B, H, T, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {d}, expected one of {SUPPORTED_HEAD_DIMS}")
    if q.device.type != "cuda" and not is_interpreted():
        raise ValueError(f"q: on {q.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): "
                         "use segment_cross_attention_ref on this device")
    block_m, block_n, num_warps, num_stages = launch_params(q.dtype, d)
    if groups > block_m:
        raise ValueError(f"k: {H // groups} KV heads for {H} query heads ({groups} per KV head), expected at most "
                         f"{block_m} query heads per KV head for {q.dtype}")
    if out is None:
        out = _new_out(q)
    check_row_spans(q=q, k=k, v=v, out=out)
    if out.numel() == 0:
        return out
    n_tiles = tile_valid.shape[1]
    if n_tiles == 0:  # no vision tokens at all: every range is empty
        return out.zero_()
    valid = tile_valid.view(torch.uint8)  # same bytes; a uint8 pointer for the kernel
    grid = (triton.cdiv(T, block_m // groups), H // groups, B)
    _segment_cross_attention_kernel[grid](
        q, k, v, tile_start, tile_end, valid, out,
        T, n_tiles, tile_len, tile_stride, inverse_stride(tile_stride), scale * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), *tile_start.stride(), *tile_end.stride(), *valid.stride(),
        *out.stride(),
        HEAD_DIM=d, GROUP=groups, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype(q.dtype), OUT_DTYPE=tl_dtype(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def launch_params(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M query rows = tokens x GROUP heads, BLOCK_N keys, num_warps, num_stages).

    The attention kernels' tiles (`attention_launch_params`: 64 x 64 for fp16/bf16) with more warps where this
    kernel's per-row range state pushed them over (bench/compile_report.py, triton 3.9, Mllama-11B's d 128,
    G 4): bf16 64 x 64 with 4 warps spills 8 B on sm_90 (255 registers), 8 warps fit (249-251, no spills,
    HGMMA kept); fp32 16 x 64 spills 304 B on sm_80, 16 x 32 with 4 warps 8 B on sm_90, 16 x 32 with 8 warps
    fits both (70-80 registers)."""
    if dtype == torch.float32:
        return 16, 32, 8, 2
    block_m, block_n, num_warps, num_stages = attention_launch_params(dtype, head_dim)
    return block_m, block_n, (8 if head_dim > 64 else num_warps), num_stages


def segment_cross_attention_ref(
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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin of `segment_cross_attention` (same signature and semantics); the torch backend runs it.

    Segment-indexed like the kernel: along each row, consecutive tokens with the same (start, end) form a
    run; each run gathers the keys of its tiles (only those it attends) and runs one attention in fp32 with
    the run's G * tokens queries per KV head as one [G * n, d] matrix (no K/V repeated per query head). Cost
    per token: its own keys, not the row's. One host sync per call (the runs); fine for prefill.
    """
    groups, tile_stride, scale = _check_inputs(q, k, v, tile_start, tile_end, tile_valid, tile_len, tile_stride,
                                               scale, out)
    B, H, T, d = q.shape
    Hkv = H // groups
    if out is None:
        out = _new_out(q)
    if out.numel() == 0:
        return out
    n_tiles = tile_valid.shape[1]
    start, end = clamp_tile_ranges(tile_start.long(), tile_end.long(), n_tiles)
    # runs of equal ranges along each row: where (start, end) changes
    change = torch.ones(B, T, dtype=torch.bool, device=q.device)
    every = tile_start < 0
    change[:, 1:] = (start[:, 1:] != start[:, :-1]) | (end[:, 1:] != end[:, :-1]) | (every[:, 1:] != every[:, :-1])
    run_b, run_t = change.nonzero(as_tuple=True)
    host = torch.stack([run_b, run_t, start[run_b, run_t], end[run_b, run_t], every[run_b, run_t].long()]).tolist()
    valid_host = tile_valid.tolist()
    bounds = list(zip(*host, strict=True))
    key_offsets = torch.arange(tile_len, device=q.device)
    for i, (b, t0, s, e, all_tiles) in enumerate(bounds):
        t1 = bounds[i + 1][1] if i + 1 < len(bounds) and bounds[i + 1][0] == b else T
        tiles = [j for j in range(s, e) if all_tiles or valid_host[b][j]]
        if not tiles:
            out[b, :, t0:t1] = 0
            continue
        rows = (torch.tensor(tiles, device=q.device)[:, None] * tile_stride + key_offsets).flatten()
        kk = k[b].index_select(1, rows).float()  # [Hkv, n_keys, d]
        vv = v[b].index_select(1, rows).float()
        n = t1 - t0
        qq = q[b, :, t0:t1].float().reshape(Hkv, groups * n, d)  # head h = hk * G + g: rows (g, token)
        o = F.scaled_dot_product_attention(qq, kk, vv, scale=scale)
        out[b, :, t0:t1] = o.view(H, n, d).to(q.dtype)
    return out


def clamp_tile_ranges(start: torch.Tensor, end: torch.Tensor, n_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, end) clamped to [0, n_tiles], with start < 0 meaning [0, n_tiles) (every tile)."""
    every = start < 0
    s = torch.where(every, 0, start.clamp(max=n_tiles))
    e = torch.where(every, n_tiles, end.clamp(0, n_tiles))
    return s, e


def tile_ranges_from_mask(cross_attention_mask: torch.Tensor, *, check: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A processor's cross_attention_mask [B, T, images, max_tiles] (nonzero = the token sees that tile) ->
    (tile_start [B, T] int32, tile_end [B, T] int32, tile_valid [B, images * max_tiles] bool) for the segment
    ops: a token's range runs from its first to its last visible tile, a tile is valid when some token of the
    row sees it, and a token that sees nothing gets tile_start = ALL_TILES (transformers attends it to every
    vision token of the row). No host sync unless `check`.

    The encoding holds every mask the Mllama processor writes: a token sees a contiguous range of images and,
    of each, the tiles the image has. `check=True` verifies that the mask is of that form (one host sync) and
    raises ValueError otherwise (e.g. a token that sees images 0 and 2 but not 1)."""
    check_tensor("cross_attention_mask", cross_attention_mask, ndim=4, dtypes=None)
    B, T, images, max_tiles = cross_attention_mask.shape
    n_tiles = images * max_tiles
    visible = (cross_attention_mask != 0).reshape(B, T, n_tiles)
    seen = visible.any(dim=-1)
    index = torch.arange(n_tiles, device=visible.device)
    if n_tiles:
        first = torch.where(visible, index, n_tiles).amin(dim=-1)
        last = torch.where(visible, index, -1).amax(dim=-1)
    else:
        first = last = torch.zeros(B, T, dtype=torch.long, device=visible.device)
    tile_start = torch.where(seen, first, ALL_TILES).to(torch.int32)
    tile_end = torch.where(seen, last + 1, n_tiles).to(torch.int32)
    tile_valid = visible.any(dim=1)
    if check:
        in_range = (index >= first[..., None]) & (index <= last[..., None])
        rebuilt = in_range & tile_valid[:, None, :]
        bad = seen[..., None] & (rebuilt != visible)
        if bool(bad.any()):
            b, t, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(
                f"cross_attention_mask: token {t} of row {b} is not a contiguous tile range of the row's real "
                f"tiles (tile {j}: image {j // max_tiles}, tile {j % max_tiles}); expected the Mllama processor's "
                "form (a token sees a contiguous group of images, and of each the tiles the image has)"
            )
    return tile_start, tile_end, tile_valid
