"""The profiler's results and their writers: the row types, the markdown tables, JSON (read back by
`load_json`), CSV and the PNG plot, and the run's metadata (device name, git commit, date, versions).

No model code runs here and nothing here imports the profiler: the sweep (profiler.py) fills these types.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class ProfileRow:
    impl: str
    batch: int
    shots: int
    images: int
    prompt_tokens: int
    new_tokens: int
    repeats: int
    warmup_s: list[float]
    vision_ms: float  # the "vision" lap: encoder + resampler, median over repeats
    media_kv_ms: float  # the "media_kv" lap: cross-attention K/V of new images (0 for the reference: in prefill)
    prefill_ms: float
    ttft_ms: float  # cold: an implementation with a context cache has it cleared before each timed call
    decode_ms_p50: float
    decode_ms_p90: float
    decode_tokens_per_s: float
    total_ms: float
    peak_mem_mib: float
    peak_mem_kind: str
    weights: str | None = None  # the fast runtime's weight format (profile_options.WEIGHT_FORMATS); None: not fast
    weight_mib: float | None = None  # the weights held (FastFlamingo.weight_bytes(), else parameters + buffers)
    ttft_warm_ms: float | None = None  # the same prompt again right after, its context cached (fast only)
    tokens_match_baseline: float | None = None  # fraction of generated ids equal to the baseline's
    # ||logits - baseline logits|| / ||baseline logits|| for the first new token (same prompt, untimed call).
    # With random weights logits are nearly tied, so at bf16 one flipped argmax changes every later id: this
    # is the number that says whether two implementations compute the same function.
    first_logits_rel_err: float | None = None
    speedup_vision: float | None = None
    speedup_prefill: float | None = None
    speedup_ttft: float | None = None
    speedup_ttft_warm: float | None = None  # baseline (cold) TTFT / this warm TTFT
    speedup_decode_p50: float | None = None
    speedup_decode_p90: float | None = None
    speedup_total: float | None = None
    mem_ratio: float | None = None  # this peak / the baseline's peak


RATIOS = {  # ratio field -> the timing it compares (baseline / this)
    "speedup_vision": "vision_ms",
    "speedup_prefill": "prefill_ms",
    "speedup_ttft": "ttft_ms",
    "speedup_decode_p50": "decode_ms_p50",
    "speedup_decode_p90": "decode_ms_p90",
    "speedup_total": "total_ms",
}
FIELDS = [f.name for f in dataclasses.fields(ProfileRow)]


@dataclass
class ProfileResult:
    metadata: dict[str, Any]
    rows: list[ProfileRow] = field(default_factory=list)

    def to_json(self, complete: bool = True) -> dict[str, Any]:
        """Plain JSON (a missing measurement is null, never NaN)."""
        rows = [{k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in dataclasses.asdict(r).items()} for r in self.rows]
        return {"metadata": self.metadata, "complete": complete, "rows": rows}


@dataclass
class WorkloadRow:
    impl: str
    shots: int
    batch: int
    batches: int
    num_beams: int
    new_tokens: int
    total_s: float  # every batch, the first (cold context) included
    queries_per_s: float
    ttft_ms_p50: float
    ttft_ms_p90: float
    speedup_queries: float | None = None  # this queries/s / the baseline's
    speedup_ttft_p50: float | None = None  # baseline TTFT p50 / this


@dataclass
class WeightRow:
    """What one implementation holds, counted on the meta device (profiler.count_weights): nothing allocated."""

    impl: str
    batch: int
    weights: str | None  # the fast runtime's weight format; None: not a fast row
    weight_bytes: dict[str, int] | None  # by dtype name (FastFlamingo.weight_bytes()); None: not built
    cache_bytes: int | None  # the fast runtime's KV and media caches at this capacity; None: it has none
    max_seq_len: int  # the capacity the caches are sized for: the sweep's longest prompt + new tokens
    max_images: int
    note: str | None = None
    # Llama 3.2 Vision rows: the cross-attention K/V of one image of max_num_tiles tiles over every cross-attention
    # layer (mllama_sizes.mllama_image_kv_bytes); format_weights then says how many fit beside the weights
    image_kv_bytes: int | None = None

    @property
    def total_weight_bytes(self) -> int | None:
        return None if self.weight_bytes is None else sum(self.weight_bytes.values())


# Nominal memory of the cards the fit is reported for, in GB (1e9 bytes).
CARDS_GB = {"H200 (141 GB)": 141, "H100 (80 GB)": 80, "24 GB card": 24}




def format_workload(rows: Sequence[WorkloadRow], options: Any) -> str:
    """Markdown: one row per (shots, batch, impl) of `profiler.workload`; `options` is its ProfileOptions."""
    lines = [f"evaluation workload: preset {options.preset}, {options.torch_dtype}, {options.new_tokens} new tokens, "
             f"{rows[0].num_beams if rows else 1} beam(s); queries/s over every batch, the cold first one included",
             "", "| impl | shots | batch | batches | queries/s | TTFT p50 ms | TTFT p90 ms | queries/s x | TTFT x |",
             "| --- " + "| ---: " * 8 + "|"]
    for r in rows:
        lines.append(f"| {r.impl} | {r.shots} | {r.batch} | {r.batches} | {_fmt(r.queries_per_s, 2)} "
                     f"| {_fmt(r.ttft_ms_p50)} | {_fmt(r.ttft_ms_p90)} | {_fmt(r.speedup_queries, 2)} "
                     f"| {_fmt(r.speedup_ttft_p50, 2)} |")
    return "\n".join(lines)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _device_name(device: str) -> str:
    if torch.device(device).type == "meta":
        return "meta device (nothing allocated)"
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def environment(device: str) -> dict[str, Any]:
    """Where and when a result was measured: the device's name, versions, git commit and the UTC date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _first_label(options: Any) -> str:
    """The baseline row's label: the first implementation; "fast" with a weight format is fast-<format>
    (profiler._variants labels its rows so)."""
    first, weights = options.impls[0], list(getattr(options, "weights", ["none"]))
    return first if first != "fast" or weights[0] == "none" else f"fast-{weights[0]}"


def metadata(options: Any) -> dict[str, Any]:
    """The run's settings (`options`: a profiler.ProfileOptions) with versions, device name, git commit, date."""
    env = environment(options.device)
    return {
        "preset": options.preset,
        "device": options.device,
        "device_name": env["device_name"],
        "dtype": options.dtype,
        "impls": list(options.impls),
        "baseline": _first_label(options),
        "shots": list(options.shots),
        "batch": list(options.batch),
        "new_tokens": options.new_tokens,
        "num_beams": options.num_beams,
        "weights": list(getattr(options, "weights", ["none"])),  # the fast rows' weight formats
        "repeats": options.repeats,
        "warmup": options.warmup,
        "seed": options.seed,
        "caption_tokens": options.caption_tokens,
        "question_tokens": options.question_tokens,
        "prompt": "<bos> + shots x (<image> caption <|endofchunk|>) + <image> question; shots + 1 images",
        **{key: env[key] for key in ("torch", "triton", "python", "git_commit", "date")},
        "setup_s": {},
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def format_table(result: ProfileResult) -> str:
    """Markdown: one row per (batch, shots, impl); speed-ups are baseline time / this time."""
    meta = result.metadata
    lines = [
        f"preset {meta['preset']}, {meta['device_name']}, {meta['dtype']}, {meta['new_tokens']} new tokens, "
        f"{meta.get('num_beams', 1)} beam(s) (decode ms: one step of batch x beams), "
        f"median of {meta['repeats']} repeats after {meta['warmup']} warm-up; baseline: {meta['baseline']}",
        "",
        "| impl | batch | shots | prompt tok | vision ms | media K/V ms | prefill ms | TTFT ms | warm TTFT ms "
        "| decode ms/tok p50 | p90 | tok/s | generate ms | weight MiB | peak MiB | warm-up s | TTFT x | warm TTFT x "
        "| decode x | generate x | same ids | logits rel err |",
        "| --- " + "| ---: " * 21 + "|",
    ]
    for r in result.rows:
        same = "-" if r.tokens_match_baseline is None else f"{100 * r.tokens_match_baseline:.0f}%"
        rel_err = "-" if r.first_logits_rel_err is None else f"{r.first_logits_rel_err:.1e}"
        lines.append(
            f"| {r.impl} | {r.batch} | {r.shots} | {r.prompt_tokens} | {_fmt(r.vision_ms)} | {_fmt(r.media_kv_ms)} "
            f"| {_fmt(r.prefill_ms)} "
            f"| {_fmt(r.ttft_ms)} | {_fmt(r.ttft_warm_ms)} | {_fmt(r.decode_ms_p50, 2)} | {_fmt(r.decode_ms_p90, 2)} "
            f"| {_fmt(r.decode_tokens_per_s)} | {_fmt(r.total_ms)} | {_fmt(r.weight_mib)} "
            f"| {_fmt(r.peak_mem_mib, 0)} | {_fmt(sum(r.warmup_s), 2)} | {_fmt(r.speedup_ttft, 2)} "
            f"| {_fmt(r.speedup_ttft_warm, 2)} "
            f"| {_fmt(r.speedup_decode_p50, 2)} "
            f"| {_fmt(r.speedup_total, 2)} | {same} | {rel_err} |"
        )
    kinds = sorted({r.peak_mem_kind for r in result.rows})
    held = " (every tensor the process holds during the row: the reference's weights and every fast row's, " \
        "built before the rows, count in each row)" if "cuda_max_allocated" in kinds else ""
    lines += ["", f"peak MiB: {', '.join(kinds)}{held}. x: speed-up over {meta['baseline']} (its time / this time)."]
    return "\n".join(lines)


def format_weights(rows: Sequence[WeightRow], meta: dict[str, Any]) -> str:
    """Markdown for `--device meta`: per row the exact weight bytes (by int8 and float dtypes), the caches, and the
    GB each card in CARDS_GB keeps after weights + caches (negative: they do not fit)."""
    capacity = f"{rows[0].max_seq_len} positions, {rows[0].max_images} images" if rows else "-"
    lines = [
        f"preset {meta['preset']}, {meta['dtype']} activations, built on the meta device: nothing allocated, nothing "
        f"run (no times, no peak memory); caches sized for {capacity} per row",
        "",
        "| impl | batch | weights | int8 bytes | float bytes | weight bytes | weight GB | weight MiB | caches MiB | "
        + " | ".join(f"GB left on {card}" for card in CARDS_GB) + " |",
        "| --- | ---: | --- " + "| ---: " * (6 + len(CARDS_GB)) + "|",
    ]
    notes = []
    for r in rows:
        total = r.total_weight_bytes
        if total is None:
            lines.append(f"| {r.impl} | {r.batch} | {r.weights or '-'} | " + " | ".join(["-"] * (6 + len(CARDS_GB)))
                         + " |")
            notes += [f"{r.impl}: {r.note}"] if r.note and f"{r.impl}: {r.note}" not in notes else []
            continue
        int8 = r.weight_bytes.get("int8", 0)
        held = (total + (r.cache_bytes or 0)) / 1e9
        cache_mib = "-" if r.cache_bytes is None else f"{r.cache_bytes / 2**20:.1f}"
        lines.append(f"| {r.impl} | {r.batch} | {r.weights or '-'} | {int8} | {total - int8} | {total} | "
                     f"{total / 1e9:.2f} | {total / 2**20:.1f} | {cache_mib} | "
                     + " | ".join(f"{gb - held:.1f}" for gb in CARDS_GB.values()) + " |")
    if meta.get("weights_note"):
        lines += ["", meta["weights_note"]]
    else:
        lines += ["", "weight bytes: FastFlamingo.weight_bytes() (the reference: its parameters and buffers), each "
                  "storage once. GB left: a card's nominal memory minus weights and caches; activations, the context "
                  "cache, CUDA-graph pools and the CUDA context come on top."]
    lines += notes
    images = [r for r in rows if r.image_kv_bytes and r.total_weight_bytes is not None]
    if images:
        lines += ["", meta.get("image_kv_note", "images: cross-attention K/V of one image"), "",
                  "| impl | batch | weights | image K/V MiB | "
                  + " | ".join(f"images beside the weights on {card}" for card in CARDS_GB) + " |",
                  "| --- | ---: | --- | ---: " + "| ---: " * len(CARDS_GB) + "|"]
        for r in images:
            fit = [max(int((gb * 1e9 - r.total_weight_bytes) // r.image_kv_bytes), 0) for gb in CARDS_GB.values()]
            lines.append(f"| {r.impl} | {r.batch} | {r.weights or '-'} | {r.image_kv_bytes / 2**20:.1f} | "
                         + " | ".join(str(n) for n in fit) + " |")
    return "\n".join(lines)


def write_json(result: ProfileResult, path: str | Path, complete: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(result.to_json(complete), indent=2, allow_nan=False) + "\n")
    tmp.replace(path)


def load_json(path: str | Path) -> ProfileResult:
    """A result written by `write_json` (complete or partial) back as a ProfileResult."""
    data = json.loads(Path(path).read_text())
    return ProfileResult(data["metadata"], [ProfileRow(**row) for row in data["rows"]])


def write_csv(result: ProfileResult, path: str | Path) -> None:
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta_fields = ["preset", "device_name", "dtype", "git_commit", "date"]
    with path.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(FIELDS + meta_fields)
        for r in result.rows:
            values = [getattr(r, name) for name in FIELDS]
            values = [";".join(f"{v:g}" for v in v) if isinstance(v, list) else ("" if v is None else v)
                      for v in values]
            writer.writerow(values + [result.metadata[name] for name in meta_fields])


def write_plot(result: ProfileResult, path: str | Path) -> bool:
    """Latency vs shots, one colour per impl (and batch): time to first token cold (solid) and with the context
    cache warm (dashed: the same prompt again, fast only), on a log scale; prefill; decode per token (p50).
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    several_batches = len({r.batch for r in result.rows}) > 1
    series: dict[str, list[ProfileRow]] = {}
    for r in result.rows:
        series.setdefault(f"{r.impl} (batch {r.batch})" if several_batches else r.impl, []).append(r)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r.shots)
        shots = [r.shots for r in rows]
        (cold,) = axes[0].plot(shots, [r.ttft_ms for r in rows], marker="o", label=f"{label} cold")
        warm = [(r.shots, r.ttft_warm_ms) for r in rows if r.ttft_warm_ms is not None]
        if warm:
            axes[0].plot(*zip(*warm, strict=True), marker="s", linestyle="--", color=cold.get_color(),
                         label=f"{label} warm (context cached)")
        axes[1].plot(shots, [r.prefill_ms for r in rows], marker="o", label=label)
        axes[2].plot(shots, [r.decode_ms_p50 for r in rows], marker="o", label=label)
    meta = result.metadata
    titles = ("time to first token (vision + prefill)", "prefill (prompt -> first token)", "decode per token (p50)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("shots")
        ax.set_ylabel("ms")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xticks(sorted({r.shots for r in result.rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")  # warm TTFT is an order of magnitude below cold at many shots
    plain = matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}")
    axes[0].yaxis.set_major_formatter(plain)
    axes[0].yaxis.set_minor_formatter(plain)
    axes[0].tick_params(axis="y", which="minor", labelsize=7)
    fig.suptitle(f"{meta['preset']} on {meta['device_name']}, {meta['dtype']}, {meta['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
