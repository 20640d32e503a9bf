"""What the per-call weight check costs (flamingo_fast/runtime/weight_watch.py): FastFlamingo's check at every entry
point and the drop-in's pointer check, against a whole warm few-shot generate call on the same preset.

    python bench/weight_watch.py [--preset small] [--shots 4] [--new-tokens 5]

Prints the tensor count and the median time per call of each (microseconds), and the generate call's (ms).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import build_models


def median_us(fn, repeats: int = 2000) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, fast, (vision, ids, mask) = build_models(args.preset, args.shots, 1, args.new_tokens, "cpu", backend="torch")
    watch = fast.weight_watch
    check, moved = median_us(watch.check), median_us(watch.moved)
    fast.generate(vision, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=[])  # warm the context cache
    calls = []
    for _ in range(3):
        start = time.perf_counter()
        fast.generate(vision, ids, mask, max_new_tokens=args.new_tokens, eos_token_id=[])
        calls.append(time.perf_counter() - start)
    print(f"{args.preset}: {len(watch.tensors)} tensors; check {check:.0f} us, moved {moved:.0f} us per call; "
          f"a warm {args.shots}-shot generate of {args.new_tokens} tokens {statistics.median(calls) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
