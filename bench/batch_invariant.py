"""What the batch-invariant mode costs: the default against `batch_invariant=True`, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/batch_invariant.py [--preset small --shots 4 --batch 4 --repeats 3]

One model (random weights, float32 on the CPU, bf16 on a GPU), two FastFlamingo over its parameters: the default and
the batch-invariant mode (runtime/invariant.py: every row alone). The workload is OpenFlamingo's evaluation
(prompts.build_workload): one `shots`-shot context shared by the `batch` rows, each row with its own query
(`<image>` + 6 tokens). Medians of `repeats` calls (fresh queries each), after one warm-up call of each kind; the
two runtimes alternate call by call:
  TTFT cold   generate(max_new_tokens=1), the context cache cleared before each call (wall time of the call)
  TTFT warm   the same with the context and its images cached
  decode      (generate(1 + new) - generate(1)) / new, warm, no stop token: ms per generated token of the batch
  score       score() of 20 candidates of 1-4 tokens, warm
and each ratio invariant / default. Then, per mode, whether row 0 alone gives the bits it gets in the batch
(greedy ids and logits over 4 tokens): True is the mode's promise; the default may give either.
"""

from __future__ import annotations

import statistics

import torch
from common import build_few_shot_workload, timed, workload_parser

from flamingo_fast.runtime.runtime import FastFlamingo


def seconds(fn, device: str) -> float:
    return timed(fn, 1, device)[0]


def measure(runtimes: dict[str, FastFlamingo], work: list, candidates: list[list[int]], new: int,
            device: str) -> dict[str, dict[str, float]]:
    """Per mode, the medians in ms; the modes alternate call by call (the machine's load hits both alike)."""
    def generate(fast, inputs, tokens):
        vision_x, lang_x, mask, image_mask = inputs
        return lambda: fast.generate(vision_x, lang_x, mask, max_new_tokens=tokens, eos_token_id=[],
                                     image_attention_mask=image_mask)

    def cold(fast, inputs):
        fast.clear_context_cache()
        return seconds(generate(fast, inputs, 1), device)

    def score(fast, inputs):
        vision_x, lang_x, mask, image_mask = inputs
        return seconds(lambda: fast.score(vision_x, lang_x, mask, candidates=candidates,
                                          image_attention_mask=image_mask), device)

    kinds = {"cold": cold, "warm": lambda fast, inputs: seconds(generate(fast, inputs, 1), device),
             "longer": lambda fast, inputs: seconds(generate(fast, inputs, 1 + new), device), "score": score}
    times = {mode: {kind: [] for kind in kinds} for mode in runtimes}
    for index, inputs in enumerate(work):  # the first inputs: warm-up, not counted
        for kind, fn in kinds.items():
            for mode, fast in runtimes.items():
                elapsed = fn(fast, inputs)
                if index:
                    times[mode][kind].append(elapsed)
    out = {}
    for mode, t in times.items():
        m = {kind: 1e3 * statistics.median(values) for kind, values in t.items()}
        out[mode] = {"TTFT cold ms": m["cold"], "TTFT warm ms": m["warm"],
                     "decode ms/token": (m["longer"] - m["warm"]) / new, "score ms": m["score"]}
    return out


def row_alone_equal(fast: FastFlamingo, inputs) -> bool:
    """Row 0 of the batch alone against inside the batch: the same greedy ids and logits, bit for bit?"""
    vision_x, lang_x, mask, image_mask = inputs
    gen = dict(max_new_tokens=4, eos_token_id=[], return_logits=True)
    ids, logits = fast.generate(vision_x, lang_x, mask, image_attention_mask=image_mask, **gen)
    alone = fast.generate(vision_x[:1], lang_x[:1], mask[:1],
                          image_attention_mask=None if image_mask is None else image_mask[:1], **gen)
    return torch.equal(alone[0][0], ids[0]) and torch.equal(alone[1][0], logits[0])


def main() -> None:
    parser = workload_parser(__doc__, shots=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()

    config, model, dtype, work = build_few_shot_workload(args)
    g = torch.Generator().manual_seed(1)
    high = min(1000, config.media_token_id)  # the special tokens sit at the vocabulary's end
    candidates = [torch.randint(10, high, (int(n),), generator=g).tolist()
                  for n in torch.randint(1, 5, (20,), generator=g)]
    options = dict(max_batch_size=args.batch, max_seq_len=work[0][1].shape[1] + args.new_tokens + 4,
                   max_images=args.shots + 1)
    runtimes = {name: FastFlamingo.from_reference(model, batch_invariant=invariant, **options)
                for name, invariant in (("default", False), ("invariant", True))}
    results = measure(runtimes, work, candidates, args.new_tokens, args.device)
    print(f"preset {args.preset}, {args.device}, {dtype}, torch threads {torch.get_num_threads()}, batch "
          f"{args.batch}, {args.shots}-shot context ({work[0][1].shape[1]} tokens per row), {args.new_tokens} new "
          f"tokens, 20 candidates; median of {args.repeats}")
    print("| measure | default | batch_invariant | invariant / default |")
    print("| --- | ---: | ---: | ---: |")
    for key in results["default"]:
        base, inv = results["default"][key], results["invariant"][key]
        print(f"| {key} | {base:.1f} | {inv:.1f} | {inv / base:.2f} |")
    same = {name: row_alone_equal(fast, work[0]) for name, fast in runtimes.items()}
    print(f"row 0 alone == row 0 in the batch (ids and logits, bitwise): default {same['default']}, "
          f"batch_invariant {same['invariant']}")


if __name__ == "__main__":
    main()
