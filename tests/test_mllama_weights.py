"""load_mllama_hf (flamingo_fast/dropins/mllama_weights.py): Hugging Face Llama 3.2 Vision checkpoint folders of
both key layouts load into transformers' own MllamaForConditionalGeneration with every tensor bitwise equal to the
model that wrote them, the same logits, bf16 as transformers' from_pretrained gives it, the head tied as the installed
release ties it; unusable folders are errors naming the folder, the key and what was expected; and loading does not
hold two copies of the model (a memory probe in its own process). Runs under transformers 4.57 (.venv-openflamingo)
and 5.24 (.venv-transformers5)."""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="needs transformers (make test-openflamingo)")
pytestmark = pytest.mark.comparison

from mllama_fixtures import batch, build_mllama, mllama_config, prompt_batches  # noqa: E402
from mllama_memory_probe import measure_in_fork  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from flamingo_fast.dropins.mllama_weights import load_mllama_hf  # noqa: E402
from flamingo_fast.reference.mllama import key_layout  # noqa: E402
from flamingo_fast.testing import build_mllama_from_config  # noqa: E402

NAME = "gqa-llama3-4tiles"


@functools.cache
def source():
    return build_mllama(NAME, seed=7)


def file_keys(folder: Path) -> list[str]:
    keys = []
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys += list(f.keys())
    return keys


def saved(folder: Path, model=None, **options) -> Path:
    (model or source()).save_pretrained(folder, **options)
    return folder


def model_layout_folder(folder: Path) -> Path:
    """The live model's own names (the "model" layout), written by hand: save_pretrained writes the other."""
    model = source()
    model.config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
    return folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch(prompt_batches(4)["mixed"], 4)).logits


def assert_same_tensors(loaded, expected) -> None:
    """Every parameter and buffer: the same names, dtypes and values (bitwise)."""
    ours, theirs = loaded.state_dict(), expected.state_dict()
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name
    assert [n for n, _ in loaded.named_buffers()] == [n for n, _ in expected.named_buffers()]
    for (name, buffer), (_, theirs_buffer) in zip(loaded.named_buffers(), expected.named_buffers(), strict=True):
        assert buffer.dtype == theirs_buffer.dtype and torch.equal(buffer, theirs_buffer), name


@pytest.mark.parametrize("layout", ["legacy", "model"])
def test_both_key_layouts_load_to_the_same_model(tmp_path, layout):
    """save_pretrained writes the "legacy" layout (language_model.model.*) in both 4.57 and 5.24 (transformers
    reverses its checkpoint conversion map on save); the "model" layout (model.language_model.*) is written here."""
    folder = saved(tmp_path) if layout == "legacy" else model_layout_folder(tmp_path)
    assert key_layout(file_keys(folder)) == layout
    model = load_mllama_hf(folder)
    assert isinstance(model, transformers.MllamaForConditionalGeneration) and not model.training
    assert_same_tensors(model, source())
    assert torch.equal(logits(model), logits(source()))
    assert model.generation_config.eos_token_id == source().generation_config.eos_token_id


def test_bf16_load_equals_transformers_from_pretrained(tmp_path):
    """dtype=bfloat16 from float32 files: every parameter is the source's rounded to bf16, the rotary buffers stay
    float32, all as transformers' own from_pretrained(dtype=bfloat16) loads them; the same logits."""
    folder = saved(tmp_path, max_shard_size="100KB")  # sharded, with model.safetensors.index.json
    assert len(list(folder.glob("*.safetensors"))) > 1 and (folder / "model.safetensors.index.json").is_file()
    model = load_mllama_hf(folder, dtype=torch.bfloat16)
    for name, tensor in source().named_parameters():
        assert torch.equal(model.get_parameter(name), tensor.to(torch.bfloat16)), name
    theirs = transformers.MllamaForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert_same_tensors(model, theirs)
    assert torch.equal(logits(model), logits(theirs))


def test_head_is_tied_as_the_installed_release_ties_it(tmp_path):
    """text_config.tie_word_embeddings=True: 4.57 ties the head to the embedding (and writes no head key), 5.24
    keeps its own head. The loaded model shares (or not) exactly as from_pretrained's does."""
    config = mllama_config(NAME)
    config.text_config.tie_word_embeddings = True
    folder = saved(tmp_path, build_mllama_from_config(config, seed=8))
    model = load_mllama_hf(folder)
    theirs = transformers.MllamaForConditionalGeneration.from_pretrained(folder).eval()

    def tied(m):
        return m.lm_head.weight is m.model.language_model.embed_tokens.weight

    assert tied(model) == tied(theirs) == (int(transformers.__version__.split(".")[0]) < 5)
    assert_same_tensors(model, theirs)


def rewrite(folder: Path, change) -> None:
    """The folder's model.safetensors rewritten with change(tensors) applied."""
    path = folder / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(path))


Q = "language_model.model.layers.0.self_attn.q_proj.weight"
SPOIL = {
    "unknown key": (lambda t: t.update({"language_model.model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
                    r"key 'language_model.model.layers.0.self_attn.q_proj.bias' in model.safetensors is not a "
                    r"parameter of this config.json's MllamaForConditionalGeneration; expected keys of the 'legacy' "
                    r"layout \(vision_model., multi_modal_projector., language_model.model., "
                    r"language_model.lm_head.\)"),
    "missing key": (lambda t: t.pop(Q),
                    r"1 keys missing from the shards \('legacy' layout\): \['" + Q.replace(".", r"\.") + r"'\]"),
    "wrong shape": (lambda t: t.update({Q: t[Q][:, :32].contiguous()}),
                    r"key '" + Q.replace(".", r"\.") + r"' in model.safetensors has shape \(64, 32\); expected "
                    r"\(64, 64\) \(config.json's sizes\)"),
    "no layout": (lambda t: [t.update({"decoder." + k: t.pop(k)}) for k in list(t)],
                  r"neither layout of MllamaForConditionalGeneration"),
}


@pytest.mark.parametrize("case", list(SPOIL))
def test_unusable_keys_name_the_folder_the_key_and_what_was_expected(tmp_path, case):
    folder = saved(tmp_path)
    change, match = SPOIL[case]
    rewrite(folder, change)
    with pytest.raises(ValueError, match=rf"^path='{folder}': .*{match}"):
        load_mllama_hf(folder)


def test_a_missing_shard_or_config_is_named(tmp_path):
    folder = saved(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted(folder.glob("*.safetensors"))
    shards[1].unlink()
    with pytest.raises(ValueError, match=rf"path='{folder}': model.safetensors.index.json lists shards "
                                         rf"\['{shards[1].name}'\] that are not in the folder; expected all "
                                         rf"{len(shards)} shards"):
        load_mllama_hf(folder)
    shutil.copytree(folder, tmp_path / "no_config")
    os.remove(tmp_path / "no_config" / "config.json")
    with pytest.raises(ValueError, match=r"no config.json; expected a Hugging Face checkpoint folder"):
        load_mllama_hf(tmp_path / "no_config")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"config.json has model_type='llama'; expected 'mllama'"):
        load_mllama_hf(folder)
    with pytest.raises(ValueError, match=r"not a folder"):
        load_mllama_hf(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- memory, measured


def test_loading_holds_the_model_and_one_block_not_two_copies(tmp_path):
    """tests/mllama_memory_probe.py in a forked process: float32 files (9.9 M parameters, 40 MB) loaded in bf16 peak
    at the loaded model + its largest block + 8 MiB (caches, bookkeeping). Reading the files whole and handing them
    to a built model (the probe's contrast) holds both copies, and the bound is below it."""
    config = mllama_config(NAME)
    config.text_config.update(dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=10,
                                   cross_attention_layers=[3, 8]))
    folder = saved(tmp_path, build_mllama_from_config(config, seed=9))
    found = measure_in_fork(folder, torch.bfloat16)
    bound = found["model_bytes"] + found["largest_block"] + (8 << 20)
    print({k: f"{v / 2**20:.1f} MiB" for k, v in {**found, "bound": bound}.items()})
    assert found["model_bytes"] > 18 << 20  # the model is big enough for a second copy to show
    assert found["loader"] <= bound
    assert found["whole"] > bound  # the probe sees a second copy where there is one
