"""Hugging Face configs as transformers 4.x and 5.x write them (hf.rope_of, openflamingo_config.lm_config_from_hf,
load_openflamingo's config.json): the same model in either layout reads to the same LMConfig, and anything but
plain RoPE is an error naming the key, its value and the expectation.

The layouts (`hf_config`), as `XConfig(...).to_dict()` writes them:
- transformers 4.57: LLaMA `rope_theta`, `rope_scaling`; GPT-NeoX `rotary_pct`, `rotary_emb_base` (read) and their
  copies `partial_rotary_factor`, `rope_theta`, and `rope_scaling`; IDEFICS none (its model uses base 10000).
- transformers 5.24: one dict, `rope_parameters` = {rope_theta, rope_type, and GPT-NeoX's partial_rotary_factor},
  for LLaMA, GPT-NeoX and IDEFICS; no top-level copies.
- MPT (ALiBi, no rotary) in both: the attention options in `attn_config`; 5.24 drops `verbose` and most of the
  generic keys inside attn_config. Nothing MPT's reading uses moved.
Where transformers is installed (`make test-openflamingo`: 4.57 and 5.24), the installed version's own
`to_dict()` must read to the same LMConfig as the layout written here for it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest
import torch
from checkpoint_files import OPTIONS, TINY, logits_agree, write_files

import flamingo_fast
from flamingo_fast.config import LMConfig
from flamingo_fast.dropins.hf import rope_of
from flamingo_fast.dropins.openflamingo_config import lm_config_from_hf
from flamingo_fast.reference.model import build_reference

LAYOUTS = ["transformers4", "transformers5"]
# One LM per family, with values that differ from every default: a wrong or missed key changes the LMConfig.
LMS = {
    "llama": dataclasses.replace(TINY.lm, rope_theta=500000.0),
    "gpt_neox": dataclasses.replace(TINY.lm, family="gpt_neox", num_kv_heads=TINY.lm.num_heads, rotary_pct=0.25,
                                    rope_theta=5000.0, parallel_residual=True, layer_norm_eps=1e-4),
    "mpt": dataclasses.replace(TINY.lm, family="mpt", num_kv_heads=TINY.lm.num_heads, alibi=True, alibi_bias_max=4.0,
                               intermediate_size=4 * TINY.lm.hidden_size, tie_word_embeddings=True,
                               layer_norm_eps=1e-4),
}


def hf_config(lm: LMConfig, layout: str) -> dict:
    """`lm` as the config.json that transformers 4.57 ("transformers4") or 5.24 ("transformers5") writes."""
    v5 = layout == "transformers5"
    if lm.family == "llama":
        rope = {"rope_parameters": {"rope_theta": lm.rope_theta, "rope_type": "default"}} if v5 else {
            "rope_theta": lm.rope_theta, "rope_scaling": None}
        return {"model_type": "llama", "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
                "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads,
                "num_key_value_heads": lm.num_kv_heads, "head_dim": lm.head_dim, "hidden_act": "silu",
                "rms_norm_eps": lm.rms_norm_eps, "max_position_embeddings": lm.max_position_embeddings,
                "tie_word_embeddings": lm.tie_word_embeddings, "attention_bias": False, "mlp_bias": False, **rope}
    if lm.family == "gpt_neox":
        rope = {"rope_parameters": {"rope_theta": lm.rope_theta, "partial_rotary_factor": lm.rotary_pct,
                                    "rope_type": "default"}} if v5 else {
            "rotary_pct": lm.rotary_pct, "partial_rotary_factor": lm.rotary_pct, "rotary_emb_base": lm.rope_theta,
            "rope_theta": lm.rope_theta, "rope_scaling": None}
        return {"model_type": "gpt_neox", "hidden_size": lm.hidden_size, "intermediate_size": lm.intermediate_size,
                "num_hidden_layers": lm.num_layers, "num_attention_heads": lm.num_heads, "hidden_act": "gelu",
                "layer_norm_eps": lm.layer_norm_eps, "max_position_embeddings": lm.max_position_embeddings,
                "use_parallel_residual": lm.parallel_residual, "tie_word_embeddings": lm.tie_word_embeddings,
                "attention_bias": True, **rope}
    attn = {"attn_type": "multihead_attention", "attn_pdrop": 0, "attn_impl": "torch", "clip_qkv": lm.clip_qkv,
            "softmax_scale": None, "prefix_lm": False, "qk_ln": lm.qk_ln, "attn_uses_sequence_id": False,
            "alibi": lm.alibi, "alibi_bias_max": int(lm.alibi_bias_max), "model_type": ""}
    return {"model_type": "mpt", "d_model": lm.hidden_size, "n_heads": lm.num_heads, "n_layers": lm.num_layers,
            "expansion_ratio": lm.intermediate_size // lm.hidden_size, "max_seq_len": lm.max_position_embeddings,
            "layer_norm_epsilon": lm.layer_norm_eps, "no_bias": not lm.bias, "logit_scale": None,
            "tie_word_embeddings": True, "attn_config": attn, **({} if v5 else {"verbose": 0})}


def read(config: dict) -> LMConfig:
    return lm_config_from_hf(config, TINY.lm.vocab_size)[0]


@pytest.mark.parametrize("family", list(LMS))
def test_both_layouts_read_to_the_same_lm_config(family):
    lm = LMS[family]
    assert read(hf_config(lm, "transformers4")) == read(hf_config(lm, "transformers5")) == lm


def test_gpt_neox_as_older_4x_and_5x_fallbacks_write_it():
    """Hub configs written before 4.57 carry only rotary_pct / rotary_emb_base; a 5.x rope_parameters without a
    key takes the top-level one, then GPTNeoXConfig's default (rotary_pct 0.25, base 10000), as 5.x fills it."""
    lm = LMS["gpt_neox"]
    old = {k: v for k, v in hf_config(lm, "transformers4").items() if k not in ("partial_rotary_factor", "rope_theta")}
    assert read(old) == lm
    sparse = {**hf_config(lm, "transformers5"), "rope_parameters": {"rope_type": "default"}, "rotary_pct": 0.5,
              "rotary_emb_base": 123}
    assert (read(sparse).rotary_pct, read(sparse).rope_theta) == (0.5, 123.0)
    bare = {k: v for k, v in hf_config(lm, "transformers4").items()
            if k not in ("rotary_pct", "partial_rotary_factor", "rotary_emb_base", "rope_theta")}
    assert (read(bare).rotary_pct, read(bare).rope_theta) == (0.25, 10000.0)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_default_rope_type_written_out_is_plain_rope(family):
    lm = LMS[family]
    scaled = {**hf_config(lm, "transformers4"), "rope_scaling": {"rope_type": "default"}}
    legacy = {**hf_config(lm, "transformers4"), "rope_scaling": {"type": "default"}}
    assert read(scaled) == read(legacy) == lm


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
@pytest.mark.parametrize("rope_type", ["linear", "dynamic", "llama3", "yarn"])
def test_scaled_rope_is_a_named_error_in_both_layouts(family, rope_type):
    lm = LMS[family]
    scaling = {"rope_type": rope_type, "factor": 2.0}
    v5 = hf_config(lm, "transformers5")
    v5["rope_parameters"] = {**v5["rope_parameters"], **scaling}
    with pytest.raises(ValueError, match=rf"lang_encoder config: rope_parameters\['rope_type'\]='{rope_type}' is not "
                                         rf"supported \(rope_parameters=.*'factor': 2.0.*\); expected 'default'"):
        read(v5)
    for v4_scaling in (scaling, {"type": rope_type, "factor": 2.0}):  # `type`: the spelling before 4.45
        with pytest.raises(ValueError, match=rf"lang_encoder config: rope_scaling=\{{'(rope_)?type': '{rope_type}', "
                                             rf"'factor': 2.0\}} is not supported; expected None"):
            read({**hf_config(lm, "transformers4"), "rope_scaling": v4_scaling})


def test_rope_parameters_per_layer_type_is_a_named_error():
    v5 = hf_config(LMS["llama"], "transformers5")
    v5["rope_parameters"] = {"full_attention": {"rope_theta": 1e4, "rope_type": "default"},
                             "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"}}
    with pytest.raises(ValueError, match=r"rope_parameters=\{'full_attention'.*expected one dict with rope_type "
                                         r"'default' \(not one per layer type\)"):
        read(v5)


def test_idefics_arguments_read_5x_and_ignore_what_4x_ignores():
    """config_from_idefics's reading: 5.x's rope_parameters give the base; without them (4.x) it is 10000, and
    4.x's IDEFICS reads no top-level rope keys (scaling_key=None, theta_keys=())."""
    idefics = dict(where="model.config", theta_keys=(), scaling_key=None)
    assert rope_of({"rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}}, **idefics).theta == 500.0
    assert rope_of({"rope_parameters": None, "rope_theta": 500.0, "rope_scaling": {"rope_type": "linear"}},
                   **idefics).theta == 10000.0
    with pytest.raises(ValueError, match=r"model.config: rope_parameters\['rope_type'\]='dynamic' is not supported"):
        rope_of({"rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0}}, **idefics)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(LMS))
def test_config_json_in_either_layout_loads_the_same_model(family, layout, tmp_path):
    """load_openflamingo's config path: OpenFlamingo's three files with the LM's config.json as each transformers
    writes it; the loaded model computes the reference's logits (a wrong rotary base or fraction would not)."""
    lm = LMS[family]
    model = build_reference(TINY.replace(lm=lm), seed=41)
    files = write_files(model, tmp_path)
    (tmp_path / "lm" / "config.json").write_text(json.dumps(hf_config(lm, layout)))
    layers = {"llama": "model.layers", "gpt_neox": "gpt_neox.layers", "mpt": "transformer.blocks"}[family]
    checkpoint = {k.replace("lang_encoder.model.layers.", f"lang_encoder.{layers}."): v
                  for k, v in torch.load(files[0], weights_only=True).items()}  # write_files names LLaMA's layers
    torch.save(checkpoint, files[0])
    fast = flamingo_fast.load_openflamingo(*files, **OPTIONS)
    assert fast.config.lm == lm
    logits_agree(fast, model)


@pytest.mark.comparison
@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="needs transformers (make test-openflamingo: 4.57 and 5.24)")
@pytest.mark.parametrize("family", list(LMS))
def test_installed_transformers_writes_the_layout_written_here(family):
    import transformers

    lm = LMS[family]
    major = int(transformers.__version__.split(".")[0])
    layout = "transformers5" if major >= 5 else "transformers4"
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads, num_key_value_heads=lm.num_kv_heads, rope_theta=lm.rope_theta,
            max_position_embeddings=lm.max_position_embeddings)
    elif family == "gpt_neox":
        config = transformers.GPTNeoXConfig(
            hidden_size=lm.hidden_size, intermediate_size=lm.intermediate_size, num_hidden_layers=lm.num_layers,
            num_attention_heads=lm.num_heads, rotary_pct=lm.rotary_pct, rotary_emb_base=lm.rope_theta,
            layer_norm_eps=lm.layer_norm_eps, max_position_embeddings=lm.max_position_embeddings)
    else:
        config = transformers.MptConfig(
            d_model=lm.hidden_size, n_heads=lm.num_heads, n_layers=lm.num_layers, layer_norm_epsilon=lm.layer_norm_eps,
            max_seq_len=lm.max_position_embeddings, attn_config={"alibi": True, "alibi_bias_max": 4})
    written = config.to_dict()
    assert read(written) == read(hf_config(lm, layout)) == lm
    rope_keys = {"rope_theta", "rope_scaling", "rope_parameters", "rotary_pct", "partial_rotary_factor",
                 "rotary_emb_base"}
    assert {k for k in written if k in rope_keys} == {k for k in hf_config(lm, layout) if k in rope_keys}


def test_generate_length_as_transformers_sets_it():
    """hf.hf_new_tokens, transformers' rule (4.57 and 5.x, given the generation_config's diff dict): max_new_tokens
    (call, else config) wins; else max_length (call, else config) counts the prompt; else 20 new tokens, stopped at
    the model config's max_position_embeddings; a max_length the prompt fills is an error naming it."""
    from flamingo_fast.dropins.hf import HFGenerateDefaults, hf_new_tokens

    def defaults(max_positions=None, **config):
        return HFGenerateDefaults(config, None, None, "generation_config", max_positions=max_positions)

    assert hf_new_tokens(16, None, None, defaults()) == 20
    assert hf_new_tokens(16, None, None, defaults(max_positions=30)) == 14
    assert hf_new_tokens(16, None, None, defaults(max_length=30)) == 14
    assert hf_new_tokens(16, None, 20, defaults(max_length=30)) == 4
    assert hf_new_tokens(16, 5, None, defaults(max_length=30)) == 5
    assert hf_new_tokens(16, None, None, defaults(max_length=30, max_new_tokens=3)) == 3
    with pytest.raises(ValueError, match=r"max_length=16: the prompt already has 16 tokens"):
        hf_new_tokens(16, None, None, defaults(max_length=16))
