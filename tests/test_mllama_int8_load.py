"""load_mllama_hf(folder, weights="int8") (flamingo_fast/dropins/mllama_weights.py): each language-model block
quantized as it loads, into transformers' own MllamaForConditionalGeneration. The int8 values are bitwise those
from_mllama(float_model, weights="int8") computes and its runtime gives the same logits and tokens; transformers'
own forward and generate run the int8 modules (equal to the model holding the dequantized weights); the float weights
of the quantized layers never all exist at once (a memory probe in its own process); bad options and layouts are
errors naming them. Runs under transformers 4.57 (.venv-openflamingo) and 5.24 (.venv-transformers5)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", reason="needs transformers (make test-openflamingo)")
pytestmark = pytest.mark.comparison

from helpers import assert_close  # noqa: E402
from mllama_fixtures import batch, build_mllama, mllama_config, prompt_batches  # noqa: E402
from mllama_memory_probe import measure_in_fork  # noqa: E402

import flamingo_fast  # noqa: E402
from flamingo_fast.dropins import mllama_weights  # noqa: E402
from flamingo_fast.dropins.mllama_weights import load_mllama_hf  # noqa: E402
from flamingo_fast.runtime.quantize import Int8Linear, quantize_per_channel  # noqa: E402
from flamingo_fast.testing import build_mllama_from_config  # noqa: E402

NAME = "gqa-llama3-4tiles"
FP32 = torch.float32


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mllama")
    build_mllama(NAME, seed=7).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tied_folder(tmp_path_factory) -> Path:
    """text_config.tie_word_embeddings=True: 4.57 ties the head to the embedding (no head key in the files), 5.24
    keeps its own head."""
    path = tmp_path_factory.mktemp("mllama_tied")
    config = mllama_config(NAME)
    config.text_config.tie_word_embeddings = True
    build_mllama_from_config(config, seed=8).save_pretrained(path)
    return path


@functools.cache
def inputs() -> dict:
    return batch(prompt_batches(4)["mixed"], 4)


def int8_modules(model) -> dict[str, Int8Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, Int8Linear)}


@pytest.mark.parametrize("case", ["fp32", "bf16", "tied head"])
def test_int8_load_is_bitwise_from_mllama_quantizing_the_float_model(folder, tied_folder, case):
    """Every language-model Linear and the head are int8 modules holding quantize_per_channel of the float weights in
    `dtype` (no float Linear left there; a tied head quantized from the embedding, which stays float); from_mllama
    runs them as they are (weights="int8" implied, the runtime's modules are the model's), with the logits and greedy
    tokens of from_mllama(float model, weights="int8")."""
    dtype = torch.bfloat16 if case == "bf16" else FP32
    folder = tied_folder if case == "tied head" else folder
    floats = load_mllama_hf(folder, dtype=dtype)
    model = load_mllama_hf(folder, dtype=dtype, weights="int8")
    assert isinstance(model, transformers.MllamaForConditionalGeneration) and not model.training
    found = int8_modules(model)
    assert "lm_head" in found and not [m for m in model.model.language_model.layers.modules()
                                       if type(m) is nn.Linear]
    for name, module in found.items():
        q, scales = quantize_per_channel(floats.get_submodule(name).weight)
        assert torch.equal(module.weight, q) and torch.equal(module.scales, scales) and module.bias is None, name
    assert model.model.vision_model.patch_embedding.weight.dtype == dtype
    embedding = model.model.language_model.embed_tokens.weight
    assert embedding.dtype == dtype and torch.equal(embedding, floats.model.language_model.embed_tokens.weight)
    if case == "tied head" and floats.lm_head.weight is floats.model.language_model.embed_tokens.weight:
        # 4.57's tied head has the embedding's 8 extra rows, which from_mllama refuses, in int8 as in float
        with pytest.raises(ValueError, match=r"model: lm_head holds an int8 weight of shape \(104, 64\); expected "
                                             r"\(96, 64\)"):
            flamingo_fast.from_mllama(model, backend="torch")
        return
    ours = flamingo_fast.from_mllama(model, backend="torch")
    theirs = flamingo_fast.from_mllama(floats, backend="torch", weights="int8")
    assert ours.engine.weights == "int8"
    assert {id(m) for m in ours.engine.reference.modules() if isinstance(m, Int8Linear)} == set(map(id, found.values()))
    with torch.no_grad():
        assert torch.equal(ours(**inputs()).logits, theirs(**inputs()).logits)
    gen = dict(max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(**inputs(), **gen), theirs.generate(**inputs(), **gen))
    assert flamingo_fast.from_mllama(model, backend="torch", weights="int8").engine.weights == "int8"


def test_transformers_runs_the_int8_model_as_the_dequantized_float_model(folder):
    """transformers' own forward and generate on the int8 model equal (fp32 row) those of the float model whose
    quantized weights are replaced by q * scale. The nn.Module contract: state_dict has the float model's keys;
    `.to(torch.bfloat16)` converts the float tensors and leaves the scales float32 (bitwise); the drop-in over the
    model refuses a dtype conversion (its runtime computes in the built dtype)."""
    model = load_mllama_hf(folder, weights="int8")
    dequant = load_mllama_hf(folder)
    with torch.no_grad():
        for name, module in int8_modules(model).items():
            dequant.get_submodule(name).weight.copy_(module.weight.float() * module.scales[:, None])
        assert_close(model(**inputs()).logits, dequant(**inputs()).logits, dtype=FP32)
        gen = dict(max_new_tokens=4, do_sample=False)
        assert torch.equal(model.generate(**inputs(), **gen), dequant.generate(**inputs(), **gen))
    assert model.state_dict().keys() == dequant.state_dict().keys()
    scales = {n: m.scales.clone() for n, m in int8_modules(model).items()}
    with pytest.raises(ValueError, match=r"converting a drop-in built with weights='int8'"):
        flamingo_fast.from_mllama(model, backend="torch").to(torch.bfloat16)
    assert model.to(torch.bfloat16) is model and model.lm_head.weight.dtype == torch.int8
    assert model.model.language_model.embed_tokens.weight.dtype == torch.bfloat16
    for name, module in int8_modules(model).items():
        assert module.scales.dtype == FP32 and torch.equal(module.scales, scales[name]), name


def test_int8_loading_never_holds_the_float_model(tmp_path):
    """tests/mllama_memory_probe.py in a forked process: float32 files (9.9 M parameters) loaded with
    weights="int8" peak at the int8 model + its largest float block + the quantizer's float32 temporaries of one
    matrix + 8 MiB (bookkeeping, as the float loader's test allows), and below the float model + that block (what
    loading in float then quantizing holds at least)."""
    config = mllama_config(NAME)
    config.text_config.update(dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=10,
                                   cross_attention_layers=[3, 8]))
    path = tmp_path / "model"
    build_mllama_from_config(config, seed=9).save_pretrained(path)
    found = measure_in_fork(path, torch.float32, weights="int8")
    bound = found["model_bytes"] + found["largest_block"] + found["temporaries"] + (8 << 20)
    print({k: f"{v / 2**20:.1f} MiB" for k, v in {**found, "bound": bound}.items()})
    assert found["float_bytes"] > found["model_bytes"] + (16 << 20)  # int8 saves enough to show
    assert found["loader"] <= bound
    assert found["loader"] < found["float_bytes"] + found["largest_block"]


def test_bad_options_and_unquantizable_layouts_are_named(folder, monkeypatch):
    with pytest.raises(ValueError, match=r"^weights='int4': expected None \(the files' float weights\) or 'int8'"):
        load_mllama_hf(folder, weights="int4")
    with pytest.raises(ValueError, match=r"^weights='int8' with dtype=torch.float64: expected float32, float16 or "
                                         r"bfloat16"):
        load_mllama_hf(folder, dtype=torch.float64, weights="int8")
    model = load_mllama_hf(folder, weights="int8")
    with pytest.raises(ValueError, match=r"^weights='bf16': the model holds int8 layers \(load_mllama_hf\(\.\.\., "
                                         r"weights='int8'\)\); expected None or 'int8'"):
        flamingo_fast.from_mllama(model, backend="torch", weights="bf16")
    model.lm_head = nn.Linear(model.lm_head.weight.shape[1], model.lm_head.weight.shape[0], bias=False).eval()
    with pytest.raises(ValueError, match=r"^model: holds int8 layers \(model.language_model.layers.0.self_attn.q_proj, "
                                         r"\.\.\.\) and float ones where weights='int8' quantizes too \(\['lm_head'\]"):
        flamingo_fast.from_mllama(model, backend="torch")

    class Adapter(nn.Linear):  # e.g. a LoRA wrapper: the same parameter names, another forward
        pass

    build = mllama_weights.build_meta_model

    def with_adapter(*args):
        meta = build(*args)
        attn = meta.model.language_model.layers[0].self_attn
        with torch.device("meta"):
            attn.q_proj = Adapter(attn.q_proj.in_features, attn.q_proj.out_features, bias=False)
        return meta

    monkeypatch.setattr(mllama_weights, "build_meta_model", with_adapter)
    with pytest.raises(ValueError, match=r"^weights='int8': model.language_model.layers.0.self_attn.q_proj is a "
                                         r".*Adapter; expected a bias-free torch.nn.Linear"):
        load_mllama_hf(folder, weights="int8")
