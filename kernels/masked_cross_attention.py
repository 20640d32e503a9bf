"""Segment-indexed masked cross-attention for prefill: text queries attend to the media latents of their
own image (immediate mode) or of every image up to their own (all-previous mode).

Semantics (OpenFlamingo, docs/semantics.md), with `image_index[b, t]` the 0-based image of token t
(OpenFlamingo's `text_time - 1`), -1 before the first image:
- immediate (`attend_previous=False`): token t attends to keys `[i*NL, (i+1)*NL)`, i = image_index[b, t].
- all-previous (`attend_previous=True`): token t attends to keys `[0, (i+1)*NL)`.
- tokens with index -1 give exactly 0 (never NaN), except with `pre_image_attends_all=True` in
  all-previous mode, which reproduces OpenFlamingo's bug: such a token's scores are all masked to the same
  value, so its softmax is uniform over all keys of all images and its output is the mean of v.
  In immediate mode the flag changes nothing (OpenFlamingo zeroes those tokens in that mode too); with no
  images at all (N_img = 0) every output is 0 in every mode.
- an index >= N_img (a caller's error) is clamped to N_img - 1 and one < -1 to -1, by the kernel and the
  twin alike: nothing is ever read out of bounds.

Along an OpenFlamingo row the index never decreases, so a block of consecutive queries touches a short range
of images (one, rarely two or three): the kernel visits only those 64-latent tiles and the work is O(T * NL) per
head in immediate mode, where the reference's dense masked attention is O(T * N_img * NL).
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

# Block sizes: `attention_launch_params` (64 queries x 64 keys for fp16/bf16, one wgmma tile per dot; 16
# queries for exact fp32). With ~32 text tokens per shot a 64-query block touches ~2 images; smaller
# blocks would waste less of the second tile but fall below wgmma's 64-row minimum.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
# The torch twin processes queries in chunks of this many tokens; each chunk gathers the latents of the
# images it touches. Measured at the `small` shape, 32 shots (T 1032), 1 CPU thread: 16 -> 14.2 ms,
# 32 -> 10.8 ms, 64 -> 12.7 ms (bench/sweep_xattn_cpu.py --chunk N).
REF_CHUNK = 32


@triton.jit
def _masked_cross_attention_kernel(
    q_ptr, k_ptr, v_ptr, index_ptr, out_ptr,
    T, num_images, qk_scale_log2,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_it,
    stride_ob, stride_oh, stride_ot, stride_od,
    HEAD_DIM: tl.constexpr, NUM_LATENTS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    ATTEND_PREVIOUS: tl.constexpr, PRE_IMAGE_ATTENDS_ALL: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: BLOCK_T consecutive queries of one (batch row b, head h); an online softmax over the
    key tiles of the images those queries touch, and no others.

    grid = (cdiv(T, BLOCK_T), H, B)
    q      [B, H, T, HEAD_DIM]            any strides (the runtime passes a [B, T, H, d] tensor transposed)
    k, v   [B, H, N_img * NUM_LATENTS, HEAD_DIM]  any strides; image i owns rows [i*NL, (i+1)*NL)
    index  [B, T] int32, -1 = no image; usually non-decreasing along t (OpenFlamingo), but any order is
           correct (IDEFICS's -1 after `</s>`): a block visits every tile from its lowest image to its highest
    out    [B, H, T, HEAD_DIM]            any strides, OUT_DTYPE

    Tiling, for the program (t0 = program_id(0) * BLOCK_T, h, b):

        queries t0 .. t0+BLOCK_T-1 ──> images lo .. hi-1 (lo = min index in the block, hi = max + 1;
                                       all-previous: lo = 0; pre-image bug with a -1 token: hi = N_img)
        for key rows n0 = lo*NL, lo*NL + BLOCK_N, .. < hi*NL      (NL = 64 = BLOCK_N: one tile per image)
            S = Q[BLOCK_T, d] @ K[n0:n0+BLOCK_N, d]^T             (fp32 accumulate, times scale*log2(e))
            S[t, n] = -inf unless token t accepts key n's image   (immediate: idx[t] == n // NL;
                                                                   all-previous: idx[t] >= n // NL)
            online softmax:  m, l, acc = rescale(acc) + P @ V[n0:n0+BLOCK_N]
        out = acc / l,  exactly 0 for tokens that accepted no key (l == 0)

    Immediate mode reads (hi - lo) * NL keys per program: one image when the block sits inside a shot.
    """
    tl.static_assert(BLOCK_T >= 16)
    tl.static_assert(BLOCK_N >= 16)
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    t_valid = offs_t < T

    img = tl.load(index_ptr + b * stride_ib + offs_t * stride_it, mask=t_valid, other=-1)
    img = tl.minimum(tl.maximum(img, -1), num_images - 1)
    if PRE_IMAGE_ATTENDS_ALL:
        uniform = (img < 0) & t_valid
    hi = tl.max(img, axis=0) + 1
    if ATTEND_PREVIOUS:
        lo = 0
        if PRE_IMAGE_ATTENDS_ALL:
            hi = tl.where(tl.max(uniform.to(tl.int32), axis=0) > 0, num_images, hi)
    else:
        lo = tl.maximum(tl.min(tl.where(t_valid & (img >= 0), img, num_images), axis=0), 0)
    key_end = hi * NUM_LATENTS

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_t[:, None] * stride_qt + offs_d[None, :] * stride_qd,
        mask=t_valid[:, None], other=0.0,
    ).to(DOT_DTYPE)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK_T], -1.0e30, dtype=tl.float32)  # finite: a token with no key never gives NaN
    l_i = tl.zeros([BLOCK_T], dtype=tl.float32)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], dtype=tl.float32)
    for n0 in range(lo * NUM_LATENTS, key_end, BLOCK_N):
        rows = n0 + offs_n
        n_valid = rows < key_end
        k = tl.load(
            k_base + rows[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=n_valid[:, None], other=0.0
        ).to(DOT_DTYPE)
        v = tl.load(
            v_base + rows[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=n_valid[:, None], other=0.0
        ).to(DOT_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
        key_img = rows // NUM_LATENTS
        if ATTEND_PREVIOUS:
            accept = img[:, None] >= key_img[None, :]
        else:
            accept = img[:, None] == key_img[None, :]
        if PRE_IMAGE_ATTENDS_ALL:
            accept = accept | uniform[:, None]
            s = tl.where(uniform[:, None], 0.0, s)
        accept = accept & n_valid[None, :]
        s = tl.where(accept, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :] * stride_od,
        to_output(o, OUT_DTYPE),
        mask=t_valid[:, None],
    )


def _check_inputs(q, k, v, image_index, num_latents, scale, out):
    """Shared argument checks of the launcher and the twin; returns (N_img, scale)."""
    check_tensor("q", q, ndim=4)
    B, H, T, d = q.shape
    check_tensor("k", k, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=4, dtypes=(q.dtype,), device=q.device)
    check_tensor("image_index", image_index, ndim=2, dtypes=(torch.int32,), device=q.device)
    if not isinstance(num_latents, int) or num_latents < 1:
        raise ValueError(f"num_latents: got {num_latents!r}, expected a positive int")
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != d or k.shape[2] % num_latents:
        raise ValueError(
            f"k: got shape {tuple(k.shape)}, expected [B={B}, H={H}, N_img*{num_latents}, d={d}] "
            f"(q is {tuple(q.shape)})"
        )
    check_shape("v", v, tuple(k.shape), "the shape of k")
    check_shape("image_index", image_index, (B, T), "[B, T] of q")
    scale = resolve_scale(scale, d)
    if out is not None:
        check_out(out, (B, H, T, d), q.dtype, q.device)
    return k.shape[2] // num_latents, scale


def _new_out(q: torch.Tensor) -> torch.Tensor:
    """[B, H, T, d] laid out as [B, T, H, d], so the caller reshapes to [B, T, H*d] without a copy."""
    B, H, T, d = q.shape
    return torch.empty(B, T, H, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def masked_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    image_index: torch.Tensor,
    *,
    num_latents: int = 64,
    attend_previous: bool = False,
    pre_image_attends_all: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked cross-attention of text queries to media latents (Triton). See the module docstring.

    q [B, H, T, d] (d in 16/32/64/128), k, v [B, H, N_img*num_latents, d] (same dtype: fp32, fp16 or
    bf16; any strides), image_index [B, T] int32. Returns [B, H, T, d] in q.dtype (fp32 accumulation),
    written into `out` when given (any strides), else allocated with a [B, T, H, d] memory layout.
    """
    num_images, scale = _check_inputs(q, k, v, image_index, num_latents, scale, out)
    B, H, T, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {d}, expected one of {SUPPORTED_HEAD_DIMS}")
    if q.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"q: on {q.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): "
            "use masked_cross_attention_ref on this device"
        )
    if out is None:
        out = _new_out(q)
    if out.numel() == 0:
        return out
    if num_images == 0:  # text only: every token is before the first image (and a mean over no keys is 0)
        return out.zero_()
    block_t, block_n, num_warps, num_stages = attention_launch_params(q.dtype, d)
    grid = (triton.cdiv(T, block_t), H, B)
    _masked_cross_attention_kernel[grid](
        q, k, v, image_index, out,
        T, num_images, scale * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), *image_index.stride(), *out.stride(),
        HEAD_DIM=d, NUM_LATENTS=num_latents,
        BLOCK_T=block_t, BLOCK_N=block_n,
        ATTEND_PREVIOUS=attend_previous, PRE_IMAGE_ATTENDS_ALL=attend_previous and pre_image_attends_all,
        DOT_DTYPE=dot_dtype(q.dtype), OUT_DTYPE=tl_dtype(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def masked_cross_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    image_index: torch.Tensor,
    *,
    num_latents: int = 64,
    attend_previous: bool = False,
    pre_image_attends_all: bool = False,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin of `masked_cross_attention` (same signature and semantics); the torch backend runs it.

    Immediate mode is segment-indexed like the kernel, so its cost per token does not grow with the number
    of images: queries are cut into chunks of REF_CHUNK tokens, each chunk gathers (index_select) the
    NL-latent K/V tiles of the S images it touches (S = the largest span of any chunk, usually 2), and one
    batched scaled_dot_product_attention runs with a per-token mask over those S*NL keys. All-previous mode
    is dense over the keys of images 0..max(index), as that mode is by definition. One host sync (the span
    S, or the largest index) per call: fine for prefill; the decode twin has none.
    """
    num_images, scale = _check_inputs(q, k, v, image_index, num_latents, scale, out)
    B, H, T, d = q.shape
    if out is None:
        out = _new_out(q)
    if out.numel() == 0:
        return out
    if num_images == 0:
        return out.zero_()
    img = image_index.long().clamp(-1, num_images - 1)
    if attend_previous:
        result = _all_previous(q, k, v, img, num_latents, scale)
        if pre_image_attends_all:
            mean_v = v[:, :, : num_images * num_latents].float().mean(dim=2).to(q.dtype)  # [B, H, d]
            result = torch.where((img < 0)[:, None, :, None], mean_v[:, :, None, :], result)
    else:
        result = _immediate(q, k, v, img, num_latents, scale, REF_CHUNK)
    return out.copy_(result)


def _immediate(q, k, v, img, NL: int, scale: float, chunk: int) -> torch.Tensor:
    B, H, T, d = q.shape
    num_images = k.shape[2] // NL
    n_chunks = -(-T // chunk)
    pad = n_chunks * chunk - T
    img_c = F.pad(img, (0, pad), value=-1).view(B, n_chunks, chunk)
    has_image = img_c >= 0
    lo = torch.where(has_image, img_c, num_images).amin(dim=-1).clamp(max=num_images - 1)  # [B, C]
    span = int((img_c.amax(dim=-1) - lo + 1).clamp(min=1).max())  # the one host sync
    key_image = lo[..., None] + torch.arange(span, device=q.device)  # [B, C, S]; > N_img-1 never matches
    gather = key_image.clamp(max=num_images - 1).view(B, n_chunks * span)

    def tiles(x):  # [B, H, N_img*NL, d] (any strides) -> [B, H*C, S*NL, d]: the latents of each chunk's images
        x = x[:, :, : num_images * NL].unflatten(2, (num_images, NL))  # [B, H, N_img, NL, d], a view
        out = torch.empty(B, H, n_chunks * span, NL, d, dtype=x.dtype, device=x.device)
        for b in range(B):  # one gather per row, straight into the layout attention reads
            torch.index_select(x[b], 1, gather[b], out=out[b])
        return out.view(B, H * n_chunks, span * NL, d)

    q_c = F.pad(q, (0, 0, 0, pad)).reshape(B, H * n_chunks, chunk, d)
    mask = img_c[..., :, None] == key_image.repeat_interleave(NL, dim=-1)[..., None, :]  # [B, C, chunk, S*NL]
    mask = mask[:, None].expand(B, H, n_chunks, chunk, span * NL).reshape(B, H * n_chunks, chunk, span * NL)
    o = F.scaled_dot_product_attention(q_c, tiles(k), tiles(v), attn_mask=mask, scale=scale)
    o = torch.where(has_image[:, None, :, :, None], o.view(B, H, n_chunks, chunk, d), 0.0)  # no key: exactly 0
    return o.view(B, H, n_chunks * chunk, d)[:, :, :T]


def _all_previous(q, k, v, img, NL: int, scale: float) -> torch.Tensor:
    B, H, T, d = q.shape
    n_keys = (int(img.max()) + 1) * NL  # keys of images past the last one used are never attended
    if n_keys == 0:
        return torch.zeros_like(q)
    key_image = torch.arange(n_keys, device=q.device) // NL
    mask = key_image[None, None, :] <= img[:, :, None]  # [B, T, n_keys]
    o = F.scaled_dot_product_attention(q, k[:, :, :n_keys], v[:, :, :n_keys], attn_mask=mask[:, None], scale=scale)
    return torch.where((img >= 0)[:, None, :, None], o, 0.0)

