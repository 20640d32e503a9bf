"""Device copy bandwidth, and decode time as a percentage of the memory-bandwidth floor.

    python bench/bandwidth.py measure --out OUT/bandwidth.json [--device cuda] [--gib 4]
    python bench/bandwidth.py floor --bandwidth OUT/bandwidth.json --profile OUT/profile_b1.json ... \\
        --json OUT/floor.json --md OUT/floor.md
    python bench/bandwidth.py weights [--preset openflamingo-9b-v1 idefics-80b] [--format bf16 int8]

measure: a device-to-device copy of `--gib` GiB, timed with CUDA events (perf_counter on the CPU), median of
`--repeats` copies after warm-up; bandwidth = (bytes read + bytes written) / time.

floor: a decode step must at least read, once each:
    LM weights          every decoder layer, the final norm and lm_head (the embedding: one row per token)
    xattn weights       every gated block except `to_kv` (the media K/V are computed once per prompt)
    self-attn KV cache  2 x layers x batch x kv_heads x head_dim x context, context = prompt + new_tokens / 2
                        (the mean over the decode steps)
    media K/V           2 x xattn layers x batch x 64 latents x inner dim: the current image only in immediate
                        mode, every image up to it otherwise
With int8 weights (a profile row whose `weights` is "int8": FastFlamingo.from_reference(weights="int8")) every
nn.Linear weight of the LM, the gated blocks and the output head counts 1 byte per element + a float32 scale
per output row (runtime/quantize.py); biases, norms and gates stay in the activation dtype.
weights: the bytes FastFlamingo.weight_bytes() counts per preset and weight format, for runtimes built on the
meta device (no memory, no random init; bfloat16 activations), and what is left of each card in report.CARDS_GB
(an H200's 141 GB, an 80 GB and a 24 GB card).
floor_ms = bytes / measured bandwidth; `pct_of_floor` = decode_ms_p50 / floor_ms x 100 (100 % = at the floor)
and `bandwidth_util` = floor_ms / decode_ms_p50.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from flamingo_fast.config import FlamingoConfig, from_name
from flamingo_fast.profiling import report
from flamingo_fast.reference.model import Flamingo

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
INT8_PARTS = ("lm_layers", "xattn_read", "lm_head")  # where weights="int8" quantizes the matrices


def measure_copy_bandwidth(device: str, nbytes: int, repeats: int = 20, warmup: int = 3) -> dict:
    """Median device-to-device copy time of `nbytes`; GB/s counts the bytes read plus the bytes written."""
    dev = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
    dst = torch.empty_like(src)
    for _ in range(warmup):
        dst.copy_(src)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {
        "device": str(dev), "device_name": name, "bytes": nbytes, "repeats": repeats,
        "median_s": median, "min_s": min(times), "max_s": max(times),
        "copy_GBps": 2 * nbytes / median / 1e9, "peak_copy_GBps": 2 * nbytes / min(times) / 1e9,
    }


def parameter_counts(config: FlamingoConfig) -> dict[str, int]:
    """Elements per part of the model, counted on the meta device (no memory, no init cost); `linear_<part>` and
    `rows_<part>` (part: lm_layers, xattn_read, lm_head): the elements and output rows of the matrices that
    weights="int8" quantizes (every nn.Linear weight there, and the whole output head)."""
    with torch.device("meta"):
        model = Flamingo(config)
    counts = {"lm_layers": 0, "lm_norm": 0, "lm_head": 0, "embed": 0, "xattn_read": 0, "xattn_to_kv": 0, "other": 0}
    counts |= {f"{kind}_{part}": 0 for kind in ("linear", "rows") for part in INT8_PARTS}
    linear_weights = {f"{name}.weight" for name, module in model.named_modules() if type(module) is nn.Linear}
    for name, param in model.named_parameters():
        n = param.numel()
        xattn = name.startswith("lang_encoder.gated_cross_attn_layers.") and ".attn.to_kv." not in name
        part = ("lm_layers" if name.startswith("lang_encoder.model.layers.") else "xattn_read" if xattn else
                "lm_head" if name.startswith("lang_encoder.lm_head.") else None)
        if part and (name in linear_weights or part == "lm_head" and param.dim() == 2):
            counts[f"linear_{part}"] += n
            counts[f"rows_{part}"] += param.shape[0]
        if name.startswith("lang_encoder.model.layers."):
            counts["lm_layers"] += n
        elif name.startswith("lang_encoder.model.norm."):
            counts["lm_norm"] += n
        elif name.startswith("lang_encoder.lm_head."):
            counts["lm_head"] += n
        elif name.startswith("lang_encoder.model.embed_tokens."):
            counts["embed"] += n
        elif name.startswith("lang_encoder.gated_cross_attn_layers."):
            counts["xattn_to_kv" if ".attn.to_kv." in name else "xattn_read"] += n
        else:
            counts["other"] += n  # vision encoder and perceiver: not read by a decode step
    if config.lm.tie_word_embeddings:
        counts["lm_head"] = config.lm.vocab_size * config.lm.hidden_size  # shared with the embedding, read whole
        counts["linear_lm_head"], counts["rows_lm_head"] = counts["lm_head"], config.lm.vocab_size
    return counts


def decode_bytes_per_step(config: FlamingoConfig, batch: int, context: float, images: int, dtype_bytes: int,
                          counts: dict[str, int] | None = None, weights: str | None = None) -> dict[str, float]:
    """Bytes a decode step must read at least (see the module docstring), by part; `weights="int8"`: the
    quantized matrices at 1 byte per element + 4 per output row."""
    counts = counts or parameter_counts(config)
    lm = config.lm
    xattn_layers = len(config.xattn_layer_indices)
    media_images = 1 if config.only_attend_immediate_media else images
    inner = config.xattn_heads * config.xattn_dim_head
    parts = {
        "lm_weights": (counts["lm_layers"] + counts["lm_norm"] + counts["lm_head"] + batch * lm.hidden_size),
        "xattn_weights": counts["xattn_read"],
        "self_kv": 2 * lm.num_layers * batch * lm.num_kv_heads * lm.head_dim * context,
        "media_kv": 2 * xattn_layers * batch * media_images * config.perceiver.num_latents * inner,
    }
    parts = {k: v * dtype_bytes for k, v in parts.items()}
    if weights == "int8":
        for part, key in (("lm_layers", "lm_weights"), ("lm_head", "lm_weights"), ("xattn_read", "xattn_weights")):
            parts[key] += counts[f"linear_{part}"] * (1 - dtype_bytes) + 4 * counts[f"rows_{part}"]
    parts["total"] = sum(parts.values())
    return parts


def floor_rows(profile: dict, bandwidth_GBps: float) -> list[dict]:
    meta = profile["metadata"]
    config = from_name(meta["preset"])
    dtype_bytes = DTYPE_BYTES[meta["dtype"]]
    counts = parameter_counts(config)
    rows = []
    for row in profile["rows"]:
        context = row["prompt_tokens"] + row["new_tokens"] / 2
        parts = decode_bytes_per_step(config, row["batch"], context, row["images"], dtype_bytes, counts,
                                      weights=row.get("weights"))
        floor_ms = parts["total"] / (bandwidth_GBps * 1e9) * 1e3
        decode = row["decode_ms_p50"]
        rows.append({
            "impl": row["impl"], "weights": row.get("weights"), "batch": row["batch"], "shots": row["shots"],
            "prompt_tokens": row["prompt_tokens"],
            "decode_ms_p50": decode, "floor_ms": floor_ms, "bytes_per_step": parts["total"],
            "bytes_parts": parts, "pct_of_floor": 100 * decode / floor_ms if floor_ms > 0 else None,
            "bandwidth_util": floor_ms / decode if decode and decode > 0 else None,
            "achieved_GBps": parts["total"] / (decode / 1e3) / 1e9 if decode and decode > 0 else None,
            "speedup_decode_p50": row.get("speedup_decode_p50"),
        })
    return rows


CARDS_GB = report.CARDS_GB  # nominal memory, 1e9 bytes: the cards `profile --device meta` reports too


def weight_bytes_table(presets: list[str], formats: list[str]) -> str:
    """Markdown: FastFlamingo.weight_bytes() by dtype per preset and weight format (runtimes on the meta device,
    bfloat16 activations) and the GB each card keeps after the weights (negative: the weights do not fit)."""
    from flamingo_fast.reference.model import build_reference
    from flamingo_fast.runtime.runtime import FastFlamingo

    lines = ["| preset | weights | int8 GB | float GB | total GB | " + " | ".join(f"left on {c}" for c in CARDS_GB)
             + " |", "| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(CARDS_GB)]
    for preset in presets:
        model = build_reference(from_name(preset), device="meta")
        for weights in formats:
            counted = FastFlamingo.from_reference(model, weights=weights, dtype=torch.bfloat16).weight_bytes()
            total = sum(counted.values()) / 1e9
            int8 = counted.get("int8", 0) / 1e9
            lines.append(f"| {preset} | {weights} | {int8:.2f} | {total - int8:.2f} | {total:.2f} | "
                         + " | ".join(f"{gb - total:.1f}" for gb in CARDS_GB.values()) + " |")
    return "\n".join(lines)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_floor_table(rows: list[dict], bandwidth: dict) -> str:
    gib = bandwidth["bytes"] / 2**30
    lines = [
        f"decode vs the memory-bandwidth floor; copy bandwidth {bandwidth['copy_GBps']:.0f} GB/s "
        f"({bandwidth['device_name']}, median of {bandwidth['repeats']} copies of {gib:.2f} GiB)",
        "",
        "| impl | batch | shots | prompt tok | MB read/step | floor ms | decode ms p50 | % of floor | BW util "
        "| x baseline |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    f = _fmt
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['batch']} | {r['shots']} | {r['prompt_tokens']} | {r['bytes_per_step'] / 1e6:.1f} "
            f"| {f(r['floor_ms'], 3)} | {f(r['decode_ms_p50'])} | {f(r['pct_of_floor'], 0)} | "
            f"{f(r['bandwidth_util'])} | {f(r['speedup_decode_p50'])} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    m = commands.add_parser("measure", help="device-to-device copy bandwidth")
    m.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    m.add_argument("--gib", type=float, default=None, help="bytes copied (default: 4 GiB on CUDA, 0.25 on CPU)")
    m.add_argument("--repeats", type=int, default=20)
    m.add_argument("--out", required=True, help="JSON path")
    f = commands.add_parser("floor", help="decode time vs the bandwidth floor, from profile JSON files")
    f.add_argument("--bandwidth", required=True, help="JSON written by `measure`")
    f.add_argument("--profile", nargs="+", required=True, help="JSON written by `flamingo-fast profile --json`")
    f.add_argument("--json", help="output JSON path")
    f.add_argument("--md", help="output markdown path")
    w = commands.add_parser("weights", help="weight bytes per preset and format (FastFlamingo.weight_bytes)")
    w.add_argument("--preset", nargs="+", default=["openflamingo-9b-v1", "idefics-80b"])
    w.add_argument("--format", nargs="+", default=["bf16", "int8"], choices=["bf16", "int8"])
    args = parser.parse_args(argv)

    if args.command == "weights":
        print(weight_bytes_table(args.preset, args.format))
        return 0

    if args.command == "measure":
        gib = args.gib if args.gib is not None else (4.0 if torch.device(args.device).type == "cuda" else 0.25)
        result = measure_copy_bandwidth(args.device, int(gib * 2**30), args.repeats)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"{result['device_name']}: copy {result['copy_GBps']:.1f} GB/s (read + write, median of "
              f"{result['repeats']} x {gib:g} GiB)")
        return 0

    bandwidth = json.loads(Path(args.bandwidth).read_text())
    rows, missing = [], []
    for path in args.profile:
        if not Path(path).exists():
            missing.append(path)
            continue
        profile = json.loads(Path(path).read_text())
        rows += floor_rows(profile, bandwidth["copy_GBps"])
    table = format_floor_table(rows, bandwidth)
    if missing:
        table += "\n\nmissing profile files (step failed or timed out): " + ", ".join(missing)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth": bandwidth, "rows": rows}, indent=2) + "\n")
    if args.md:
        Path(args.md).write_text(table + "\n")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
