"""Masked cross-attention on the CPU, per shot count: the reference's dense masked attention vs the
segment-indexed torch twin, timed in the same run (median of repeats, warm-up excluded). Prints a markdown
table for bench/RESULTS.md.

    python bench/sweep_xattn_cpu.py [--shots 0,1,4,8,16,32] [--repeats 9] [--chunk N]

Shape: the `small` preset's cross-attention (B 1, H 8, d 64, fp32, 64 latents per image), T = 8 + 32 * shots.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
from pathlib import Path

import torch
from bench_kernels import dense_masked_cross_attention, xattn_prompt
from common import median_seconds

from flamingo_fast.kernels import masked_cross_attention as mca


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="0,1,4,8,16,32")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--chunk", type=int, default=None, help="override the twin's query chunk (REF_CHUNK)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine more threads time the "
                             "scheduler, not the op)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.chunk:
        mca.REF_CHUNK = args.chunk
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or "uncommitted"
    print(f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {datetime.date.today().isoformat()}; commit {commit}; twin chunk "
          f"{mca.REF_CHUNK}; median of {args.repeats}\n")
    print("| shots | T | dense ms | twin ms | dense / twin | dense us/token | twin us/token |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shots in (int(s) for s in args.shots.split(",")):
        q, k, v, index = xattn_prompt(shots)
        T = q.shape[2]
        twin = lambda: mca.masked_cross_attention_ref(q, k, v, index)  # noqa: B023
        dense = lambda: dense_masked_cross_attention(q, k, v, index)  # noqa: B023
        torch.testing.assert_close(twin(), dense(), rtol=1e-5, atol=1e-5)
        dense_s = median_seconds(dense, repeats=args.repeats)
        twin_s = median_seconds(twin, repeats=args.repeats)
        print(f"| {shots} | {T} | {dense_s * 1e3:.3f} | {twin_s * 1e3:.3f} | {dense_s / twin_s:.2f} | "
              f"{dense_s * 1e6 / T:.2f} | {twin_s * 1e6 / T:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
