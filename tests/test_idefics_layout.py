"""The IDEFICS layout without transformers: FastFlamingo against the reference on the idefics-tiny preset (q/k
norms, per-channel gates, 5 latents, a perceiver head dim the Triton kernel pads). The reference against
transformers' real IdeficsForVisionText2Text is tests/test_idefics.py (in .venv-openflamingo)."""

from __future__ import annotations

import pytest
import torch
from builders import idefics_batch
from helpers import assert_close

from flamingo_fast import masking
from flamingo_fast.config import from_name
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.runtime import FastFlamingo

CONFIG = from_name("idefics-tiny")
BASE = CONFIG.lm.vocab_size - CONFIG.lm.additional_vocab_size  # <fake_token_around_image>


# text before the first image, a </s> inside the prompt (and text after it that sees nothing), adjacent images,
# different image counts per row, a text-only row, left padding
ROWS = [
    [("text", 3), "image", ("text", 4), "eos", ("text", 2), "image", "image", ("text", 3)],
    [("text", 2), "image", ("text", 5)],
    [("text", 6)],
]


def compare(model, fast, vision, ids, mask, image_mask, seed: int | None = None, **gen):
    """Logits of the real positions, then generated ids; `seed`: each generate samples from its own generator
    seeded alike."""
    real = mask.bool()
    assert_close(fast(vision, ids, mask, image_mask)[real], model(vision, ids, mask, image_mask)[real],
                 dtype=torch.float32)

    def draws():
        return {} if seed is None else {"generator": torch.Generator().manual_seed(seed)}

    ref = model.generate(vision, ids, mask, image_attention_mask=image_mask, **gen, **draws())
    got = fast.generate(vision, ids, mask, image_attention_mask=image_mask, **gen, **draws())
    assert torch.equal(got, ref), f"fast vs reference:\n{got[:, ids.shape[1]:]}\n{ref[:, ids.shape[1]:]}"


def test_prompt_images_from_the_mask():
    vision, ids, mask, image_mask = idefics_batch(ROWS, num_images=3)
    prompt = masking.PromptImages.from_image_attention_mask(image_mask)
    assert prompt.visible == [[0, 1, 2], [0], []]
    assert prompt.decode_image.tolist() == [2, 0, -1]
    row0 = prompt.image_index[0, mask[0].bool()].tolist()
    assert row0[:5] == [-1, -1, -1, -1, -1] and row0[5] == 0  # <s>, 3 words, <fake>; then <image> sees image 0
    assert -1 in row0[row0.index(0):row0.index(1)]  # the </s> and the text after it see nothing
    image_mask[1, -1, 0] = image_mask[1, -1, 1] = 1
    with pytest.raises(ValueError, match=r"image_attention_mask: token \d+ of row 1 sees 2 images; the fast path"):
        masking.PromptImages.from_image_attention_mask(image_mask)


@pytest.mark.parametrize("every", [1, 2, 4])
def test_torch_backend_matches_reference(every):
    model = build_reference(CONFIG.replace(cross_attn_every_n_layers=every), seed=every)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=64)
    vision, ids, mask, image_mask = idefics_batch(ROWS, num_images=3, seed=every)
    compare(model, fast, vision, ids, mask, image_mask, max_new_tokens=8, eos_token_id=[])


@pytest.mark.parametrize("qk_norm, per_channel", [(False, False), (True, False), (False, True)])
def test_scalar_gates_and_no_qk_norms(qk_norm, per_channel):
    config = CONFIG.replace(xattn_qk_norm=qk_norm, xattn_gate_per_channel=per_channel)
    model = build_reference(config, seed=3)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=64)
    compare(model, fast, *idefics_batch(ROWS[:2], num_images=3, seed=3), max_new_tokens=6, eos_token_id=[])


def test_beams_sampling_and_stops_match_reference():
    model = build_reference(CONFIG, seed=4)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=64)
    batch = idefics_batch(ROWS, num_images=3, seed=4)
    compare(model, fast, *batch, max_new_tokens=6, num_beams=3, length_penalty=-2.0, eos_token_id=[])
    for seed in (1, 2):
        compare(model, fast, *batch, max_new_tokens=6, do_sample=True, top_k=5, seed=seed)
    compare(model, fast, *batch, max_new_tokens=10)  # stops at </s>, the default


def test_context_cache_warm_equals_cold_and_score():
    model = build_reference(CONFIG, seed=5)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=64)
    context = [("text", 2), "image", ("text", 4), "eos", "image", ("text", 3)]
    rows = [context + ["image", ("text", 2)], context + ["image", ("text", 2)]]
    vision, ids, mask, image_mask = idefics_batch(rows, num_images=3, seed=5)
    vision[1, :2] = vision[0, :2]  # the same demonstrations in both rows: images and words
    ids[1, :-5] = ids[0, :-5]  # all but the query (<fake><image><fake> and 2 words)
    cold = fast.generate(vision, ids, mask, image_attention_mask=image_mask, max_new_tokens=5, eos_token_id=[])
    warm = fast.generate(vision, ids, mask, image_attention_mask=image_mask, max_new_tokens=5, eos_token_id=[])
    ref = model.generate(vision, ids, mask, image_attention_mask=image_mask, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(cold, ref) and torch.equal(warm, ref)
    stats = fast.context_cache_stats()
    assert stats.context_misses == 1 and stats.context_hits >= 1  # one shared context, computed once
    candidates = [[5], [7, 8], [9, BASE, 11]]
    assert_close(fast.score(vision, ids, mask, candidates, image_attention_mask=image_mask),
                 model.score(vision, ids, mask, candidates, image_attention_mask=image_mask), dtype=torch.float32)


def test_text_only_call_and_unseen_images_are_not_encoded():
    model = build_reference(CONFIG, seed=6)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=64)
    _, ids, mask, image_mask = idefics_batch([[("text", 5)], [("text", 3)]], num_images=0)
    compare(model, fast, None, ids, mask, image_mask, max_new_tokens=4, eos_token_id=[])
    vision, ids, mask, image_mask = idefics_batch(ROWS[1:], num_images=3, seed=6)  # slots 1, 2 are padding
    encoded = []
    hook = model.vision_encoder.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    try:
        fast.clear_context_cache()
        fast.generate(vision, ids, mask, image_attention_mask=image_mask, max_new_tokens=2)
    finally:
        hook.remove()
    assert encoded == [1]


def test_input_errors_name_the_argument():
    model = build_reference(CONFIG, seed=7)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=64)
    vision, ids, mask, image_mask = idefics_batch(ROWS[:2], num_images=3)
    with pytest.raises(ValueError, match=r"image_attention_mask: got NoneType; the IDEFICS layout needs"):
        fast.generate(vision, ids, mask)
    with pytest.raises(ValueError, match=r"image_attention_mask: got shape \(2, \d+, 2\); expected \(2, \d+, 3\)"):
        fast.generate(vision, ids, mask, image_attention_mask=image_mask[..., :2])
    with pytest.raises(ValueError, match=r"image_attention_mask: expected only 0/1 values"):
        model(vision, ids, mask, image_mask * 2)
    of_model = build_reference(from_name("tiny"), seed=0)
    with pytest.raises(ValueError, match=r"image_attention_mask: given to a model of layout 'openflamingo'"):
        of_model(None, ids.clamp(max=90), mask, image_mask)


@pytest.mark.parametrize("change, message", [
    (dict(cross_attn_every_n_layers=3), r"cross_attn_every_n_layers=3: expected an interval that divides the 4"),
    (dict(xattn_heads=4), r"xattn_heads=4, xattn_dim_head=32: IDEFICS's gated blocks use the LM's heads"),
    (dict(only_attend_immediate_media=False), r"layout='idefics': the image_attention_mask decides"),
    (dict(layout="openflamingo", eoc_token_id=None), r"IDEFICS options; expected layout='idefics'"),
    (dict(layout="nope"), r"layout='nope': expected one of \['openflamingo', 'idefics'\]"),
])
def test_config_errors(change, message):
    with pytest.raises(ValueError, match=message):
        CONFIG.replace(**change)


def test_gated_blocks_sit_before_every_nth_layer_from_the_first():
    assert CONFIG.replace(cross_attn_every_n_layers=2).xattn_layer_indices == (0, 2)
    assert from_name("idefics-9b").xattn_layer_indices == tuple(range(0, 32, 4))
    assert from_name("tiny").replace(cross_attn_every_n_layers=2).xattn_layer_indices == (1, 3)  # OpenFlamingo's


@pytest.mark.interpreter
def test_triton_backend_matches_reference():
    """Interpreted Triton: head dim 32 cross-attention, a perceiver head dim of 24 padded to 32, 5 latents."""
    model = build_reference(CONFIG, seed=8)
    fast = FastFlamingo.from_reference(model, backend="triton", max_batch_size=4, max_seq_len=64)
    assert fast.perceiver.padded == 32
    vision, ids, mask, image_mask = idefics_batch(ROWS[:2], num_images=3, seed=8)
    compare(model, fast, vision, ids, mask, image_mask, max_new_tokens=4, eos_token_id=[])
    compare(model, fast, vision, ids, mask, image_mask, max_new_tokens=3, num_beams=2, eos_token_id=[])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graphs_equal_eager_and_the_reference(dtype):
    """The IDEFICS layout on a GPU: Triton kernels (perceiver head dim padded), decode captured as CUDA graphs,
    greedy and beams, the context cache warm; float32 also against the reference."""
    model = build_reference(CONFIG, seed=9).to(device="cuda", dtype=dtype)
    eager = FastFlamingo.from_reference(model, max_batch_size=4, max_seq_len=64, cuda_graphs=False)
    graphed = FastFlamingo.from_reference(model, max_batch_size=4, max_seq_len=64)
    vision, ids, mask, image_mask = (t.cuda() for t in idefics_batch(ROWS, num_images=3, seed=9))
    vision = vision.to(dtype)
    for gen in (dict(max_new_tokens=8, eos_token_id=[]), dict(max_new_tokens=6, num_beams=3, length_penalty=-2.0)):
        for _ in range(2):  # cold, then warm (context cache)
            got = graphed.generate(vision, ids, mask, image_attention_mask=image_mask, **gen)
            assert torch.equal(got, eager.generate(vision, ids, mask, image_attention_mask=image_mask, **gen))
        if dtype == torch.float32:
            assert torch.equal(got, model.generate(vision, ids, mask, image_attention_mask=image_mask, **gen))
    assert graphed.graphs.graphs, "no decode step was captured"
