"""Rank classification, OpenFlamingo's way against flamingo_fast's, in one run.

    .venv-openflamingo/bin/python bench/score_cpu.py --candidates 200,1000      (needs `make setup-openflamingo`)

Per row count of candidates: a `small`-preset random model, a 4-shot prompt per row (prompts.build_prompt),
batch 4, candidates of 1-5 random text tokens (seeded). Times, on the same weights:
  openflamingo   OpenFlamingo's get_rank_classifications loop (OpenFlamingoBaseline.score: cached prompt, one
                 cached forward per candidate)
  fast           FastFlamingo.score (prompt once per row, candidate trie, batched passes), default options
                 (its passes sized by score_bytes) unless --score-bytes / --max-hypotheses / --max-tail-len
and prints each one's seconds, the ratio, the largest relative difference of the scores and whether every
row's argmax agrees. --json writes the rows.

--loop times the per-class loop instead, as OpenFlamingo's evaluation drives it (EvalModel's
get_rank_classifications with use_cache=True: one token per call, log-softmax of the concatenated logits per
class): on OpenFlamingo's model and on the drop-in's forward(past_key_values=...), with each one's largest
relative difference from the correct values (`score`, = OpenFlamingo's use_cache=False) and score's time:

    .venv-openflamingo/bin/python bench/score_cpu.py --loop --candidates 200
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import build_models, write_results

import flamingo_fast
from flamingo_fast.config import from_name
from flamingo_fast.profiling.baselines import EvalModelCalls, OpenFlamingoBaseline, to_openflamingo


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
    parser.add_argument("--max-hypotheses", type=int, help="FastFlamingo's max_hypotheses (default: its default)")
    parser.add_argument("--max-tail-len", type=int, help="FastFlamingo's max_tail_len (default: its default)")
    parser.add_argument("--score-bytes", type=int, help="FastFlamingo's score_bytes (default: its default)")
    parser.add_argument("--repeats", type=int, default=1, help="median of this many calls of each (alternating)")
    parser.add_argument("--loop", action="store_true",
                        help="time the per-class loop instead (EvalModel's use_cache=True), drop-in and OpenFlamingo")
    parser.add_argument("--json")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = from_name(args.preset)
    options = {name: value for name, value in (("max_hypotheses", args.max_hypotheses),
                                               ("max_tail_len", args.max_tail_len),
                                               ("score_bytes", args.score_bytes)) if value is not None}
    model, fast, (vision, lang_x, mask) = build_models(args.preset, args.shots, args.batch, 8, "cpu",
                                                       backend="torch", max_images=args.shots + 1, **options)
    if args.loop:
        return per_class_loop(args, to_openflamingo(model), fast, vision, lang_x, mask)
    baseline = OpenFlamingoBaseline(to_openflamingo(model))
    rows = []
    print(f"preset {args.preset}, {args.shots}-shot prompt ({lang_x.shape[1]} tokens), batch {args.batch}, "
          f"candidates of 1-5 tokens, CPU float32, {torch.get_num_threads()} threads")
    print("| candidates | openflamingo s | fast s | ratio | max rel diff | same argmax |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for count in [int(c) for c in args.candidates.split(",")]:
        candidates = random_candidates(count, 3, config.eoc_token_id, seed=count)
        fast.score(vision, lang_x, mask, candidates=candidates[:8], progress=False)  # warm-up
        base_times, fast_times = [], []
        for _ in range(args.repeats):  # alternating, so a change in the machine's load reaches both
            base_s, expected = timed(baseline.score, vision, lang_x, mask, candidates=candidates)
            fast_s, got = timed(fast.score, vision, lang_x, mask, candidates=candidates, progress=False)
            base_times.append(base_s)
            fast_times.append(fast_s)
        base_s, fast_s = statistics.median(base_times), statistics.median(fast_times)
        rel = float(((got - expected).abs() / expected.abs()).max())
        same = bool(torch.equal(got.argmax(dim=1), expected.argmax(dim=1)))
        rows.append(dict(candidates=count, openflamingo_s=base_s, fast_s=fast_s, ratio=base_s / fast_s,
                         max_rel_diff=rel, same_argmax=same))
        print(f"| {count} | {base_s:.2f} | {fast_s:.2f} | {base_s / fast_s:.1f}x | {rel:.1e} | {same} |", flush=True)
    if args.json:
        write_results(args.json, dict(args=vars(args), rows=rows))


def per_class_loop(args, of_model, fast, vision, lang_x, mask) -> None:
    """--loop: OpenFlamingo's EvalModel.get_rank_classifications(use_cache=True), one token per call and the
    log-softmax of the concatenated logits per class (baselines.EvalModelCalls), on OpenFlamingo's model and on
    the drop-in, the same weights; both against `score` (= OpenFlamingo's use_cache=False values)."""
    drop_in = flamingo_fast.from_openflamingo(of_model, backend="torch", max_batch_size=args.batch,
                                              max_images=args.shots + 1)
    mask = mask.bool()
    rows = []
    print("| candidates | openflamingo loop s | drop-in loop s | ratio | drop-in max rel diff | openflamingo max rel "
          "diff | score s |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for count in [int(c) for c in args.candidates.split(",")]:
        names = random_candidates(count, 3, fast.config.eoc_token_id, seed=count)
        EvalModelCalls(drop_in).get_rank_classifications(vision, lang_x, mask, names[:4], True, False)  # warm-up
        times = {"openflamingo": [], "drop_in": [], "score": []}
        for _ in range(args.repeats):  # alternating, so a change in the machine's load reaches all
            base_s, of_loop = timed(EvalModelCalls(of_model).get_rank_classifications, vision, lang_x, mask, names,
                                    True, False)
            loop_s, ours = timed(EvalModelCalls(drop_in).get_rank_classifications, vision, lang_x, mask, names,
                                 True, False)
            score_s, expected = timed(drop_in.score, vision, lang_x, mask, candidates=names, progress=False)
            for name, value in (("openflamingo", base_s), ("drop_in", loop_s), ("score", score_s)):
                times[name].append(value)
        base_s, loop_s, score_s = (statistics.median(times[n]) for n in ("openflamingo", "drop_in", "score"))
        rel = float(((ours - expected).abs() / expected.abs()).max())
        of_rel = float(((of_loop - expected).abs() / expected.abs()).max())
        rows.append(dict(candidates=count, openflamingo_loop_s=base_s, drop_in_loop_s=loop_s, ratio=base_s / loop_s,
                         drop_in_max_rel_diff=rel, openflamingo_max_rel_diff=of_rel, score_s=score_s))
        print(f"| {count} | {base_s:.2f} | {loop_s:.2f} | {base_s / loop_s:.2f}x | {rel:.1e} | {of_rel:.1e} | "
              f"{score_s:.2f} |", flush=True)
    if args.json:
        write_results(args.json, dict(args=vars(args), rows=rows))


if __name__ == "__main__":
    main()
