"""Compile every kernel, in every configuration the runtime launches, ahead of time for sm_80 and sm_90 on
a machine without a GPU, and report what the cubins use: registers, shared memory, stack / local memory
(spills), and whether the sm_90 code of the dot-heavy kernels uses the Hopper matrix instructions (HGMMA).

    python bench/compile_report.py --out bench/compile_report.md [--json FILE] [--quick]

Exit status 1 when a configuration fails to compile, spills (stack or local memory > 0), needs more shared
memory than the architecture has, or a dot-heavy kernel's sm_90 code has no HGMMA. The compile gate test
(tests/test_compile_gate.py) runs this script in a subprocess: TRITON_INTERPRET must be unset before the
kernels are imported (under it `@triton.jit` returns an interpreter object that cannot be compiled).

Each configuration mirrors what the launcher passes: the same constexprs (block sizes, modes, dtypes), unit
strides specialised to the constant 1 and 16-byte-aligned pointers / multiple-of-16 strides marked
divisible by 16, as Triton's JIT specialises them for the tensors the runtime allocates.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # before any kernel module is imported
# Triton 3.9 warns when unset; 1 is its current default (and triton 3.6's behaviour): fused multiply-adds.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flamingo_fast.kernels import decode_attention as da  # noqa: E402
from flamingo_fast.kernels import gated_residual as gr  # noqa: E402
from flamingo_fast.kernels import int8_matmul as i8  # noqa: E402
from flamingo_fast.kernels import masked_cross_attention as mca  # noqa: E402
from flamingo_fast.kernels import masked_cross_attention_decode as mcad  # noqa: E402
from flamingo_fast.kernels import perceiver_attention as pa  # noqa: E402
from flamingo_fast.kernels import rotary_kv_write as rkv  # noqa: E402
from flamingo_fast.kernels import segment_cross_attention as sca  # noqa: E402
from flamingo_fast.kernels import segment_cross_attention_decode as scad  # noqa: E402
from flamingo_fast.kernels._common import attention_launch_params, dot_dtype, tl_dtype  # noqa: E402

ARCHS = (80, 90)
SHARED_LIMIT = {80: 166912, 90: 232448}  # bytes of shared memory one block may use (A100, H100/H200)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


@dataclass
class Config:
    kernel_name: str
    label: str
    fn: object
    args: dict  # arg name -> ("ptr", dtype) | ("i32", divisible_by_16) | ("fp32",) | ("one",) | constexpr
    num_warps: int
    num_stages: int = 3
    dot_heavy: bool = False
    results: dict = field(default_factory=dict)


def _ptr(dtype):
    return ("ptr", dtype)


_I32 = ("i32", False)
_I32_16 = ("i32", True)  # a stride that is a multiple of 16 elements for the shapes the runtime uses
_FP32 = ("fp32",)
_ONE = ("one",)


def _source(cfg: Config) -> ASTSource:
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(cfg.fn.arg_names):
        spec = cfg.args[name]
        if isinstance(spec, tuple) and spec and spec[0] == "ptr":
            signature[name] = _PTR[spec[1]] if isinstance(spec[1], torch.dtype) else spec[1]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(spec, tuple) and spec and spec[0] == "i32":
            signature[name] = "i32"
            if spec[1]:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif spec == _FP32:
            signature[name] = "fp32"
        elif spec == _ONE:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name], constexprs[name] = "constexpr", spec
    missing = set(cfg.args) - set(cfg.fn.arg_names)
    if missing:
        raise KeyError(f"{cfg.kernel_name}: unknown args {sorted(missing)}")
    return ASTSource(fn=cfg.fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _strides(prefix: str, dims: str, unit_last: bool = True) -> dict:
    """stride_{prefix}{dim} for each dim: multiples of 16 except the last, which is 1."""
    out = {f"stride_{prefix}{d}": _I32_16 for d in dims}
    if unit_last:
        out[f"stride_{prefix}{dims[-1]}"] = _ONE
    return out


MODES = {
    "immediate": dict(ATTEND_PREVIOUS=False, PRE_IMAGE_ATTENDS_ALL=False),
    "all-previous": dict(ATTEND_PREVIOUS=True, PRE_IMAGE_ATTENDS_ALL=False),
    "all-previous+pre-image-bug": dict(ATTEND_PREVIOUS=True, PRE_IMAGE_ATTENDS_ALL=True),
}


def _attention_configs(dname: str, dt, head_dim: int, modes: dict) -> list[Config]:
    block_q, block_n, num_warps, num_stages = attention_launch_params(dt, head_dim)
    dot_heavy = dt != torch.float32  # fp32 dots are exact FMA ("ieee") by design: no tensor cores
    suffix = "" if head_dim == 64 else f" d={head_dim}"
    out = []
    for mode, flags in modes.items():
        args = dict(q_ptr=_ptr(dt), k_ptr=_ptr(dt), v_ptr=_ptr(dt), index_ptr=_ptr("*i32"), out_ptr=_ptr(dt),
                    T=_I32, num_images=_I32, qk_scale_log2=_FP32,
                    **_strides("q", "bhtd"), **_strides("k", "bhnd"), **_strides("v", "bhnd"),
                    stride_ib=_I32, stride_it=_ONE, **_strides("o", "bhtd"),
                    HEAD_DIM=head_dim, NUM_LATENTS=64, BLOCK_T=block_q, BLOCK_N=block_n, **flags,
                    DOT_DTYPE=dot_dtype(dt, interpreted=False), OUT_DTYPE=tl_dtype(dt))
        out.append(Config("masked_cross_attention", f"{dname} {mode}{suffix} T{block_q}xN{block_n}",
                          mca._masked_cross_attention_kernel, args, num_warps, num_stages, dot_heavy))
    args = dict(q_ptr=_ptr(dt), km_ptr=_ptr(dt), vm_ptr=_ptr(dt), kl_ptr=_ptr(dt), vl_ptr=_ptr(dt),
                out_ptr=_ptr(dt), L=_I32, M=_I32, qk_scale_log2=_FP32,
                **_strides("q", "bhld"), **_strides("km", "bhnd"), **_strides("vm", "bhnd"),
                **_strides("kl", "bhnd"), **_strides("vl", "bhnd"), **_strides("o", "bhld"),
                HEAD_DIM=head_dim, BLOCK_L=block_q, BLOCK_N=block_n,
                DOT_DTYPE=dot_dtype(dt, interpreted=False), OUT_DTYPE=tl_dtype(dt))
    out.append(Config("perceiver_attention", f"{dname}{suffix} L{block_q}xN{block_n}",
                      pa._perceiver_attention_kernel, args, num_warps, num_stages, dot_heavy))
    return out


def _decode_attention_configs(dname: str, dt, head_dim: int, full: bool) -> list[Config]:
    """What the decode step launches (decode.decode_step): one query per row against its valid columns
    (LLaMA / GPT-NeoX; MPT with ALiBi), split or not, and for beams the cascade's prompt part (R x G queries per
    KV head, float32 out, LSE) and tail part (no start, LSE). `full`: every variant, else the main one only.
    Range tensors are int64 ([B] from a sum, [1] kv_column + 1: stride 0, which is divisible by 16)."""
    variants = [("rows split", dict(SPLIT=True, HAS_START=True, ALIBI=False, RETURN_LSE=False), 16, dt)]
    if dt == torch.float32:  # the beams' prompt part in float32: the largest M block float32 uses
        variants.append(("beams prompt lse", dict(SPLIT=True, HAS_START=True, ALIBI=False, RETURN_LSE=True), 64,
                         torch.float32))
    if full:
        variants += [
            ("rows 1 split", dict(SPLIT=False, HAS_START=True, ALIBI=False, RETURN_LSE=False), 16, dt),
            ("rows split alibi", dict(SPLIT=True, HAS_START=True, ALIBI=True, RETURN_LSE=False), 16, dt),
            ("beams prompt M64 lse", dict(SPLIT=True, HAS_START=True, ALIBI=False, RETURN_LSE=True), 64,
             torch.float32),
            ("beams tail lse", dict(SPLIT=False, HAS_START=False, ALIBI=False, RETURN_LSE=True), 16, dt),
        ]
    out = []
    block_d = triton.next_power_of_2(head_dim)
    block_n, num_warps, max_block_m = da.launch_params(dt)
    for label, flags, block_m, out_dt in variants:
        block_m = min(block_m, max_block_m)
        args = dict(q_ptr=_ptr(dt), k_ptr=_ptr(dt), v_ptr=_ptr(dt), start_ptr=_ptr("*i64"), end_ptr=_ptr("*i64"),
                    slopes_ptr=_ptr(torch.float32), qcol_ptr=_ptr("*i64"), out_ptr=_ptr(out_dt),
                    lse_ptr=_ptr(torch.float32), part_out_ptr=_ptr(torch.float32), part_lse_ptr=_ptr(torch.float32),
                    S=_I32, queries_per_row=_I32, groups=_I32, chunk=_I32_16, num_splits=_I32, qk_scale_log2=_FP32,
                    **_strides("q", "nhd"), **_strides("k", "bhsd"), **_strides("v", "bhsd"),
                    stride_sb=_ONE, stride_eb=_I32_16, stride_cb=_I32_16, **_strides("o", "nhd"),
                    stride_ln=_I32_16, stride_lh=_ONE,
                    HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, M_BLOCKS=1, **flags,
                    DOT_DTYPE=dot_dtype(dt, interpreted=False), OUT_DTYPE=tl_dtype(out_dt))
        out.append(Config("decode_attention", f"{dname} d={head_dim} {label} M{block_m}xN{block_n}",
                          da._decode_attention_kernel, args, num_warps))
    for lse in ((False, True) if full else (False,)):
        args = dict(part_out_ptr=_ptr(torch.float32), part_lse_ptr=_ptr(torch.float32), out_ptr=_ptr(dt),
                    lse_ptr=_ptr(torch.float32), num_splits=_I32, **_strides("o", "nhd"), stride_ln=_I32_16,
                    stride_lh=_ONE, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=da.MAX_SPLITS, RETURN_LSE=lse,
                    OUT_DTYPE=tl_dtype(dt))
        out.append(Config("decode_attention_combine", f"{dname} d={head_dim} splits<=64{' lse' if lse else ''}",
                          da._decode_attention_combine_kernel, args, da.COMBINE_WARPS))
    return out


def _rotary_kv_write_configs(dname: str, dt) -> list[Config]:
    """The layer's fused rotary + cache write: LLaMA-7B (d 128, all rotated), GPT-NeoX 4B (d 80), partial
    rotary (d 64, 32 rotated), MPT (no rotary). q/k/v are views of the fused projection output."""
    out = []
    for head_dim, rotary in ((128, 128), (80, 80), (64, 32), (128, 0)):
        args = dict(q_ptr=_ptr(dt), k_ptr=_ptr(dt), v_ptr=_ptr(dt), cos_ptr=_ptr(dt), sin_ptr=_ptr(dt),
                    kc_ptr=_ptr(dt), vc_ptr=_ptr(dt), col_ptr=_ptr("*i64"), out_ptr=_ptr(dt), S=_I32,
                    num_q_heads=_I32, **_strides("q", "nhd"), **_strides("k", "nhd"), **_strides("v", "nhd"),
                    stride_cn=_I32_16, stride_cr=_ONE, stride_sn=_I32_16, stride_sr=_ONE,
                    **_strides("kc", "nhsd"), **_strides("vc", "nhsd"), stride_col=_I32_16, **_strides("o", "nhd"),
                    HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), ROTARY_DIM=rotary,
                    OUT_DTYPE=tl_dtype(dt))
        out.append(Config("rotary_kv_write", f"{dname} d={head_dim} rotary {rotary or 'none'}",
                          rkv._rotary_kv_write_kernel, args, rkv.NUM_WARPS))
    return out


def _int8_matmul_configs(dname: str, dt) -> list[Config]:
    """The weight-only int8 matmul at the 9B shapes: decode (M 1 / 17 / 64 -> 16 / 32 / 64-row blocks) split
    over K 4096 and K 11008 (the down projection), unsplit for the fused gate/up (N 22016), and the prefill
    tile; the split-K combine. The shapes are runtime arguments: they only pick the constexprs here."""
    out = []
    for label, M, N, K in (("decode M1 K4096", 1, 4096, 4096), ("decode M1 K11008", 1, 4096, 11008),
                           ("decode M1 N22016", 1, 22016, 4096), ("decode M17 K4096", 17, 4096, 4096),
                           ("decode M64 K4096", 64, 4096, 4096),
                           ("prefill M512 K4096", 512, 4096, 4096)):
        block_m, block_n, block_k, num_warps, num_stages = i8.launch_params(dt, M)
        split = i8.num_k_splits(M, N, K, block_m, block_n, i8.k_chunk(dt, N, K)) > 1
        args = dict(x_ptr=_ptr(dt), w_ptr=_ptr("*i8"), s_ptr=_ptr(dt), out_ptr=_ptr(dt),
                    part_ptr=_ptr(torch.float32) if split else _ptr(dt), M=_I32, N=_I32_16, K=_I32_16,
                    k_chunk=_I32_16, k_span=_I32_16, stride_xm=_I32_16, stride_xk=_ONE, stride_wn=_I32_16,
                    stride_wk=_ONE, stride_sn=_ONE, stride_om=_I32_16, stride_on=_ONE, stride_ps=_I32_16,
                    stride_pm=_I32_16,
                    BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split,
                    DOT_DTYPE=dot_dtype(dt, interpreted=False), OUT_DTYPE=tl_dtype(dt))
        out.append(Config("int8_weight_matmul", f"{dname} {label}{' split-K' if split else ''} "
                          f"M{block_m}xN{block_n}xK{block_k}", i8._int8_weight_matmul_kernel, args, num_warps,
                          num_stages))
    args = dict(part_ptr=_ptr(torch.float32), s_ptr=_ptr(dt), out_ptr=_ptr(dt), N=_I32_16, splits=_I32,
                stride_ps=_I32_16, stride_pm=_I32_16, stride_sn=_ONE, stride_om=_I32_16, stride_on=_ONE,
                BLOCK_N=i8.COMBINE_BLOCK_N, OUT_DTYPE=tl_dtype(dt))
    out.append(Config("int8_weight_matmul_combine", dname, i8._int8_weight_matmul_combine_kernel, args,
                      i8.COMBINE_WARPS))
    return out


def _segment_configs(dname: str, dt, full: bool, head_dim: int = 128, heads: int = 32,
                     kv_heads: int = 8) -> list[Config]:
    """Llama 3.2 Vision's cross-attention (11B: d 128, 32 query heads on 8 KV heads) as the launchers pass it:
    prefill (GROUP 4 heads x 16 tokens per 64-row tile), decode with one query per row (a 16-row tile; beams up
    to 4 use the same), split or not, with 16 scored candidates per row (64 rows, the largest tile), and the
    split combine. The tile length (1601
    keys, or 1608 rows with the vision tower's padding) is a runtime argument: it changes no constexpr. `full`:
    every variant, else the prefill and the split decode only (the launch parameters fp32 needs)."""
    groups = heads // kv_heads
    block_m, block_n, num_warps, num_stages = sca.launch_params(dt, head_dim)
    ranges = dict(start_ptr=_ptr("*i32"), end_ptr=_ptr("*i32"), valid_ptr=_ptr("*u8"), n_tiles=_I32, tile_len=_I32,
                  tile_stride=_I32, inv_stride=_FP32, qk_scale_log2=_FP32)
    args = dict(q_ptr=_ptr(dt), k_ptr=_ptr(dt), v_ptr=_ptr(dt), out_ptr=_ptr(dt), T=_I32, **ranges,
                **_strides("q", "bhtd"), **_strides("k", "bhnd"), **_strides("v", "bhnd"),
                stride_sb=_I32, stride_st=_ONE, stride_eb=_I32, stride_et=_ONE, stride_wb=_I32, stride_wj=_ONE,
                **_strides("o", "bhtd"), HEAD_DIM=head_dim, GROUP=groups, BLOCK_M=block_m, BLOCK_N=block_n,
                DOT_DTYPE=dot_dtype(dt, interpreted=False), OUT_DTYPE=tl_dtype(dt))
    out = [Config("segment_cross_attention", f"{dname} d={head_dim} G{groups} M{block_m}xN{block_n}",
                  sca._segment_cross_attention_kernel, args, num_warps, num_stages, dt != torch.float32)]
    block_n, num_warps, max_block_m = da.launch_params(dt)
    variants = (("rows split", 1, True), ("rows 1 split", 1, False), ("16 candidates split", 16, True))
    for label, beams, split in variants if full else variants[:1]:
        block_m = max(16, min(max_block_m, triton.next_power_of_2(beams * groups)))
        args = dict(q_ptr=_ptr(dt), k_ptr=_ptr(dt), v_ptr=_ptr(dt), out_ptr=_ptr(dt), part_out_ptr=_ptr(torch.float32),
                    part_lse_ptr=_ptr(torch.float32), **ranges, split_keys=_I32_16, num_splits=_I32,
                    queries_per_row=_I32, **_strides("q", "nhd"), **_strides("k", "bhnd"), **_strides("v", "bhnd"),
                    stride_sb=_ONE, stride_eb=_ONE, stride_wb=_I32, stride_wj=_ONE, **_strides("o", "nhd"),
                    HEAD_DIM=head_dim, GROUP=groups, BLOCK_M=block_m, BLOCK_N=block_n, M_BLOCKS=1, SPLIT=split,
                    DOT_DTYPE=dot_dtype(dt, interpreted=False), OUT_DTYPE=tl_dtype(dt))
        out.append(Config("segment_cross_attention_decode", f"{dname} d={head_dim} G{groups} {label} "
                          f"M{block_m}xN{block_n}", scad._segment_cross_attention_decode_kernel, args, num_warps,
                          scad.NUM_STAGES))
    args = dict(part_out_ptr=_ptr(torch.float32), part_lse_ptr=_ptr(torch.float32), out_ptr=_ptr(dt), num_splits=_I32,
                **_strides("o", "nhd"), HEAD_DIM=head_dim, OUT_DTYPE=tl_dtype(dt))
    if full:
        out.append(Config("segment_decode_combine", f"{dname} d={head_dim}", scad._segment_decode_combine_kernel,
                          args, scad.COMBINE_WARPS))
    return out


def configs(quick: bool = False) -> list[Config]:
    """What the runtime launches: d 64, 64 latents, the launchers' block sizes, every dtype and mode (and
    bf16 at d 128, which the launchers accept too)."""
    dtypes = {"bf16": torch.bfloat16} if quick else DTYPES
    out = []
    for dname, dt in dtypes.items():
        out += _attention_configs(dname, dt, 64, MODES)
        for mode, flags in MODES.items():
            args = dict(q_ptr=_ptr(dt), k_ptr=_ptr(dt), v_ptr=_ptr(dt), index_ptr=_ptr("*i32"),
                        num_images_ptr=_ptr("*i32"), out_ptr=_ptr(dt), capacity_images=_I32, qk_scale_log2=_FP32,
                        queries_per_row=_I32, queries_per_index=_I32,
                        **_strides("q", "bhd"), **_strides("k", "bhnd"), **_strides("v", "bhnd"),
                        stride_ib=_ONE, stride_nb=_ONE, **_strides("o", "bhd"),
                        HEAD_DIM=64, NUM_LATENTS=64, BLOCK_N=64, **flags, OUT_DTYPE=tl_dtype(dt))
            out.append(Config("masked_cross_attention_decode", f"{dname} {mode}",
                              mcad._masked_cross_attention_decode_kernel, args, mcad.NUM_WARPS))
        # gated residual: the LM widths of the presets (tiny 64, small 512, 9B 4096) with the norms the
        # runtime fuses (LayerNorm with bias before the xattn FF, RMSNorm before a LLaMA layer), gated (the
        # cross-attention blocks) and ungated (the decoder layers' residual adds, gate=None).
        widths = (4096,) if quick else (64, 512, 4096)
        for D in widths:
            block_r, block_d, num_warps = gr.launch_config(D)
            for norm, has_bias in ((None, False), ("layernorm", True), ("rmsnorm", False)):
                gate_modes = ((True, False), (True, True), (False, False)) if D == 4096 and norm is None else (
                    (True, False), (False, False))
                for has_gate, per_channel in gate_modes:
                    args = dict(x_ptr=_ptr(dt), y_ptr=_ptr(dt), gate_ptr=_ptr(torch.float32), weight_ptr=_ptr(dt),
                                bias_ptr=_ptr(dt), out_ptr=_ptr(dt), normed_ptr=_ptr(dt), R=_I32, D=_I32_16,
                                eps=_FP32, stride_xr=_I32_16, stride_yr=_I32_16, stride_or=_I32_16,
                                stride_nr=_I32_16, BLOCK_R=block_r, BLOCK_D=block_d, HAS_GATE=has_gate,
                                GATE_PER_CHANNEL=per_channel, NORM=gr._NORM_CODE[norm], HAS_BIAS=has_bias,
                                OUT_DTYPE=tl_dtype(dt))
                    gate = "no gate" if not has_gate else "gate[D]" if per_channel else "gate[1]"
                    out.append(Config("gated_residual", f"{dname} D={D} {norm or 'no norm'} {gate}",
                                      gr._gated_residual_kernel, args, num_warps))
        # decode step: the 9B head dim in every variant for bf16, the main launch for the rest
        out += _decode_attention_configs(dname, dt, 128, full=dt == torch.bfloat16)
        out += _rotary_kv_write_configs(dname, dt)
        out += _int8_matmul_configs(dname, dt)
    if not quick:
        out += _attention_configs("bf16", torch.bfloat16, 128, {"immediate": MODES["immediate"]})
        out += _decode_attention_configs("bf16", torch.bfloat16, 64, full=True)
        out += _decode_attention_configs("bf16", torch.bfloat16, 80, full=False)
    # Llama 3.2 Vision 11B, last and interleaved by cost: the gate runs configuration i in shard i % 2, and these
    # 14 compiles take ~16 s cold (prefill 4.5 s for both archs, decode 2.4-2.9 s, combine 0.7 s; 2026-12-07)
    prefill, split, one_split, candidates, combine = _segment_configs("bf16", torch.bfloat16, full=True)
    fp32 = _segment_configs("fp32", torch.float32, full=False) if not quick else []
    return out + [split, prefill, one_split, *fp32[:1], combine, candidates, *fp32[1:]]


def _cuobjdump() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes, tool: Path, sass: bool) -> tuple[dict, bool | None]:
    """({REG, STACK, SHARED, LOCAL} of the kernel, whether its SASS holds HGMMA) from one cuobjdump call.

    The SASS is dumped only when `sass` (where HGMMA is asserted: sm_90, dot-heavy kernels), else HGMMA is
    None: the dump was 150 of the gate's ~160 s for its 226 compiles (2026-12, 2 cores), and the resource
    usage is the same without it."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        dump = subprocess.run([str(tool), "--dump-resource-usage", *(["--dump-sass"] if sass else []), f.name],
                              capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", dump))
    return {k: int(v) for k, v in fields.items()}, ("HGMMA" in dump) if sass else None


def compile_one(cfg: Config, arch: int, tool: Path) -> dict:
    t0 = time.perf_counter()
    try:
        compiled = triton.compile(
            _source(cfg), target=GPUTarget("cuda", arch, 32),
            options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
        )
        usage, hgmma = _resource_usage(compiled.asm["cubin"], tool, sass=arch == 90 and cfg.dot_heavy)
        shared = int(compiled.metadata.shared)
    except Exception as exc:  # a compile failure is a result to report, not a crash
        return {"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}",
                "seconds": time.perf_counter() - t0}
    problems = []
    if usage.get("STACK", 0) or usage.get("LOCAL", 0):
        problems.append(f"spills (stack {usage.get('STACK', 0)} B, local {usage.get('LOCAL', 0)} B)")
    if shared > SHARED_LIMIT[arch]:
        problems.append(f"shared memory {shared} B > {SHARED_LIMIT[arch]} B")
    if arch == 90 and cfg.dot_heavy and not hgmma:
        problems.append("no HGMMA in the sm_90 code of a dot-heavy kernel")
    return {"ok": not problems, "error": "; ".join(problems), "regs": usage.get("REG"), "shared": shared,
            "stack": usage.get("STACK", 0), "local": usage.get("LOCAL", 0), "hgmma": hgmma,
            "seconds": time.perf_counter() - t0}


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
        return sha.stdout.strip() if sha.returncode == 0 and sha.stdout.strip() else "uncommitted"
    except OSError:
        return "uncommitted"


def markdown(cfgs: list[Config], seconds: float) -> str:
    lines = [
        "# Kernel compile report (ahead of time, no GPU)",
        "",
        f"- date: {datetime.date.today().isoformat()}; git commit: {_commit()}",
        f"- triton {triton.__version__} on the CPU machine (the GPU machine runs triton 3.6, whose JIT "
        "compiles its own code: this report checks the kernels lower and fit, not the 3.6 code itself)",
        f"- targets: {', '.join(f'sm_{a}' for a in ARCHS)}; {len(cfgs) * len(ARCHS)} compiles in {seconds:.0f} s",
        "- regs: registers per thread; shared: bytes of shared memory per block (triton metadata); "
        "stack/local: bytes per thread (any nonzero = spills, fails the gate); HGMMA: the sm_90 SASS holds "
        "Hopper warpgroup MMA instructions (checked for the bf16/fp16 dot kernels; fp32 dots use "
        "input_precision='ieee', FMA, by design)",
        "",
        "| kernel | configuration | warps | sm_80 regs | sm_80 shared | sm_90 regs | sm_90 shared | "
        "stack/local | sm_90 HGMMA | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for cfg in cfgs:
        r80, r90 = cfg.results.get(80, {}), cfg.results.get(90, {})
        errors = [f"sm_{a}: {cfg.results[a]['error']}" for a in ARCHS if cfg.results.get(a, {}).get("error")]
        spill = "/".join(str(max(r.get("stack", 0) or 0, r.get("local", 0) or 0)) for r in (r80, r90))
        hgmma = {True: "yes", False: "no"}.get(r90.get("hgmma"), "-")
        lines.append(
            f"| {cfg.kernel_name} | {cfg.label} | {cfg.num_warps} | {r80.get('regs', '-')} | "
            f"{r80.get('shared', '-')} | {r90.get('regs', '-')} | {r90.get('shared', '-')} | {spill} | "
            f"{hgmma if cfg.dot_heavy else 'n/a'} | {'; '.join(errors) or 'ok'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown report here")
    parser.add_argument("--json", type=Path, help="write per-configuration results as JSON here")
    parser.add_argument("--quick", action="store_true", help="bf16 and the 9B width only")
    parser.add_argument("--shard", default="0/1", help="I/N: compile only every N-th configuration from the I-th "
                        "(the test suite runs N shards on its workers at once); default 0/1, all of them")
    args = parser.parse_args(argv)
    shard, _, shards = args.shard.partition("/")
    if not (shard.isdigit() and shards.isdigit() and 0 <= int(shard) < int(shards)):
        parser.error(f"--shard {args.shard!r}: expected I/N with 0 <= I < N, e.g. 0/2")
    tool = _cuobjdump()
    every = configs(quick=args.quick)
    cfgs = every[int(shard)::int(shards)]
    t0 = time.perf_counter()
    for cfg in cfgs:
        for arch in ARCHS:
            cfg.results[arch] = compile_one(cfg, arch, tool)
            r = cfg.results[arch]
            status = "ok" if r["ok"] else f"FAIL {r['error']}"
            print(f"sm_{arch} {cfg.kernel_name:30s} {cfg.label:40s} regs={r.get('regs', '-')!s:>4} "
                  f"shared={r.get('shared', '-')!s:>6} {r['seconds']:.1f}s {status}", flush=True)
    report = markdown(cfgs, time.perf_counter() - t0)
    if args.out:
        args.out.write_text(report)
    if args.json:
        args.json.write_text(json.dumps({
            "kernels": sorted({c.kernel_name for c in every}),  # of every shard: what the whole gate covers
            "configs": [{"kernel": c.kernel_name, "config": c.label, "results": c.results} for c in cfgs],
        }, indent=1))
    failures = [(c.kernel_name, c.label, a) for c in cfgs for a in ARCHS if not c.results[a]["ok"]]
    print(f"{len(cfgs) * len(ARCHS) - len(failures)} of {len(cfgs) * len(ARCHS)} compiles pass")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
