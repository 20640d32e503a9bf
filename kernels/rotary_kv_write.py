"""Rotary embedding and the K/V cache write of one decode step, fused: one launch per layer instead of
rotary's cat / multiply / add kernels on q and k and two index_copy kernels.

For each new token n (of N, one per hypothesis) and head:
    q_out[n, h]                     = rotate(q[n, h])        h < Hq
    k_cache[n, j, column[n], :]     = rotate(k[n, j])        j < Hkv
    v_cache[n, j, column[n], :]     = v[n, j]
with `rotate` Hugging Face's non-interleaved rotate-half on the first R = cos.shape[-1] dims (all of them for
LLaMA, `rotary_dim` for GPT-NeoX; the rest pass through):
    x[i] * cos[i] - x[i + R/2] * sin[i]    (i < R/2)
    x[i] * cos[i] + x[i - R/2] * sin[i]    (R/2 <= i < R)
computed in float32 from the loaded values and rounded once. Without cos/sin (ALiBi models) only the cache
write happens and q is returned as it is. `column` is a [1] (every row, the runtime's kv_column) or [N]
device tensor; a column outside [0, S) writes nothing (never out of bounds). Safe to capture in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flamingo_fast.kernels._common import check_out, check_tensor, is_interpreted, tl_dtype, to_output

NUM_WARPS = 1  # a program moves one head: at most 128 elements in and out


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, col_ptr, out_ptr,
    S, num_q_heads,
    stride_qn, stride_qh, stride_qd,
    stride_kn, stride_kh, stride_kd,
    stride_vn, stride_vh, stride_vd,
    stride_cn, stride_cr, stride_sn, stride_sr,
    stride_kcn, stride_kch, stride_kcs, stride_kcd,
    stride_vcn, stride_vch, stride_vcs, stride_vcd,
    stride_col,
    stride_on, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY_DIM: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: token n, head h of the Hq query heads followed by the Hkv key/value heads.

    grid = (N, Hq + Hkv)
    q [N, Hq, HEAD_DIM], k, v [N, Hkv, HEAD_DIM]          any strides
    cos, sin [N, ROTARY_DIM] (ROTARY_DIM 0: no rotary)    any strides, q's dtype
    k_cache, v_cache [N, Hkv, S, HEAD_DIM]                any strides; column [N] (stride 0: one for all)
    out [N, Hq, HEAD_DIM]                                 any strides

    q head h:      load q[n, h] and its rotate-half partner, write out[n, h]
    kv head j:     the same for k[n, j] into k_cache[n, j, column], and v[n, j] copied to v_cache[n, j, column]
    """
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs = tl.arange(0, BLOCK_D)
    d_valid = offs < HEAD_DIM
    if ROTARY_DIM > 0:
        half = ROTARY_DIM // 2
        rotated = offs < ROTARY_DIM
        partner = tl.where(offs < half, offs + half, offs - half)
        sign = tl.where(offs < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + n * stride_cn + offs * stride_cr, mask=rotated, other=1.0).to(tl.float32)
        sin = tl.load(sin_ptr + n * stride_sn + offs * stride_sr, mask=rotated, other=0.0).to(tl.float32)
        sin = sign * sin
    if h < num_q_heads:
        x = tl.load(q_ptr + n * stride_qn + h * stride_qh + offs * stride_qd, mask=d_valid, other=0.0)
        x = x.to(tl.float32)
        if ROTARY_DIM > 0:
            y = tl.load(q_ptr + n * stride_qn + h * stride_qh + partner * stride_qd, mask=rotated, other=0.0)
            x = x * cos + y.to(tl.float32) * sin
        tl.store(out_ptr + n * stride_on + h * stride_oh + offs * stride_od, to_output(x, OUT_DTYPE), mask=d_valid)
    else:
        j = h - num_q_heads
        col = tl.load(col_ptr + n * stride_col).to(tl.int64)
        ok = d_valid & (offs * 0 + col >= 0) & (offs * 0 + col < S)  # a block mask: never out of bounds
        x = tl.load(k_ptr + n * stride_kn + j * stride_kh + offs * stride_kd, mask=d_valid, other=0.0)
        x = x.to(tl.float32)
        if ROTARY_DIM > 0:
            y = tl.load(k_ptr + n * stride_kn + j * stride_kh + partner * stride_kd, mask=rotated, other=0.0)
            x = x * cos + y.to(tl.float32) * sin
        tl.store(kc_ptr + n * stride_kcn + j * stride_kch + col * stride_kcs + offs * stride_kcd,
                 to_output(x, OUT_DTYPE), mask=ok)
        val = tl.load(v_ptr + n * stride_vn + j * stride_vh + offs * stride_vd, mask=d_valid, other=0.0)
        tl.store(vc_ptr + n * stride_vcn + j * stride_vch + col * stride_vcs + offs * stride_vcd, val, mask=ok)


def _check_inputs(q, k, v, cos, sin, k_cache, v_cache, column, out):
    check_tensor("q", q, ndim=3)
    N, Hq, d = q.shape
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=q.device)
    check_tensor("v", v, ndim=3, dtypes=(q.dtype,), device=q.device)
    Hkv = k.shape[1]
    if k.shape[0] != N or k.shape[2] != d or Hkv < 1 or Hq % Hkv:
        raise ValueError(f"k: got shape {tuple(k.shape)}, expected [N={N}, Hkv dividing Hq={Hq}, d={d}]")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: got shape {tuple(v.shape)}, expected {tuple(k.shape)} (the shape of k)")
    if (cos is None) != (sin is None):
        raise ValueError("cos and sin: give both (rotary) or neither (ALiBi models)")
    if cos is not None:
        check_tensor("cos", cos, ndim=2, dtypes=(q.dtype,), device=q.device)
        check_tensor("sin", sin, ndim=2, dtypes=(q.dtype,), device=q.device)
        rotary = cos.shape[1]
        if cos.shape[0] != N or rotary % 2 or not 0 < rotary <= d:
            raise ValueError(f"cos: got shape {tuple(cos.shape)}, expected [N={N}, R] with R even and <= d={d}")
        if tuple(sin.shape) != tuple(cos.shape):
            raise ValueError(f"sin: got shape {tuple(sin.shape)}, expected {tuple(cos.shape)} (the shape of cos)")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, cache, ndim=4, dtypes=(q.dtype,), device=q.device)
        if cache.shape[0] != N or cache.shape[1] != Hkv or cache.shape[3] != d:
            raise ValueError(f"{name}: got shape {tuple(cache.shape)}, expected [N={N}, Hkv={Hkv}, S, d={d}]")
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache: got shape {tuple(v_cache.shape)}, expected {tuple(k_cache.shape)}")
    check_tensor("column", column, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
    if column.shape[0] not in (1, N):
        raise ValueError(f"column: got shape {tuple(column.shape)}, expected [1] (all rows) or [{N}]")
    if out is not None:
        check_out(out, (N, Hq, d), q.dtype, q.device)


def rotary_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    column: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k, write k and v into the caches at `column` (Triton, one launch). See the module docstring.

    q [N, Hq, d], k, v [N, Hkv, d], cos, sin [N, R] or None, k_cache, v_cache [N, Hkv, S, d], column [1] or [N]
    int32/int64 -> rotated q [N, Hq, d] (into `out` when given; q itself without rotary and without `out`)."""
    _check_inputs(q, k, v, cos, sin, k_cache, v_cache, column, out)
    if q.device.type != "cuda" and not is_interpreted():
        raise ValueError(f"q: on {q.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): "
                         "use rotary_kv_write_ref on this device")
    N, Hq, d = q.shape
    Hkv = k.shape[1]
    if out is None:
        out = q if cos is None else torch.empty_like(q)
    if N == 0:
        return out
    rotary = 0 if cos is None else cos.shape[1]
    cs = (0, 0, 0, 0) if cos is None else (*cos.stride(), *sin.stride())
    trig_cos, trig_sin = (q, q) if cos is None else (cos, sin)
    heads = Hq + Hkv if rotary or out is not q else Hkv  # no rotary and out is q: only the cache write
    first = 0 if heads == Hq + Hkv else Hq
    _rotary_kv_write_kernel[(N, heads)](
        q, k, v, trig_cos, trig_sin, k_cache, v_cache, column, out,
        k_cache.shape[2], Hq - first,
        *q.stride(), *k.stride(), *v.stride(), *cs,
        *k_cache.stride(), *v_cache.stride(), 0 if column.shape[0] == 1 else column.stride(0), *out.stride(),
        HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), ROTARY_DIM=rotary, OUT_DTYPE=tl_dtype(q.dtype),
        num_warps=NUM_WARPS,
    )
    return out


def rotary_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    column: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Torch twin of `rotary_kv_write` (same signature and rounding: float32, rounded once); no host sync.
    A column outside [0, S) writes nothing, as in the kernel."""
    _check_inputs(q, k, v, cos, sin, k_cache, v_cache, column, out)
    N, Hq, d = q.shape
    S = k_cache.shape[2]

    def rotate(x: torch.Tensor) -> torch.Tensor:  # [N, heads, d] -> rotated, x's dtype
        r = cos.shape[1]
        x32 = x.float()
        x1, x2, rest = x32[..., : r // 2], x32[..., r // 2: r], x32[..., r:]
        c, s = cos.float()[:, None], sin.float()[:, None]
        return torch.cat([x1 * c[..., : r // 2] - x2 * s[..., : r // 2],
                          x2 * c[..., r // 2:] + x1 * s[..., r // 2:], rest], dim=-1).to(x.dtype)

    k_new = k if cos is None else rotate(k)
    rows = torch.arange(N, device=q.device)
    cols = column.expand(N)
    inside = (cols >= 0) & (cols < S)
    safe = cols.clamp(0, max(S - 1, 0))
    for cache, new in ((k_cache, k_new), (v_cache, v)):  # [N, Hkv, S, d][rows, :, col] -> [N, Hkv, d]
        cache[rows, :, safe] = torch.where(inside[:, None, None], new, cache[rows, :, safe])
    q_new = q if cos is None else rotate(q)
    if out is None:
        return q_new
    return out.copy_(q_new)
