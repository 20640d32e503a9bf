"""Perceiver-resampler attention: the latents attend over the concatenation [media tokens; latents] of
one image, without materialising the concatenation.

    out = softmax(q @ [k_media; k_latents]^T * scale) @ [v_media; v_latents]

The kernel runs one online softmax over two key sources, media tiles first, then latent tiles. The
LayerNorms of the resampler (norm_media, norm_latents) are NOT fused in: they are a small fraction of the
resampler's cost next to the to_q / to_kv / to_out GEMMs and this attention (an LN reads and writes
[M, D] once; to_kv alone multiplies it by a [D, 2*H*d] matrix), and fusing them would mean writing a
custom LN-prologue GEMM instead of calling cuBLAS. The projections stay cuBLAS GEMMs on torch tensors.
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

# Block sizes: `attention_launch_params` (64 latents x 64 keys for fp16/bf16, one wgmma tile per dot; 16
# latents for exact fp32). With M = 256 media tokens (ViT-L/14 at 224 px) a program runs 4 media tiles and
# 1 latent tile; M = 196 (ViT-B/16) leaves a masked tail tile.
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _attend_tile(q, k_base, v_base, start, n_keys, stride_n, stride_d, m_i, l_i, acc, qk_scale_log2,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """One online-softmax step: the queries `q` [BLOCK_L, HEAD_DIM] against keys start..start+BLOCK_N-1
    (those >= n_keys masked) of one source. Returns the updated (m_i, l_i, acc)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < n_keys
    ptrs = offs_n[:, None] * stride_n + offs_d[None, :] * stride_d
    k = tl.load(k_base + ptrs, mask=n_ok[:, None], other=0.0).to(DOT_DTYPE)
    v = tl.load(v_base + ptrs, mask=n_ok[:, None], other=0.0).to(DOT_DTYPE)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
    s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _perceiver_attention_kernel(
    q_ptr, km_ptr, vm_ptr, kl_ptr, vl_ptr, out_ptr,
    L, M, qk_scale_log2,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kmb, stride_kmh, stride_kmn, stride_kmd,
    stride_vmb, stride_vmh, stride_vmn, stride_vmd,
    stride_klb, stride_klh, stride_kln, stride_kld,
    stride_vlb, stride_vlh, stride_vln, stride_vld,
    stride_ob, stride_oh, stride_ol, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: BLOCK_L latent queries of one (image b, head h) against all M media keys and all L
    latent keys of that image.

    grid = (cdiv(L, BLOCK_L), H, B)          B = images (batch x media x frames, flattened by the caller)
    q                     [B, H, L, HEAD_DIM]   any strides
    k_media, v_media      [B, H, M, HEAD_DIM]   any strides (their strides may differ from each other)
    k_latents, v_latents  [B, H, L, HEAD_DIM]   any strides
    out                   [B, H, L, HEAD_DIM]   any strides, OUT_DTYPE

        Q[BLOCK_L, d] ──> for media tiles  n0 = 0, BLOCK_N, .. < M:  online softmax step (tail masked)
                      ──> for latent tiles n0 = 0, BLOCK_N, .. < L:  same step, same m / l / acc
                      ──> out = acc / l
    """
    tl.static_assert(BLOCK_L >= 16)
    tl.static_assert(BLOCK_N >= 16)
    pid_l = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, HEAD_DIM)
    l_ok = offs_l < L

    q = tl.load(
        q_ptr + b * stride_qb + h * stride_qh + offs_l[:, None] * stride_ql + offs_d[None, :] * stride_qd,
        mask=l_ok[:, None], other=0.0,
    ).to(DOT_DTYPE)
    m_i = tl.full([BLOCK_L], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_L], dtype=tl.float32)
    acc = tl.zeros([BLOCK_L, HEAD_DIM], dtype=tl.float32)

    km_base = km_ptr + b * stride_kmb + h * stride_kmh
    vm_base = vm_ptr + b * stride_vmb + h * stride_vmh
    for start in range(0, M, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, km_base, vm_base, start, M, stride_kmn, stride_kmd, m_i, l_i, acc, qk_scale_log2,
            HEAD_DIM, BLOCK_N, DOT_DTYPE,
        )
    kl_base = kl_ptr + b * stride_klb + h * stride_klh
    vl_base = vl_ptr + b * stride_vlb + h * stride_vlh
    for start in range(0, L, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, kl_base, vl_base, start, L, stride_kln, stride_kld, m_i, l_i, acc, qk_scale_log2,
            HEAD_DIM, BLOCK_N, DOT_DTYPE,
        )
    o = acc / l_i[:, None]  # l >= 1: every query sees its own latent keys (L >= 1)
    tl.store(
        out_ptr + b * stride_ob + h * stride_oh + offs_l[:, None] * stride_ol + offs_d[None, :] * stride_od,
        to_output(o, OUT_DTYPE),
        mask=l_ok[:, None],
    )


def _check_inputs(q, k_media, v_media, k_latents, v_latents, scale, out):
    check_tensor("q", q, ndim=4)
    B, H, L, d = q.shape
    for name, t in (("k_media", k_media), ("v_media", v_media), ("k_latents", k_latents), ("v_latents", v_latents)):
        check_tensor(name, t, ndim=4, dtypes=(q.dtype,), device=q.device)
    if k_media.shape[:2] != (B, H) or k_media.shape[3] != d:
        raise ValueError(f"k_media: got shape {tuple(k_media.shape)}, expected [B={B}, H={H}, M, d={d}]")
    check_shape("v_media", v_media, tuple(k_media.shape), "the shape of k_media")
    check_shape("k_latents", k_latents, (B, H, L, d), "the shape of q")
    check_shape("v_latents", v_latents, (B, H, L, d), "the shape of q")
    scale = resolve_scale(scale, d)
    if out is not None:
        check_out(out, (B, H, L, d), q.dtype, q.device)
    return scale


def _new_out(q: torch.Tensor) -> torch.Tensor:
    """[B, H, L, d] laid out as [B, L, H, d]: the caller reshapes to [B, L, H*d] for to_out without a copy."""
    B, H, L, d = q.shape
    return torch.empty(B, L, H, d, dtype=q.dtype, device=q.device).transpose(1, 2)


def perceiver_attention(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Latent queries over [media; latents] keys (Triton), never concatenated. See the module docstring.

    q, k_latents, v_latents [B, H, L, d]; k_media, v_media [B, H, M, d] (any M >= 0); one dtype (fp32,
    fp16, bf16), any strides. Returns [B, H, L, d] in q.dtype with a [B, L, H, d] memory layout, or `out`.
    """
    scale = _check_inputs(q, k_media, v_media, k_latents, v_latents, scale, out)
    B, H, L, d = q.shape
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"q: head dim {d}, expected one of {SUPPORTED_HEAD_DIMS}")
    if q.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"q: on {q.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): "
            "use perceiver_attention_ref on this device"
        )
    if out is None:
        out = _new_out(q)
    if out.numel() == 0:
        return out
    M = k_media.shape[2]
    block_l, block_n, num_warps, num_stages = attention_launch_params(q.dtype, d)
    _perceiver_attention_kernel[(triton.cdiv(L, block_l), H, B)](
        q, k_media, v_media, k_latents, v_latents, out,
        L, M, scale * math.log2(math.e),
        *q.stride(), *k_media.stride(), *v_media.stride(), *k_latents.stride(), *v_latents.stride(),
        *out.stride(),
        HEAD_DIM=d, BLOCK_L=block_l, BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype(q.dtype), OUT_DTYPE=tl_dtype(q.dtype),
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def perceiver_attention_ref(
    q: torch.Tensor,
    k_media: torch.Tensor,
    v_media: torch.Tensor,
    k_latents: torch.Tensor,
    v_latents: torch.Tensor,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin of `perceiver_attention`: one scaled_dot_product_attention over the concatenated keys
    (torch has no two-source attention; the concat is M + L rows per head, small next to the GEMMs)."""
    scale = _check_inputs(q, k_media, v_media, k_latents, v_latents, scale, out)
    if out is None:
        out = _new_out(q)
    if out.numel() == 0:
        return out
    k = torch.cat([k_media, k_latents], dim=2)
    v = torch.cat([v_media, v_latents], dim=2)
    return out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale))
