"""The profiler's Llama 3.2 Vision presets (flamingo_fast/profiling/mllama_profile.py).

`--device meta` (no transformers: the main environment): the weight bytes per format, the caches and the images that
fit, checked against counts written out from the configs (tests/mllama_counts.py), in-process and through the CLI
in a subprocess; options that make no sense with an mllama-* preset are errors naming them.
The timed sweep against transformers' generate: tests/test_mllama_profile_hf.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mllama_counts import closed_form

from flamingo_fast import cli
from flamingo_fast.profiling import profile_options
from flamingo_fast.reference.mllama_config import mllama_from_name

CARDS_GB = {"H200": 141, "H100": 80, "24 GB": 24}


def expected_meta(name: str, batch: int, shots: int, new_tokens: int, caption: int = 12,
                  question: int = 6) -> dict:
    """Weight bytes per format, caches and images per card, from the config's arithmetic (bf16 activations)."""
    config = mllama_from_name(name)
    v, t = config.vision, config.text
    total, quantized, rows = closed_form(config)
    head_dim = t.hidden_size // t.num_heads
    vision_tokens = v.max_num_tiles * ((v.image_size // v.patch_size) ** 2 + 1)  # each tile's patches + class
    image_kv = t.num_kv_heads * head_dim * vision_tokens * 2 * 2 * len(t.cross_attention_layers)  # K and V, 2 B
    positions = 1 + shots * (1 + caption) + 1 + question + new_tokens
    self_kv = (t.num_layers - len(t.cross_attention_layers)) * t.num_kv_heads * head_dim * positions * 2 * 2
    caches = batch * (self_kv + (shots + 1) * image_kv)
    weights = {"bf16": 2 * total, "int8": quantized + 4 * rows + 2 * (total - quantized)}
    return {"weights": weights, "int8_part": quantized, "image_kv": image_kv, "caches": caches,
            "images": {fmt: {card: max(int((gb * 1e9 - w) // image_kv), 0) for card, gb in CARDS_GB.items()}
                       for fmt, w in weights.items()}}


def _tables(out: str) -> tuple[dict, dict]:
    """The weight table's and the images table's rows, by (impl, batch) -> cells."""
    weights, images = {}, {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) > 5 and cells[1].isdigit():
            (images if len(cells) == 7 else weights)[(cells[0], int(cells[1]))] = cells
    return weights, images


def test_meta_table_of_the_11b(tmp_path, capsys):
    """mllama-11b: 21.3 GB of bf16 weights (the 24 GB card keeps them, with 12 images of 200 MiB beside), int8
    12.1 GB; the caches of a 2-shot prompt at batch 2; nothing built but the reference on the meta device."""
    path = tmp_path / "m.json"
    assert cli.main(["profile", "--device", "meta", "--preset", "mllama-11b", "--shots", "0,2", "--batch", "2",
                     "--new-tokens", "4", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    want = expected_meta("mllama-11b", batch=2, shots=2, new_tokens=4)
    assert want["image_kv"] == 8 * 128 * 6404 * 2 * 2 * 8  # the figure: 25 MiB a layer, 8 layers
    weights, images = _tables(out)
    assert list(weights) == [("hf", 2), ("fast-bf16", 2), ("fast-int8", 2)] and list(images) == list(weights)
    for label, fmt in (("hf", "bf16"), ("fast-bf16", "bf16"), ("fast-int8", "int8")):
        cells = weights[(label, 2)]
        total = want["weights"][fmt]
        assert int(cells[5]) == total and int(cells[3]) == (want["int8_part"] if fmt == "int8" else 0)
        assert float(cells[8]) == pytest.approx(want["caches"] / 2**20, abs=0.05)
        assert float(cells[9]) == pytest.approx(141 - (total + want["caches"]) / 1e9, abs=0.05)
        assert float(cells[11]) == pytest.approx(24 - (total + want["caches"]) / 1e9, abs=0.05)
        assert [int(c) for c in images[(label, 2)][4:]] == list(want["images"][fmt].values())
    assert 21.3e9 < want["weights"]["bf16"] < 21.4e9 and want["images"]["bf16"]["24 GB"] == 12
    data = json.loads(path.read_text())
    assert data["metadata"]["preset"] == "mllama-11b" and data["metadata"]["weights"] == ["bf16", "int8"]
    assert [r["image_kv_bytes"] for r in data["weight_rows"]] == [want["image_kv"]] * 3
    assert "the cross-attention K/V of one image of 4 tiles" in out and "25.0 MiB per layer" in out


def test_meta_table_of_the_90b_through_the_cli_in_a_subprocess(tmp_path):
    """`python -m flamingo_fast profile --device meta --preset mllama-90b`: bf16 (177 GB) fits no card, int8 (91 GB)
    only the H200, with room for 96 images of 500 MiB (20 cross-attention layers)."""
    path = tmp_path / "m.json"
    proc = subprocess.run([sys.executable, "-m", "flamingo_fast", "profile", "--device", "meta", "--preset",
                           "mllama-90b", "--shots", "1", "--new-tokens", "2", "--json", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    want = expected_meta("mllama-90b", batch=1, shots=1, new_tokens=2)
    weights, images = _tables(proc.stdout)
    for label, fmt in (("hf", "bf16"), ("fast-int8", "int8")):
        assert int(weights[(label, 1)][5]) == want["weights"][fmt]
        assert [int(c) for c in images[(label, 1)][4:]] == list(want["images"][fmt].values())
    assert want["images"]["bf16"] == {"H200": 0, "H100": 0, "24 GB": 0}
    assert want["images"]["int8"]["H200"] > 0 == want["images"]["int8"]["H100"]
    rows = json.loads(path.read_text())["weight_rows"]
    assert [sum(r["weight_bytes"].values()) for r in rows] == [want["weights"][f] for f in ("bf16", "bf16", "int8")]
    assert rows[0]["cache_bytes"] == want["caches"]


def test_decode_read_bytes_of_the_11b():
    """The floor of bench/mllama_gpu.py (the GPU check's mllama_11b step): per decode step every language-model
    layer's weights but the cross-attention k/v projections and k_norm, the final norm, the head and one embedding
    row, in bf16; plus the self-attention K/V of the context and the image's cross-attention K/V."""
    from flamingo_fast.reference.mllama_sizes import mllama_decode_read_bytes

    t = mllama_from_name("mllama-11b").text
    h, head_dim = t.hidden_size, t.hidden_size // t.num_heads
    kv, cross = t.num_kv_heads * head_dim, len(t.cross_attention_layers)
    layer = 2 * h * h + 2 * h * kv + 3 * h * t.intermediate_size + 2 * h  # q, o, k, v, the MLP, two norms
    weights = t.num_layers * layer + cross * (2 * head_dim + 2) - cross * (2 * h * kv + head_dim) \
        + h + t.vocab_size * h + h  # final norm, head, one embedding row
    assert mllama_decode_read_bytes(mllama_from_name("mllama-11b"), 1, 0, 0) == 2 * weights
    context_kv = (t.num_layers - cross) * kv * 2 * 2  # K and V a position, bf16
    assert mllama_decode_read_bytes(mllama_from_name("mllama-11b"), 2, 10, 1) == \
        2 * weights + 2 * (10 * context_kv + 8 * 128 * 6404 * 2 * 2 * 8)
    assert 18.3e9 < 2 * weights < 18.4e9  # of the 21.3 GB: no vision tower, no embedding table, no k/v projections


def test_options_that_make_no_sense_with_an_mllama_preset(capsys, monkeypatch):
    """Each refused with the argument, its value and what is expected."""
    monkeypatch.setattr(profile_options.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else __import__("importlib").util
                        .find_spec(name, *a))
    with pytest.raises(ValueError, match=r"device='cpu' with preset 'mllama-small': the timed Llama 3.2 Vision "
                                         r"profile builds transformers' .* expected device='meta'"):
        profile_options.ProfileOptions(preset="mllama-small", device="cpu", shots=[0])
    cases = [
        (["--device", "cpu"], "device='cpu' with preset 'mllama-small'"),
        (["--device", "meta", "--impl", "reference,fast"], "impl='reference' with preset 'mllama-small' "
                                                           "(Llama 3.2 Vision): expected hf and/or fast"),
        (["--device", "meta", "--workload", "2"], "--workload with --preset mllama-small"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["profile", "--preset", "mllama-small", "--shots", "0", *extra])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err, extra
    with pytest.raises(ValueError, match=r"impl='hf' with preset 'small' \(layout 'openflamingo'\): that baseline "
                                         r"runs the 'mllama' layout only"):
        profile_options.ProfileOptions(preset="small", impls=["hf", "fast"], device="meta")
    options = profile_options.ProfileOptions(preset="mllama-tiny", device="meta", shots=[0])
    assert options.impls == ["hf", "fast"] and options.weights == ["bf16", "int8"]

