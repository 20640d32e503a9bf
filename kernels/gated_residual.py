"""Fused tanh-gated residual, optionally followed in the same pass by the normalisation the next sub-layer
needs:

    out    = x + tanh(gate) * y                       (fp32 math, stored in x.dtype); gate=None: x + y
    normed = LayerNorm(out) * weight + bias           norm="layernorm" (biased variance, like torch)
           = weight * (out * rsqrt(mean(out^2) + eps)).to(dtype)   norm="rmsnorm" (HF LLaMA's order)

`gate` is the raw gate parameter: a scalar (OpenFlamingo's attn_gate / ff_gate, shape [1]) or one value
per channel ([D]); its tanh is taken in the kernel, so the caller never launches a separate tanh. With
`gate=None` it is the plain residual add + norm of a decoder layer (x + y, rounded once). The norm
reads `out` as stored (rounded to x.dtype), exactly what an unfused LayerNorm/RMSNorm module would read.
`out` may be `x` itself (an in-place residual update): each element is read before it is written, by the
same program.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from flamingo_fast.kernels._common import (
    check_out,
    check_shape,
    check_tensor,
    is_interpreted,
    round_to,
    tanh,
    tl_dtype,
    to_output,
)

NORMS = (None, "layernorm", "rmsnorm")
_NORM_CODE = {None: 0, "layernorm": 1, "rmsnorm": 2}
# A program holds ELEMENTS_PER_PROGRAM values per tensor: one row when D >= 2048 (LLaMA-7B: D 4096, one
# row), several short rows otherwise, so small widths still launch few, well-filled programs.
ELEMENTS_PER_PROGRAM = 2048
MAX_WIDTH = 32768


def launch_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_R rows per program, BLOCK_D, num_warps) for width D: the one place the tiling is chosen."""
    block_d = triton.next_power_of_2(D)
    block_r = max(1, ELEMENTS_PER_PROGRAM // block_d)
    elements = block_r * block_d
    num_warps = 4 if elements <= 2048 else 8 if elements <= 8192 else 16
    return block_r, block_d, num_warps


@triton.jit
def _gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, weight_ptr, bias_ptr, out_ptr, normed_ptr,
    R, D, eps,
    stride_xr, stride_yr, stride_or, stride_nr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_GATE: tl.constexpr, GATE_PER_CHANNEL: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
    OUT_DTYPE: tl.constexpr,
):
    """One program: BLOCK_R whole rows of width D (BLOCK_D = next power of two >= D, masked).

    grid = (cdiv(R, BLOCK_R),)        R = number of rows (all leading dims flattened)
    x, y      [R, D]  row stride stride_xr / stride_yr, unit column stride
    gate      [1] or [D] (GATE_PER_CHANNEL), any float dtype; unread without HAS_GATE (then o = x + y)
    weight    [D], bias [D] (HAS_BIAS)              read only when NORM != 0
    out       [R, D]  row stride stride_or          OUT_DTYPE
    normed    [R, D]  row stride stride_nr          written only when NORM != 0 (1 layernorm, 2 rmsnorm)

        rows r0..r0+BLOCK_R-1 ┐  x, y ──> o = x + tanh(g) * y ──> store out
                              └  o as stored ──> row mean / mean square (fp32, whole row in registers)
                                 ──> normed = norm(o) * weight (+ bias) ──> store normed
    """
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    mask = (rows < R)[:, None] & col_ok[None, :]

    x = tl.load(x_ptr + rows[:, None] * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows[:, None] * stride_yr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if not HAS_GATE:
        o = round_to(x + y, OUT_DTYPE)
    elif GATE_PER_CHANNEL:
        o = round_to(x + tanh(tl.load(gate_ptr + cols, mask=col_ok, other=0.0).to(tl.float32))[None, :] * y, OUT_DTYPE)
    else:
        o = round_to(x + tanh(tl.load(gate_ptr).to(tl.float32)) * y, OUT_DTYPE)
    tl.store(out_ptr + rows[:, None] * stride_or + cols[None, :], o.to(OUT_DTYPE), mask=mask)

    if NORM != 0:
        w = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        if NORM == 1:
            mean = tl.sum(o, axis=1) / D
            centred = tl.where(mask, o - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.sum(centred * centred, axis=1) / D + eps)
            n = centred * rstd[:, None] * w
            if HAS_BIAS:
                n += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        else:
            rstd = tl.rsqrt(tl.sum(o * o, axis=1) / D + eps)
            n = round_to(o * rstd[:, None], OUT_DTYPE) * w  # HF LLaMA: weight * hidden.to(dtype)
        tl.store(normed_ptr + rows[:, None] * stride_nr + cols[None, :], to_output(n, OUT_DTYPE), mask=mask)


def _rows(name: str, t: torch.Tensor, D: int, *, writable: bool) -> torch.Tensor:
    """[..., D] -> an [R, D] view with unit column stride (an input that has none is copied)."""
    try:
        rows = t.view(-1, D)
    except RuntimeError:
        rows = None
    if rows is None or (rows.stride(1) != 1 and rows.shape[1] > 1):
        if writable:
            raise ValueError(
                f"{name}: strides {tuple(t.stride())} do not flatten to [rows, {D}] with a contiguous last "
                "dim; expected such a tensor (for example a contiguous one)"
            )
        rows = t.reshape(-1, D).contiguous()
    return rows


def _check_inputs(x, y, gate, norm, norm_weight, norm_bias, eps, out, norm_out):
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected [..., D] with D >= 1")
    D = x.shape[-1]
    check_tensor("y", y, dtypes=(x.dtype,), device=x.device)
    check_shape("y", y, tuple(x.shape), "the shape of x")
    if gate is not None:
        check_tensor("gate", gate, device=x.device)
    if gate is not None and (gate.dim() > 1 or gate.numel() not in (1, D)):
        raise ValueError(f"gate: got shape {tuple(gate.shape)}, expected [1] (a scalar gate) or [D={D}]")
    if norm not in NORMS:
        raise ValueError(f"norm: got {norm!r}, expected one of {NORMS}")
    if norm is None:
        for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias), ("norm_out", norm_out)):
            if t is not None:
                raise ValueError(f"{name}: given but norm=None; pass norm='layernorm' or 'rmsnorm'")
    else:
        if norm_weight is None:
            raise ValueError(f"norm_weight: got None, expected a [D={D}] tensor (norm={norm!r})")
        check_tensor("norm_weight", norm_weight, ndim=1, dtypes=(x.dtype,), device=x.device)
        check_shape("norm_weight", norm_weight, (D,), "[D] of x")
        if norm_bias is not None:
            if norm == "rmsnorm":
                raise ValueError("norm_bias: given with norm='rmsnorm', which has no bias; expected None")
            check_tensor("norm_bias", norm_bias, ndim=1, dtypes=(x.dtype,), device=x.device)
            check_shape("norm_bias", norm_bias, (D,), "[D] of x")
        if norm_out is not None:
            check_out(norm_out, tuple(x.shape), x.dtype, x.device, name="norm_out")
    if not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps: got {eps!r}, expected a float >= 0")
    if out is not None:
        check_out(out, tuple(x.shape), x.dtype, x.device)
    return D


def gated_residual(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    *,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    norm_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """out = x + tanh(gate) * y (Triton), and with `norm`, also norm(out) from the same pass.

    x, y [..., D] (same shape and dtype: fp32, fp16 or bf16), gate [1] or [D] or None (out = x + y);
    norm_weight / norm_bias [D]
    in x.dtype. Returns `out`, or `(out, normed)` when `norm` is given; `out` / `norm_out` are written
    when given (their leading dims must flatten to rows with a contiguous last dim; `out` may be `x`).
    """
    D = _check_inputs(x, y, gate, norm, norm_weight, norm_bias, eps, out, norm_out)
    if D > MAX_WIDTH:
        raise ValueError(f"x: width D={D}, expected at most {MAX_WIDTH} (one row per program in registers)")
    for name, given in (("out", out), ("norm_out", norm_out)):
        if given is not None:
            _rows(name, given, D, writable=True)  # raises now if its rows do not flatten
    if x.device.type != "cuda" and not is_interpreted():
        raise ValueError(
            f"x: on {x.device}; the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1): "
            "use gated_residual_ref on this device"
        )
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if norm is not None and norm_out is None:
        norm_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    out_rows = _rows("out", out, D, writable=True)
    normed_rows = _rows("norm_out", norm_out, D, writable=True) if norm is not None else out_rows
    x_rows, y_rows = _rows("x", x, D, writable=False), _rows("y", y, D, writable=False)
    R = x_rows.shape[0]
    if R > 0:
        block_r, block_d, num_warps = launch_config(D)
        gate_flat = gate.reshape(-1) if gate is not None else x_rows  # a valid pointer, unread without a gate
        weight = norm_weight if norm is not None else gate_flat  # a valid pointer, unread without a norm
        bias = norm_bias if norm_bias is not None else weight
        _gated_residual_kernel[(triton.cdiv(R, block_r),)](
            x_rows, y_rows, gate_flat, weight, bias, out_rows, normed_rows,
            R, D, float(eps),
            x_rows.stride(0), y_rows.stride(0), out_rows.stride(0), normed_rows.stride(0),
            BLOCK_R=block_r, BLOCK_D=block_d,
            HAS_GATE=gate is not None, GATE_PER_CHANNEL=gate is not None and gate.numel() == D and D > 1,
            NORM=_NORM_CODE[norm],
            HAS_BIAS=norm_bias is not None, OUT_DTYPE=tl_dtype(x.dtype),
            num_warps=num_warps,
        )
    return out if norm is None else (out, norm_out)


def gated_residual_ref(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor | None,
    *,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    out: torch.Tensor | None = None,
    norm_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch twin of `gated_residual`: the same math as unfused torch ops (fp32 residual, then the norm
    of the stored result)."""
    D = _check_inputs(x, y, gate, norm, norm_weight, norm_bias, eps, out, norm_out)
    if gate is None:
        result = x + y  # one rounding of the exact sum, as the kernel's fp32 add then store
    else:
        result = torch.addcmul(x.float(), torch.tanh(gate.float()).reshape(-1), y.float()).to(x.dtype)
    if out is not None:
        result = out.copy_(result)
    if norm is None:
        return result
    if norm == "layernorm":
        normed = F.layer_norm(result, (D,), norm_weight, norm_bias, eps)
    else:
        r32 = result.float()
        normed = norm_weight * (r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    if norm_out is not None:
        normed = norm_out.copy_(normed)
    return result, normed
