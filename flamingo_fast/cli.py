"""`flamingo-fast` (also `python -m flamingo_fast`): command-line entry points.

    flamingo-fast profile --preset small --shots 0,1,2,4,8,16,32 --impl reference,fast \\
        --new-tokens 16 --repeats 3 --warmup 1 --json out/profile.json --csv out/profile.csv --plot out/profile.png

prints a markdown table (one row per batch x shot count x implementation) and writes the files asked for.

    flamingo-fast profile --preset idefics-80b --impl fast --weights bf16,int8 --device meta

runs nothing: builds on the meta device (no memory) and prints each row's weight bytes, caches and what a card keeps.

    flamingo-fast profile --preset mllama-11b --device meta

the same for Llama 3.2 Vision (bf16 and int8 rows by default, and how many 4-tile images' cross-attention K/V fit
beside the weights); no transformers needed (profiling/mllama_profile.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .config import PRESETS
from .profiling import profile_options, profiler, report
from .reference.mllama_config import MLLAMA_PRESETS


def _int_list_type(name: str, minimum: int):
    def parse(text: str) -> list[int]:
        try:
            return profile_options.parse_int_list(text, name, minimum)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return parse


def _weights_list(text: str) -> list[str]:
    try:
        return profile_options.parse_weights(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _impl_list(text: str) -> list[str]:
    impls = [item.strip() for item in text.split(",") if item.strip()]
    for impl in impls:
        if impl not in profile_options.IMPLEMENTATIONS:
            raise argparse.ArgumentTypeError(
                f"impl={impl!r}: unknown implementation; expected a comma-separated list of "
                f"{', '.join(profile_options.IMPLEMENTATIONS)} (the first is the baseline)"
            )
    if not impls:
        raise argparse.ArgumentTypeError(f"impl={text!r}: expected at least one implementation")
    return impls


def _non_negative_int(name: str, minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name}={text!r}: expected an integer >= {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{name}={value}: expected an integer >= {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flamingo-fast", description="Flamingo inference runtime tools")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "profile",
        help="latency per shot count: vision, prefill, decode per token, memory; baseline vs fast",
        description=profiler.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", default="small", choices=sorted(PRESETS) + sorted(MLLAMA_PRESETS),
                   help="model shapes (random weights); mllama-*: Llama 3.2 Vision (transformers' "
                        "MllamaForConditionalGeneration), profiled with --impl hf,fast")
    p.add_argument("--shots", type=_int_list_type("shots", 0), default=list(profile_options.DEFAULT_SHOTS),
                   help="comma-separated shot counts; k shots = k + 1 images (default: 0,1,2,4,8,16,32)")
    p.add_argument("--batch", type=_int_list_type("batch", 1), default=[1],
                   help="rows per call; a comma-separated list sweeps several (default: 1)")
    p.add_argument("--new-tokens", type=_non_negative_int("new_tokens", 2), default=16,
                   help="tokens decoded per call, never stopping early (default: 16)")
    p.add_argument("--num-beams", type=_non_negative_int("num_beams", 1), default=1,
                   help="beam search with N beams (default 1: greedy); decode rows time one step of batch x N")
    p.add_argument("--dtype", choices=sorted(profile_options.DTYPES), default=None,
                   help="weights and activations (default: bfloat16 on CUDA, float32 on the CPU)")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:N] (default: cuda if available); meta: build on the meta device and print the "
                        "weight bytes per row and what fits where, running nothing (seconds, even for an 80B model)")
    p.add_argument("--impl", type=_impl_list, default=None,
                   help="comma-separated implementations, the first is the baseline (default: reference,fast; "
                        "hf,fast with an mllama-* preset); openflamingo (OpenFlamingo's own generate), idefics "
                        "(transformers' IDEFICS generate) and hf (transformers' MllamaForConditionalGeneration."
                        "generate: the mllama-* presets, whose other implementation is fast) need their packages "
                        "and a preset of their layout")
    p.add_argument("--backend", default="auto", choices=profile_options.FAST_BACKENDS,
                   help="the fast runtime's backend: auto, triton or torch")
    p.add_argument("--weights", type=_weights_list, default=None,
                   help="the fast runtime's weight format: none, bf16 (both: the activation dtype) or int8; a "
                        "comma-separated list (e.g. bf16,int8) gives one fast row per format (default: none; "
                        "bf16,int8 with an mllama-* preset on --device meta)")
    p.add_argument("--repeats", type=_non_negative_int("repeats", 1), default=3, help="timed calls (default 3)")
    p.add_argument("--warmup", type=_non_negative_int("warmup", 0), default=1,
                   help="untimed calls first, reported as warm-up seconds (default 1)")
    p.add_argument("--caption-tokens", type=_non_negative_int("caption_tokens", 0), default=12,
                   help="text tokens per shot's caption (default 12)")
    p.add_argument("--question-tokens", type=_non_negative_int("question_tokens", 0), default=6,
                   help="text tokens after the query image (default 6)")
    p.add_argument("--seed", type=_non_negative_int("seed", 0), default=0, help="weights and prompts")
    p.add_argument("--json", metavar="PATH", help="every field + metadata (rewritten after each row)")
    p.add_argument("--csv", metavar="PATH", help="one line per row")
    p.add_argument("--plot", metavar="PATH",
                   help="PNG: cold and warm TTFT, prefill and decode per token vs shots (needs matplotlib)")
    p.add_argument("--trace", metavar="DIR", help="torch.profiler chrome traces at the largest shot count")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--workload", type=_non_negative_int("workload", 1), default=None, metavar="N",
                   help="instead of the sweep: N batches of queries sharing one k-shot context per shot count "
                        "(OpenFlamingo's evaluation); queries/s and TTFT p50/p90 against the baseline")
    p.set_defaults(run=_profile, command_parser=p)
    return parser


def _profile(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.workload is not None and args.preset in MLLAMA_PRESETS:
        parser.error(f"--workload with --preset {args.preset}: the evaluation workload runs the Flamingo layouts "
                     f"only; expected no --workload (the sweep), or a preset of {sorted(PRESETS)}")
    if args.workload is not None:
        for option in ("csv", "plot", "trace"):
            if getattr(args, option) is not None:
                parser.error(f"--{option} with --workload: the workload mode writes its table and --json only; "
                             f"expected no --{option}, or the sweep (no --workload)")
    try:
        options = profile_options.ProfileOptions(
            preset=args.preset, shots=args.shots, batch=args.batch, new_tokens=args.new_tokens, dtype=args.dtype,
            device=args.device, impls=args.impl, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
            caption_tokens=args.caption_tokens, question_tokens=args.question_tokens, trace_dir=args.trace,
            fast_backend=args.backend, num_beams=args.num_beams, weights=args.weights,
        )
        for option in ("json", "csv", "plot"):  # checked now, not after a sweep that may take an hour
            if getattr(args, option) is not None:
                profile_options.check_output_path(option, getattr(args, option))
    except ValueError as error:
        parser.error(str(error))
    if torch.device(options.device).type == "meta":
        return _count_weights(args, parser, options)
    if args.workload is not None:
        try:
            rows = profiler.workload(options, args.workload, progress=not args.no_progress)
        except (ValueError, NotImplementedError) as error:
            print(f"flamingo-fast profile: error: {error}", file=sys.stderr)
            return 2
        print(report.format_workload(rows, options))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"metadata": report.metadata(options), "workload": [vars(r) for r in rows]}, f, indent=2)
            print(f"wrote {args.json}", file=sys.stderr)
        return 0
    on_row = (lambda result: report.write_json(result, args.json, complete=False)) if args.json else None
    try:
        if options.is_mllama:
            from .profiling import mllama_profile

            result = mllama_profile.profile_mllama(options, progress=not args.no_progress, on_row=on_row)
        else:
            result = profiler.profile(options, progress=not args.no_progress, on_row=on_row)
    except (ValueError, NotImplementedError) as error:
        print(f"flamingo-fast profile: error: {error}", file=sys.stderr)
        return 2
    print(report.format_table(result))
    if args.json:
        report.write_json(result, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.csv:
        report.write_csv(result, args.csv)
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        if report.write_plot(result, args.plot):
            print(f"wrote {args.plot}", file=sys.stderr)
        else:
            print(f"--plot {args.plot}: not written: matplotlib is not installed "
                  "(pip install matplotlib, or the [plot] extra); the table, JSON and CSV are complete",
                  file=sys.stderr)
    return 0


def _count_weights(args: argparse.Namespace, parser: argparse.ArgumentParser,
                   options: profile_options.ProfileOptions) -> int:
    """--device meta: the weight table, and --json; nothing runs, so the options of a run are errors."""
    for option in ("csv", "plot", "trace", "workload"):
        if getattr(args, option) is not None:
            parser.error(f"--{option} with --device meta: nothing runs on the meta device (it counts the weights "
                         f"only); expected no --{option}, or --device cpu / cuda")
    meta = report.metadata(options)
    try:
        if options.is_mllama:
            from .profiling import mllama_profile

            rows = mllama_profile.count_mllama_weights(options)
            meta.update(prompt=mllama_profile.PROMPT, weights_note=mllama_profile.weights_note(options),
                        image_kv_note=mllama_profile.image_kv_note(options))
        else:
            rows = profiler.count_weights(options)
    except (ValueError, NotImplementedError) as error:
        print(f"flamingo-fast profile: error: {error}", file=sys.stderr)
        return 2
    print(report.format_weights(rows, meta))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"metadata": meta, "weight_rows": [dict(vars(r)) for r in rows]}, f, indent=2)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.run(args, args.command_parser)


if __name__ == "__main__":
    sys.exit(main())
