"""What the bench scripts share: the reference and fast models on the profiler's k-shot prompt, the few-shot
evaluation workload and its options, one timer (the median of synchronised calls), and one results writer that
stamps device name, git commit and date.

A script run as `python bench/x.py` has bench/ on sys.path, so `import common` finds this file (pytest puts
bench/ there too when it collects bench/*.py); flamingo_fast itself comes from the installed package.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flamingo_fast.config import FlamingoConfig, from_name
from flamingo_fast.profiling.prompts import build_prompt, build_workload
from flamingo_fast.profiling.report import environment
from flamingo_fast.reference.model import Flamingo, build_reference


def default_dtype(device: str | torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_models(preset: str, shots: int, batch: int, new_tokens: int, device: str, dtype: torch.dtype | None = None,
                 seed: int = 0, **fast_options):
    """-> (reference, FastFlamingo sized for the prompt, (vision_x, lang_x, attention_mask)): the profiler's
    `shots`-shot prompt (12 caption and 6 question tokens per row), room for `new_tokens` more; `fast_options`
    (backend, max_images, cuda_graphs, ...) go to FastFlamingo.from_reference."""
    from flamingo_fast.runtime.runtime import FastFlamingo

    config, dtype = from_name(preset), dtype or default_dtype(device)
    model = build_reference(config, seed=seed, dtype=dtype, device=device)
    inputs = build_prompt(config, shots, batch, 12, 6, seed=seed, dtype=dtype, device=device)
    fast_options = {"max_batch_size": batch, "max_seq_len": inputs[1].shape[1] + new_tokens, **fast_options}
    return model, FastFlamingo.from_reference(model, **fast_options), inputs


def workload_parser(doc: str, shots: int) -> argparse.ArgumentParser:
    """The options of the few-shot workload scripts (--preset --shots --batch --repeats --device); a script adds
    its own."""
    from flamingo_fast.profiling.profile_options import default_device

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--shots", type=int, default=shots)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=default_device())
    return parser


def build_few_shot_workload(args: argparse.Namespace) -> tuple[FlamingoConfig, Flamingo, torch.dtype, list]:
    """-> (config, reference (seed 0, default_dtype), work): `args.repeats + 1` calls of OpenFlamingo's evaluation
    (prompts.build_workload: one `args.shots`-shot context of 12-token captions shared by the `args.batch` rows,
    each row its own query, an image and 6 tokens), each (vision_x, lang_x, attention_mask, image_attention_mask);
    the first is for warming up."""
    dtype = default_dtype(args.device)
    config = from_name(args.preset)
    model = build_reference(config, seed=0, dtype=dtype, device=args.device)
    work = build_workload(config, args.shots, args.batch, args.repeats + 1, 12, 6, 0, dtype, args.device)
    return config, model, dtype, work


def timed(fn: Callable[[], Any], repeats: int, device: str | torch.device = "cpu") -> list[float]:
    """Seconds of each of `repeats` calls, the device synchronised before the clock stops."""
    cuda = torch.device(device).type == "cuda"
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def median_seconds(fn: Callable[[], Any], repeats: int = 7, warmup: int = 2,
                   device: str | torch.device = "cpu") -> float:
    """The median of `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, repeats, device))


def write_results(path: str | Path, data: dict, device: str | torch.device = "cpu") -> None:
    """`data` as JSON at `path` (folders made), with "environment": device name, versions, git commit, date."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**data, "environment": environment(str(device))}, indent=2) + "\n")
