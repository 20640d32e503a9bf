"""The Llama 3.2 Vision layout without transformers: presets and their meta-device sizes against closed-form counts
and the published parameter counts, the config reader's two spellings, the key maps, and the intermediate-layer
conventions (tests/test_mllama_reference.py checks the reference against transformers itself)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from mllama_counts import closed_form

from flamingo_fast.reference.mllama import KEY_MAPS, MllamaReference, key_layout, our_key, state_dict_keys
from flamingo_fast.reference.mllama_config import MllamaConfig, mllama_config_from_hf, mllama_from_name
from flamingo_fast.reference.mllama_sizes import (
    CARDS,
    mllama_fits,
    mllama_parameter_count,
    mllama_weight_bytes,
)


@pytest.mark.parametrize("name, published", [("mllama-11b", 10.6e9), ("mllama-90b", 88.8e9)])
def test_released_presets_have_the_published_size(name, published):
    """Meta's model cards give 10.6B and 88.8B parameters."""
    config = mllama_from_name(name)
    count = mllama_parameter_count(config)
    assert count == closed_form(config)[0]
    assert abs(count - published) / published < 0.01, f"{name}: {count / 1e9:.3f}B"


@pytest.mark.parametrize("name", ["mllama-tiny", "mllama-small", "mllama-11b", "mllama-90b"])
def test_weight_bytes(name):
    config = mllama_from_name(name)
    total, quantized, rows = closed_form(config)
    assert mllama_weight_bytes(config) == {"bf16": 2 * total, "int8": quantized + 4 * rows + 2 * (total - quantized)}


def test_what_fits():
    """The 11B's ~21 GB of bf16 weights fit every card listed (a 24 GB card keeps ~4 GiB); the 90B's ~177 GB fit
    none in bf16, and only the H200 in int8 (~91 GB)."""
    fits = {card: {fmt: left >= 0 for fmt, left in formats.items()}
            for card, formats in mllama_fits(mllama_from_name("mllama-90b")).items()}
    assert fits == {"H100 80GB": {"bf16": False, "int8": False}, "H200 141GB": {"bf16": False, "int8": True},
                    "24GB card": {"bf16": False, "int8": False}}
    left = mllama_fits(mllama_from_name("mllama-11b"))
    assert all(left[card]["bf16"] > 0 for card in CARDS) and 3 * 2**30 < left["24GB card"]["bf16"] < 5 * 2**30


def _hf_dict(rope: dict) -> dict:
    vision = dict(image_size=28, patch_size=14, max_num_tiles=4, hidden_size=32, num_hidden_layers=3,
                  num_global_layers=1, attention_heads=2, intermediate_size=64, intermediate_layers_indices=[0, 2],
                  vision_output_dim=96, supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]], norm_eps=1e-5,
                  hidden_act="gelu", num_channels=3)
    text = dict(vocab_size=96, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, cross_attention_layers=[1, 3], rms_norm_eps=1e-5, max_position_embeddings=256,
                hidden_act="silu", bos_token_id=1, eos_token_id=[2, 7], pad_token_id=0, **rope)
    return dict(vision_config=vision, text_config=text, image_token_index=96)


LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=8)


def test_config_reader_takes_both_spellings():
    """transformers 4.x: rope_theta and rope_scaling at the top; 5.x: rope_parameters holds both."""
    old = mllama_config_from_hf(_hf_dict(dict(rope_theta=5000.0, rope_scaling=LLAMA3)))
    new = mllama_config_from_hf(_hf_dict(dict(rope_parameters=dict(LLAMA3, rope_theta=5000.0))))
    assert old == new
    assert (old.text.rope_theta, old.text.rope_scaling.factor, old.eos_token_id, old.vision.max_aspect_ratio_id) \
        == (5000.0, 8.0, 2, 3)
    plain = mllama_config_from_hf(_hf_dict(dict(rope_parameters=dict(rope_type="default", rope_theta=10.0))))
    assert plain.text.rope_scaling is None


@pytest.mark.parametrize("change, match", [
    (lambda d: d["text_config"].update(rope_scaling=dict(rope_type="yarn", factor=2.0)), "rope_type='yarn'"),
    (lambda d: d["vision_config"].update(vision_output_dim=100), "vision_output_dim=100"),
    (lambda d: d["vision_config"].update(hidden_act="quick_gelu"), "hidden_act='quick_gelu'"),
    (lambda d: d["text_config"].update(cross_attention_layers=[1, 9]), r"cross_attention_layers=\(1, 9\)"),
])
def test_config_reader_names_what_it_refuses(change, match):
    hf = _hf_dict(dict(rope_theta=5000.0, rope_scaling=LLAMA3))
    change(hf)
    with pytest.raises(ValueError, match=match):
        mllama_config_from_hf(hf)


def test_key_maps():
    assert our_key("model.language_model.layers.3.cross_attn.q_norm.weight", "model") == \
        our_key("language_model.model.layers.3.cross_attn.q_norm.weight", "legacy") == \
        "language_model.layers.3.cross_attn.q_norm.weight"
    assert our_key("lm_head.weight", "model") == our_key("language_model.lm_head.weight", "legacy") == "lm_head.weight"
    assert our_key("model.vision_model.class_embedding", "model") == our_key("vision_model.class_embedding", "legacy")
    config = mllama_from_name("mllama-tiny")
    with torch.device("meta"):
        ours = sorted(MllamaReference(config).state_dict())
    for layout in KEY_MAPS:
        keys = state_dict_keys(layout, config)
        assert key_layout(keys) == layout and sorted(our_key(k, layout) for k in keys) == ours
    with pytest.raises(ValueError, match="neither layout"):
        key_layout(["vision_model.class_embedding"])


def _random_reference(config: MllamaConfig, seed: int = 0) -> MllamaReference:
    torch.manual_seed(seed)
    model = MllamaReference(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape) / max(1, p[0].numel() if p.dim() > 1 else 1) ** 0.5)
    return model.eval()


def test_layer_input_is_the_previous_layers_output():
    """Intermediate layer i under Meta's convention (the input of local layer i) is layer i - 1's output under
    transformers 4.57 / 5.x's."""
    tiny = mllama_from_name("mllama-tiny")
    base = tiny.replace(vision=dataclasses.replace(tiny.vision, intermediate_layers=(0, 1)))
    shifted = tiny.replace(vision=dataclasses.replace(tiny.vision, intermediate_layers=(1, 2),
                                                      intermediate_from="layer_input"))
    ref = _random_reference(base)
    other = MllamaReference.from_state(shifted, {f"model.{k}" if not k.startswith("lm_head") else k: v
                                                 for k, v in ref.state_dict().items()})
    pixels = torch.randn(1, 2, 4, 3, 28, 28)
    ids, mask = torch.tensor([[6, 1]]), torch.tensor([[[1, 1, 0, 0], [1, 0, 0, 0]]])
    with torch.no_grad():
        assert torch.equal(ref.vision_model(pixels, ids, mask), other.vision_model(pixels, ids, mask))


def test_tiny_forward_shapes():
    config = mllama_from_name("mllama-tiny")
    ref = _random_reference(config)
    ids = torch.tensor([[1, config.image_token_id, 5, 6], [0, 1, 7, 8]])
    cross = torch.zeros(2, 4, 1, 4, dtype=torch.long)
    cross[0, 1:, 0, :2] = 1
    with torch.no_grad():
        logits = ref(ids, torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]]), torch.randn(2, 1, 4, 3, 28, 28),
                     torch.tensor([[2], [0]]), torch.tensor([[[1, 1, 0, 0]], [[1, 0, 0, 0]]]), cross)
    assert logits.shape == (2, 4, config.text.vocab_size) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="cross_attention_mask"):
        ref(ids, None, torch.randn(2, 1, 4, 3, 28, 28), torch.tensor([[2], [0]]),
            torch.ones(2, 1, 4, dtype=torch.long), cross * 2)
