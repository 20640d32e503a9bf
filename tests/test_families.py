"""The MPT and GPT-NeoX decoders: FastFlamingo against the reference (the real Hugging Face / OpenFlamingo
models are compared in test_openflamingo.py, which needs .venv-openflamingo), config errors, min_new_tokens."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from builders import FAMILIES
from helpers import assert_close, random_batch

from flamingo_fast.config import LMConfig, from_name
from flamingo_fast.positions import alibi_slopes
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.runtime import FastFlamingo

TINY = from_name("tiny")


def build(name: str, every: int, seed: int):
    lm = dataclasses.replace(TINY.lm, **FAMILIES[name])
    return build_reference(TINY.replace(lm=lm, cross_attn_every_n_layers=every), seed=seed)


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fast_matches_reference(name, every):
    model = build(name, every, seed=len(name) + every)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=64)
    rows = [([0, 5, 9], 16), ([2], 7), ([], 11)]  # 3 images, 1 image (2 padding images), text only; left-padded
    vision, lang_x, mask = random_batch(model.config, rows, num_images=3)
    real = mask.bool()
    assert_close(fast(vision, lang_x, mask)[real], model(vision, lang_x, mask)[real], dtype=torch.float32)
    ref_ids, ref_logits = model.generate(vision, lang_x, mask, max_new_tokens=20, eos_token_id=[], return_logits=True)
    ids, logits = fast.generate(vision, lang_x, mask, max_new_tokens=20, eos_token_id=[], return_logits=True)
    assert torch.equal(ids, ref_ids)
    assert_close(logits, ref_logits, dtype=torch.float32)


def test_alibi_slopes_follow_mpt():
    """MPT: 2^(-8 i / n) for a power-of-two head count; otherwise odd-indexed then even-indexed of the next."""
    assert torch.allclose(alibi_slopes(4, 8.0), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    eight = alibi_slopes(8, 8.0)
    assert torch.allclose(alibi_slopes(6, 8.0), torch.cat([eight[1::2], eight[::2]])[:6])


def test_min_new_tokens_suppresses_stop_tokens_in_both():
    model = build("gpt_neox_parallel", 2, seed=3)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=64)
    vision, lang_x, mask = random_batch(model.config, [([0], 8), ([1], 8)], num_images=1)
    free = model.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=[])
    stop = int(free[0, 8])  # row 0's first token: without min_new_tokens generation stops right there
    for minimum in (0, 3):
        ref = model.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=stop, min_new_tokens=minimum)
        got = fast.generate(vision, lang_x, mask, max_new_tokens=6, eos_token_id=stop, min_new_tokens=minimum)
        assert torch.equal(got, ref)
        assert stop not in ref[:, 8:8 + minimum].flatten().tolist()
    with pytest.raises(ValueError, match=r"min_new_tokens=-1: expected an integer >= 0"):
        fast.generate(vision, lang_x, mask, max_new_tokens=2, min_new_tokens=-1)


def test_lm_config_errors_name_what_is_supported():
    expected = r"lm.family='gpt2': unsupported; expected one of \['llama', 'mpt', 'gpt_neox'\]"
    with pytest.raises(ValueError, match=expected):
        LMConfig(family="gpt2")
    with pytest.raises(ValueError, match=r"lm.alibi=False with family='mpt'"):
        LMConfig(family="mpt")
    with pytest.raises(ValueError, match=r"lm.num_kv_heads=2: family 'gpt_neox' has no grouped KV heads"):
        LMConfig(family="gpt_neox", num_heads=8, num_kv_heads=2)


@pytest.mark.parametrize("preset, family, every", [("openflamingo-3b", "mpt", 1), ("openflamingo-4b", "gpt_neox", 2),
                                                   ("openflamingo-9b-v2", "mpt", 4)])
def test_openflamingo_presets(preset, family, every):
    config = from_name(preset)
    assert (config.lm.family, config.cross_attn_every_n_layers, config.vision.width) == (family, every, 1024)
    assert config.lm.vocab_size == 50280 and config.media_token_id == 50278


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cuda_graphs_and_triton_match_reference(name):
    """Each family's decode step under CUDA-graph replay (ALiBi bias built inside the step for MPT) with the
    Triton kernels, against the reference at fp32 and graph-free eager at bf16."""
    model = build(name, 2, seed=21).cuda()
    rows = [([0, 5, 9], 16), ([2], 7), ([], 11)]
    vision, lang_x, mask = (t.cuda() for t in random_batch(model.config, rows, num_images=3))
    fast = FastFlamingo.from_reference(model, max_batch_size=4, max_seq_len=64)
    ref_ids = model.generate(vision, lang_x, mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(fast.generate(vision, lang_x, mask, max_new_tokens=20, eos_token_id=[]), ref_ids)
    assert fast.graphs is not None and fast.graphs.graphs, "no CUDA graph was captured"
    eager = FastFlamingo.from_reference(model, dtype=torch.bfloat16, cuda_graphs=False, max_batch_size=4,
                                        max_seq_len=64)
    graphed = FastFlamingo.from_reference(model, dtype=torch.bfloat16, max_batch_size=4, max_seq_len=64)
    a = eager.generate(vision, lang_x, mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(graphed.generate(vision, lang_x, mask, max_new_tokens=20, eos_token_id=[]), a)
