"""The eager Llama 3.2 Vision reference (flamingo_fast/reference/mllama.py) against transformers' own
`MllamaForConditionalGeneration`: tiny models built offline with EVERY parameter random, images through
transformers' MllamaImageProcessor, cross_attention_mask from processing_mllama's helpers (tests/mllama_fixtures.py).
Runs under transformers 4.57 (.venv-openflamingo) and 5.24 (.venv-transformers5); skipped elsewhere.

Logits are compared at real tokens only (a left pad's output is unused), within the fp32 row of the tolerance
table: transformers' forward gives every row positions 0..T-1, the reference 0 from each row's first real token
(rotary attention sees only differences), and the two compute in different orders.
"""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import assert_close, assert_within_torch_error

transformers = pytest.importorskip("transformers", reason="needs transformers (make test-openflamingo)")
pytestmark = pytest.mark.comparison

from mllama_fixtures import (  # noqa: E402
    CONFIGS,
    IMAGE,
    RELEASE,
    WIDE2,
    batch,
    build_mllama,
    image_processor,
    prompt_batches,
    random_image,
)

from flamingo_fast.reference.mllama import (  # noqa: E402
    MllamaReference,
    installed_intermediate_from,
    key_layout,
    state_dict_keys,
)

FP32 = torch.float32


@functools.cache
def hf_model(name: str):
    return build_mllama(name, seed=len(name))


@functools.cache
def reference(name: str) -> MllamaReference:
    return MllamaReference.from_hf(hf_model(name))


def max_tiles(name: str) -> int:
    return CONFIGS[name][0]["max_num_tiles"]


def hf_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def assert_logits_match(ours: torch.Tensor, theirs: torch.Tensor, attention_mask: torch.Tensor) -> None:
    real = attention_mask.bool()
    assert ours.shape == theirs.shape, f"{tuple(ours.shape)} != {tuple(theirs.shape)}"
    assert_close(ours[real], theirs[real], dtype=FP32)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("prompts", ["mixed", "text_only", "single"])
def test_logits_equal_transformers(name, prompts):
    """0-4 images of 1-4 tiles, adjacent images, text before the first image, an image first, a text-only row
    beside image rows, left padding; a batch without images (the cross-attention layers skipped)."""
    inputs = batch(prompt_batches(max_tiles(name))[prompts], max_tiles(name))
    with torch.no_grad():
        ours = reference(name)(**inputs)
    assert_logits_match(ours, hf_logits(hf_model(name), inputs), inputs["attention_mask"])


def test_position_ids_as_transformers_takes_them():
    name = "gqa-llama3-4tiles"
    inputs = batch(prompt_batches(4)["mixed"], 4)
    t = inputs["input_ids"].shape[1]
    inputs["position_ids"] = torch.arange(3, 3 + t)[None].expand(4, t)
    with torch.no_grad():
        ours = reference(name)(**inputs)
    assert_logits_match(ours, hf_logits(hf_model(name), inputs), inputs["attention_mask"])


def test_images_without_cross_attention_mask_are_refused():
    """transformers' result then depends on its attention implementation: SDPA (the default) applies a causal mask
    between text positions and vision-token indices (its is_causal rule for a missing mask), eager attends to every
    vision token. The reference names the argument instead of picking one."""
    name = "gqa-llama3-4tiles"
    model = hf_model(name)
    inputs = batch(prompt_batches(4)["single"], 4)
    inputs.pop("cross_attention_mask")
    sdpa = hf_logits(model, inputs)
    model.config._attn_implementation = "eager"
    try:
        eager = hf_logits(model, inputs)
    finally:
        model.config._attn_implementation = "sdpa"
    assert not torch.allclose(sdpa, eager, atol=1e-3)
    with pytest.raises(ValueError, match="cross_attention_mask"):
        reference(name)(**inputs)


def test_bf16_within_twice_transformers_own_error():
    """The reference over a bf16 model: its error against the float64 model is at most twice transformers' own at
    bf16 (the tolerance table's rule)."""
    name = "gqa-llama3-4tiles"
    inputs = batch(prompt_batches(4)["mixed"], 4)
    real = inputs["attention_mask"].bool()
    model = build_mllama(name, seed=len(name))
    with torch.no_grad():
        exact = model.to(torch.float64)(**inputs).logits[real]
        model.to(torch.bfloat16)
        theirs = model(**inputs).logits[real]
        ours = MllamaReference.from_hf(model)(**inputs)[real]
    assert ours.dtype == torch.bfloat16
    assert_within_torch_error(ours, exact, theirs, torch.bfloat16)


def test_parameters_are_the_live_models_tensors():
    model, ref = hf_model("gqa-llama3-4tiles"), reference("gqa-llama3-4tiles")
    theirs = {t.data_ptr() for t in model.state_dict().values()}
    ours = list(ref.state_dict().values())
    assert len(ours) == len(theirs) and all(t.data_ptr() in theirs for t in ours)


def test_rows_without_images_follow_transformers():
    """A row that sees no image attends to every vision token of its row (padded slots included) with the gate
    applied, and only its MLP branch is zeroed (transformers 4.57 and 5.x; Meta's code zeroes the attention too):
    changing the pixels of the text-only row's padded image slot changes its logits, in both."""
    name = "gqa-llama3-4tiles"
    inputs = batch(prompt_batches(4)["mixed"], 4)
    changed = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    noise = torch.randn(changed["pixel_values"][2].shape, generator=torch.Generator().manual_seed(3))
    changed["pixel_values"][2] = noise
    with torch.no_grad():
        ours, ours_changed = reference(name)(**inputs), reference(name)(**changed)
    theirs_changed = hf_logits(hf_model(name), changed)
    assert (ours_changed[2] - ours[2]).abs().max() > 1e-3  # row 2 sees no image, and still reads the vision tokens
    torch.testing.assert_close(ours_changed[:2], ours[:2], rtol=0, atol=0)  # other rows: their own slots only
    assert_logits_match(ours_changed, theirs_changed, inputs["attention_mask"])


def test_rotary_inverse_frequencies_equal_transformers():
    model, ref = hf_model("gqa-llama3-4tiles"), reference("gqa-llama3-4tiles")
    theirs = model.model.language_model.rotary_emb.inv_freq
    assert torch.equal(ref.language_model.inv_freq("cpu"), theirs)


def test_vision_tower_equals_transformers_and_intermediate_layers_follow_the_release():
    """4.57 and 5.24 both take local-encoder layer i's OUTPUT as intermediate layer i (Meta's code, and
    transformers before mid 2025, its input): the reference reads the convention from the installed release and
    the tower's output equals transformers'; the other convention does not."""
    name = "gqa-llama3-4tiles"
    model = hf_model(name)
    assert installed_intermediate_from(model) == "layer_output"
    inputs = batch(prompt_batches(4)["mixed"], 4)
    images = {k: inputs[k] for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    with torch.no_grad():
        theirs = model.model.vision_model(**images).last_hidden_state
        ours = reference(name).vision_model(**images)
        other = MllamaReference.from_hf(model, intermediate_from="layer_input").vision_model(**images)
    assert_close(ours, theirs, dtype=FP32)
    width = model.config.vision_config.hidden_size
    assert not torch.allclose(other[..., width:], theirs[..., width:], atol=1e-3)


def test_config_spelling_of_the_release():
    """4.57 writes rope_theta and rope_scaling at the text config's top level, 5.x both in rope_parameters; the
    reader gives the same config from either."""
    text = hf_model("gqa-llama3-4tiles").config.to_dict()["text_config"]
    if RELEASE >= 5:
        assert text["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in text
    else:
        assert text["rope_scaling"]["rope_type"] == "llama3" and text["rope_theta"] == 10000.0
    config = reference("gqa-llama3-4tiles").config.text
    assert (config.rope_theta, config.rope_scaling.factor, config.rope_scaling.original_max_position_embeddings) \
        == (10000.0, 8.0, 8)


def test_image_processor_rows_without_images_by_release():
    """A batch row with no images: 4.57's MllamaImageProcessor pads every output to the batch; 5.x pads
    pixel_values but leaves the row out of aspect_ratio_ids / aspect_ratio_mask (transformers' own forward then
    fails on such a batch; the fixtures pad the row as 4.57 does)."""
    g = __import__("numpy").random.default_rng(0)
    out = image_processor(4)([[random_image(g, *WIDE2)], []], return_tensors="pt")
    assert out["pixel_values"].shape[0] == 2
    assert out["aspect_ratio_ids"].shape[0] == (1 if RELEASE >= 5 else 2)


def test_both_key_layouts_load(tmp_path):
    """The legacy layout (language_model.model.*, vision_model.*, language_model.lm_head: what save_pretrained
    writes in both releases and the released checkpoints hold) and the live models' layout (model.language_model.*,
    model.vision_model.*, lm_head) both map onto the reference: the same logits, exactly."""
    from safetensors.torch import load_file

    name = "mha-default-2tiles"
    model, ref = hf_model(name), reference(name)
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    live = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert (key_layout(saved), key_layout(live)) == ("legacy", "model")
    assert sorted(saved) == sorted(state_dict_keys("legacy", ref.config))
    assert sorted(live) == sorted(state_dict_keys("model", ref.config))
    inputs = batch(prompt_batches(2)["mixed"], 2)
    with torch.no_grad():
        expected = ref(**inputs)
        for tensors in (saved, live):
            assert torch.equal(MllamaReference.from_state(ref.config, tensors)(**inputs), expected)


def test_unknown_keys_are_named():
    ref = reference("mha-default-2tiles")
    tensors = dict(hf_model("mha-default-2tiles").state_dict(), **{"model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="model.extra.weight"):
        MllamaReference.from_state(ref.config, tensors)


def test_image_token_is_outside_the_head():
    ref = reference("gqa-llama3-4tiles")
    assert ref.lm_head.out_features == IMAGE and ref.language_model.embed_tokens.num_embeddings == IMAGE + 8
