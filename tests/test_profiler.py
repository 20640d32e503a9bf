"""The per-shot profiler and its CLI: a tiny sweep writes complete JSON/CSV; bad arguments are clear errors."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from flamingo_fast import cli
from flamingo_fast.config import from_name
from flamingo_fast.profiling import profiler, prompts, report

TINY = ["--preset", "tiny", "--shots", "0,2", "--new-tokens", "3", "--repeats", "2", "--warmup", "1",
        "--device", "cpu", "--no-progress"]


class CountingStandIn:
    """Stands in for the fast runtime (which has its own tests): the reference model behind the same
    generate() signature, recording the calls so the test sees warm-up + repeats reach it."""

    def __init__(self, model, max_batch_size, max_seq_len):
        self.model, self.max_batch_size, self.max_seq_len, self.calls = model, max_batch_size, max_seq_len, 0

    def generate(self, vision_x, lang_x, attention_mask=None, max_new_tokens=20, eos_token_id=None, timer=None,
                 return_logits=False):
        assert lang_x.shape[0] <= self.max_batch_size and lang_x.shape[1] + max_new_tokens <= self.max_seq_len
        self.calls += 0 if return_logits else 1  # count the timed calls; the logits check is one extra
        return self.model.generate(vision_x, lang_x, attention_mask, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, timer=timer, return_logits=return_logits)


def test_prompt_layout():
    config = from_name("tiny")
    vision_x, lang_x, mask = prompts.build_prompt(config, shots=3, batch=2, caption_tokens=5, question_tokens=4,
                                                   seed=7, dtype=torch.float32, device="cpu")
    assert lang_x.shape == (2, prompts.prompt_length(3, 5, 4)) == (2, 1 + 3 * 7 + 1 + 4)
    assert vision_x.shape == (2, 4, 1, 3, config.vision.image_size, config.vision.image_size)
    assert mask.shape == lang_x.shape and bool(mask.all())
    assert (lang_x[:, 0] == config.bos_token_id).all()
    assert ((lang_x == config.media_token_id).sum(dim=1) == 4).all()  # k shots -> k + 1 images
    assert ((lang_x == config.eoc_token_id).sum(dim=1) == 3).all()
    body = lang_x[:, 1:]
    text = body[(body != config.media_token_id) & (body != config.eoc_token_id)]
    assert (text > config.eos_token_id).all() and (text < config.eoc_token_id).all()
    again = prompts.build_prompt(config, 3, 2, 5, 4, seed=7, dtype=torch.float32, device="cpu")
    assert torch.equal(again[1], lang_x) and torch.equal(again[0], vision_x)  # every impl sees the same prompt
    zero_shot = prompts.build_prompt(config, 0, 1, 5, 4, seed=7, dtype=torch.float32, device="cpu")
    assert zero_shot[0].shape[1] == 1 and int((zero_shot[1] == config.media_token_id).sum()) == 1


def test_cli_writes_table_json_csv(tmp_path, capsys, monkeypatch):
    stand_ins = []

    def build_stand_in(model, *, max_batch_size, max_seq_len, max_images, backend="auto"):
        assert max_images == 3 and backend == "auto"
        stand_ins.append(CountingStandIn(model, max_batch_size, max_seq_len))
        return stand_ins[-1]

    monkeypatch.setitem(profiler.BUILDERS, "fast", build_stand_in)
    paths = {name: tmp_path / f"out/profile.{name}" for name in ("json", "csv", "png")}
    argv = ["profile", *TINY, "--batch", "1,2", "--impl", "reference,fast", "--json", str(paths["json"]),
            "--csv", str(paths["csv"]), "--plot", str(paths["png"])]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out

    assert [s.max_batch_size for s in stand_ins] == [1, 2]
    assert all(s.calls == 2 * (1 + 2) for s in stand_ins)  # 2 shot counts x (1 warm-up + 2 repeats)
    data = json.loads(paths["json"].read_text())
    assert data["complete"] is True
    for key in ("preset", "device_name", "torch", "triton", "git_commit", "date", "dtype", "baseline", "setup_s"):
        assert key in data["metadata"], key
    assert data["metadata"]["preset"] == "tiny" and data["metadata"]["baseline"] == "reference"
    rows = data["rows"]
    assert [(r["batch"], r["shots"], r["impl"]) for r in rows] == [
        (b, s, i) for b in (1, 2) for s in (0, 2) for i in ("reference", "fast")
    ]
    for row in rows:
        assert set(row) == set(report.FIELDS)
        assert row["prompt_tokens"] == prompts.prompt_length(row["shots"], 12, 6) and row["images"] == row["shots"] + 1
        assert len(row["warmup_s"]) == 1 and row["repeats"] == 2
        for name in ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_p50", "decode_tokens_per_s", "total_ms"):
            assert math.isfinite(row[name]) and row[name] > 0, (name, row)
        assert row["decode_ms_p50"] <= row["decode_ms_p90"]
        # medians of sums against sums of medians: equal only up to the spread of the repeats
        assert row["ttft_ms"] == pytest.approx(row["vision_ms"] + row["media_kv_ms"] + row["prefill_ms"], rel=0.5)
        assert row["peak_mem_kind"].startswith("cpu_") and row["peak_mem_mib"] >= 0
        assert row["speedup_decode_p50"] > 0 and row["speedup_ttft"] > 0
        if row["impl"] == "reference":
            assert row["speedup_decode_p50"] == 1.0 and row["tokens_match_baseline"] is None
        else:  # the stand-in is the reference itself: same greedy ids, same logits
            assert row["tokens_match_baseline"] == 1.0
            assert row["first_logits_rel_err"] is not None and row["first_logits_rel_err"] < 1e-6
    # every ratio is the baseline's time over this row's, from the same (batch, shots)
    timings = {"speedup_vision": "vision_ms", "speedup_prefill": "prefill_ms", "speedup_ttft": "ttft_ms",
               "speedup_decode_p50": "decode_ms_p50", "speedup_decode_p90": "decode_ms_p90",
               "speedup_total": "total_ms"}
    baselines = {(r["batch"], r["shots"]): r for r in rows if r["impl"] == "reference"}
    for row in rows:
        base = baselines[(row["batch"], row["shots"])]
        for ratio, timing in timings.items():
            assert row[ratio] == pytest.approx(base[timing] / row[timing], rel=1e-9), (ratio, row, base)
        if base["peak_mem_mib"] > 0:
            assert row["mem_ratio"] == pytest.approx(row["peak_mem_mib"] / base["peak_mem_mib"], rel=1e-9)
    with paths["csv"].open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows) and set(report.FIELDS) <= set(csv_rows[0])
    assert float(csv_rows[1]["decode_ms_p50"]) == pytest.approx(rows[1]["decode_ms_p50"])
    assert paths["png"].stat().st_size > 0 and paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert table.count("| reference |") == 4 and table.count("| fast |") == 4


def test_trace_writes_chrome_trace(tmp_path):
    options = profiler.ProfileOptions(preset="tiny", shots=[1], new_tokens=2, repeats=1, warmup=0, device="cpu",
                                      impls=["reference"], trace_dir=str(tmp_path / "traces"))
    result = profiler.profile(options, progress=False)
    assert len(result.rows) == 1
    trace = json.loads((tmp_path / "traces/trace_reference_b1_s1.json").read_text())
    assert trace["traceEvents"]


def test_plot_missing_matplotlib_keeps_table(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report, "write_plot", lambda result, path: False)
    argv = ["profile", *TINY, "--shots", "0", "--impl", "reference", "--plot", str(tmp_path / "p.png")]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "| reference | 1 | 0 |" in captured.out
    assert "matplotlib is not installed" in captured.err and not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--shots", "0,-1"], "shots='0,-1': -1 is below 0"),
        (["--shots", "1,two"], "'two' is not an integer"),
        (["--impl", "reference,turbo"], "impl='turbo': unknown implementation"),
        (["--impl", "reference,reference"], "listed twice"),
        (["--dtype", "float8"], "invalid choice: 'float8'"),
        (["--device", "tpu"], "device='tpu'"),
        (["--new-tokens", "1"], "new_tokens=1: expected an integer >= 2"),
        (["--batch", "0"], "batch='0': 0 is below 1"),
        (["--preset", "tiny", "--shots", "32"], "preset 'tiny' allows 256"),
        (["--weights", "int4"], "weights='int4': expected one or more of ['none', 'bf16', 'int8']"),
        (["--weights", "bf16,bf16"], "weights='bf16,bf16'"),
    ],
)
def test_bad_arguments_are_clear_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["profile", "--device", "cpu", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "option, where, message",
    [
        ("--json", "/dev/null/p.json",
         "json='/dev/null/p.json': '/dev/null' is not a folder; expected a path under a folder"),
        ("--csv", "{tmp}", "csv='{tmp}': is a folder; expected a file path"),
        ("--plot", "{tmp}/file.txt/p.png",
         "plot='{tmp}/file.txt/p.png': '{tmp}/file.txt' is not a folder; expected a path under a folder"),
        ("--trace", "{tmp}/file.txt", "trace='{tmp}/file.txt': exists and is not a folder; expected a folder for "
         "the traces"),
        ("--backend", "foo", "argument --backend: invalid choice: 'foo' (choose from 'auto', 'triton', 'torch')"),
    ],
)
def test_bad_output_paths_and_backend_fail_before_the_sweep(option, where, message, tmp_path, capsys, monkeypatch):
    (tmp_path / "file.txt").write_text("not a folder")
    monkeypatch.setattr(profiler, "profile", lambda *args, **kwargs: pytest.fail("the sweep ran"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["profile", *TINY, option, where.format(tmp=tmp_path)])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "flamingo-fast profile: error: " + message.format(tmp=tmp_path)  # one line


def test_cli_refusals_in_a_fresh_process(tmp_path):
    """`python -m flamingo_fast profile`'s refusals before any work, in one process of its own (the torch import
    is most of its time), each an exit status 2 and one line naming the option: --csv / --plot / --trace with
    --workload (which writes its table and --json only); output paths the file system refuses even to root,
    whose permission bits pass (/sys), found by creating them; a shot count or batch size listed twice (two rows
    under one key), as an implementation listed twice is."""
    import subprocess
    import sys

    if not Path("/sys").is_dir():
        pytest.skip("needs Linux's /sys (a folder no one may create files in)")
    quick = ["profile", "--preset", "tiny", "--shots", "0", "--new-tokens", "2", "--repeats", "1", "--warmup", "0",
             "--device", "cpu", "--no-progress"]
    cases = {
        "--csv with --workload": ["--workload", "2", "--csv", str(tmp_path / "w.csv")],
        "--plot with --workload": ["--workload", "2", "--plot", str(tmp_path / "w.png")],
        "--trace with --workload": ["--workload", "2", "--trace", str(tmp_path / "traces")],
        "json='/sys/x.json': cannot be written (Permission denied)": ["--json", "/sys/x.json"],
        "csv='/sys/new/x.csv': cannot be written (Operation not permitted)": ["--csv", "/sys/new/x.csv"],
        "trace='/sys/traces': cannot be written (Operation not permitted)": ["--trace", "/sys/traces"],
        "shots='0,2,0': 0 is listed twice; expected each value once": ["--shots", "0,2,0"],
        "batch='1,2,2': 2 is listed twice; expected each value once": ["--batch", "1,2,2"],
        "impl='fast,fast': an implementation is listed twice": ["--impl", "fast,fast"],
    }
    driver = ("import contextlib, io, json, sys\nfrom flamingo_fast.cli import main\nout = []\n"
              "for argv in json.loads(sys.argv[1]):\n"
              "    err = io.StringIO()\n"
              "    try:\n"
              "        with contextlib.redirect_stderr(err):\n"
              "            code = main(argv)\n"
              "    except SystemExit as exit:\n"
              "        code = exit.code\n"
              "    except Exception as error:  # a crash fails its case only\n"
              "        code = f'{type(error).__name__}: {error}'\n"
              "    out.append([code, err.getvalue()])\n"
              "print(json.dumps(out))")
    runs = [quick + extra for extra in cases.values()]
    done = subprocess.run([sys.executable, "-c", driver, json.dumps(runs)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    wrong = [(extra, code, err[-500:]) for (message, extra), (code, err) in zip(cases.items(), results, strict=True)
             if code != 2 or message not in err or not err.strip().splitlines()[-1].startswith("flamingo-fast "
                                                                                                   "profile: error: ")]
    assert not wrong
    assert not [*tmp_path.iterdir()]  # nothing ran, nothing was written


def test_writable_output_paths_in_new_folders_are_accepted(tmp_path):
    """Checked by creating them: what did not exist before is gone again after, and an existing file keeps its
    contents."""
    for option in ("json", "csv", "plot"):
        profiler.check_output_path(option, tmp_path / "new" / "deeper" / f"p.{option}")
    profiler.check_output_path("trace", tmp_path / "traces", folder=True)
    profiler.check_output_path("trace", tmp_path / "new" / "traces", folder=True)
    (tmp_path / "kept.json").write_text("earlier results")
    profiler.check_output_path("json", tmp_path / "kept.json")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept.json"]
    assert (tmp_path / "kept.json").read_text() == "earlier results"
    with pytest.raises(ValueError, match=r"backend='foo': unknown fast runtime backend; expected one of "
                                         r"\['auto', 'triton', 'torch'\]"):
        profiler.ProfileOptions(preset="tiny", device="cpu", fast_backend="foo")


def test_cuda_without_gpu_is_a_clear_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible")
    with pytest.raises(ValueError, match="device='cuda': no CUDA device is visible"):
        profiler.ProfileOptions(preset="tiny", device="cuda")


def test_unavailable_impls_fail_before_running(monkeypatch):
    options = profiler.ProfileOptions(preset="tiny", shots=[0], device="cpu", impls=["reference", "openflamingo"])
    monkeypatch.setattr(profiler.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="needs the open_flamingo package"):
        profiler.profile(options, progress=False)
    options = profiler.ProfileOptions(preset="tiny", shots=[0], device="cpu", impls=["reference", "fast"])
    with pytest.raises(ValueError, match="flamingo_fast.runtime.runtime"):
        profiler.profile(options, progress=False)


def test_options_validate_programmatic_values():
    with pytest.raises(ValueError, match="shots=\\[1, -2\\]: -2 is not an integer >= 0"):
        profiler.ProfileOptions(preset="tiny", shots=[1, -2], device="cpu")
    with pytest.raises(ValueError, match="preset='nope': unknown"):
        profiler.ProfileOptions(preset="nope", device="cpu")
    with pytest.raises(ValueError, match="repeats=0: expected an integer >= 1"):
        profiler.ProfileOptions(preset="tiny", repeats=0, device="cpu")
    with pytest.raises(ValueError, match=r"batch=\[1, 2, 1\]: 1 is listed twice; expected each value once"):
        profiler.ProfileOptions(preset="tiny", shots=[0], batch=[1, 2, 1], device="cpu")


def test_progress_bar_counts_to_total():
    import io

    stream = io.StringIO()
    bar = profiler.ProgressBar(3, stream=stream)
    for i in range(3):
        bar.step(f"call {i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and lines[-1].startswith("[" + "#" * 24 + "] 3/3") and "call 2" in lines[-1]


def _bench_bandwidth():
    """bench/bandwidth.py as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / "bandwidth.py"
    spec = importlib.util.spec_from_file_location("bench_bandwidth", path)
    bandwidth = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bandwidth)
    return bandwidth


def test_bandwidth_floor_bytes_match_the_9b_shapes():
    bandwidth = _bench_bandwidth()
    config = from_name("openflamingo-9b-v1")  # LLaMA-7B: 32 layers, 4096 wide, MLP 11008; xattn every 4th layer
    counts = bandwidth.parameter_counts(config)
    d, ff, inner = 4096, 11008, 512
    assert counts["lm_layers"] == 32 * (4 * d * d + 3 * d * ff + 2 * d)
    assert counts["lm_head"] == 32003 * d
    assert counts["xattn_to_kv"] == 8 * 1024 * 2 * inner  # from the 1024-wide latents; not read when decoding
    assert counts["xattn_read"] == 8 * (2 * d + d * inner + inner * d + 2 * d + 2 * d * 4 * d + 2)
    parts = bandwidth.decode_bytes_per_step(config, batch=2, context=100, images=5, dtype_bytes=2, counts=counts)
    assert parts["self_kv"] == 2 * 2 * 32 * 2 * d * 100  # K and V, bf16, 32 layers, 2 rows, 100 positions
    assert parts["media_kv"] == 2 * 2 * 8 * 2 * 64 * inner  # only the current image's 64 latents per row
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    # int8 (FastFlamingo weights="int8"): each Linear's matrix 1 byte per weight + a float32 scale per output row
    # (LM: q, k, v, o 4d rows, gate and up 2 x ff, down d; gated block: to_q inner, to_out d, ff 4d and d; head:
    # the vocabulary); the RMSNorm / LayerNorm weights, biases and gates stay bf16
    int8 = bandwidth.decode_bytes_per_step(config, batch=2, context=100, images=5, dtype_bytes=2, counts=counts,
                                           weights="int8")
    lm_int8 = 32 * (4 * d * d + 3 * d * ff) + 4 * 32 * (5 * d + 2 * ff) + 32003 * d + 4 * 32003
    assert int8["lm_weights"] == lm_int8 + 2 * (32 * 2 * d + d + 2 * d)  # + layer norms, final norm, 2 embed rows
    xattn_int8 = 8 * (2 * d * inner + 8 * d * d) + 4 * 8 * (inner + 6 * d)
    assert int8["xattn_weights"] == xattn_int8 + 2 * 8 * (4 * d + 2)
    assert int8["self_kv"] == parts["self_kv"] and int8["media_kv"] == parts["media_kv"]
    assert int8["total"] == sum(v for k, v in int8.items() if k != "total")
    rows = bandwidth.floor_rows({"metadata": {"preset": "openflamingo-9b-v1", "dtype": "bfloat16"}, "rows": [
        {"impl": impl, "weights": weights, "batch": 2, "shots": 4, "images": 5, "prompt_tokens": 90, "new_tokens": 20,
         "decode_ms_p50": 5.0} for impl, weights in (("fast-bf16", "bf16"), ("fast-int8", "int8"))]}, 1000.0)
    assert [r["bytes_per_step"] for r in rows] == [parts["total"], int8["total"]]


def test_floor_int8_counts_match_what_the_runtime_quantizes():
    """At the 9B shapes on the meta device: the int8 bytes FastFlamingo.weight_bytes() holds are the matrices the
    floor counts at 1 byte (plus the gated blocks' to_kv, quantized but not read when decoding), and its float32
    bytes the scales, one per output row; `bench/bandwidth.py weights` prints the same totals."""
    from flamingo_fast.reference.model import build_reference
    from flamingo_fast.runtime.runtime import FastFlamingo

    bandwidth = _bench_bandwidth()
    config = from_name("openflamingo-9b-v1")
    counts = bandwidth.parameter_counts(config)
    runtime = FastFlamingo.from_reference(build_reference(config, device="meta"), weights="int8",
                                          dtype=torch.bfloat16)
    held = runtime.weight_bytes()
    matrices = sum(counts[f"linear_{part}"] for part in bandwidth.INT8_PARTS)
    assert held["int8"] == matrices + counts["xattn_to_kv"]
    assert held["float32"] == 4 * (sum(counts[f"rows_{part}"] for part in bandwidth.INT8_PARTS) + 8 * 1024)
    table = bandwidth.weight_bytes_table(["openflamingo-9b-v1"], ["int8"])
    assert f"| openflamingo-9b-v1 | int8 | {held['int8'] / 1e9:.2f} |" in table
    assert f"| {sum(held.values()) / 1e9:.2f} |" in table


def test_cold_and_warm_ttft_with_the_real_fast_path(capsys):
    """FastFlamingo rows: TTFT with the context cache cleared before each timed call, and warm TTFT (the same
    prompt again); the reference has no cache and no warm column. The ratio is the baseline's cold TTFT over
    this row's warm TTFT."""
    options = profiler.ProfileOptions(preset="tiny", shots=[3], new_tokens=2, repeats=2, warmup=0, device="cpu",
                                      fast_backend="torch")
    rows = profiler.profile(options, progress=False).rows
    reference, fast = rows
    assert reference.ttft_warm_ms is None and reference.speedup_ttft_warm is None
    assert fast.ttft_warm_ms is not None and fast.ttft_warm_ms > 0
    assert fast.speedup_ttft_warm == pytest.approx(reference.ttft_ms / fast.ttft_warm_ms, rel=1e-9)
    # the reference projects its cross-attention K/V inside prefill; the fast path in its own media K/V phase
    assert reference.media_kv_ms == 0 and fast.media_kv_ms > 0
    assert "warm TTFT ms" in report.format_table(report.ProfileResult(report.metadata(options), rows))


def test_weights_give_one_fast_row_per_format_with_its_weight_bytes(tmp_path, capsys):
    """--weights bf16,int8: the reference row, then a fast row per format, each with the MiB of the weights it
    holds; int8 (1 byte per quantized weight + a float32 scale per row) holds fewer than the float32 bf16 row."""
    path = tmp_path / "p.json"
    assert cli.main(["profile", *TINY, "--shots", "0", "--backend", "torch", "--weights", "bf16,int8",
                     "--json", str(path)]) == 0
    rows = {r.impl: r for r in report.load_json(path).rows}
    assert list(rows) == ["reference", "fast-bf16", "fast-int8"]
    assert [rows[n].weights for n in rows] == [None, "bf16", "int8"]
    model = rows["reference"]
    assert model.weight_mib == pytest.approx(rows["fast-bf16"].weight_mib, rel=1e-6)  # shares the reference's
    assert 0 < rows["fast-int8"].weight_mib < 0.6 * rows["fast-bf16"].weight_mib
    assert "| weight MiB |" in capsys.readouterr().out


def test_workload_mode(capsys):
    """OpenFlamingo's evaluation shape: every row of every batch shares one context; each row has its own query."""
    config = from_name("tiny")
    work = prompts.build_workload(config, 3, 2, 4, 5, 2, seed=0, dtype=torch.float32, device="cpu")
    assert len(work) == 4
    context = work[0][1][0, :-3]
    for vision, lang_x, mask, image_mask in work:
        assert image_mask is None  # the OpenFlamingo layout: <image> tokens say it
        assert torch.equal(lang_x[:, :-3], context.expand(2, -1)) and mask.all()
        assert lang_x[0, -3] == config.media_token_id and torch.equal(vision[:, :3], work[0][0][:, :3])
    assert not torch.equal(work[0][0][:, 3], work[1][0][:, 3]) and not torch.equal(work[0][1], work[1][1])
    assert cli.main(["profile", "--preset", "tiny", "--shots", "2", "--batch", "2", "--new-tokens", "2",
                     "--workload", "3", "--backend", "torch", "--no-progress", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| reference") or line.startswith("| fast")]
    assert len(lines) == 2
    cells = [line.split("|")[1:-1] for line in lines]
    ref_qps, fast_qps = float(cells[0][4]), float(cells[1][4])
    # the table rounds queries/s and the ratio to 0.01: the ratio of the true values lies within these bounds
    low, high = (fast_qps - 0.005) / (ref_qps + 0.005), (fast_qps + 0.005) / max(ref_qps - 0.005, 1e-9)
    assert low - 0.005 <= float(cells[1][7]) <= high + 0.005


def test_progress_bar_stays_quiet_until_after_seconds():
    import io

    quiet, shown = io.StringIO(), io.StringIO()
    late = profiler.ProgressBar(2, stream=quiet, after_seconds=60.0)
    now = profiler.ProgressBar(2, stream=shown, after_seconds=0.0)
    for bar in (late, now):
        bar.step("a")
        bar.step("b")
    assert quiet.getvalue() == "" and late.done == 2
    assert "2/2" in shown.getvalue()


def test_idefics_presets_profile_with_the_processor_mask():
    """IDEFICS prompts wrap each image in <fake_token_around_image>; the mask says which image a token sees."""
    config = from_name("idefics-tiny")
    vision, lang_x, mask = prompts.build_prompt(config, 2, 2, 3, 2, seed=0, dtype=torch.float32, device="cpu")
    assert lang_x.shape == (2, prompts.prompt_length(2, 3, 2, config)) == (2, 1 + 2 * 6 + 3 + 2)
    image_mask = prompts.image_attention_mask(config, lang_x, 3)
    fake = config.lm.vocab_size - config.lm.additional_vocab_size
    assert lang_x[0, 1:4].tolist() == [fake, config.media_token_id, fake]
    assert image_mask[0, :2].sum() == 0 and image_mask[0, 2:8, 0].all() and image_mask[0, 8:, 1:].sum(-1).all()
    assert image_mask.sum(-1).max() == 1
    assert cli.main(["profile", "--preset", "idefics-tiny", "--shots", "0,2", "--batch", "2", "--new-tokens", "3",
                     "--repeats", "1", "--warmup", "0", "--backend", "torch", "--no-progress"]) == 0
    with pytest.raises(ValueError, match=r"impl='openflamingo' with preset 'idefics-tiny' \(layout 'idefics'\)"):
        profiler.ProfileOptions(preset="idefics-tiny", impls=["openflamingo", "fast"])


def _weight_table_rows(out: str) -> dict[tuple[str, int], list[str]]:
    """The --device meta table's rows by (impl, batch) -> their cells."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) > 5 and cells[1].isdigit():
            rows[(cells[0], int(cells[1]))] = cells
    return rows


def test_meta_device_prints_the_80b_int8_weight_count_without_running(tmp_path, capsys, monkeypatch):
    """`profile --device meta` builds IDEFICS-80B on the meta device and prints, per weight format, the
    bytes FastFlamingo.weight_bytes() counts for the build the issue names (int8 under 100 GB); nothing runs."""
    from flamingo_fast.reference.model import build_reference
    from flamingo_fast.runtime.fused_weights import bytes_by_dtype
    from flamingo_fast.runtime.runtime import FastFlamingo

    monkeypatch.setattr(profiler, "_timed_generate", lambda *a, **k: pytest.fail("a generate call ran on meta"))
    path = tmp_path / "w.json"
    assert cli.main(["profile", "--preset", "idefics-80b", "--impl", "fast", "--weights", "bf16,int8", "--dtype",
                     "bfloat16", "--device", "meta", "--shots", "0", "--new-tokens", "4", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    rows = _weight_table_rows(out)
    assert list(rows) == [("fast-bf16", 1), ("fast-int8", 1)]
    int8 = FastFlamingo.from_reference(build_reference(from_name("idefics-80b"), device="meta"), weights="int8",
                                       dtype=torch.bfloat16).weight_bytes()
    cells = rows[("fast-int8", 1)]
    assert int(cells[5]) == sum(int8.values()) < 100e9
    assert int(cells[3]) == int8["int8"] and int(cells[4]) == sum(int8.values()) - int8["int8"]
    config = from_name("idefics-80b")
    bf16 = bytes_by_dtype(build_reference(config, dtype=torch.bfloat16, device="meta"))
    assert int(rows[("fast-bf16", 1)][5]) == sum(bf16.values()) and int(rows[("fast-bf16", 1)][3]) == 0
    # the caches the runtime allocates for that capacity (batch 1): K and V of every layer, media K/V of every
    # gated block, the bool key mask; and what an H200 keeps after weights + caches
    lm, seq, images = config.lm, prompts.prompt_length(0, 12, 6, config) + 4, 1
    caches = (2 * 2 * lm.num_layers * lm.num_kv_heads * seq * lm.head_dim + seq
              + 2 * 2 * len(config.xattn_layer_indices) * config.xattn_heads * images * config.perceiver.num_latents
              * config.xattn_dim_head)
    assert float(cells[8]) == pytest.approx(caches / 2**20, abs=0.05)
    assert float(cells[9]) == pytest.approx(141 - (sum(int8.values()) + caches) / 1e9, abs=0.05)
    data = json.loads(path.read_text())
    assert data["metadata"]["device"] == "meta" and data["weight_rows"][1]["weight_bytes"] == int8


def test_meta_device_rejects_what_needs_a_run(tmp_path, capsys):
    for extra in (["--csv", str(tmp_path / "p.csv")], ["--workload", "2"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["profile", "--preset", "tiny", "--device", "meta", "--shots", "0", *extra])
        assert exit_info.value.code == 2
        assert "with --device meta: nothing runs on the meta device" in capsys.readouterr().err
    options = profiler.ProfileOptions(preset="tiny", shots=[0], device="meta")
    assert options.dtype == "bfloat16"
    with pytest.raises(ValueError, match="device='meta': nothing runs on the meta device"):
        profiler.profile(options, progress=False)
    rows = profiler.count_weights(options)  # reference and fast on tiny: the fast row shares the reference's
    assert [(r.impl, r.weights) for r in rows] == [("reference", None), ("fast", "none")]
    assert rows[0].weight_bytes == rows[1].weight_bytes and rows[0].cache_bytes is None
    assert rows[1].cache_bytes > 0


def _bench_int8_matmul(monkeypatch):
    """bench/int8_matmul.py as a module, with bench/ on sys.path for its `bandwidth` and `common` imports."""
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("bench_int8_matmul", bench / "int8_matmul.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_int8_matmul_bench_shapes_are_the_decode_steps_gemms(monkeypatch):
    """The microbenchmark's shapes: one GEMM per fused matrix (LLaMA q/k/v and gate/up), no to_kv (once per
    prompt), each weighted by how often a decode step runs it: the bytes add up to the int8 the step reads."""
    bench = _bench_int8_matmul(monkeypatch)
    # `small`: LLaMA, 8 layers 512 wide (MLP 2048), a gated block before every layer (inner 512, FF 4 x 512)
    shapes = {(s["N"], s["K"]): s for s in bench.decode_matmuls("small")}
    d, ff = 512, 2048
    assert shapes[(3 * d, d)]["per_step"] == 8 and "q_proj+k_proj+v_proj x8" in shapes[(3 * d, d)]["names"]
    assert shapes[(2 * ff, d)]["per_step"] == 8 and "gate_proj+up_proj x8" in shapes[(2 * ff, d)]["names"]
    assert shapes[(d, ff)]["per_step"] == 8 + 8  # the MLP's down_proj and the gated blocks' FF out (4 d = ff)
    assert shapes[(d, d)]["per_step"] == 3 * 8  # o_proj, to_q and to_out (inner 512 = d)
    assert shapes[(4 * d, d)]["per_step"] == 8 and shapes[(32003, d)]["per_step"] == 1
    assert len(shapes) == 6  # nothing else: to_kv is not a decode matmul
    counts = _bench_bandwidth().parameter_counts(from_name("small"))
    read = sum(counts[f"linear_{part}"] for part in ("lm_layers", "xattn_read", "lm_head"))
    assert sum(s["N"] * s["K"] * s["per_step"] for s in shapes.values()) == read


def test_int8_matmul_bench_runs_its_cpu_form(monkeypatch, tmp_path, capsys):
    """The CPU form: Triton skipped with its reason, bf16 / aten / fp32 timed, the ratio printed from the same
    run, the aten op checked against float64, the goal "not measured"; the step sums its shapes' times."""
    bench = _bench_int8_matmul(monkeypatch)
    path = tmp_path / "int8.json"
    assert bench.main(["--preset", "tiny", "--m", "1,3", "--repeats", "1", "--gib", "0.01", "--rotate-mib", "1",
                       "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "triton: skipped on the CPU" in out and "not measured (no CUDA" in out
    data = json.loads(path.read_text())
    assert data["impls"] == ["bf16", "aten", "fp32"] and data["goal"] == "not measured"
    checked = [r for r in data["rows"] if "check" in r]
    assert checked and all(r["M"] == 3 and r["check"]["aten"]["ok"] for r in checked)
    for step in data["steps"]:
        rows = [r for r in data["rows"] if r["M"] == step["M"]]
        assert step["ms"]["aten"] == pytest.approx(sum(r["per_step"] * r["ms"]["aten"] for r in rows))
    row = data["rows"][0]
    assert f"| {row['ms']['bf16'] / row['ms']['aten']:.2f} |" in out  # baseline / fast, from the same run
