"""Rank classification, OpenFlamingo's way against flamingo_fast's, in one run (issue 11).

    .venv-openflamingo/bin/python bench/score_cpu.py --candidates 200,1000      (needs `make setup-openflamingo`)

Per row count of candidates: a `small`-preset random model, a 4-shot prompt per row (prompts.build_prompt),
batch 4, candidates of 1-5 random text tokens (seeded). Times, on the same weights:
  openflamingo   OpenFlamingo's get_rank_classifications loop (OpenFlamingoBaseline.score: cached prompt, one
                 cached forward per candidate)
  fast           FastFlamingo.score (prompt once per row, candidate trie, batched passes)
and prints each one's seconds, the ratio, the largest relative difference of the scores and whether every
row's argmax agrees. --json writes the rows.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import build_models, write_results

from flamingo_fast.baselines import OpenFlamingoBaseline, to_openflamingo
from flamingo_fast.config import from_name


def random_candidates(count: int, low: int, high: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (count,), generator=g).tolist()
    return [torch.randint(low, high, (n,), generator=g).tolist() for n in lengths]


def timed(score, *args, **kwargs) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = score(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--candidates", default="200,1000", help="comma-separated candidate counts")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-hypotheses", type=int, default=512, help="FastFlamingo's pass size (all rows)")
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = from_name(args.preset)
    model, fast, (vision, lang_x, mask) = build_models(args.preset, args.shots, args.batch, 8, "cpu",
                                                       backend="torch", max_images=args.shots + 1,
                                                       max_hypotheses=args.max_hypotheses, max_tail_len=4)
    baseline = OpenFlamingoBaseline(to_openflamingo(model))
    rows = []
    print(f"preset {args.preset}, {args.shots}-shot prompt ({lang_x.shape[1]} tokens), batch {args.batch}, "
          f"candidates of 1-5 tokens, CPU float32, {torch.get_num_threads()} threads")
    print("| candidates | openflamingo s | fast s | ratio | max rel diff | same argmax |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for count in [int(c) for c in args.candidates.split(",")]:
        candidates = random_candidates(count, 3, config.eoc_token_id, seed=count)
        fast.score(vision, lang_x, mask, candidates=candidates[:8], progress=False)  # warm-up
        base_s, expected = timed(baseline.score, vision, lang_x, mask, candidates=candidates)
        fast_s, got = timed(fast.score, vision, lang_x, mask, candidates=candidates, progress=False)
        rel = float(((got - expected).abs() / expected.abs()).max())
        same = bool(torch.equal(got.argmax(dim=1), expected.argmax(dim=1)))
        rows.append(dict(candidates=count, openflamingo_s=base_s, fast_s=fast_s, ratio=base_s / fast_s,
                         max_rel_diff=rel, same_argmax=same))
        print(f"| {count} | {base_s:.2f} | {fast_s:.2f} | {base_s / fast_s:.1f}x | {rel:.1e} | {same} |", flush=True)
    if args.json:
        write_results(args.json, dict(args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
