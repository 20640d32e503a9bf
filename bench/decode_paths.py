"""Decode before and after each decode-path change, in one process over one model: per-token decode time of
FastFlamingo with the new decode paths turned on one at a time (runtime.DECODE_PATHS).

    python bench/decode_paths.py [--preset openflamingo-9b-v1 --shots 32 --batches 1,8 --new-tokens 16]
                                 [--repeats 3 --device cuda --dtype bfloat16 --backend auto --json F --md F]

Configurations, cumulative (each row adds one change to the row above; "before" is today's path):
    before                  none of them
    +fused_projections      LLaMA: one GEMM for q/k/v and one for gate/up
    +rotary_kv_write        rotary + K/V cache write fused, one kernel per layer
    +decode_attention       split-KV decode attention over the valid columns (all three: the default)
then every "all but X" configuration (--leave-one-out), so each change is also measured against the others.

Each configuration builds its own FastFlamingo (CUDA graphs on a GPU), runs one warm-up generate (compiles,
captures), then `repeats` timed ones; decode ms per token is the median over all their decode laps (PhaseTimer,
which synchronises the device at each token). Its greedy tokens and the logits of every new token are compared
with the "before" configuration's (same model, same prompt): in float32 the ids must be identical.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from common import write_results

from flamingo_fast.config import from_name  # noqa: E402
from flamingo_fast.profiling.profile_options import default_device  # noqa: E402
from flamingo_fast.profiling.prompts import build_prompt  # noqa: E402
from flamingo_fast.reference.model import build_reference  # noqa: E402
from flamingo_fast.runtime.decode import DECODE_PATHS  # noqa: E402
from flamingo_fast.runtime.runtime import FastFlamingo  # noqa: E402
from flamingo_fast.timing import PhaseTimer  # noqa: E402


def configurations(leave_one_out: bool) -> list[tuple[str, tuple[str, ...]]]:
    out = [("before", ())]
    for i, name in enumerate(DECODE_PATHS):
        out.append((f"+{name}", DECODE_PATHS[: i + 1]))
    if leave_one_out:
        out += [(f"all but {name}", tuple(n for n in DECODE_PATHS if n != name)) for name in DECODE_PATHS]
    return out


def measure(model, inputs, paths, args, dtype) -> dict:
    vision, lang_x, mask = inputs
    fast = FastFlamingo.from_reference(model, backend=args.backend, max_batch_size=lang_x.shape[0],
                                       max_seq_len=lang_x.shape[1] + args.new_tokens + 2,
                                       max_images=vision.shape[1], decode_paths=paths)
    t0 = time.perf_counter()
    fast.generate(vision, lang_x, mask, max_new_tokens=args.new_tokens, eos_token_id=[])  # warm-up
    warmup_s = time.perf_counter() - t0
    laps, ids = [], None  # every decode lap of every repeat: one median over them all
    for _ in range(args.repeats):
        timer = PhaseTimer(device=args.device)
        ids = fast.generate(vision, lang_x, mask, max_new_tokens=args.new_tokens, eos_token_id=[], timer=timer)
        laps += timer.laps.get("decode", [])
    _, logits = fast.generate(vision, lang_x, mask, max_new_tokens=args.new_tokens, eos_token_id=[],
                              return_logits=True)
    result = {"decode_ms": 1e3 * statistics.median(laps),
              "decode_ms_p90": 1e3 * sorted(laps)[round(0.9 * (len(laps) - 1))],
              "warmup_s": warmup_s, "ids": ids[:, lang_x.shape[1]:].cpu(), "logits": logits.float().cpu()}
    del fast
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="openflamingo-9b-v1")
    parser.add_argument("--shots", type=int, default=32)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=default_device())
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on the CPU")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--leave-one-out", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 on a shared CPU: 2 threads under other load ran 100x slower here)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device == "cuda" else torch.float32)
    config = from_name(args.preset)
    model = build_reference(config, seed=0, dtype=dtype, device=args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    head = (f"{args.preset}, {device_name}, {dtype}, backend {args.backend}, {args.shots} shots, "
            f"{args.new_tokens} new tokens, median of {args.repeats} runs' decode laps after 1 warm-up")
    lines = [head, "", "| config | batch | decode ms p50 | p90 | x before | warm-up s | same ids as before | "
             "logits max abs diff vs before |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        inputs = build_prompt(config, args.shots, batch, 12, 6, seed=0, dtype=dtype, device=args.device)
        before = None
        for name, paths in configurations(args.leave_one_out):
            r = measure(model, inputs, paths, args, dtype)
            before = before or r
            same = float((r["ids"] == before["ids"]).float().mean())
            diff = float((r["logits"] - before["logits"]).abs().max())
            speedup = before["decode_ms"] / r["decode_ms"]
            rows.append({"config": name, "paths": list(paths), "batch": batch, "decode_ms": r["decode_ms"],
                         "decode_ms_p90": r["decode_ms_p90"], "x_before": speedup, "warmup_s": r["warmup_s"],
                         "same_ids": same, "logits_max_abs_diff": diff})
            lines.append(f"| {name} | {batch} | {r['decode_ms']:.3f} | {r['decode_ms_p90']:.3f} | {speedup:.2f} | "
                         f"{r['warmup_s']:.1f} | {100 * same:.0f}% | {diff:.2e} |")
            print(lines[-1], flush=True)
            write(args, head, lines, rows, complete=False)  # a timeout keeps the rows measured so far
    write(args, head, lines, rows, complete=True)
    print("\n" + "\n".join(lines))
    return 0


def write(args, head: str, lines: list[str], rows: list[dict], complete: bool) -> None:
    note = [] if complete else ["", "(partial: rows still being measured)"]
    if args.md:
        args.md.write_text("\n".join(lines + note) + "\n")
    if args.json:
        write_results(args.json, {"header": head, "rows": rows, "complete": complete}, args.device)


if __name__ == "__main__":
    sys.exit(main())
