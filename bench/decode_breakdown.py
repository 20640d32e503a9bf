"""Where a decode step's device time goes: torch.profiler over eager decode steps, kernels grouped by name.

    python bench/decode_breakdown.py --preset openflamingo-9b-v1 --shots 8 [--steps 4] [--md PATH]

Runs FastFlamingo with CUDA graphs off, so each kernel shows up on its own (under a graph the same kernels run
back to back, without the CPU launch gaps this view also contains).
FLAMINGO_FAST_OLD_DECODE=fused_projections,rotary_kv_write,decode_attention gives the breakdown before the decode paths'
changes (runtime.DECODE_PATHS); the header names the decode paths in use.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from common import build_models


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="openflamingo-9b-v1")
    parser.add_argument("--shots", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("decode_breakdown: needs a CUDA GPU (none visible to torch)")
        return 0
    _, fast, (vision, lang_x, mask) = build_models(args.preset, args.shots, 1, args.steps + 2, "cuda",
                                                   cuda_graphs=False)
    fast.generate(vision, lang_x, mask, max_new_tokens=args.steps + 1, eos_token_id=[])  # warm-up, compiles
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        fast.generate(vision, lang_x, mask, max_new_tokens=args.steps + 1, eos_token_id=[])
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    if not events:  # a profiler that does not tag kernel rows: print its own table instead
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.rows))
        return 0
    events.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in events)
    count = sum(e.count for e in events)
    lines = [f"{args.preset}, {torch.cuda.get_device_name()}, bf16, {args.shots} shots, one prefill + {args.steps} "
             f"decode steps, graphs off, decode paths {sorted(fast.decode_paths) or 'all old'}: {count} kernels, "
             f"{total_us / 1e3:.2f} ms of device time",
             "", "| kernel | calls | device ms | share |", "| --- | ---: | ---: | ---: |"]
    for e in events[: args.rows]:
        share = e.self_device_time_total / total_us
        lines.append(f"| {e.key[:90]} | {e.count} | {e.self_device_time_total / 1e3:.3f} | {100 * share:.1f}% |")
    text = "\n".join(lines)
    print(text)
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
