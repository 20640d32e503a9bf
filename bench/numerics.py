"""Is the fast path's bf16 error rounding, or a bug? The tolerance rule (tests/helpers.py) at a real model size.

Builds one random-weight model in float32 (the ground truth) and, from the same weights, the bf16 reference and
the bf16 FastFlamingo; compares each one's logits with the float32 reference's. The fast path passes when its
error is at most twice the bf16 reference's (the error of plain torch at that dtype) plus a small atol.

    python bench/numerics.py --preset openflamingo-9b-v1 --shots 4 --batch 2 [--device cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from common import write_results

from flamingo_fast.config import from_name  # noqa: E402
from flamingo_fast.profiling.prompts import build_prompt  # noqa: E402
from flamingo_fast.reference.model import build_reference  # noqa: E402
from flamingo_fast.runtime.runtime import FastFlamingo  # noqa: E402

ATOL_REL = 1e-3  # slack on the relative error, for cases where plain torch happens to be nearly exact


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@torch.no_grad()
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="openflamingo-9b-v1")
    parser.add_argument("--shots", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    config = from_name(args.preset)
    model32 = build_reference(config, seed=0, dtype=torch.float32, device=args.device)
    vision, lang_x, mask = build_prompt(config, args.shots, args.batch, 12, 6, seed=0, dtype=torch.float32,
                                        device=args.device)
    seq = lang_x.shape[1] + args.new_tokens
    truth = model32(vision, lang_x, mask)
    fast32 = FastFlamingo.from_reference(model32, max_batch_size=args.batch, max_seq_len=seq)
    fast16 = FastFlamingo.from_reference(model32, dtype=torch.bfloat16, max_batch_size=args.batch, max_seq_len=seq)
    ref16 = fast16.model  # the bf16 reference: the same converted weights the bf16 fast path runs
    real = mask.bool()
    rows = {
        "reference bf16": ref16(vision.bfloat16(), lang_x, mask),
        "fast bf16": fast16(vision.bfloat16(), lang_x, mask),
        "fast fp32": fast32(vision, lang_x, mask),
    }
    result = {"preset": args.preset, "shots": args.shots, "batch": args.batch, "prompt_tokens": lang_x.shape[1],
              "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "torch": torch.__version__, "errors_vs_fp32_reference": {}}
    for name, logits in rows.items():
        result["errors_vs_fp32_reference"][name] = {
            "rel_err_all": rel_err(logits[real], truth[real]),
            "rel_err_last": rel_err(logits[:, -1], truth[:, -1]),
            "argmax_agree_last": float((logits[:, -1].argmax(-1) == truth[:, -1].argmax(-1)).float().mean()),
        }
    errs = result["errors_vs_fp32_reference"]
    bound = 2 * errs["reference bf16"]["rel_err_all"] + ATOL_REL
    result["bf16_bound"] = bound
    result["fast_bf16_ok"] = errs["fast bf16"]["rel_err_all"] <= bound
    ids32 = model32.generate(vision, lang_x, mask, max_new_tokens=args.new_tokens, eos_token_id=[])
    result["fast_fp32_greedy_ids_equal"] = bool(torch.equal(
        fast32.generate(vision, lang_x, mask, max_new_tokens=args.new_tokens, eos_token_id=[]), ids32))
    result["seconds"] = round(time.perf_counter() - start, 1)

    print(f"{args.preset}, {result['device']}, {args.shots} shots, batch {args.batch}, "
          f"{lang_x.shape[1]} prompt tokens; errors against the float32 reference's logits")
    print("| implementation | rel err (all real tokens) | rel err (last token) | top-1 agrees (last) |")
    print("| --- | ---: | ---: | ---: |")
    for name, e in errs.items():
        print(f"| {name} | {e['rel_err_all']:.2e} | {e['rel_err_last']:.2e} | {100 * e['argmax_agree_last']:.0f}% |")
    print(f"fast bf16 within 2 x reference bf16 + {ATOL_REL}: {result['fast_bf16_ok']} (bound {bound:.2e}); "
          f"fast fp32 greedy ids == reference fp32: {result['fast_fp32_greedy_ids_equal']}")
    if args.json:
        write_results(args.json, result, args.device)
    return 0 if result["fast_bf16_ok"] and result["fast_fp32_greedy_ids_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
