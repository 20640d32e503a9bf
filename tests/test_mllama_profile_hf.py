"""The profiler's timed Llama 3.2 Vision sweep (`profile --preset mllama-*`, flamingo_fast/profiling/mllama_profile.py)
against transformers' own MllamaForConditionalGeneration.generate: one tiny run (mllama-tiny, shots 0 and 1, 2 new
tokens) through the CLI, once per module, its rows, JSON and CSV checked; the presets as transformers configs; the
random model built on a device. Runs under transformers 4.57 (.venv-openflamingo) and 5.24 (.venv-transformers5);
skipped elsewhere (tests/test_mllama_profile.py: the meta-device counts, which need no transformers)."""

from __future__ import annotations

import csv
import functools
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", reason="the timed Mllama profile needs transformers "
                                                          "(make test-openflamingo / test-transformers5)")
pytestmark = pytest.mark.comparison

from flamingo_fast import cli  # noqa: E402
from flamingo_fast.profiling import report  # noqa: E402
from flamingo_fast.reference.mllama_config import (  # noqa: E402
    MLLAMA_PRESETS,
    mllama_config_from_hf,
    mllama_from_name,
)


@functools.cache
def tiny_run(folder: str) -> tuple[report.ProfileResult, list[dict], str]:
    """`profile --preset mllama-tiny --shots 0,1 --new-tokens 2 --impl hf,fast`, once: (the JSON as a result, the
    CSV's lines, stdout is not kept)."""
    json_path, csv_path = Path(folder) / "p.json", Path(folder) / "p.csv"
    assert cli.main(["profile", "--preset", "mllama-tiny", "--shots", "0,1", "--new-tokens", "2", "--repeats", "1",
                     "--warmup", "0", "--backend", "torch", "--no-progress", "--caption-tokens", "3",
                     "--question-tokens", "2", "--json", str(json_path), "--csv", str(csv_path)]) == 0
    with csv_path.open() as f:
        return report.load_json(json_path), list(csv.DictReader(f)), str(json_path)


@pytest.mark.parametrize("name", sorted(MLLAMA_PRESETS))
def test_presets_as_transformers_configs(name):
    """The timed sweep builds transformers' model from the preset: its config reads back as the preset."""
    from flamingo_fast.profiling.mllama_profile import hf_mllama_config

    assert mllama_config_from_hf(hf_mllama_config(mllama_from_name(name)).to_dict()) == mllama_from_name(name)


def test_random_model_built_on_a_device_in_its_dtype():
    """build_mllama_from_config(device=...) (the GPU check's 11B: built and drawn on the GPU, bf16 from the start)
    draws the same values as the CPU build, on the generator's device."""
    import torch

    from flamingo_fast.profiling.mllama_profile import hf_mllama_config
    from flamingo_fast.testing import build_mllama_from_config

    config = hf_mllama_config(mllama_from_name("mllama-tiny"))
    plain, placed = build_mllama_from_config(config), build_mllama_from_config(config, device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), placed.state_dict().values(),
                                                  strict=True))
    half = build_mllama_from_config(config, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16} and torch.get_default_dtype() == torch.float32


def test_timed_sweep_rows_against_transformers_generate(tmp_path_factory):
    result, lines, _ = tiny_run(str(tmp_path_factory.mktemp("mllama_profile")))
    meta = result.metadata
    assert meta["preset"] == "mllama-tiny" and meta["baseline"] == "hf" and "<|image|>" in meta["prompt"]
    assert meta["transformers"] == transformers.__version__
    assert [(r.impl, r.shots) for r in result.rows] == [("hf", 0), ("fast", 0), ("hf", 1), ("fast", 1)]
    for r in result.rows:
        # <|begin_of_text|> + shots x (<|image|> + 3 caption tokens) + <|image|> + 2 question tokens
        assert r.prompt_tokens == 1 + 4 * r.shots + 3 and r.images == r.shots + 1 and r.new_tokens == 2
        assert r.ttft_ms == pytest.approx(r.vision_ms + r.media_kv_ms + r.prefill_ms)
        assert r.vision_ms > 0 and r.prefill_ms > 0 and r.decode_ms_p50 > 0 and r.weight_mib > 0
    hf, fast = result.rows[2], result.rows[3]
    assert hf.ttft_warm_ms is None and hf.tokens_match_baseline is None and hf.media_kv_ms == 0
    assert fast.ttft_warm_ms > 0 and fast.media_kv_ms > 0 and fast.weights == "none"
    assert fast.speedup_ttft == pytest.approx(hf.ttft_ms / fast.ttft_ms)
    assert fast.speedup_decode_p50 == pytest.approx(hf.decode_ms_p50 / fast.decode_ms_p50)
    assert fast.speedup_ttft_warm == pytest.approx(hf.ttft_ms / fast.ttft_warm_ms)
    for r in result.rows[1::2]:  # the same greedy ids as transformers' generate, the same last logits
        assert r.tokens_match_baseline == 1.0 and r.first_logits_rel_err < 1e-5
    assert [line["impl"] for line in lines] == ["hf", "fast", "hf", "fast"]
    assert float(lines[3]["tokens_match_baseline"]) == 1.0 and lines[0]["preset"] == "mllama-tiny"
