"""One decode step with each weight format, in one run: float32 weights and activations (the CPU default), bf16
weights and activations, int8 weights with bf16 activations (the CPU goal: int8 at most 0.6x float32
and at most 0.8x bf16).

    OMP_NUM_THREADS=1 .venv/bin/python bench/int8_decode.py [--preset small] [--shots 4] [--repeats 7]

All three runtimes are built from one float32 reference (seed 0). Each is prefilled once with the profiler's
`shots`-shot prompt (batch 1); the timed call is one more token through `FastFlamingo.run_decode_step` (the CUDA
graph replay on a GPU), rewriting the same cache column. The formats are timed in turns, `repeats` rounds (the
median per format), so a load change on a shared machine hits all three alike. Prints weight bytes, the step
times, the ratios, and the first token of each (float32's is the yardstick; random weights make near-ties, so
a differing token is reported, not an error).
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import timed

from flamingo_fast import masking
from flamingo_fast.config import from_name
from flamingo_fast.profiling.prompts import build_prompt
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.graphs import DecodeInputs
from flamingo_fast.runtime.runtime import FastFlamingo

FORMATS = {  # label -> from_reference options
    "float32": {},
    "bf16": {"dtype": torch.bfloat16},
    "int8 + bf16": {"dtype": torch.bfloat16, "weights": "int8"},
}


@torch.no_grad()
def decode_step_call(fast: FastFlamingo, vision_x, lang_x, mask):
    """Prefill `lang_x` once -> (a callable running one decode step at the next position, the prefill's token)."""
    device, prompt_len = fast.device, lang_x.shape[1]
    out = fast.generate(vision_x.to(fast.dtype), lang_x, mask, max_new_tokens=1, eos_token_id=[])
    images = masking.images_per_row(lang_x, fast.config.media_token_id).to(torch.int32)
    column = torch.full((1,), prompt_len, dtype=torch.long, device=device)
    inputs = DecodeInputs(token=out[:, -1].clone(), rope_position=column.expand(lang_x.shape[0]).clone(),
                          kv_column=column, prompt_columns=column.clone(), image_index=images - 1,
                          row_images=images)
    return (lambda: fast.run_decode_step(inputs, kv_len=prompt_len + 1, per_row=1, tails=False)), out[:, -1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    config = from_name(args.preset)
    model = build_reference(config, seed=0, device=args.device)
    vision_x, lang_x, mask = build_prompt(config, args.shots, 1, 12, 6, seed=0, dtype=torch.float32,
                                           device=args.device)
    steps, tokens, sizes = {}, {}, {}
    for label, options in FORMATS.items():
        fast = FastFlamingo.from_reference(model, max_batch_size=1, max_seq_len=lang_x.shape[1] + 8,
                                           max_images=args.shots + 1, **options)
        steps[label], tokens[label] = decode_step_call(fast, vision_x, lang_x, mask)
        sizes[label] = sum(fast.weight_bytes().values())
        timed(steps[label], 2, args.device)  # warm-up (and the CUDA graph capture)
    times = {label: [] for label in FORMATS}
    for _ in range(args.repeats):
        for label, step in steps.items():
            times[label] += timed(step, 1, args.device)
    ms = {label: 1e3 * statistics.median(t) for label, t in times.items()}
    print(f"{args.preset}, {args.shots} shots, batch 1, {args.device}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats} rounds")
    print("| weights | weight MB | decode step ms | range ms | vs float32 | vs bf16 | first token |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label in FORMATS:
        low, high = 1e3 * min(times[label]), 1e3 * max(times[label])
        print(f"| {label} | {sizes[label] / 1e6:.1f} | {ms[label]:.2f} | {low:.2f}-{high:.2f} | "
              f"{ms[label] / ms['float32']:.2f}x | {ms[label] / ms['bf16']:.2f}x | {tokens[label].tolist()} |")


if __name__ == "__main__":
    main()
