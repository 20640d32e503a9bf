"""Weight-only int8 matmul at a preset's decode shapes: the Triton kernel and aten's int8 op against bf16
F.linear, with the bytes each moves per second as a share of the measured copy bandwidth.

    python bench/int8_matmul.py [--preset openflamingo-9b-v2] [--m 1,2,4,8,16,32] [--bandwidth OUT/bandwidth.json]
                                [--goal-pct 80] [--json PATH] [--md PATH] [--budget-s 120]

Shapes: every int8 matrix a decode step multiplies, read from FastFlamingo.from_reference(weights="int8",
dtype=torch.bfloat16) built on the meta device (no memory, no init): the LM's projections (LLaMA's q/k/v and
gate/up as the one fused matrix the step multiplies), the gated blocks' to_q, to_out and FF, and the output head.
The blocks' to_kv is left out (it runs once per prompt, not per token). Each distinct [N, K] is timed once;
"per step" is how many times one decode step multiplies it. M: the rows of one step (batch x beams, or the
hypotheses a scoring pass extends).

Implementations (x: M rows of bf16 activations, the same for all):
    bf16     F.linear(x, w) with w the dequantized weight in bf16: what the runtime runs without int8 (baseline)
    triton   int8_weight_matmul(x, w_int8, scales_fp32): the Triton backend's op (CUDA only: interpreted on a
             CPU its times say nothing)
    aten     torch.ops.aten._weight_int8pack_mm(x, w_int8, scales_bf16): the torch backend's op (the twin)
    fp32     F.linear in float32, the CPU's default dtype (CPU only, for reference)
Timing: CUDA: triton.testing.do_bench_cudagraph medians (a decode step is one captured graph; an eager launch
costs tens of us of Python, more than the GPU takes to read a 16 MB weight), and do_bench for the Triton kernel
launched eagerly ("triton eager"). CPU: the median of --repeats perf_counter calls after a warm-up, one torch
thread (--threads; the shared 2-core machine).
Caches: each call reads the next of several copies of its weight, at least --rotate-mib MiB of them in all (256 on
CUDA: 5x an H200's L2; 64 on the CPU: 2x its L3), so no call finds its weight in cache, as in a decode step
whose layers each have their own.
Bytes: weight + scales + x + out of each implementation; GB/s = bytes / time; % copy = of the copy bandwidth
(bench/bandwidth.py measure, read + written bytes, the same counting). The step: per M, the sum over the shapes
of per-step count x time and x bytes, i.e. the bandwidth of the whole step's int8 matmuls.
Goal: the Triton kernel's step at every M <= 8 at >= --goal-pct % of the copy bandwidth; reported
PASS / FAIL, and "not measured" without CUDA. The exit status says only whether the run and the checks worked.
Correctness (every implementation, one M per shape, the largest <= 8): max |out - float64| <= 2 x bf16
F.linear's own error + 1.6e-2 (the tests' rule and bf16 atol).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from bandwidth import measure_copy_bandwidth
from common import median_seconds, write_results

from flamingo_fast.config import PRESETS, from_name
from flamingo_fast.profiling.report import environment

INT8_IMPLS = ("triton", "aten")
BF16_ATOL = 1.6e-2  # tests/helpers.py TOLERANCE[bfloat16]
DEFAULT_M = (1, 2, 4, 8, 16, 32)


# ----------------------------------------------------------------------------------------------- shapes
def _short_name(name: str) -> str:
    """'lang_encoder.model.layers.3.mlp.down_proj' -> 'lm.mlp.down_proj'; 'lang_encoder.gated_cross_attn_layers.3.ff.1'
    -> 'xattn.ff.1'."""
    name = re.sub(r"\.\d+(?=\.)", "", name.removeprefix("lang_encoder."))
    if name.startswith("gated_cross_attn_layers."):
        return "xattn." + name.removeprefix("gated_cross_attn_layers.")
    return name if name == "lm_head" else "lm." + ".".join(name.split(".")[-2:])


def decode_matmuls(preset: str) -> list[dict]:
    """[{"N", "K", "per_step", "names"}], one per distinct [N, K] int8 matrix a decode step multiplies, largest
    per-step bytes first. Read from the runtime built on the meta device; matrices that are row views of one
    storage (fused q/k/v, gate/up) are the one GEMM over that storage."""
    from flamingo_fast.reference.model import build_reference
    from flamingo_fast.runtime.quantize import Int8Linear
    from flamingo_fast.runtime.runtime import FastFlamingo

    runtime = FastFlamingo.from_reference(build_reference(from_name(preset), device="meta"), weights="int8",
                                          dtype=torch.bfloat16)
    storages: dict[int, dict] = {}
    for name, module in runtime.model.named_modules():
        if not isinstance(module, Int8Linear) or ".to_kv" in name:  # to_kv: once per prompt
            continue
        K = module.weight.shape[1]
        storage = module.weight.untyped_storage()
        entry = storages.setdefault(storage._cdata, {"N": storage.nbytes() // K, "K": K, "names": {}})
        entry["names"][_short_name(name)] = None
    groups: dict[tuple[int, int], dict] = {}
    for entry in storages.values():
        names = list(entry["names"])
        label = names[0] + "".join("+" + n.rsplit(".", 1)[-1] for n in names[1:])  # q_proj+k_proj+v_proj
        group = groups.setdefault((entry["N"], entry["K"]), {"N": entry["N"], "K": entry["K"], "per_step": 0,
                                                              "names": {}})
        group["per_step"] += 1
        group["names"][label] = group["names"].get(label, 0) + 1
    shapes = sorted(groups.values(), key=lambda g: -g["N"] * g["K"] * g["per_step"])
    for g in shapes:
        g["names"] = ", ".join(f"{label} x{n}" for label, n in g["names"].items())
    return shapes


# -------------------------------------------------------------------------------------------- operands
class Operands:
    """One shape's weights, each in `copies` copies (the cache rotation), built once: int8 [N, K] with float32
    scales [N] (what Int8Linear holds) and bf16 scales (aten's), the dequantized weight in bf16 and float32."""

    def __init__(self, N: int, K: int, impls: list[str], device: str, rotate_bytes: int, seed: int = 0):
        g = torch.Generator(device=device).manual_seed(seed)
        # uniform int8 in [-127, 127] has variance 127^2 / 3: this scale makes w ~ 1 / sqrt(K) and outputs O(1)
        self.weight = torch.randint(-127, 128, (N, K), generator=g, device=device, dtype=torch.int8)
        self.scales = (3 / K) ** 0.5 / 127 * (0.5 + torch.rand(N, generator=g, device=device))
        self.N, self.K = N, K
        dequant = self.weight.float() * self.scales[:, None]
        held = {"bf16": dequant.to(torch.bfloat16), "fp32": dequant, "triton": self.weight, "aten": self.weight}
        self.bf16_weight = held["bf16"]
        self.scales_bf16 = self.scales.to(torch.bfloat16)
        self.rotation: dict[str, list[torch.Tensor]] = {}
        for impl in impls:
            w = held[impl]
            copies = max(1, math.ceil(rotate_bytes / (w.numel() * w.element_size())))
            self.rotation[impl] = [w] + [w.clone() for _ in range(copies - 1)]
        del dequant, held

    def call(self, impl: str, x: torch.Tensor):
        """-> a no-argument function: one matmul of `impl` per call, each on the next copy of the weight."""
        copies, state = self.rotation[impl], {"i": 0}
        x32 = x.float() if impl == "fp32" else None
        if impl == "triton":  # imported only here: on a CPU the kernel module is not needed
            from flamingo_fast.kernels.int8_matmul import int8_weight_matmul

        def step(w):
            if impl == "bf16":
                return F.linear(x, w)
            if impl == "fp32":
                return F.linear(x32, w)
            if impl == "aten":
                return torch.ops.aten._weight_int8pack_mm(x, w, self.scales_bf16)
            return int8_weight_matmul(x, w, self.scales)

        def fn():
            w = copies[state["i"] % len(copies)]
            state["i"] += 1
            return step(w)

        return fn

    def nbytes(self, impl: str, M: int) -> int:
        """Bytes one call must move: the weight (+ scales) read, x read, out written."""
        N, K = self.N, self.K
        if impl in ("bf16", "fp32"):
            size = 2 if impl == "bf16" else 4
            return size * (N * K + M * K + M * N)
        return N * K + (4 if impl == "triton" else 2) * N + 2 * (M * K + M * N)

    def check(self, impl: str, x: torch.Tensor) -> dict:
        """The tests' rule against float64: max error <= 2 x bf16 F.linear's error + bf16 atol."""
        ref64 = (x.double() @ self.weight.double().T) * self.scales.double()
        plain = F.linear(x, self.bf16_weight)
        got = self.call(impl, x)()
        err = (got.double() - ref64).abs().max().item()
        bound = 2 * (plain.double() - ref64).abs().max().item() + BF16_ATOL
        return {"max_err": err, "bound": bound, "ok": bool(err <= bound) and not bool(torch.isnan(got).any())}


# ------------------------------------------------------------------------------------------------ timing
def time_ms(fn, device: str, graph: bool, repeats: int) -> float:
    """Median ms of one call. CUDA: do_bench_cudagraph (graph) or do_bench (eager); CPU: perf_counter."""
    if device == "cuda":
        import triton.testing

        if graph:
            return float(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median"))
        return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    return median_seconds(fn, repeats=repeats, warmup=1) * 1e3


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _gbps(row: dict, impl: str, copy_gbps: float) -> str:
    if row["ms"].get(impl) is None:
        return "-"
    gbps = row["bytes"][impl] / (row["ms"][impl] * 1e-3) / 1e9
    return f"{gbps:.0f} ({100 * gbps / copy_gbps:.0f}%)"


def markdown(head: list[str], rows: list[dict], steps: list[dict], impls: list[str], copy_gbps: float,
             goal_lines: list[str]) -> str:
    int8 = [i for i in impls if i in INT8_IMPLS]
    timed = impls + (["triton eager"] if "triton" in impls and any("triton eager" in r["ms"] for r in rows) else [])
    lines = head + ["", "| shape | N x K | per step | M | " + " | ".join(f"{i} ms" for i in timed) + " | "
                    + " | ".join(f"{i} x bf16" for i in int8) + " | "
                    + " | ".join(f"{i} GB/s (% copy)" for i in impls) + " | check |",
                    "| --- | --- | ---: | ---: |" + " ---: |" * (len(timed) + len(int8) + len(impls)) + " --- |"]
    for r in rows:
        ms = r["ms"]
        ratios = [_fmt(ms["bf16"] / ms[i], 2) if ms.get(i) and ms.get("bf16") else "-" for i in int8]
        check = ", ".join(f"{i} {'ok' if c['ok'] else 'WRONG'} ({c['max_err']:.1e} / {c['bound']:.1e})"
                          for i, c in r.get("check", {}).items()) or "-"
        lines.append(f"| {r['names']} | {r['N']} x {r['K']} | {r['per_step']} | {r['M']} | "
                     + " | ".join(_fmt(ms.get(i), 4) for i in timed) + " | " + " | ".join(ratios) + " | "
                     + " | ".join(_gbps(r, i, copy_gbps) for i in impls) + f" | {check} |")
    lines += ["", "The decode step's int8 matmuls (each shape x its per-step count), per M:", "",
              "| M | matmuls | MB (int8) | " + " | ".join(f"{i} ms" for i in impls) + " | "
              + " | ".join(f"{i} x bf16" for i in int8) + " | " + " | ".join(f"{i} GB/s (% copy)" for i in impls)
              + " |", "| ---: | ---: | ---: |" + " ---: |" * (2 * len(impls) + len(int8))]
    for s in steps:
        ms = s["ms"]
        ratios = [_fmt(ms["bf16"] / ms[i], 2) if ms.get(i) and ms.get("bf16") else "-" for i in int8]
        lines.append(f"| {s['M']} | {s['matmuls']} | {s['int8_weight_bytes'] / 1e6:.0f} | "
                     + " | ".join(_fmt(ms.get(i), 3) for i in impls) + " | " + " | ".join(ratios) + " | "
                     + " | ".join(_gbps(s, i, copy_gbps) for i in impls) + " |")
    return "\n".join(lines + [""] + goal_lines) + "\n"


def step_totals(rows: list[dict], shapes: list[dict], impls: list[str]) -> list[dict]:
    """Per M with every shape measured: the sums over shapes of per_step x ms and per_step x bytes."""
    steps = []
    for M in sorted({r["M"] for r in rows}):
        of_m = [r for r in rows if r["M"] == M]
        if len(of_m) < len(shapes):
            continue
        ms = {i: sum(r["per_step"] * r["ms"][i] for r in of_m) if all(r["ms"].get(i) for r in of_m) else None
              for i in impls}
        nbytes = {i: sum(r["per_step"] * r["bytes"][i] for r in of_m) for i in impls}
        steps.append({"M": M, "matmuls": sum(r["per_step"] for r in of_m), "ms": ms, "bytes": nbytes,
                      "int8_weight_bytes": sum(r["per_step"] * r["N"] * r["K"] for r in of_m)})
    return steps


def goal(steps: list[dict], copy_gbps: float, goal_pct: float, device: str) -> tuple[list[str], str]:
    """The issue's goal on the Triton kernel's step at M <= 8 -> (lines, "PASS" | "FAIL" | "not measured")."""
    rule = f"the Triton kernel's decode-step int8 matmuls at M <= 8 reach >= {goal_pct:g}% of the copy bandwidth " \
           f"({copy_gbps:.0f} GB/s)"
    small = [s for s in steps if s["M"] <= 8]
    if device != "cuda" or not small or any(s["ms"].get("triton") is None for s in small):
        why = "no CUDA: the Triton kernel is not timed on the CPU" if device != "cuda" else \
            "the Triton kernel's rows at M <= 8 were not all measured"
        return [f"goal: {rule}: not measured ({why})"], "not measured"
    parts, verdict = [], "PASS"
    for s in small:
        pct = 100 * s["bytes"]["triton"] / (s["ms"]["triton"] * 1e-3) / 1e9 / copy_gbps
        ok = pct >= goal_pct
        verdict = verdict if ok else "FAIL"
        parts.append(f"M={s['M']} {pct:.0f}% {'pass' if ok else 'FAIL'}")
    return [f"goal: {rule}: {', '.join(parts)} -> {verdict}"], verdict


# -------------------------------------------------------------------------------------------------- main
def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",")]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"m={text!r}: expected comma-separated integers >= 1")
    return values


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="openflamingo-9b-v2", choices=sorted(PRESETS),
                        help="shapes of this preset (default: OpenFlamingo-9B v2, MPT-7B: 4096 wide, MLP 16384)")
    parser.add_argument("--m", type=_int_list, default=list(DEFAULT_M), help="rows per matmul (default 1,2,4,8,16,32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--impls", default=None,
                        help="comma-separated, bf16 first (default: CUDA bf16,triton,aten; CPU bf16,aten,fp32)")
    parser.add_argument("--bandwidth", type=Path, help="JSON of `bench/bandwidth.py measure` (default: measure now)")
    parser.add_argument("--gib", type=float, default=None, help="copy size when measuring (default 4 CUDA, 0.25 CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: timed calls per case (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    parser.add_argument("--rotate-mib", type=float, default=None,
                        help="MiB of weight copies each case cycles through (default 256 CUDA, 64 CPU)")
    parser.add_argument("--goal-pct", type=float, default=80.0)
    parser.add_argument("--budget-s", type=float, default=120.0, help="no new M after this many seconds")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device).type
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    impls = (args.impls.split(",") if args.impls else
             ["bf16", "triton", "aten"] if device == "cuda" else ["bf16", "aten", "fp32"])
    if impls[0] != "bf16" or any(i not in ("bf16", "triton", "aten", "fp32") for i in impls):
        parser.error(f"--impls {','.join(impls)}: expected bf16 first, then any of triton, aten, fp32")
    notes = []
    if device != "cuda" and "triton" in impls:
        impls.remove("triton")
    if device != "cuda":
        notes.append("triton: skipped on the CPU: the kernel runs only interpreted there (TRITON_INTERPRET=1), "
                     "whose times say nothing about a GPU; tests/test_kernel_int8_matmul.py checks its values")
        torch.set_num_threads(args.threads)
    started = time.perf_counter()

    shapes = decode_matmuls(args.preset)
    if args.bandwidth:
        bandwidth = json.loads(args.bandwidth.read_text())
    else:
        gib = args.gib if args.gib is not None else (4.0 if device == "cuda" else 0.25)
        bandwidth = measure_copy_bandwidth(args.device, int(gib * 2**30))
    copy_gbps = bandwidth["copy_GBps"]
    env = environment(args.device)
    rotate = int((args.rotate_mib if args.rotate_mib is not None else 256 if device == "cuda" else 64) * 2**20)
    timing = ("do_bench_cudagraph medians (triton eager: do_bench)" if device == "cuda" else
              f"median of {args.repeats} perf_counter calls after 1 warm-up, {torch.get_num_threads()} torch thread(s)")
    source = f"read from {args.bandwidth}" if args.bandwidth else "measured now"
    head = [f"int8 weight matmul at the {args.preset} decode shapes; {env['device_name']}; torch {env['torch']}, "
            f"triton {env['triton']}; commit {env['git_commit']}; {env['date']}",
            f"- copy bandwidth {copy_gbps:.1f} GB/s ({bandwidth.get('device_name', '?')}, "
            f"{bandwidth['bytes'] / 2**30:.2f} GiB, {source})",
            f"- times: {timing}; each call on the next of >= {rotate / 2**20:.0f} MiB of weight copies (no cache hits)",
            "- x bf16 = bf16 F.linear ms / this ms (> 1: faster); GB/s counts weight + scales + x + out"]
    head += [f"- {n}" for n in notes]
    print("\n".join(head), flush=True)

    operands = {}
    for s in shapes:
        operands[(s["N"], s["K"])] = Operands(s["N"], s["K"], impls, args.device, rotate)
    check_m = max([m for m in args.m if m <= 8] or [min(args.m)])
    rows, skipped, failed = [], [], False
    for M in args.m:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(M)
            continue
        for s in shapes:
            op = operands[(s["N"], s["K"])]
            x = torch.randn(M, s["K"], device=args.device, dtype=torch.bfloat16)
            row = {**s, "M": M, "ms": {}, "bytes": {i: op.nbytes(i, M) for i in impls}, "errors": {}}
            for impl in impls:
                try:
                    row["ms"][impl] = time_ms(op.call(impl, x), device, True, args.repeats)
                    if impl == "triton":
                        row["ms"]["triton eager"] = time_ms(op.call(impl, x), device, False, args.repeats)
                except Exception as exc:  # e.g. an op missing from this torch build: recorded, the run goes on
                    row["ms"][impl] = None
                    row["errors"][impl] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if M == check_m:
                row["check"] = {}
                for impl in impls:
                    if impl != "bf16" and row["ms"].get(impl) is not None:
                        row["check"][impl] = op.check(impl, x)
                        failed |= not row["check"][impl]["ok"]
            rows.append(row)
            ms = row["ms"]
            errors = "".join(f"  [{i}: {e}]" for i, e in row["errors"].items())
            print(f"M={M:3d} {s['N']:6d} x {s['K']:6d}  " + "  ".join(f"{i} {_fmt(ms.get(i), 4)} ms" for i in ms)
                  + errors, flush=True)
    steps = step_totals(rows, shapes, impls)
    goal_lines, verdict = goal(steps, copy_gbps, args.goal_pct, device)
    if skipped:
        goal_lines.append(f"M {', '.join(map(str, skipped))}: skipped, past the {args.budget_s:.0f} s budget")
    goal_lines.append(f"total {time.perf_counter() - started:.1f} s")
    table = markdown(head, rows, steps, impls, copy_gbps, goal_lines)
    print("\n" + table)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(table)
    if args.json:
        write_results(args.json, {"preset": args.preset, "bandwidth": bandwidth, "impls": impls, "shapes": shapes,
                                  "rows": rows, "steps": steps, "goal_pct": args.goal_pct, "goal": verdict,
                                  "skipped_m": skipped}, args.device)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
