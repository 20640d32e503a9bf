"""load_openflamingo from files, in the main environment (no open_flamingo needed): a tiny reference written out
as OpenFlamingo's three files (checkpoint.pt, the LM's Hugging Face folder, open_clip's weights) loads back to
the same model; mixed dtypes, multi-GPU checkpoints and ViT head counts are handled; a file that cannot be used
is an error naming the argument, the file and the cause."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_files import LM_CONFIG, OPTIONS, TINY, logits_agree, write_files
from helpers import random_batch
from safetensors.torch import save_file

import flamingo_fast
from flamingo_fast.dropins.weights_files import load_tensors
from flamingo_fast.reference.model import build_reference


@pytest.fixture
def tiny_model():
    return build_reference(TINY, seed=40)


def test_files_load_back_to_the_same_model(tiny_model, tmp_path):
    fast = flamingo_fast.load_openflamingo(*write_files(tiny_model, tmp_path), **OPTIONS)
    assert fast.config.vision.heads == 2  # from open_clip_config.json (48 wide, head_width 24)
    logits_agree(fast, tiny_model)


def test_multi_gpu_training_checkpoint_loads(tiny_model, tmp_path):
    """OpenFlamingo's DDP/FSDP training saves {"model_state_dict": {"module.<name>": ...}, "optimizer_state_dict":
    ..., "epoch": ...}; its evaluation strips `module.`."""
    def training_checkpoint(state):
        return {"epoch": 3, "model_state_dict": {"module." + k: v for k, v in state.items()}}

    fast = flamingo_fast.load_openflamingo(*write_files(tiny_model, tmp_path, checkpoint_wrap=training_checkpoint),
                                           **OPTIONS)
    logits_agree(fast, tiny_model)


def test_missing_perceiver_keys_error_lists_the_unexpected_keys(tiny_model, tmp_path):
    def compiled(state):  # torch.compile's wrapper prefix: not stripped, so nothing is where it is expected
        return {"_orig_mod." + k: v for k, v in state.items()}

    files = write_files(tiny_model, tmp_path, checkpoint_wrap=compiled)
    with pytest.raises(ValueError, match=r"missing keys \[perceiver.latents, .*\]: the perceiver's shape cannot be "
                                         r"inferred without them; unexpected keys \[_orig_mod.lang_encoder.model"
                                         r".layers.0.gated_cross_attn_layer.attn.norm.bias, .*\] and \d+ more$"):
        flamingo_fast.load_openflamingo(*files, **OPTIONS)


def test_bf16_lm_with_float32_checkpoint_and_clip_loads_as_float32(tiny_model, tmp_path):
    """MPT-7B ships bf16 weights; OpenFlamingo's checkpoint and CLIP are float32. With dtype=None everything
    becomes float32 (as OpenFlamingo loads them), so the model runs instead of failing at the first call."""
    files = write_files(tiny_model, tmp_path, lm_dtype=torch.bfloat16)
    fast = flamingo_fast.load_openflamingo(*files, **OPTIONS)
    assert {t.dtype for t in fast.reference.state_dict().values()} == {torch.float32}
    rounded = build_reference(TINY, seed=40)  # the same model with its LM weights rounded through bf16
    with torch.no_grad():
        for name, tensor in rounded.lang_encoder.named_parameters():
            if not name.startswith("gated_cross_attn_layers."):
                tensor.copy_(tensor.to(torch.bfloat16).float())
    logits_agree(fast, rounded)
    vision, lang_x, mask = random_batch(TINY, [([0], 6)], num_images=1)
    assert fast.generate(vision, lang_x, mask, max_new_tokens=3, eos_token_id=[]).shape == (1, 9)
    bf16 = flamingo_fast.load_openflamingo(*files, **OPTIONS, dtype=torch.bfloat16)  # an explicit dtype wins
    assert {t.dtype for t in bf16.reference.state_dict().values()} == {torch.bfloat16}


def test_vit_head_count_is_never_a_silent_guess(tiny_model, tmp_path):
    files = write_files(tiny_model, tmp_path, clip_config=False)  # 48 wide: no 64-wide heads fit
    expected = (r"vision: the ViT is 48 wide, which is not a multiple of open_clip's 64-wide heads.*pass "
                r"vision=VisionConfig\(image_size=32, patch_size=8, width=48, layers=2, heads=..., act=...\)")
    with pytest.raises(ValueError, match=expected):
        flamingo_fast.load_openflamingo(*files, **OPTIONS)
    fast = flamingo_fast.load_openflamingo(*files, **OPTIONS, vision=flamingo_fast.VisionConfig(
        image_size=32, patch_size=8, width=48, layers=2, heads=2, act="quick_gelu"))
    logits_agree(fast, tiny_model)


@pytest.mark.parametrize("width, heads", [(768, 12), (1024, 16), (1280, 16), (1664, 16), (256, 4)])
def test_vit_head_count_follows_open_clip(width, heads):
    """ViT-B (12 x 64), ViT-L (16 x 64), ViT-H (16 x 80), ViT-bigG (16 x 104), a 256-wide ViT (4 x 64)."""
    from flamingo_fast.dropins.openflamingo_config import _guess_vit_heads

    assert _guess_vit_heads(width, layers=2, patch=14, image_size=224) == heads


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_FILES = [
    ("checkpoint_path", lambda c, lm, v: c.write_text("perceiver weights are elsewhere\n"),
     r"checkpoint_path='.*checkpoint.pt': not a readable torch checkpoint \(not a weights file, truncated or "
     r"corrupt\?\): "),
    ("checkpoint_path", lambda c, lm, v: c.write_bytes(b""), r"checkpoint_path='.*checkpoint.pt': the file is empty"),
    ("checkpoint_path", lambda c, lm, v: _truncate(c), r"checkpoint_path='.*checkpoint.pt': not a readable torch"),
    ("vision_path", lambda c, lm, v: _truncate(v),
     r"vision_path='.*open_clip_model.safetensors': not a readable safetensors file"),
    ("lm_path", lambda c, lm, v: _truncate(lm / "model.safetensors"),
     r"lm_path='.*model.safetensors': not a readable safetensors file"),
    ("checkpoint_path", lambda c, lm, v: torch.save({"perceiver.latents": 3, "epoch": 1}, c),
     r"checkpoint_path='.*checkpoint.pt': 'perceiver.latents' holds a int; expected a tensor"),
    ("checkpoint_path", lambda c, lm, v: torch.save([torch.zeros(1)], c),
     r"checkpoint_path='.*checkpoint.pt': holds a list; expected a state dict"),
    ("lm_path", lambda c, lm, v: (lm / "config.json").write_text(json.dumps({"model_type": "llama"})),
     r"lm_path='.*lm': '.*config.json': no 'num_attention_heads'; expected a Hugging Face config.json with the "
     r"model's sizes"),
    ("lm_path", lambda c, lm, v: (lm / "config.json").write_text('{"model_type": "llama",'),
     r"lm_path='.*lm': '.*lm/config.json' is not valid JSON: "),
    ("vision_path", lambda c, lm, v: (v.parent / "open_clip_config.json").write_text("{"),
     r"vision_path: '.*clip/open_clip_config.json' is not valid JSON"),
]


@pytest.mark.parametrize("argument, spoil, match", BAD_FILES)
def test_unusable_files_name_the_argument_and_the_cause(tiny_model, tmp_path, argument, spoil, match):
    files = write_files(tiny_model, tmp_path)
    spoil(*files)
    with pytest.raises(ValueError, match=match):
        flamingo_fast.load_openflamingo(*files, **OPTIONS)


def test_load_tensors_reads_safetensors_in_the_main_environment(tmp_path):
    save_file({"a": torch.arange(3.0)}, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_tensors(tmp_path / "w.safetensors")["a"], torch.arange(3.0))


# ---------------------------------------------------------------------------------------------- memory, measured

# A LLaMA big enough for the probe to see a layer (7.1 M parameters: 14 MB in bf16) against the whole float model
# (57 M in its layers); the rest as TINY.
PROBE_LM = {**LM_CONFIG, "hidden_size": 768, "num_hidden_layers": 8, "num_attention_heads": 12,
            "num_key_value_heads": 12, "intermediate_size": 2048}
PROBE = TINY.replace(lm=dataclasses.replace(TINY.lm, hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=12,
                                            intermediate_size=2048))


def probe(folder, mode: str, **options) -> dict:
    """tests/memory_probe.py in its own process -> {"peak": bytes, "weight_bytes": {dtype: bytes}}."""
    options = {**options, "eoc_token_id": TINY.eoc_token_id, "media_token_id": TINY.media_token_id}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    script = Path(__file__).with_name("memory_probe.py")
    done = subprocess.run([sys.executable, str(script), str(folder), mode, json.dumps(options)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def probe_files(tmp_path_factory):
    """PROBE written as OpenFlamingo's files, the LM in bf16 (as the 9B's MPT-7B ships)."""
    folder = tmp_path_factory.mktemp("probe")
    write_files(build_reference(PROBE, seed=41), folder, lm_dtype=torch.bfloat16, lm_config=PROBE_LM)
    return folder


def layer_bytes(config, dtype: torch.dtype) -> int:
    """One decoder layer's weights in `dtype`."""
    lm = config.lm
    head_dim = lm.hidden_size // lm.num_heads
    attn = lm.hidden_size * head_dim * (2 * lm.num_heads + 2 * lm.num_kv_heads)
    return (attn + 3 * lm.hidden_size * lm.intermediate_size) * dtype.itemsize


@pytest.mark.parametrize("mode", ["load", "convert"])
def test_int8_loading_peaks_at_one_layer_beside_the_int8_model(probe_files, mode):
    """The CPU memory probe (tests/memory_probe.py: peak anonymous memory of its own process, sampled): building
    the int8 runtime in bf16 from the checkpoint files (load_openflamingo(weights="int8")) or from a live float32
    model (from_reference(weights="int8")) allocates at most what the runtime keeps (weight_bytes: int8 matrices,
    scales and the bf16 rest) plus two decoder layers in bf16 (the block being converted and the quantization's
    float32 temporaries of its largest matrix) plus 8 MiB (caches, bookkeeping). The whole LM in bf16 (or float32)
    at once, as a convert-then-quantize load would hold it, is 8 layers."""
    options = dict(dtype="bfloat16", weights="int8", backend="torch", max_batch_size=1, max_seq_len=16,
                   max_images=1, context_cache_bytes=1)
    measured = probe(probe_files, mode, **options)
    kept = sum(measured["weight_bytes"].values())
    layer = layer_bytes(PROBE, torch.bfloat16)
    bound = kept + 2 * layer + (8 << 20)
    print(f"{mode}: peak {measured['peak'] / 2**20:.1f} MiB; kept {kept / 2**20:.1f} MiB "
          f"({ {k: round(v / 2**20, 1) for k, v in measured['weight_bytes'].items()} }); one layer in bf16 "
          f"{layer / 2**20:.1f} MiB; bound {bound / 2**20:.1f} MiB; whole LM in bf16 "
          f"{PROBE.lm.num_layers * layer / 2**20:.1f} MiB")
    assert measured["weight_bytes"]["int8"] > PROBE.lm.num_layers * layer / 2  # the layers are int8
    assert measured["peak"] <= bound
