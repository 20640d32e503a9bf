"""Weight-only int8 matmul: activations in their own dtype, weights int8 with one scale per output channel.

    out[m, n] = scales[n] * sum_k x[m, k] * weight[n, k]     = x @ (weight * scales[:, None]).T

x [..., K] (fp32, fp16 or bf16), weight [N, K] int8 (symmetric, per output row), scales [N] (x's dtype or
fp32); out [..., N] in x's dtype. The int8 tiles are dequantized in registers (converted to the dot dtype:
every int8 value is exact in bf16 / fp16), the K reduction is accumulated in fp32 and the scale is applied
once, after it (acc * scales[n]): no dequantized copy of the weight is ever written.

A row's K reduction has one order whatever the number of rows (M): `k_chunk` cuts K into chunks from N and K
only, each chunk is accumulated from zero in BLOCK_K steps (BLOCK_K from the dtype only), and the chunks' sums
are added in order, from zero. M picks only the M tile and whether the chunks run in one program (prefill) or
one program each (decode split-K), which does not change the order: the combine adds the chunks' sums as the
one program does.
Two shapes of launch, chosen on the host from static shapes only (the same in eager and captured steps):
- prefill (M > DECODE_MAX_M rows): one program per (M tile, N tile) with a loop over all of K's chunks,
  storing the output (`launch_params`: 128 x 128 x 64 tiles for fp16 / bf16).
- decode (M <= DECODE_MAX_M: the beams and scored hypotheses of a step): few M tiles, so few programs (64 N
  tiles at M 1, N 4096), and the weight's bytes set the time. Split-K gives each program one K chunk, so a
  launch reaches about TARGET_PROGRAMS programs (two per SM of an H100 / H200); the splits write fp32
  partial sums to a [splits, M, N] buffer and a second kernel sums them in split order, scales and casts.
  A buffer, not fp32 atomics into the output: the result is deterministic (the same bits each replay of a
  CUDA graph) and the output keeps x's dtype without a second fp32 copy of it. The buffer is
  splits x M x N x 4 bytes: 5 x 1 x 4096 x 4 = 80 KB at the 9B decode shape, nothing next to the 16 MB weight.

Interpreted (TRITON_INTERPRET=1), bf16 dots are wrong: the dot dtype is fp32 there (`dot_dtype`) and every
load is converted at once; fp32 dots use input_precision="ieee" (exact FMA, no tf32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flamingo_fast.kernels._common import (
    check_out,
    check_tensor,
    dot_dtype,
    tl_dtype,
    to_output,
)

DECODE_MAX_M = 64  # up to this many rows a launch is a decode launch (beams x hypotheses), split-K allowed
# Programs a split launch aims at: two per SM of an H100 / H200 (132 SMs). Fixed, not read from the device,
# so the choice depends on shapes only.
TARGET_PROGRAMS = 264
MAX_SPLITS = 32
COMBINE_BLOCK_N, COMBINE_WARPS = 256, 4


DECODE_BLOCK_N = 64  # the decode launches' N tile, by which k_chunk counts a launch's tiles


def block_k_of(dtype: torch.dtype) -> int:
    """BLOCK_K, the K step of every launch for x of `dtype`, whatever M: 32 for fp32, 64 for fp16 / bf16."""
    return 32 if dtype == torch.float32 else 64


def launch_params(dtype: torch.dtype, M: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for x of `dtype` with M rows: the one place the
    tiling is chosen; BLOCK_K (block_k_of) does not depend on M. Decode: the fewest 16-row M blocks that hold
    the rows (16 is the smallest dot tile), 64 output channels x 64 of K per iteration (a 4 KB int8 weight
    tile), 8 warps, 4 stages: with 4 warps ptxas put 8 B on the stack on sm_90 at 80 registers
    (bench/compile_report.py; 8 warps: 50-64 registers, none). Prefill: 128 x 128 x 64, 8 warps. fp32 (exact
    "ieee" FMA dots, the slow path) uses smaller tiles to fit the registers without spilling."""
    decode, block_k = M <= DECODE_MAX_M, block_k_of(dtype)
    if dtype == torch.float32:
        return (16 if M <= 16 else 32, DECODE_BLOCK_N, block_k, 4, 3) if decode else (32, 64, block_k, 4, 3)
    if decode:
        return min(DECODE_MAX_M, max(16, triton.next_power_of_2(M))), DECODE_BLOCK_N, block_k, 8, 4
    return 128, 128, block_k, 8, 3


def k_chunk(dtype: torch.dtype, N: int, K: int) -> int:
    """The chunk of K (a whole number of BLOCK_K) that a row's reduction sums from zero before adding it to the
    previous chunks': from N and K only, so a row's reduction order never depends on M. As many chunks as a
    one-row decode launch needs to reach TARGET_PROGRAMS programs over its N tiles, at most MAX_SPLITS and one
    BLOCK_K each. 9B decode: K 4096 x N 4096 -> 64 tiles x 5 chunks; K 11008 x N 4096 (down projection) -> 5
    chunks; N 22016 (fused gate/up) -> 344 tiles, one chunk."""
    block_k, tiles = block_k_of(dtype), triton.cdiv(N, DECODE_BLOCK_N)
    chunks = 1 if tiles >= TARGET_PROGRAMS else max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, tiles),
                                                           triton.cdiv(K, block_k)))
    return triton.cdiv(triton.cdiv(K, chunks), block_k) * block_k


def num_k_splits(M: int, N: int, K: int, block_m: int, block_n: int, chunk: int) -> int:
    """Programs that share a row's K chunks (`chunk`: the launch's k_chunk): 1 for prefill or when the (M, N)
    tiles already fill TARGET_PROGRAMS; else one chunk per program. The bits are the same either way."""
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if M > DECODE_MAX_M or tiles >= TARGET_PROGRAMS:
        return 1
    return triton.cdiv(K, chunk)


@triton.jit
def _int8_weight_matmul_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, part_ptr,
    M, N, K, k_chunk, k_span,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_om, stride_on, stride_ps, stride_pm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: a [BLOCK_M, BLOCK_N] output tile over the K range [s * k_span, (s+1) * k_span) of
    split s = program_id(2) (all of K without SPLIT_K), in chunks of k_chunk (k_span a multiple of it): each
    chunk summed from zero, then added to the chunks before it, so that the order does not depend on k_span.

    grid = (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), splits)
    x       [M, K]  activations, row stride stride_xm, unit K stride         any float dtype
    weight  [N, K]  int8, row stride stride_wn, unit K stride
    scales  [N]     stride stride_sn, fp32 or x's dtype                      read only without SPLIT_K
    out     [M, N]  row stride stride_om, unit column stride, OUT_DTYPE      written only without SPLIT_K
    part    [splits, M, N] fp32, strides (stride_ps, stride_pm, 1)           written only with SPLIT_K

        x tile [BLOCK_M, BLOCK_K] ─┐
                                   ├─ tl.dot (fp32 acc) ── K loop ──> acc * scales[n] ──> out
        w tile [BLOCK_K, BLOCK_N] ─┘   (int8 -> DOT_DTYPE)        └─> SPLIT_K: part[s] (unscaled)
    """
    tl.static_assert(BLOCK_M >= 16 and BLOCK_N >= 16 and BLOCK_K >= 16)  # tl.dot's smallest tile on a GPU
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_start = split * k_span
    k_stop = tl.minimum(k_start + k_span, K)
    ks = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + rows[:, None] * stride_xm
    w_cols = w_ptr + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for c0 in range(k_start, k_stop, k_chunk):
        k_end = tl.minimum(c0 + k_chunk, K)
        chunk = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(c0, k_end, BLOCK_K):
            k = k0 + ks
            k_ok = k < k_end
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_cols + k[:, None] * stride_wk, mask=k_ok[:, None] & col_ok[None, :], other=0)
            # dequantized in registers: int8 -> DOT_DTYPE is exact (fp32 interpreted, where bf16 dots are wrong)
            chunk += tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), input_precision="ieee")
        acc += chunk

    if SPLIT_K:
        part = part_ptr + split.to(tl.int64) * stride_ps + rows[:, None] * stride_pm + cols[None, :]
        tl.store(part, acc, mask=row_ok[:, None] & col_ok[None, :])
    else:
        scale = tl.load(s_ptr + cols * stride_sn, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
                 to_output(acc * scale[None, :], OUT_DTYPE), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _int8_weight_matmul_combine_kernel(
    part_ptr, s_ptr, out_ptr, N, splits,
    stride_ps, stride_pm, stride_sn, stride_om, stride_on,
    BLOCK_N: tl.constexpr, OUT_DTYPE: tl.constexpr,
):
    """One program: BLOCK_N outputs of row m = program_id(0): out = (sum over splits of part, in split
    order) * scales, cast to OUT_DTYPE.

    grid = (M, cdiv(N, BLOCK_N))
    part [splits, M, N] fp32, strides (stride_ps, stride_pm, 1); scales [N] stride stride_sn;
    out [M, N] row stride stride_om, unit column stride
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for s in range(0, splits):
        acc += tl.load(part_ptr + s * stride_ps + row * stride_pm + cols, mask=col_ok, other=0.0)
    scale = tl.load(s_ptr + cols * stride_sn, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + cols * stride_on, to_output(acc * scale, OUT_DTYPE), mask=col_ok)


def _rows(name: str, t: torch.Tensor, width: int) -> torch.Tensor:
    """[..., width] -> an [rows, width] view with unit last stride, or a ValueError naming `name`."""
    try:
        rows = t.view(-1, width)
    except RuntimeError:
        rows = None
    if rows is None or (rows.stride(1) != 1 and width > 1):
        raise ValueError(f"{name}: strides {tuple(t.stride())} do not flatten to [rows, {width}] with a "
                         "contiguous last dim; expected such a tensor (for example a contiguous one)")
    return rows


def _check_inputs(x, weight, scales, out, split_k) -> tuple[int, int, int]:
    """-> (M, N, K) after checking every argument; errors name the argument, its value and what was expected."""
    check_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x: got shape {tuple(x.shape)}, expected [..., K] with K >= 1")
    K = x.shape[-1]
    check_tensor("weight", weight, ndim=2, dtypes=(torch.int8,), device=x.device)
    if weight.shape[1] != K or weight.shape[0] == 0:
        raise ValueError(f"weight: got shape {tuple(weight.shape)}, expected [N >= 1, K={K}] (K of x)")
    if weight.stride(1) != 1 and K > 1:
        raise ValueError(f"weight: strides {tuple(weight.stride())}, expected a contiguous K dim (stride 1)")
    N = weight.shape[0]
    check_tensor("scales", scales, ndim=1, dtypes=tuple(dict.fromkeys((x.dtype, torch.float32))), device=x.device)
    if scales.shape[0] != N:
        raise ValueError(f"scales: got shape {tuple(scales.shape)}, expected [N={N}] (one per row of weight)")
    if out is not None:
        check_out(out, (*x.shape[:-1], N), x.dtype, x.device)
    if split_k is not None and (isinstance(split_k, bool) or not isinstance(split_k, int) or split_k < 1):
        raise ValueError(f"split_k: got {split_k!r}, expected None (chosen from the shapes) or an integer >= 1")
    return x.numel() // K, N, K


def int8_weight_matmul(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None, *,
    split_k: int | None = None,
) -> torch.Tensor:
    """x @ (weight * scales[:, None]).T (Triton), in x's dtype, accumulated in fp32.

    x [..., K] fp32 / fp16 / bf16 (its leading dims must flatten to rows with a contiguous K dim);
    weight [N, K] int8 with a contiguous K dim; scales [N] in x's dtype or fp32; out [..., N] in x's dtype
    (written when given; its leading dims must flatten to rows with a contiguous last dim).
    split_k: programs that share a row's K (None: `num_k_splits` from the shapes; 1: no split). Each covers a
    whole number of K chunks (`k_chunk`: from N and K only), so the launch may use fewer splits than asked. One
    program, or one chunk per program (the launcher's two choices), give the same bits, whatever M; another
    grouping adds the chunks in another order."""
    M, N, K = _check_inputs(x, weight, scales, out, split_k)
    x_rows = _rows("x", x, K)
    if out is None:
        out = torch.empty((*x.shape[:-1], N), dtype=x.dtype, device=x.device)
    out_rows = _rows("out", out, N)
    if M == 0:
        return out
    block_m, block_n, block_k, num_warps, num_stages = launch_params(x.dtype, M)
    chunk = k_chunk(x.dtype, N, K)
    splits = split_k if split_k is not None else num_k_splits(M, N, K, block_m, block_n, chunk)
    span = triton.cdiv(triton.cdiv(K, chunk), splits) * chunk  # whole chunks per program
    splits = triton.cdiv(K, span)
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device) if splits > 1 else out_rows
    out_dtype = tl_dtype(x.dtype)
    _int8_weight_matmul_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)](
        x_rows, weight, scales, out_rows, part,
        M, N, K, chunk, span,
        x_rows.stride(0), x_rows.stride(1), weight.stride(0), weight.stride(1), scales.stride(0),
        out_rows.stride(0), out_rows.stride(1), part.stride(0), part.stride(1) if splits > 1 else 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=splits > 1,
        DOT_DTYPE=dot_dtype(x.dtype), OUT_DTYPE=out_dtype, num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        _int8_weight_matmul_combine_kernel[(M, triton.cdiv(N, COMBINE_BLOCK_N))](
            part, scales, out_rows, N, splits,
            part.stride(0), part.stride(1), scales.stride(0), out_rows.stride(0), out_rows.stride(1),
            BLOCK_N=COMBINE_BLOCK_N, OUT_DTYPE=out_dtype, num_warps=COMBINE_WARPS,
        )
    return out


PACKED_MAX_ROWS = 16  # the torch twin's aten int8 op up to this many rows, a bf16 GEMM over the int8 weight above


def int8_weight_matmul_ref(
    x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, out: torch.Tensor | None = None, *,
    split_k: int | None = None,
) -> torch.Tensor:
    """Torch twin of `int8_weight_matmul` (same arguments; `split_k` is checked, then unused).

    bf16 x with at most PACKED_MAX_ROWS rows (decode): `aten._weight_int8pack_mm` (bf16 activations, bf16
    scales; on the CPU machine 0.65x the time of bf16 F.linear at one row). More rows (prefill, beams, scoring):
    its time grows linearly with the rows (2.7x bf16 F.linear's at 512 rows, 1024 x 4096, 1 thread), so the int8
    weight is converted to bf16 (exact: |q| <= 127) for a bf16 F.linear, scaled after the reduction (1.05x bf16's
    time at 512 rows; the two cross near 32 rows). Other dtypes: the slow fallback, int8 -> fp32 then an fp32
    matmul, scaled after the reduction like the kernel (the aten op with fp32 x was 13x slower than bf16,
    dequantize-then-matmul 4.5x)."""
    M, N, K = _check_inputs(x, weight, scales, out, split_k)
    x_rows = x.reshape(M, K)
    if x.dtype == torch.bfloat16 and M <= PACKED_MAX_ROWS:
        result = torch.ops.aten._weight_int8pack_mm(x_rows.contiguous(), weight.contiguous(),
                                                    scales.to(torch.bfloat16).contiguous())
    elif x.dtype == torch.bfloat16:
        result = (torch.nn.functional.linear(x_rows, weight.to(torch.bfloat16)).float() * scales.float()).to(x.dtype)
    else:
        result = ((x_rows.float() @ weight.float().T) * scales.float()).to(x.dtype)
    result = result.reshape(*x.shape[:-1], N)
    return out.copy_(result) if out is not None else result
