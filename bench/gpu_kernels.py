"""Kernels on a CUDA GPU: correctness at real sizes and `triton.testing.do_bench` medians against the torch
twins and the dense baselines, written as one markdown table (and JSON).

    python bench/gpu_kernels.py --out DIR              on a GPU: DIR/kernels_gpu.md, DIR/kernels_gpu.json
    python bench/gpu_kernels.py --out DIR --dry-run    on a CPU: Triton interpreter, tiny shapes, perf_counter

Sizes are OpenFlamingo-9B's (bf16): cross-attention 8 heads x 64 with 64 latents per image, T up to 2048
with up to 32 images; the perceiver over 256 patch tokens; the gated residual at LM width 4096. Each case
is independent: a failure is recorded (with its traceback) and the script goes on. The correctness rule is
the tests' one: max |kernel - float64| <= 2 * max |plain torch at dtype - float64| + atol[dtype]. The whole
run stays under --budget-s (default 100 s); cases past it are recorded as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:  # before any kernel module is imported: @triton.jit reads it at decoration
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from common import median_seconds  # noqa: E402

from flamingo_fast.kernels.gated_residual import gated_residual, gated_residual_ref  # noqa: E402
from flamingo_fast.kernels.masked_cross_attention import (  # noqa: E402
    masked_cross_attention,
    masked_cross_attention_ref,
)
from flamingo_fast.kernels.masked_cross_attention_decode import (  # noqa: E402
    masked_cross_attention_decode,
    masked_cross_attention_decode_ref,
)
from flamingo_fast.kernels.perceiver_attention import perceiver_attention, perceiver_attention_ref  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # tests/helpers.py TOLERANCE
NL = 64
DRY = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
DEVICE = "cpu" if DRY else "cuda"


# --------------------------------------------------------------------------------------------- helpers
def bench_ms(fn, graph: bool = False) -> float:
    """Median ms. GPU: do_bench (launch overhead included) or do_bench_cudagraph (kernel time alone)."""
    if DRY:
        return median_seconds(fn, repeats=3, warmup=1) * 1e3
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def check(result, ref64, plain, dtype) -> dict:
    """The tests' rule, as data: {'max_err', 'bound', 'ok'}."""
    err = (result.double() - ref64).abs().max().item()
    torch_err = (plain.double() - ref64).abs().max().item()
    bound = 2 * torch_err + ATOL[dtype]
    ok = bool(err <= bound) and not bool(torch.isnan(result).any())
    return {"max_err": err, "bound": bound, "ok": ok}


def attention_formula64(q, k, v, allowed, uniform_keys=None):
    """Dense float64 attention with an explicit [B, T, K] mask; rows with no allowed key give 0. Rows where
    `uniform_keys` ([B, T, K]) has any key give the plain mean of v over those keys (the pre-image bug)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhtd,bhkd->bhtk", q, k) * q.shape[-1] ** -0.5
    w = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.where(allowed.any(-1)[:, None, :, None], w @ v, 0.0)
    return _uniform_rows(out, v, uniform_keys)


def attention_plain(q, k, v, allowed, uniform_keys=None):
    """OpenFlamingo's masked attention at the inputs' dtype (the error yardstick; also a timing baseline)."""
    sim = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    sim = sim.masked_fill(~allowed[:, None], -torch.finfo(sim.dtype).max)
    attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    out = attn.masked_fill(~allowed.any(-1)[:, None, :, None], 0.0) @ v
    return _uniform_rows(out, v, uniform_keys)


def _uniform_rows(out, v, uniform_keys):
    if uniform_keys is None:
        return out
    weights = uniform_keys.to(v.dtype) / uniform_keys.sum(-1, keepdim=True).clamp(min=1).to(v.dtype)
    mean = torch.einsum("btk,bhkd->bhtd", weights, v)
    return torch.where(uniform_keys.any(-1)[:, None, :, None], mean, out)


def prompt_layout(batch: int, T: int, shots: int) -> torch.Tensor:
    """[B, T] int32: row b has max(1, shots - b) images after 4 + 16 b text tokens, equal segments."""
    t = torch.arange(T)
    rows = []
    for b in range(batch):
        n, start = max(1, shots - b), min(4 + 16 * b, T - 1)
        seg = max(1, (T - start) // n)
        rows.append(torch.where(t < start, -1, ((t - start) // seg).clamp(max=n - 1)))
    return torch.stack(rows).to(torch.int32)


def media_kv(batch, heads, keys, dim, dtype):
    """K and V as strided views of one [B, keys, 2, H, d] projection, as the runtime's to_kv produces."""
    kv = torch.randn(batch, keys, 2, heads, dim, device=DEVICE, dtype=dtype)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return k, v


# ----------------------------------------------------------------------------------------------- cases
def xattn_prefill_case(batch=4, shots=32, mode="immediate", dtype=torch.bfloat16, heads=8) -> dict:
    attend_previous, bug = mode != "immediate", mode == "all-previous+bug"
    T = (64 if not DRY else 48) * max(shots, 1)
    index = prompt_layout(batch, T, shots).to(DEVICE)
    q = torch.randn(batch, T, heads, 64, device=DEVICE, dtype=dtype).transpose(1, 2)
    k, v = media_kv(batch, heads, shots * NL, 64, dtype)
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=bug)
    key_image = torch.arange(shots * NL, device=DEVICE) // NL
    idx = index.long()[:, :, None]
    allowed = (key_image <= idx) if attend_previous else (key_image == idx)
    uniform = ((index < 0)[:, :, None] & (key_image >= 0)) if bug else None
    ref64, plain = attention_formula64(q, k, v, allowed, uniform), attention_plain(q, k, v, allowed, uniform)
    row = check(masked_cross_attention(q, k, v, index, **kwargs), ref64, plain, dtype)
    row["twin_ok"] = check(masked_cross_attention_ref(q, k, v, index, **kwargs), ref64, plain, dtype)["ok"]
    del ref64
    mask = (allowed if uniform is None else allowed | uniform)[:, None]
    ms = {
        "triton": bench_ms(lambda: masked_cross_attention(q, k, v, index, **kwargs)),
        "twin": bench_ms(lambda: masked_cross_attention_ref(q, k, v, index, **kwargs)),
        "dense sdpa": bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        "dense reference": bench_ms(lambda: attention_plain(q, k, v, allowed, uniform)),
    }
    return {"case": f"xattn prefill {mode}", "shape": f"B{batch} H{heads} T{T} N_img{shots} d64",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "dense sdpa", **row}


def decode_case(batch=8, mode="immediate", dtype=torch.bfloat16, heads=8, capacity_images=32) -> dict:
    attend_previous, bug = mode != "immediate", mode == "all-previous+bug"
    rows = [capacity_images, 1, 8, 0, 17, capacity_images, 5, 2][:batch]
    num_images = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    index = (num_images - 1).to(torch.int32)
    index[min(2, batch - 1)] = -1
    q = torch.randn(batch, heads, 64, device=DEVICE, dtype=dtype)
    k, v = media_kv(batch, heads, capacity_images * NL, 64, dtype)
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=bug, num_images=num_images)
    key_image = torch.arange(capacity_images * NL, device=DEVICE) // NL
    idx = index.long()[:, None, None]
    allowed = (key_image <= idx) if attend_previous else (key_image == idx)  # [B, 1, K]
    # the pre-image bug: uniform over the row's own images only
    uniform = ((index < 0)[:, None, None] & (key_image < num_images.long()[:, None, None])) if bug else None
    q4 = q[:, :, None]
    ref64 = attention_formula64(q4, k, v, allowed, uniform)[:, :, 0]
    plain = attention_plain(q4, k, v, allowed, uniform)[:, :, 0]
    out = torch.empty_like(q)
    row = check(masked_cross_attention_decode(q, k, v, index, out=out, **kwargs), ref64, plain, dtype)
    row["twin_ok"] = check(masked_cross_attention_decode_ref(q, k, v, index, **kwargs), ref64, plain, dtype)["ok"]
    out_twin = torch.empty_like(q)
    ms = {
        "triton": bench_ms(lambda: masked_cross_attention_decode(q, k, v, index, out=out, **kwargs)),
        "twin": bench_ms(lambda: masked_cross_attention_decode_ref(q, k, v, index, out=out_twin, **kwargs)),
        "triton graph": bench_ms(lambda: masked_cross_attention_decode(q, k, v, index, out=out, **kwargs), True),
        "twin graph": bench_ms(lambda: masked_cross_attention_decode_ref(q, k, v, index, out=out_twin, **kwargs),
                               True),
    }
    return {"case": f"xattn decode {mode}", "shape": f"B{batch} H{heads} capacity {capacity_images} images d64",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "twin", **row}


def gated_residual_case(norm="layernorm", per_channel=False, rows=8192, width=4096, dtype=torch.bfloat16) -> dict:
    x = torch.randn(rows, width, device=DEVICE, dtype=dtype)
    y = torch.randn(rows, width, device=DEVICE, dtype=dtype)
    gate = torch.rand(width if per_channel else 1, device=DEVICE) * 1.6 - 0.8
    weight = (1 + 0.3 * torch.randn(width, device=DEVICE)).to(dtype) if norm else None
    bias = (0.2 * torch.randn(width, device=DEVICE)).to(dtype) if norm == "layernorm" else None
    eps = 1e-5
    kwargs = dict(norm=norm, norm_weight=weight, norm_bias=bias, eps=eps)

    def unfused():
        out = x + torch.tanh(gate.to(dtype)) * y
        if norm == "layernorm":
            return out, F.layer_norm(out, (width,), weight, bias, eps)
        if norm == "rmsnorm":
            o32 = out.float()
            return out, weight * (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        return out, None

    o64 = x.double() + torch.tanh(gate.double()) * y.double()
    if norm == "layernorm":
        n64 = torch.nn.functional.layer_norm(o64, (width,), weight.double(), bias.double(), eps)
    elif norm == "rmsnorm":
        n64 = o64 * torch.rsqrt((o64**2).mean(-1, keepdim=True) + eps) * weight.double()
    got = gated_residual(x, y, gate, **kwargs)
    got_twin = gated_residual_ref(x, y, gate, **kwargs)
    plain = unfused()
    if norm is None:
        got, got_twin = (got, None), (got_twin, None)
    row = check(got[0], o64, plain[0], dtype)
    twin_ok = check(got_twin[0], o64, plain[0], dtype)["ok"]
    if norm is not None:
        normed = check(got[1], n64, plain[1], dtype)
        # Report the output (sum or norm) closest to its own bound; mixing one's error with the other's bound
        # would print an error above a bound that was never applied to it.
        worst = max(row, normed, key=lambda c: c["max_err"] / c["bound"])
        row = {"max_err": worst["max_err"], "bound": worst["bound"], "ok": row["ok"] and normed["ok"]}
        twin_ok = twin_ok and check(got_twin[1], n64, plain[1], dtype)["ok"]
    row["twin_ok"] = twin_ok
    ms = {
        "triton": bench_ms(lambda: gated_residual(x, y, gate, **kwargs)),
        "twin": bench_ms(lambda: gated_residual_ref(x, y, gate, **kwargs)),
        "unfused torch": bench_ms(unfused),
    }
    moved = x.numel() * x.element_size() * (4 if norm else 3)  # read x, y; write out (+ normed)
    row["triton_GBps"] = moved / (ms["triton"] * 1e-3) / 1e9
    gate_name = "gate[D]" if per_channel else "gate[1]"
    return {"case": f"gated residual {norm or 'no norm'} {gate_name}", "shape": f"{rows}x{width}",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "unfused torch", **row}


def perceiver_case(images=32, heads=8, latents=64, media=256, dtype=torch.bfloat16) -> dict:
    q = torch.randn(images, latents, heads, 64, device=DEVICE, dtype=dtype).transpose(1, 2)
    km, vm = media_kv(images, heads, media, 64, dtype)
    kl, vl = media_kv(images, heads, latents, 64, dtype)
    k_all, v_all = torch.cat([km, kl], dim=2), torch.cat([vm, vl], dim=2)
    allowed = torch.ones(images, latents, media + latents, dtype=torch.bool, device=DEVICE)
    row = check(perceiver_attention(q, km, vm, kl, vl), attention_formula64(q, k_all, v_all, allowed),
                attention_plain(q, k_all, v_all, allowed), dtype)
    row["twin_ok"] = check(perceiver_attention_ref(q, km, vm, kl, vl), attention_formula64(q, k_all, v_all, allowed),
                           attention_plain(q, k_all, v_all, allowed), dtype)["ok"]

    def reference_way():  # OpenFlamingo: concat, then plain attention
        k, v = torch.cat([km, kl], dim=2), torch.cat([vm, vl], dim=2)
        sim = (q * 64**-0.5) @ k.transpose(-1, -2)
        return (sim - sim.amax(-1, keepdim=True)).softmax(-1) @ v

    ms = {
        "triton": bench_ms(lambda: perceiver_attention(q, km, vm, kl, vl)),
        "twin": bench_ms(lambda: perceiver_attention_ref(q, km, vm, kl, vl)),
        "reference": bench_ms(reference_way),
    }
    return {"case": "perceiver attention", "shape": f"images {images} H{heads} L{latents} M{media} d64",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "reference", **row}


def plan(dry: bool) -> list[tuple[str, object]]:
    """(name, thunk) for every case, the most important first (a budget overrun drops the tail)."""
    p = []
    if dry:
        p += [(f"xattn {m} 2 shots", lambda m=m: xattn_prefill_case(1, 2, m, heads=2))
              for m in ("immediate", "all-previous", "all-previous+bug")]
        p += [(f"decode {m}", lambda m=m: decode_case(4, m, heads=2, capacity_images=3))
              for m in ("immediate", "all-previous", "all-previous+bug")]
        p += [("gated ln", lambda: gated_residual_case("layernorm", rows=16, width=256)),
              ("gated rms gate[D]", lambda: gated_residual_case("rmsnorm", True, rows=16, width=256)),
              ("perceiver", lambda: perceiver_case(images=2, heads=2, media=70))]
        return p
    for shots in (32, 16, 8, 4, 1):
        p.append((f"xattn immediate B4 {shots} shots", lambda s=shots: xattn_prefill_case(4, s, "immediate")))
    p.append(("xattn immediate B1 32 shots", lambda: xattn_prefill_case(1, 32, "immediate")))
    p += [(f"decode {m}", lambda m=m: decode_case(8, m)) for m in ("immediate", "all-previous", "all-previous+bug")]
    p += [(f"gated {n}", lambda n=n: gated_residual_case(n)) for n in ("layernorm", "rmsnorm", None)]
    p.append(("gated rmsnorm gate[D]", lambda: gated_residual_case("rmsnorm", True)))
    p.append(("perceiver bf16", lambda: perceiver_case()))
    p += [(f"xattn {m} B4 32 shots", lambda m=m: xattn_prefill_case(4, 32, m))
          for m in ("all-previous", "all-previous+bug")]
    p += [(f"xattn immediate fp16/fp32 {d}", lambda d=d: xattn_prefill_case(2, 16, "immediate", d))
          for d in (torch.float16, torch.float32)]
    p += [(f"perceiver {d}", lambda d=d: perceiver_case(dtype=d)) for d in (torch.float16, torch.float32)]
    return p


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "uncommitted"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| case | shape | dtype | triton ms | twin ms | baseline | baseline ms | x vs twin | x vs baseline | "
             "max err / bound | kernel ok | twin ok | notes |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | | | | | | | | | FAILED | | {r['error']} |")
            continue
        ms, base = r["ms"], r["baseline"]
        notes = ", ".join(f"{k} {v:.4f} ms" for k, v in ms.items() if k not in ("triton", "twin", base))
        if "triton_GBps" in r:
            notes = (notes + ", " if notes else "") + f"triton {r['triton_GBps']:.0f} GB/s"
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['dtype']} | {ms['triton']:.4f} | {ms['twin']:.4f} | {base} | "
            f"{ms[base]:.4f} | {ms['twin'] / ms['triton']:.2f} | {ms[base] / ms['triton']:.2f} | "
            f"{r['max_err']:.2e} / {r['bound']:.2e} | {'yes' if r['ok'] else 'NO'} | "
            f"{'yes' if r['twin_ok'] else 'NO'} | {notes} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU: interpreter, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=100.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not DRY and not torch.cuda.is_available():
        (args.out / "kernels_gpu.md").write_text("# Kernels on GPU\n\nskipped: no CUDA GPU visible to torch\n")
        print("no CUDA GPU: nothing to run (use --dry-run on a CPU)")
        return 0
    device_name = "CPU (dry run: Triton interpreter)" if DRY else torch.cuda.get_device_name()
    header = (f"# Kernels on GPU\n\n- device: {device_name}; torch {torch.__version__}; triton {triton.__version__}; "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}; commit {_commit()}\n"
              "- times: triton.testing.do_bench medians in ms (decode: also do_bench_cudagraph, the kernel "
              "without Python launch overhead); x = baseline ms / triton ms\n"
              "- check: max |out - float64| <= 2 x plain torch's error at the dtype + atol (tests/helpers.py)")
    start = time.perf_counter()
    rows = []
    for name, thunk in plan(DRY):
        if time.perf_counter() - start > args.budget_s:
            rows.append({"case": name, "error": f"skipped: over the {args.budget_s:.0f} s budget"})
            continue
        t0 = time.perf_counter()
        try:
            row = thunk()
        except Exception as exc:  # record and go on
            row = {"case": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                   "traceback": traceback.format_exc()}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        status = row.get("error") or ("ok" if row["ok"] and row["twin_ok"] else "CHECK FAILED")
        print(f"{name:45s} {row['seconds']:6.1f}s {status}", flush=True)
        (args.out / "kernels_gpu.md").write_text(markdown(rows, header))  # rewritten after every case
        (args.out / "kernels_gpu.json").write_text(json.dumps(rows, indent=1, default=str))
        if not DRY:
            torch.cuda.empty_cache()
    failed = [r for r in rows if "error" in r and not r["error"].startswith("skipped")
              or ("ok" in r and not (r["ok"] and r["twin_ok"]))]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases ok in {time.perf_counter() - start:.0f} s; "
          f"table: {args.out / 'kernels_gpu.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
