"""Llama 3.2 Vision decode at the released 11B shapes on one GPU (random bf16 weights), against the floor of the
bytes a decode step must read.

    python bench/mllama_gpu.py --out OUT/mllama_11b [--preset mllama-11b] [--bandwidth OUT/bandwidth.json]
    python bench/mllama_gpu.py --out OUT/mllama_tiny --preset mllama-tiny --device cpu     # the CPU dry run

Batch 1, one image of 4 tiles (a square of 2 x 2 tiles), 16 question tokens, `--new-tokens` decoded. Rows, the
profiler's (flamingo_fast/profiling/mllama_profile.py: the same timer, prompts and fields): transformers'
MllamaForConditionalGeneration.generate (hf) and flamingo_fast.from_mllama over the same weights (fast), when
transformers is importable. Without it, fast only: the runtime from_mllama wraps (MllamaRuntime) over a random
MllamaReference, the inputs built without the processor (one image, its 4 tiles valid, every token after it
seeing it).

floor: mllama_sizes.mllama_decode_read_bytes (every language-model weight a step reads: all but the
cross-attention layers' k/v projections, which run once per image; the head; one embedding row; plus the image's
cross-attention K/V and the self-attention K/V at the mean context) / the measured copy bandwidth (`--bandwidth`,
bench/bandwidth.py measure's JSON, else measured here). `pct_of_floor` = decode p50 / floor x 100.
Writes OUT.json and OUT.md; prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from flamingo_fast.profiling import report
from flamingo_fast.profiling.profile_options import DTYPES, ProfileOptions
from flamingo_fast.profiling.profiler import PeakMemory, SweepEntry, measure_shots
from flamingo_fast.reference.mllama_config import MLLAMA_PRESETS, mllama_from_name
from flamingo_fast.reference.mllama_sizes import mllama_decode_read_bytes
from flamingo_fast.timing import PhaseTimer, ProgressBar

QUESTION_TOKENS = 16


def _fast_without_transformers(options: ProfileOptions) -> list[report.ProfileRow]:
    """The fast row alone: MllamaRuntime over a random MllamaReference built on the device in the dtype."""
    from flamingo_fast.generation.search import generation_options
    from flamingo_fast.reference.mllama import MllamaReference
    from flamingo_fast.runtime.mllama_inputs import MllamaImages
    from flamingo_fast.runtime.mllama_runtime import MllamaRuntime

    config, device, dtype = options.mllama_config, options.device, options.torch_dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            torch.manual_seed(options.seed)
            reference = MllamaReference(config).eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():  # open the tanh gates (they start at 0): the cross-attention layers then matter
        for name, p in reference.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
    runtime = MllamaRuntime(reference, backend=options.fast_backend)
    v = config.vision
    generator = torch.Generator().manual_seed(options.seed)
    ids = torch.randint(3, config.text.vocab_size, (1, 1 + 1 + QUESTION_TOKENS), generator=generator)
    ids[0, 0], ids[0, 1] = config.bos_token_id, config.image_token_id
    ids = ids.to(device)
    tiles = v.max_num_tiles
    cross = torch.zeros(1, ids.shape[1], 1, tiles, dtype=torch.long, device=device)
    cross[:, 1:] = 1  # the image token and what follows see the image's tiles
    images = MllamaImages(
        pixel_values=torch.randn(1, 1, tiles, v.num_channels, v.image_size, v.image_size, generator=generator)
        .to(device=device, dtype=dtype),
        aspect_ratio_ids=torch.tensor([[v.supported_aspect_ratios.index((2, 2)) + 1]], device=device),
        aspect_ratio_mask=torch.ones(1, 1, tiles, dtype=torch.long, device=device), cross_attention_mask=cross)
    options_n = generation_options(runtime.config, eos_token_id=[], max_new_tokens=options.new_tokens)
    mask = torch.ones_like(ids)

    def run(inputs, new_tokens: int) -> tuple[torch.Tensor, PhaseTimer]:  # every call cold: the image encoded
        timer = PhaseTimer(device=device)
        runtime.clear_context_cache()
        return runtime.generate_from_options(images, ids, mask, options_n, timer=timer), timer

    entry = SweepEntry("fast", "none", run, first_logits=lambda inputs: None, weight_mib=lambda: None)
    bar = ProgressBar(options.warmup + options.repeats, enabled=False)
    return [row for _, row in measure_shots([entry], None, None, 1, 0, ids.shape[1], options, bar,
                                            PeakMemory(torch.device(device)))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output path without suffix: OUT.json and OUT.md")
    parser.add_argument("--preset", default="mllama-11b", choices=sorted(MLLAMA_PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, else fp32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--backend", default="auto", choices=["auto", "triton", "torch"])
    parser.add_argument("--bandwidth", help="bench/bandwidth.py measure's JSON (else measured here)")
    parser.add_argument("--gib", type=float, default=None, help="bytes copied when measuring (default 4 / 0.25 GiB)")
    args = parser.parse_args(argv)

    has_transformers = importlib.util.find_spec("transformers") is not None
    dtype_name = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    common = dict(preset=args.preset, shots=[0], batch=[1], new_tokens=args.new_tokens, dtype=dtype_name,
                  repeats=args.repeats, warmup=args.warmup, caption_tokens=0, question_tokens=QUESTION_TOKENS,
                  fast_backend=args.backend, weights=["none"])
    if has_transformers:
        options = ProfileOptions(**common, device=args.device, impls=["hf", "fast"])
    else:  # ProfileOptions refuses a timed Mllama run without transformers (the profiler builds its model); the
        # fast-only path needs none: the options are checked on the meta device, then pointed at the real one
        options = ProfileOptions(**common, device="meta", impls=["fast"])
        options.device = args.device
    if args.bandwidth:
        bandwidth = json.loads(Path(args.bandwidth).read_text())
    else:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bandwidth import measure_copy_bandwidth

        gib = args.gib if args.gib is not None else (4.0 if torch.device(args.device).type == "cuda" else 0.25)
        bandwidth = measure_copy_bandwidth(args.device, int(gib * 2**30))
    started = time.perf_counter()
    if has_transformers:
        from flamingo_fast.profiling.mllama_profile import profile_mllama

        rows = profile_mllama(options, progress=False).rows
        source = "hf (transformers' generate) and fast (from_mllama)"
    else:
        rows = _fast_without_transformers(options)
        source = "fast only (MllamaRuntime over a random MllamaReference: transformers is not importable)"
    seconds = time.perf_counter() - started
    config = mllama_from_name(args.preset)
    dtype = options.torch_dtype
    context = rows[0].prompt_tokens + args.new_tokens / 2  # the mean context over the decode steps
    floor_bytes = mllama_decode_read_bytes(config, 1, context, 1, dtype)
    floor_ms = floor_bytes / (bandwidth["copy_GBps"] * 1e9) * 1e3
    out = []
    for r in rows:
        out.append({"impl": r.impl, "ttft_ms": r.ttft_ms, "decode_ms_p50": r.decode_ms_p50,
                    "decode_ms_p90": r.decode_ms_p90, "floor_ms": floor_ms,
                    "pct_of_floor": 100 * r.decode_ms_p50 / floor_ms, "speedup_decode_p50": r.speedup_decode_p50,
                    "tokens_match_baseline": r.tokens_match_baseline, "peak_mem_mib": r.peak_mem_mib})
    lines = [f"{args.preset} on {report.environment(args.device)['device_name']}, {options.dtype}, batch 1, one "
             f"{config.vision.max_num_tiles}-tile image, {rows[0].prompt_tokens} prompt tokens, {args.new_tokens} new "
             f"tokens, median of {args.repeats} after {args.warmup} warm-up; {source}; floor: "
             f"{floor_bytes / 1e9:.2f} GB a step at {bandwidth['copy_GBps']:.1f} GB/s copy bandwidth "
             f"= {floor_ms:.2f} ms", "",
             "| impl | TTFT ms | decode ms/tok p50 | p90 | floor ms | % of floor | decode x | same ids | peak MiB |",
             "| --- " + "| ---: " * 8 + "|"]
    for r in out:
        same = "-" if r["tokens_match_baseline"] is None else f"{100 * r['tokens_match_baseline']:.0f}%"
        speed = "-" if r["speedup_decode_p50"] is None else f"{r['speedup_decode_p50']:.2f}"
        lines.append(f"| {r['impl']} | {r['ttft_ms']:.1f} | {r['decode_ms_p50']:.2f} | {r['decode_ms_p90']:.2f} | "
                     f"{r['floor_ms']:.2f} | {r['pct_of_floor']:.0f}% | {speed} | {same} | {r['peak_mem_mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".md").write_text(table + "\n")
    path.with_suffix(".json").write_text(json.dumps(
        {"preset": args.preset, "device": args.device, "dtype": options.dtype, "new_tokens": args.new_tokens,
         "source": source, "seconds": round(seconds, 2), "bandwidth": bandwidth, "floor_bytes": floor_bytes,
         "rows": out, **report.environment(args.device)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
