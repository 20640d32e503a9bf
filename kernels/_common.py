"""Helpers shared by the kernels: jit functions that work the same interpreted and compiled, and the
launch-time choices (dot operand dtype, argument checks) every launcher makes the same way.

Why these exist (measured on triton 3.9 under TRITON_INTERPRET=1, see ../shared/TRITON_ON_CPU.md):
- bf16 arithmetic and bf16 `tl.dot` are wrong in the interpreter, so kernels convert loads to fp32 at once
  and choose the dot operand dtype by a constexpr (`dot_dtype`): fp32 interpreted, the input dtype on a GPU.
- `tl.math.tanh` does not exist in 3.9 and libdevice fails interpreted: `tanh` below is built from `exp`.
- the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest even: `to_output` rounds by hand
  (integer ops on the fp32 bits), so interpreted and compiled kernels store the same bits. On a GPU it
  costs four integer ops per stored element, nothing next to the memory traffic of the store.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def is_interpreted() -> bool:
    """True when Triton kernels run on the CPU interpreter (read at launch, like Triton itself does)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def tl_dtype(dtype: torch.dtype):
    return _TL_DTYPE[dtype]


def dot_dtype(dtype: torch.dtype, interpreted: bool | None = None):
    """Operand dtype for `tl.dot`: the input's own dtype on a GPU (tensor cores), fp32 when interpreted
    (bf16 dots are wrong there). fp32 dots pass input_precision="ieee" (exact; tf32 would cost ~1e-3
    relative error): to fit 255 registers without spilling, fp32 launches use 16-row query tiles (see
    `attention_launch_params`)."""
    if interpreted is None:
        interpreted = is_interpreted()
    return tl.float32 if interpreted else _TL_DTYPE[dtype]


def attention_launch_params(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_Q query rows, BLOCK_N key rows, num_warps, num_stages) of the tl.dot attention kernels.

    fp16/bf16: 64 x 64 tiles, 4 warps: one m64n64k16 wgmma tile per dot on sm_90 (HGMMA), 124-136
    registers there and ~200-220 on sm_80, no spills (bench/compile_report.md). fp32 (exact "ieee" FMA
    dots): 64- and 32-row tiles spill on sm_80/sm_90 (measured 32-900 B of stack), 16 x 64 does not.
    `head_dim` does not change the choice yet: bf16 at d 128 fits the same tiles (254 registers on sm_80,
    no spills); it is an argument so that a future d-dependent choice changes no caller."""
    if dtype == torch.float32:
        return 16, 64, 4, 2
    return 64, 64, 4, 2


def check_tensor(name: str, t, *, ndim: int | None = None, dtypes=FLOAT_DTYPES, device=None) -> None:
    """Raise ValueError naming `name` when `t` is not a tensor of rank `ndim`, one of `dtypes`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: got {type(t).__name__}, expected a torch.Tensor")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name}: got shape {tuple(t.shape)} (rank {t.dim()}), expected rank {ndim}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name}: got dtype {t.dtype}, expected one of {names}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, expected the same device as the other inputs ({device})")


def check_shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: got shape {tuple(t.shape)}, expected {tuple(expected)} ({what})")


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale an attention launcher uses: `scale` (a number) or, for None, head_dim ** -0.5."""
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise ValueError(f"scale: got {scale!r}, expected a float or None")
    return head_dim**-0.5 if scale is None else float(scale)


def rows_of_queries(queries: int, queries_per_row: int) -> int:
    """Decode kernels take a row's queries (its beams or candidates) together: `queries` = rows x queries_per_row.
    -> rows."""
    if not isinstance(queries_per_row, int) or isinstance(queries_per_row, bool) or queries_per_row < 1:
        raise ValueError(f"queries_per_row: got {queries_per_row!r}, expected an integer >= 1")
    if queries % queries_per_row:
        raise ValueError(f"q: {queries} queries is not a multiple of queries_per_row={queries_per_row}")
    return queries // queries_per_row


def check_out(out: torch.Tensor, shape: tuple, dtype: torch.dtype, device, name: str = "out") -> None:
    """An `out=` tensor must have the result's exact shape, dtype and device (any strides)."""
    check_tensor(name, out, dtypes=(dtype,), device=device)
    check_shape(name, out, shape, "the result's shape")


@triton.jit
def tanh(x):
    """tanh in fp32 from exp, accurate to ~1e-7 absolute (tl.math.tanh is missing in triton 3.9).

    Odd Taylor series below |x| < 0.04 (where (1 - e)/(1 + e) would cancel), exp form above with the sign
    restored; exp(-2|x|) never overflows."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = x * x
    small = ax * (1.0 - x2 * (1.0 / 3.0 - x2 * (2.0 / 15.0)))
    r = tl.where(ax < 0.04, small, big)
    return tl.where(x < 0, -r, r)


@triton.jit
def round_to_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still held as fp32; NaN stays NaN."""
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = ((bits + 0x7FFF + lsb) & 0xFFFF0000).to(tl.float32, bitcast=True)
    return tl.where(x != x, x, rounded)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 `x` rounded (to nearest even) to DTYPE's precision, still held as fp32."""
    if DTYPE == tl.bfloat16:
        return round_to_bf16(x)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def to_output(x, OUT_DTYPE: tl.constexpr):
    """Cast fp32 `x` to OUT_DTYPE rounding to nearest even, interpreted or compiled."""
    if OUT_DTYPE == tl.bfloat16:
        return round_to_bf16(x).to(tl.bfloat16)
    else:
        return x.to(OUT_DTYPE)
