"""Latency per shot count: how prefill and decode grow with the number of in-context examples.

For every batch size, shot count and implementation (the first one is the baseline), `profile()` runs
`warmup` generate calls (reported on their own as `warmup_s`: they hold CUDA-graph capture and compilation)
and then `repeats` timed calls with a `PhaseTimer`, decoding a fixed number of tokens (`eos_token_id=[]`:
random models rarely emit an end token). Reported per row:

    vision_ms        encoder + resampler, median over repeats
    media_kv_ms      the fast path's cross-attention K/V of the new images, the context cache's image look-up and
                     the media cache write (the reference projects its K/V inside prefill: 0 there)
    prefill_ms       the prompt through the LM, first token chosen; ttft_ms = vision + media_kv + prefill
    decode_ms_p50/90 per generated token after the first, over every decode lap of every repeat
    ttft_warm_ms     the same prompt right after, its context and images in the context cache (fast only);
                     ttft_ms is cold: the cache is cleared before each timed call
    decode_tokens_per_s   batch / decode p50 (rows advance together)
    total_ms         the whole generate call (every lap), median over repeats
    With `num_beams` N > 1 every call is a beam search: a decode lap is one step of all B x N hypotheses.
    peak_mem_mib     CUDA: torch.cuda.max_memory_allocated (weights included). CPU: growth of the process's
                     peak RSS over its RSS before the row (VmHWM reset per row where Linux allows it,
                     else getrusage's ru_maxrss, which never goes down); `peak_mem_kind` says which.
    speedup_*        baseline time / this time, from the same run (> 1: faster than the baseline)

`device="meta"` (`--device meta`) runs nothing: `count_weights()` builds every implementation on the meta device
(no memory, no random init: an 80B model in seconds) and reports, per batch and weight format, the bytes of its
weights (FastFlamingo.weight_bytes()) and of the fast runtime's KV and media caches at the sweep's capacity, and
what a card's memory keeps after them (report.format_weights). No times, no peak memory: nothing is allocated.

Prompt for k shots, per row: `<bos>` then k times `<image>` + caption + `<|endofchunk|>`, then the query
`<image>` + question; so k shots use k + 1 images and 0 shots is one query image (prompts.py builds them; the
result types and their writers are in report.py; the options and their checks in profile_options.py).
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..reference.model import Flamingo, build_reference
from ..runtime.fused_weights import bytes_by_dtype
from ..timing import PhaseTimer, ProgressBar
from .profile_options import ProfileOptions
from .profile_options import check_output_path as check_output_path  # the CLI's check, read here by the tests
from .prompts import build_prompt, build_workload, image_attention_mask, prompt_length
from .report import RATIOS, ProfileResult, ProfileRow, WeightRow, WorkloadRow, metadata


class GenerateImpl(Protocol):
    def generate(self, vision_x, lang_x, attention_mask=None, *, max_new_tokens=20, eos_token_id=None,
                 timer: PhaseTimer | None = None, num_beams: int = 1) -> torch.Tensor: ...


# ----------------------------------------------------------------------------------------------------------
# Implementations
# ----------------------------------------------------------------------------------------------------------


def check_available(impls: Sequence[str]) -> None:
    """Fail before the (possibly long) model build when an implementation cannot be loaded."""
    if "idefics" in impls and importlib.util.find_spec("transformers") is None:
        raise ValueError("impl='idefics': the IDEFICS baseline needs transformers (make setup-openflamingo, then run "
                         "with .venv-openflamingo/bin/python; or .venv-transformers5 for transformers 5)")
    if ("fast" in impls and BUILDERS["fast"] is build_fast
            and importlib.util.find_spec("flamingo_fast.runtime.runtime") is None):
        raise ValueError("impl='fast': flamingo_fast.runtime.runtime (FastFlamingo) is not available in this checkout")
    if "openflamingo" in impls and importlib.util.find_spec("open_flamingo") is None:
        raise ValueError("impl='openflamingo': the openflamingo baseline needs the open_flamingo package "
                         "(make setup-openflamingo, then run with .venv-openflamingo/bin/python)")


def build_fast(model: Flamingo, *, max_batch_size: int, max_seq_len: int, max_images: int,
               backend: str = "auto", weights: str = "none") -> GenerateImpl:
    from ..runtime.runtime import FastFlamingo  # imported only when the fast path is profiled

    return FastFlamingo.from_reference(model, backend=backend, max_batch_size=max_batch_size,
                                       max_seq_len=max_seq_len, max_images=max_images,
                                       weights=None if weights == "none" else weights)


def build_openflamingo(model: Flamingo, *, max_batch_size: int, max_seq_len: int, max_images: int,
                       backend: str = "auto") -> GenerateImpl:
    """OpenFlamingo's own generate (open_clip + Hugging Face LM + FlamingoLMMixin) on the reference's tensors."""
    if importlib.util.find_spec("open_flamingo") is None:
        raise ValueError("impl='openflamingo': the openflamingo baseline needs the open_flamingo package "
                         "(make setup-openflamingo, then run with .venv-openflamingo/bin/python)")
    from .baselines import OpenFlamingoBaseline, to_openflamingo

    return OpenFlamingoBaseline(to_openflamingo(model))


def build_idefics(model: Flamingo, *, max_batch_size: int, max_seq_len: int, max_images: int,
                  backend: str = "auto") -> GenerateImpl:
    """transformers' own IdeficsForVisionText2Text.generate on the reference's tensors."""
    from .baselines import IdeficsBaseline, to_idefics

    return IdeficsBaseline(to_idefics(model))


# name -> builder(model, *, max_batch_size, max_seq_len, max_images, backend) (+ weights for "fast"); tests may
# swap in a stand-in.
BUILDERS: dict[str, Callable[..., GenerateImpl]] = {
    "reference": lambda model, **capacity: model,
    "fast": build_fast,
    "openflamingo": build_openflamingo,
    "idefics": build_idefics,
}


def _variants(options: ProfileOptions) -> list[tuple[str, str, str | None]]:
    """(row label, builder name, weight format) per row of a shot count: "fast" once per `options.weights`
    (labelled fast, fast-bf16, fast-int8; the format is None for the other implementations)."""
    variants = []
    for name in options.impls:
        if name != "fast":
            variants.append((name, name, None))
            continue
        variants += [("fast" if w == "none" else f"fast-{w}", name, w) for w in options.weights]
    return variants


def _build(builder: str, weights: str | None, model: Flamingo, options: ProfileOptions, **capacity) -> GenerateImpl:
    extra = {"weights": weights} if weights not in (None, "none") else {}  # stand-ins need not know `weights`
    return BUILDERS[builder](model, max_images=max(options.shots) + 1, backend=options.fast_backend, **capacity,
                             **extra)


def weight_bytes(impl: GenerateImpl) -> dict[str, int] | None:
    """Bytes by dtype name of the weights `impl` holds: FastFlamingo.weight_bytes(), or an nn.Module's parameters
    and buffers (each storage once: tied and fused tensors share one); None when neither can say."""
    if hasattr(impl, "weight_bytes"):
        return dict(impl.weight_bytes())
    if not isinstance(impl, torch.nn.Module):
        return None
    return bytes_by_dtype(impl)


def weight_mib(impl: GenerateImpl) -> float | None:
    """MiB of the weights `impl` holds (`weight_bytes`); None when it cannot say."""
    counted = weight_bytes(impl)
    return None if counted is None else sum(counted.values()) / 2**20


def cache_bytes(impl: GenerateImpl) -> int | None:
    """Bytes of the fast runtime's static caches (its `kv_cache` and `media_cache`: every tensor they hold), sized
    at construction; None for an implementation without them."""
    caches = [getattr(impl, name, None) for name in ("kv_cache", "media_cache")]
    if all(cache is None for cache in caches):
        return None
    return sum(value.nbytes for cache in caches if cache is not None for value in vars(cache).values()
               if isinstance(value, torch.Tensor))


# ----------------------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of one row. CUDA: max_memory_allocated. CPU: peak RSS growth over the RSS at `start()`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_maxrss_growth"
        self._rss_start_kib = 0
        self._hwm_reset = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._rss_start_kib = _proc_status_kib("VmRSS") or 0
        try:  # Linux >= 4.0: "5" resets the peak RSS (VmHWM) to the current RSS
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self._hwm_reset = True
            self.kind = "cpu_peak_rss_growth"
        except OSError:
            self._rss_start_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.kind = "cpu_maxrss_growth"

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self._hwm_reset:
            peak_kib = _proc_status_kib("VmHWM") or 0
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return max(peak_kib - self._rss_start_kib, 0) / 1024


# ----------------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(np.median(values)) if len(values) else float("nan")


def _timed_generate(impl: GenerateImpl, inputs, new_tokens: int, device: str,
                    num_beams: int = 1) -> tuple[torch.Tensor, PhaseTimer]:
    vision_x, lang_x, attention_mask, *mask = inputs
    timer = PhaseTimer(device=device)
    extra = {"num_beams": num_beams} if num_beams > 1 else {}
    if mask and mask[0] is not None:
        extra["image_attention_mask"] = mask[0]
    out = impl.generate(vision_x, lang_x, attention_mask, max_new_tokens=new_tokens, eos_token_id=[], timer=timer,
                        **extra)
    return out, timer


def _first_logits(impl: GenerateImpl, inputs, num_beams: int = 1) -> torch.Tensor | None:
    """The scores the first new token is chosen from, [B, vocab] float32 (None if the impl cannot say, and
    with beams, whose first step scores the same prompt logits)."""
    if num_beams > 1 or "return_logits" not in inspect.signature(impl.generate).parameters:
        return None
    vision_x, lang_x, attention_mask, *mask = inputs
    extra = {"image_attention_mask": mask[0]} if mask and mask[0] is not None else {}
    _, logits = impl.generate(vision_x, lang_x, attention_mask, max_new_tokens=1, eos_token_id=[], return_logits=True,
                              **extra)
    return logits[:, 0].float()


def timed_row(impl_name: str, batch: int, shots: int, prompt_tokens: int, options: ProfileOptions,
              warmup_s: list[float], timers: list[PhaseTimer], peak_mib: float, peak_kind: str) -> ProfileRow:
    """One implementation's row from its timed calls' laps: medians of the phases, decode percentiles."""
    vision = [t.total("vision") for t in timers]
    media_kv = [t.total("media_kv") for t in timers]
    prefill = [t.total("prefill") for t in timers]
    ttft = [v + m + p for v, m, p in zip(vision, media_kv, prefill, strict=True)]
    decode = [lap for t in timers for lap in t.laps.get("decode", [])]
    total = [sum(sum(laps) for laps in t.laps.values()) for t in timers]
    return ProfileRow(
        impl=impl_name, batch=batch, shots=shots, images=shots + 1, prompt_tokens=prompt_tokens,
        new_tokens=options.new_tokens, repeats=options.repeats, warmup_s=[round(w, 4) for w in warmup_s],
        vision_ms=1e3 * _median(vision), media_kv_ms=1e3 * _median(media_kv),
        prefill_ms=1e3 * _median(prefill), ttft_ms=1e3 * _median(ttft),
        decode_ms_p50=1e3 * float(np.percentile(decode, 50)) if decode else float("nan"),
        decode_ms_p90=1e3 * float(np.percentile(decode, 90)) if decode else float("nan"),
        decode_tokens_per_s=batch / float(np.percentile(decode, 50)) if decode else float("nan"),
        total_ms=1e3 * _median(total), peak_mem_mib=peak_mib, peak_mem_kind=peak_kind,
    )


def compare_with_baseline(row: ProfileRow, baseline: ProfileRow) -> None:
    """The row's speed-ups (baseline time / its time) and memory ratio, written into it."""
    for ratio, timing in RATIOS.items():
        this, base = getattr(row, timing), getattr(baseline, timing)
        setattr(row, ratio, base / this if this and this > 0 and math.isfinite(base) else None)
    warm = row.ttft_warm_ms
    row.speedup_ttft_warm = baseline.ttft_ms / warm if warm and math.isfinite(baseline.ttft_ms) else None
    row.mem_ratio = row.peak_mem_mib / baseline.peak_mem_mib if baseline.peak_mem_mib > 0 else None


def _trace(impl: GenerateImpl, inputs, options: ProfileOptions, path: Path) -> None:
    """A chrome trace of one prefill and a few decode steps (after warm-up, so no capture in it)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(options.device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.profiler.profile(activities=activities) as prof:
        _timed_generate(impl, inputs, min(options.new_tokens, 4), options.device, options.num_beams)
    prof.export_chrome_trace(str(path))


@dataclass(frozen=True)
class SweepEntry:
    """One implementation of a sweep's batch, as measure_shots calls it (the Flamingo sweep and the Llama 3.2 Vision
    one, profiling/mllama_profile.py, each wrap theirs)."""

    name: str
    weights: str | None  # the weight format the row reports
    run: Callable[[Any, int], tuple[torch.Tensor, PhaseTimer]]  # (inputs, new tokens) -> (ids, the call's laps)
    first_logits: Callable[[Any], torch.Tensor | None]  # inputs -> [B, vocab] float32 (None: it cannot say)
    weight_mib: Callable[[], float | None]
    clear_context_cache: Callable[[], None] | None = None  # None: no context cache, no warm TTFT


def measure_shots(entries: Sequence[SweepEntry], inputs, warm_inputs, batch: int, shots: int, prompt_tokens: int,
                  options: ProfileOptions, bar: ProgressBar, memory: PeakMemory) -> Iterator[tuple[SweepEntry,
                                                                                                  ProfileRow]]:
    """One batch size and shot count, every entry in turn (the first is the baseline): `warmup` calls, then
    `repeats` timed calls, cold (the context cache cleared first), each followed by a 1-token call on
    `warm_inputs` for the warm TTFT (the same prompt, or the same demonstrations with a new query); the row, with
    its ratios, greedy-id agreement and first-logits error against the baseline. Yields (entry, row) as each
    finishes."""
    baseline_row, baseline_ids, baseline_logits = None, None, None
    for entry in entries:
        label = f"{entry.name} batch={batch} shots={shots}"
        warmup_s = []
        for i in range(options.warmup):
            t0 = time.perf_counter()
            entry.run(inputs, options.new_tokens)
            warmup_s.append(time.perf_counter() - t0)
            bar.step(f"{label} warm-up {i + 1}/{options.warmup}")
        memory.start()
        timers, warm_ttft, first_ids = [], [], None
        for i in range(options.repeats):
            if entry.clear_context_cache is not None:  # cold: the prompt's context computed as if never seen
                entry.clear_context_cache()
            ids, timer = entry.run(inputs, options.new_tokens)
            first_ids = ids[:, prompt_tokens:] if first_ids is None else first_ids
            timers.append(timer)
            if entry.clear_context_cache is not None:  # warm: right after, what it cached still there
                _, warm = entry.run(warm_inputs, 1)
                warm_ttft.append(sum(warm.total(p) for p in ("vision", "media_kv", "prefill")))
            bar.step(f"{label} repeat {i + 1}/{options.repeats}")
        row = timed_row(entry.name, batch, shots, prompt_tokens, options, warmup_s, timers, memory.peak_mib(),
                        memory.kind)
        row.ttft_warm_ms = 1e3 * _median(warm_ttft) if warm_ttft else None
        row.weights, row.weight_mib = entry.weights, entry.weight_mib()
        logits = entry.first_logits(inputs)
        if baseline_row is None:
            baseline_row, baseline_ids, baseline_logits = row, first_ids, logits
        else:
            if first_ids.shape == baseline_ids.shape:
                row.tokens_match_baseline = float((first_ids == baseline_ids).float().mean())
            if logits is not None and baseline_logits is not None:
                row.first_logits_rel_err = float((logits - baseline_logits).norm() / baseline_logits.norm())
        compare_with_baseline(row, baseline_row)
        yield entry, row


def _entry(name: str, impl: GenerateImpl, weights: str | None, options: ProfileOptions) -> SweepEntry:
    return SweepEntry(
        name, weights, run=lambda inputs, new: _timed_generate(impl, inputs, new, options.device, options.num_beams),
        first_logits=lambda inputs: _first_logits(impl, inputs, options.num_beams),
        weight_mib=lambda: weight_mib(impl), clear_context_cache=getattr(impl, "clear_context_cache", None))


def profile(options: ProfileOptions, progress: bool = True,
            on_row: Callable[[ProfileResult], None] | None = None) -> ProfileResult:
    """Run the sweep; `on_row(result)` is called after every finished row (e.g. to save partial results)."""
    if torch.device(options.device).type == "meta":
        raise ValueError("device='meta': nothing runs on the meta device; expected 'cpu' or 'cuda' to profile "
                         "(count_weights() counts the weights there)")
    check_available(options.impls)
    config = options.config
    device, dtype = options.device, options.torch_dtype
    result = ProfileResult(metadata(options))
    setup_s = result.metadata["setup_s"]
    started = time.perf_counter()
    model = build_reference(config, seed=options.seed, dtype=dtype, device=device)  # built on the device
    setup_s["model"] = round(time.perf_counter() - started, 3)
    max_seq_len = prompt_length(max(options.shots), options.caption_tokens, options.question_tokens, config)
    max_seq_len += options.new_tokens
    variants = _variants(options)
    calls = len(options.batch) * len(options.shots) * len(variants) * (options.warmup + options.repeats)
    bar = ProgressBar(calls, enabled=progress)
    memory = PeakMemory(torch.device(device))
    for batch in options.batch:
        impls, entries = {}, []
        for name, builder, weights in variants:
            started = time.perf_counter()
            impls[name] = _build(builder, weights, model, options, max_batch_size=batch, max_seq_len=max_seq_len)
            entries.append(_entry(name, impls[name], weights, options))
            setup_s[f"{name}_b{batch}"] = round(time.perf_counter() - started, 3)
        for shots in options.shots:
            inputs = build_prompt(config, shots, batch, options.caption_tokens, options.question_tokens,
                                  options.seed, dtype, device)
            inputs = (*inputs, image_attention_mask(config, inputs[1], shots + 1))
            for entry, row in measure_shots(entries, inputs, inputs, batch, shots, inputs[1].shape[1], options, bar,
                                            memory):
                result.rows.append(row)
                if options.trace_dir and shots == max(options.shots):
                    path = Path(options.trace_dir) / f"trace_{entry.name}_b{batch}_s{shots}.json"
                    _trace(impls[entry.name], inputs, options, path)
                if on_row is not None:
                    on_row(result)
        for name, impl in impls.items():  # CUDA-graph capture time (inside the warm-up calls), when it is known
            capture = getattr(impl, "capture_seconds", None)
            if capture:
                setup_s[f"{name}_b{batch}_graph_capture"] = round(float(capture), 3)
        del impls, entries
    return result


# ----------------------------------------------------------------------------------------------------------
# Weights only: the meta device
# ----------------------------------------------------------------------------------------------------------


def count_weights(options: ProfileOptions) -> list[WeightRow]:
    """`options.device == "meta"`: per batch and implementation row of the sweep (fast: one per weight format), the
    bytes of the weights it holds and of the fast runtime's caches at the sweep's capacity, every model built on
    the meta device: nothing is allocated and nothing runs. Baselines from other packages (openflamingo,
    idefics) are not built: their rows say so."""
    if torch.device(options.device).type != "meta":
        raise ValueError(f"device={options.device!r}: count_weights builds on the meta device; expected 'meta'")
    check_available([impl for impl in options.impls if impl in ("reference", "fast")])  # the others are not built
    config = options.config
    model = build_reference(config, seed=options.seed, dtype=options.torch_dtype, device="meta")
    max_seq_len = prompt_length(max(options.shots), options.caption_tokens, options.question_tokens, config)
    max_seq_len += options.new_tokens
    capacity = dict(max_seq_len=max_seq_len, max_images=max(options.shots) + 1)
    rows = []
    for batch in options.batch:
        for name, builder, weights in _variants(options):
            if builder not in ("reference", "fast"):
                rows.append(WeightRow(name, batch, weights, None, None, **capacity,
                                      note=f"{builder}: its package's model is not built on the meta device"))
                continue
            impl = _build(builder, weights, model, options, max_batch_size=batch, max_seq_len=max_seq_len)
            rows.append(WeightRow(name, batch, weights, weight_bytes(impl), cache_bytes(impl), **capacity))
            del impl
    return rows


# ----------------------------------------------------------------------------------------------------------
# The evaluation workload
# ----------------------------------------------------------------------------------------------------------


def workload(options: ProfileOptions, batches: int, progress: bool = True) -> list[WorkloadRow]:
    """The evaluation workload at each shot count and batch size: `batches` batches of queries over one
    context, for each implementation (the first is the baseline). An implementation with a context cache starts
    it empty, so its first batch pays for the context; warm-up calls use another context."""
    check_available(options.impls)
    config = options.config
    device, dtype = options.device, options.torch_dtype
    model = build_reference(config, seed=options.seed, dtype=dtype, device=device)
    rows: list[WorkloadRow] = []
    variants = _variants(options)
    calls = len(options.batch) * len(options.shots) * len(variants) * (options.warmup + batches)
    bar = ProgressBar(calls, enabled=progress)
    longest = prompt_length(max(options.shots), options.caption_tokens, options.question_tokens, config)
    longest += options.new_tokens
    for batch in options.batch:
        impls = {name: _build(builder, weights, model, options, max_batch_size=batch, max_seq_len=longest)
                 for name, builder, weights in variants}
        for shots in options.shots:
            work = build_workload(config, shots, batch, batches, options.caption_tokens, options.question_tokens,
                                  options.seed, dtype, device)
            warm = build_workload(config, shots, batch, options.warmup, options.caption_tokens,
                                  options.question_tokens, options.seed + 1, dtype, device)
            baseline = None
            for name, impl in impls.items():
                for inputs in warm:
                    _timed_generate(impl, inputs, options.new_tokens, device, options.num_beams)
                    bar.step(f"{name} batch={batch} shots={shots} warm-up")
                if hasattr(impl, "clear_context_cache"):
                    impl.clear_context_cache()
                ttft, started = [], time.perf_counter()
                for i, inputs in enumerate(work):
                    _, timer = _timed_generate(impl, inputs, options.new_tokens, device, options.num_beams)
                    ttft.append(sum(timer.total(p) for p in ("vision", "media_kv", "prefill")))
                    bar.step(f"{name} batch={batch} shots={shots} batch {i + 1}/{batches}")
                total = time.perf_counter() - started
                row = WorkloadRow(name, shots, batch, batches, options.num_beams, options.new_tokens, total,
                                  batch * batches / total, 1e3 * float(np.percentile(ttft, 50)),
                                  1e3 * float(np.percentile(ttft, 90)))
                baseline = baseline or row
                row.speedup_queries = row.queries_per_s / baseline.queries_per_s
                row.speedup_ttft_p50 = baseline.ttft_ms_p50 / row.ttft_ms_p50
                rows.append(row)
    return rows
