"""Masked cross-attention for cached decoding: one new text token per row against the media K/V cached
for that row, read in place. Safe to capture in a CUDA graph: no host sync, no allocation when `out` is
given, every per-row quantity (the image index, the image count) is read on the device.

Semantics match `masked_cross_attention` with T = 1 (docs/semantics.md): `image_index[b]` is the 0-based
image the new token of row b belongs to (the row's last image; -1: the row has none).
- immediate: the token attends to the NL latents of image `image_index[b]`;
- all-previous: to images 0..image_index[b];
- -1 gives exactly 0, unless `pre_image_attends_all` (all-previous mode only): then the output is the mean
  of v over the latents of the row's `num_images[b]` images (OpenFlamingo's bug, see the prefill kernel).
Indices are clamped to the cache's capacity (`capacity // NL` images): never an out-of-bounds read.

Several queries may share one row's cache (`queries_per_row` R, the beams or scored candidates of a row): query b
is a query of row b // R, reads that row's cache and attends to that row's image, so the beams of a row read its
media K/V in place, never copied per beam. With `index_per_query=True`, `image_index` holds one image per query
[B * R] instead of one per row: the beams of a row still read its cache, each attending to its own image
(OpenFlamingo's generated-`<image>` behaviour gives a row's beams different images).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flamingo_fast.kernels._common import (
    check_out,
    check_shape,
    check_tensor,
    is_interpreted,
    resolve_scale,
    rows_of_queries,
    tl_dtype,
    to_output,
)

NUM_WARPS = 4
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _masked_cross_attention_decode_kernel(
    q_ptr, k_ptr, v_ptr, index_ptr, num_images_ptr, out_ptr,
    capacity_images, qk_scale_log2, queries_per_row, queries_per_index,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_nb,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, NUM_LATENTS: tl.constexpr, BLOCK_N: tl.constexpr,
    ATTEND_PREVIOUS: tl.constexpr, PRE_IMAGE_ATTENDS_ALL: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: the single new query of (row b, head h) against that row's cached image latents.

    grid = (B * R, H), R = queries_per_row
    q          [B * R, H, HEAD_DIM]              any strides
    k, v       [B, H, capacity, HEAD_DIM]        any strides; image i owns rows [i*NL, (i+1)*NL); query b
                                                 reads row b // R
    index      [B * R / queries_per_index] int32 the current image, -1 = none: query b reads entry
                                                 b // queries_per_index (R: one per row; 1: one per query)
    num_images [B] int32                         images of the row (read only with PRE_IMAGE_ATTENDS_ALL)
    out        [B * R, H, HEAD_DIM]              any strides, OUT_DTYPE

    Tiling: for image j in [lo, hi) (immediate: the one image; all-previous: 0..index), load the
    [BLOCK_N, HEAD_DIM] K and V tiles, scores s = K_j @ q (a broadcast multiply and row sum: one query
    is below tl.dot's 16-row minimum, and decode is memory-bound anyway), online softmax in fp32.
    All arithmetic is fp32 (loads are converted at once), so no dot operand dtype is needed.
    """
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_valid = offs_n < NUM_LATENTS

    row = b // queries_per_row
    img = tl.load(index_ptr + (b // queries_per_index) * stride_ib)
    img = tl.minimum(tl.maximum(img, -1), capacity_images - 1)
    hi = img + 1
    if ATTEND_PREVIOUS:
        lo = 0
        if PRE_IMAGE_ATTENDS_ALL:
            row_images = tl.load(num_images_ptr + row * stride_nb)
            row_images = tl.minimum(tl.maximum(row_images, 0), capacity_images)
            uniform = img < 0
            hi = tl.where(uniform, row_images, hi)
    else:
        lo = tl.maximum(img, 0)

    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d * stride_qd).to(tl.float32)
    k_base = k_ptr + row * stride_kb + h * stride_kh
    v_base = v_ptr + row * stride_vb + h * stride_vh
    m_i = tl.full([], -1.0e30, dtype=tl.float32)  # finite: no NaN when no key is attended
    l_i = tl.full([], 0.0, dtype=tl.float32)
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for j in range(lo, hi):
        rows = j * NUM_LATENTS + offs_n
        k = tl.load(
            k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=n_valid[:, None], other=0.0
        ).to(tl.float32)
        v = tl.load(
            v_base + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=n_valid[:, None], other=0.0
        ).to(tl.float32)
        s = tl.sum(k * q[None, :], axis=1) * qk_scale_log2
        if PRE_IMAGE_ATTENDS_ALL:
            s = tl.where(uniform, 0.0, s)
        s = tl.where(n_valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    o = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d * stride_od, to_output(o, OUT_DTYPE))


def _check_inputs(q, k, v, image_index, num_latents, attend_previous, pre_image_attends_all, num_images,
                  scale, out, queries_per_row, index_per_query):
    """Shared argument checks (shapes only: nothing here reads device memory). Returns (capacity_images,
    scale, needs_num_images)."""
    check_tensor("q", q, ndim=3)
    B, H, d = q.shape
    rows = rows_of_queries(B, queries_per_row)
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("image_index", image_index, ndim=1, dtypes=(torch.int32,), device=q.device)
    if not isinstance(num_latents, int) or num_latents < 1:
        raise ValueError(f"num_latents: got {num_latents!r}, expected a positive int")
    if k.shape[0] != rows or k.shape[1] != H or k.shape[3] != d:
        raise ValueError(
            f"k: got shape {tuple(k.shape)}, expected [B={rows}, H={H}, capacity, d={d}] (q is {tuple(q.shape)}, "
            f"queries_per_row={queries_per_row})"
        )
    check_shape("v", v, tuple(k.shape), "the shape of k")
    if not isinstance(index_per_query, bool):
        raise ValueError(f"index_per_query: got {index_per_query!r}, expected True or False")
    if index_per_query and attend_previous:
        raise ValueError("index_per_query=True with attend_previous=True: one image per query is supported in the "
                         "immediate mode only (OpenFlamingo's generated-<image> behaviour, which needs it, is "
                         "immediate-only); expected attend_previous=False")
    if index_per_query:
        check_shape("image_index", image_index, (B,), f"[{B}]: one per query (index_per_query=True)")
    else:
        check_shape("image_index", image_index, (rows,), f"[{rows}]: one per row of k (one per query needs "
                    f"index_per_query=True)")
    needs_num_images = attend_previous and pre_image_attends_all
    if needs_num_images:
        if num_images is None:
            raise ValueError("num_images: got None, expected a [B] int32 tensor (pre_image_attends_all=True)")
    if num_images is not None:
        check_tensor("num_images", num_images, ndim=1, dtypes=(torch.int32,), device=q.device)
        check_shape("num_images", num_images, (rows,), f"[{rows}]: one per row of k")
    scale = resolve_scale(scale, d)
    if out is not None:
        check_out(out, (B, H, d), q.dtype, q.device)
    return k.shape[2] // num_latents, scale, needs_num_images


def masked_cross_attention_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    image_index: torch.Tensor,
    *,
    num_latents: int = 64,
    attend_previous: bool = False,
    pre_image_attends_all: bool = False,
    num_images: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    queries_per_row: int = 1,
    index_per_query: bool = False,
) -> torch.Tensor:
    """Decode-step masked cross-attention (Triton). See the module docstring.

    q [B * R, H, d], k, v [B, H, capacity, d] (the cached media K/V, same dtype as q; R = queries_per_row),
    image_index [B] int32 (one per row; [B * R], one per query, with index_per_query), num_images [B] int32 (one per
    row; only for pre_image_attends_all). Returns [B * R, H, d]
    in q.dtype, written into `out` when given. CUDA-graph safe: one launch, no sync, no allocation when `out` is given.
    """
    capacity_images, scale, needs_num_images = _check_inputs(
        q, k, v, image_index, num_latents, attend_previous, pre_image_attends_all, num_images, scale, out,
        queries_per_row, index_per_query,
    )
    B, H, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {d}, expected one of {SUPPORTED_HEAD_DIMS}")
    if q.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"q: on {q.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): "
            "use masked_cross_attention_decode_ref on this device"
        )
    if out is None:
        out = torch.empty(B, H, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    counts = num_images if needs_num_images else image_index  # a valid pointer; unread unless needed
    _masked_cross_attention_decode_kernel[(B, H)](
        q, k, v, image_index, counts, out,
        capacity_images, scale * math.log2(math.e), queries_per_row, 1 if index_per_query else queries_per_row,
        *q.stride(), *k.stride(), *v.stride(), image_index.stride(0), counts.stride(0), *out.stride(),
        HEAD_DIM=d, NUM_LATENTS=num_latents, BLOCK_N=max(16, triton.next_power_of_2(num_latents)),
        ATTEND_PREVIOUS=attend_previous, PRE_IMAGE_ATTENDS_ALL=needs_num_images, OUT_DTYPE=tl_dtype(q.dtype),
        num_warps=NUM_WARPS,
    )
    return out


def masked_cross_attention_decode_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    image_index: torch.Tensor,
    *,
    num_latents: int = 64,
    attend_previous: bool = False,
    pre_image_attends_all: bool = False,
    num_images: torch.Tensor | None = None,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    queries_per_row: int = 1,
    index_per_query: bool = False,
) -> torch.Tensor:
    """Torch twin of `masked_cross_attention_decode`; also free of host syncs (CUDA-graph safe).

    The R queries of a row attend together, as one [R, d] x [keys, d] product (the beams or candidates of a
    row read its latents once). Immediate mode gathers each row's NL latents (clamped indices) and runs one
    SDPA over them: its cost does not depend on the number of images; with `index_per_query` it gathers each
    query's NL latents and runs one SDPA per query. All-previous mode attends over the whole
    cache with a mask (no sync allowed to find the used length); slots past a row's images may hold garbage
    (even NaN), so K/V are zeroed there before use.
    """
    capacity_images, scale, needs_num_images = _check_inputs(
        q, k, v, image_index, num_latents, attend_previous, pre_image_attends_all, num_images, scale, out,
        queries_per_row, index_per_query,
    )
    queries, H, d = q.shape
    B, R, NL = queries // queries_per_row, queries_per_row, num_latents
    if out is None:
        out = torch.empty(queries, H, d, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if capacity_images == 0:
        return out.zero_()
    q_rows = q.view(B, R, H, d).transpose(1, 2)  # [B, H, R, d]
    img = image_index.long().clamp(-1, capacity_images - 1)  # [B], or [B * R] with index_per_query

    def finish(o: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """o [B, H, R, d] -> out [B * R, H, d], 0 for queries that attend to nothing (attended [B] or [B, R])."""
        attended = attended.view(B, 1, -1, 1)
        o = torch.where(attended, o, 0.0)
        return out.copy_(o.transpose(1, 2).reshape(queries, H, d))

    if index_per_query:  # immediate mode (checked): query (b, r) attends to the NL latents of its own image
        img = img.view(B, R)
        rows = img.clamp(min=0)[:, :, None] * NL + torch.arange(NL, device=q.device)  # [B, R, NL]
        rows = rows.view(B, 1, R * NL, 1).expand(B, H, R * NL, d)
        k_q, v_q = (t.gather(2, rows).view(B, H, R, NL, d) for t in (k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q_rows[:, :, :, None], k_q, v_q, scale=scale)
        return finish(o[:, :, :, 0], img >= 0)
    if not attend_previous:
        rows = img.clamp(min=0)[:, None] * NL + torch.arange(NL, device=q.device)  # [B, NL]
        rows = rows[:, None, :, None].expand(B, H, NL, d)
        o = torch.nn.functional.scaled_dot_product_attention(q_rows, k.gather(2, rows), v.gather(2, rows),
                                                             scale=scale)
        return finish(o, img >= 0)

    n_keys = capacity_images * NL
    key_image = torch.arange(n_keys, device=q.device) // NL
    last = img
    if needs_num_images:
        row_images = num_images.long().clamp(0, capacity_images)
        last = torch.where(img < 0, row_images - 1, img)
    key_ok = key_image[None, :] <= last[:, None]  # [B, n_keys]
    k_used = torch.where(key_ok[:, None, :, None], k[:, :, :n_keys], 0.0)
    v_used = torch.where(key_ok[:, None, :, None], v[:, :, :n_keys], 0.0)
    o = torch.nn.functional.scaled_dot_product_attention(
        q_rows, k_used, v_used, attn_mask=key_ok[:, None, None, :], scale=scale
    )
    if needs_num_images:  # uniform over the row's images: the mean of v (0 when it has none)
        count = key_ok.sum(dim=1).clamp(min=1)[:, None, None, None]
        mean_v = (v_used.float().sum(dim=2, keepdim=True) / count).to(q.dtype)  # [B, H, 1, d]
        o = torch.where((img < 0)[:, None, None, None], mean_v, o)
        return finish(o, last >= 0)
    return finish(o, img >= 0)
