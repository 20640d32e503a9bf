"""Decode paths at the bandwidth floor: fused projection weights stored once (the reference's parameters become views,
memory does not grow, outputs do not change), and every combination of the new paths (fused projections, fused
rotary + cache write, split-KV decode attention) against the reference and against the old path, for each LM
family, with left padding, grouped KV heads and beams; the before/after switch (decode_paths and the
FLAMINGO_FAST_OLD_DECODE environment variable)."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, interpreter, random_batch
from torch import nn

from flamingo_fast.config import from_name
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.decode import DECODE_PATHS, OLD_DECODE_ENV, resolve_decode_paths
from flamingo_fast.runtime.fused_weights import fuse_linear_weights
from flamingo_fast.runtime.runtime import FastFlamingo

TINY = from_name("tiny")  # LLaMA, 4 query heads over 2 KV heads (GQA)
FAMILIES = {
    "llama": {},
    "mpt": dict(family="mpt", alibi=True, tie_word_embeddings=True, num_kv_heads=4, intermediate_size=256),
    "gpt_neox": dict(family="gpt_neox", num_kv_heads=4, rotary_pct=0.5, parallel_residual=True),
}
ROWS = [([0, 5, 9], 16), ([2], 7), ([], 11)]  # 3, 1 and 0 images; left-padded to 16


def build(family: str, seed: int):
    lm = dataclasses.replace(TINY.lm, **FAMILIES[family])
    return build_reference(TINY.replace(lm=lm, cross_attn_every_n_layers=2), seed=seed)


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    seen = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ------------------------------------------------------------------------------------------- fused weights


def test_fused_weights_alias_the_modules_parameters_and_change_no_output():
    linears = [nn.Linear(24, n, bias=False) for n in (16, 8, 8)]
    params = [m.weight for m in linears]
    x = torch.randn(5, 24)
    before = [m(x) for m in linears]
    fused = fuse_linear_weights(linears)
    assert fused.shape == (32, 24) and fused.is_contiguous()
    row = 0
    for m, p, b in zip(linears, params, before, strict=True):
        assert m.weight is p, "the Parameter object must stay the same"
        assert m.weight.data_ptr() == fused.data_ptr() + row * 24 * fused.element_size()
        assert torch.equal(m(x), b)
        row += m.out_features
    # one GEMM instead of three: the same dot products, maybe summed in another order (not bitwise)
    assert_close(F.linear(x, fused), torch.cat(before, dim=-1).detach(), dtype=torch.float32)
    # idempotent: already consecutive views of one tensor -> that tensor, nothing copied
    again = fuse_linear_weights(linears)
    assert again.data_ptr() == fused.data_ptr() and again.shape == fused.shape
    # writes through the modules' parameters (load_state_dict copies into them) reach the fused tensor
    with torch.no_grad():
        linears[1].weight.copy_(torch.ones(8, 24))
    assert torch.equal(fused[16:24], torch.ones(8, 24))


def test_fused_weight_errors_name_the_linear():
    with pytest.raises(ValueError, match=r"linears\[1\]: has a bias"):
        fuse_linear_weights([nn.Linear(4, 4, bias=False), nn.Linear(4, 4)])
    with pytest.raises(ValueError, match=r"linears\[1\]: weight \(4, 5\) torch.float32 on cpu, expected \[\*, 4\]"):
        fuse_linear_weights([nn.Linear(4, 4, bias=False), nn.Linear(5, 4, bias=False)])
    with pytest.raises(ValueError, match=r"linears: got none"):
        fuse_linear_weights([])


def test_fast_flamingo_fuses_llama_projections_in_place_without_growing_memory():
    model = build("llama", seed=1)
    vision, lang_x, mask = random_batch(model.config, ROWS, num_images=3)
    with torch.no_grad():  # an autograd graph would hold the weights too (then they are not fused: see below)
        expected = model(vision, lang_x, mask)
    keys = list(model.state_dict())
    layer = model.lang_encoder.layers[0]
    q_param, gate_param = layer.self_attn.q_proj.weight, layer.mlp.gate_proj.weight
    total = storage_bytes(model)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=48)
    assert storage_bytes(model) == total, "fusing must not grow the model's memory"
    attn, mlp = layer.self_attn, layer.mlp
    assert attn.q_proj.weight is q_param and mlp.gate_proj.weight is gate_param
    qkv_end = attn.q_proj.weight.data_ptr() + attn.q_proj.weight.numel() * attn.q_proj.weight.element_size()
    assert attn.k_proj.weight.data_ptr() == qkv_end, "k_proj must follow q_proj in one tensor"
    gate_end = mlp.gate_proj.weight.data_ptr() + mlp.gate_proj.weight.numel() * mlp.gate_proj.weight.element_size()
    assert mlp.up_proj.weight.data_ptr() == gate_end, "up_proj must follow gate_proj in one tensor"
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(model(vision, lang_x, mask), expected), "the reference's output must not change"
    assert_close(fast(vision, lang_x, mask)[mask.bool()], expected[mask.bool()], dtype=torch.float32)
    # a second instance over the same model finds the fused layout and copies nothing
    FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=48)
    assert storage_bytes(model) == total and attn.q_proj.weight.data_ptr() == q_param.data_ptr()


def test_weights_held_elsewhere_are_not_fused():
    """A weight whose storage another tensor holds too (a live Hugging Face model under a drop-in) would stay
    alive there: fusing would add a copy. FastFlamingo then keeps the separate projections."""
    model = build("llama", seed=9)
    held = [p.data for p in model.parameters()]  # other tensors over the same storages
    ptrs = [p.data_ptr() for p in model.parameters()]
    layer = model.lang_encoder.layers[0]
    assert fuse_linear_weights([layer.mlp.gate_proj, layer.mlp.up_proj]) is None
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=48)
    assert "fused_projections" not in fast.decode_paths
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    ids, logits, ref_ids, ref_logits = generate_both(model, fast, new_tokens=4)
    assert torch.equal(ids, ref_ids)
    assert_close(logits, ref_logits, dtype=torch.float32)
    del held


def test_without_fused_projections_the_reference_is_left_alone():
    model = build("llama", seed=2)
    ptrs = [p.data_ptr() for p in model.parameters()]
    FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=32,
                                decode_paths=("rotary_kv_write", "decode_attention"))
    assert [p.data_ptr() for p in model.parameters()] == ptrs


# ------------------------------------------------------------------------------------------- decode paths


def generate_both(model, fast, new_tokens=10, **gen):
    vision, lang_x, mask = random_batch(model.config, ROWS, num_images=3)
    ref_ids, ref_logits = model.generate(vision, lang_x, mask, max_new_tokens=new_tokens, eos_token_id=[],
                                         return_logits=True, **gen)
    ids, logits = fast.generate(vision, lang_x, mask, max_new_tokens=new_tokens, eos_token_id=[],
                                return_logits=True, **gen)
    return ids, logits, ref_ids, ref_logits


SUBSETS = [tuple(c) for n in range(len(DECODE_PATHS) + 1) for c in itertools.combinations(DECODE_PATHS, n)]


@pytest.mark.parametrize("paths", SUBSETS, ids=lambda p: "+".join(p) or "old")
def test_every_combination_of_decode_paths_matches_the_reference_llama(paths):
    model = build("llama", seed=3)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=48, decode_paths=paths)
    assert fast.decode_paths == frozenset(paths)
    ids, logits, ref_ids, ref_logits = generate_both(model, fast)
    assert torch.equal(ids, ref_ids)
    assert_close(logits, ref_logits, dtype=torch.float32)


@pytest.mark.parametrize("family", ["mpt", "gpt_neox"])
@pytest.mark.parametrize("paths", [(), DECODE_PATHS], ids=["old", "new"])
def test_alibi_and_partial_rotary_families_on_both_paths(family, paths):
    model = build(family, seed=4)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=48, decode_paths=paths)
    ids, logits, ref_ids, ref_logits = generate_both(model, fast)
    assert torch.equal(ids, ref_ids)
    assert_close(logits, ref_logits, dtype=torch.float32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_beams_on_the_new_paths_match_the_reference(family):
    """The cascade (prompt shared by a row's beams + private tails) through the decode-attention LSE merge."""
    model = build(family, seed=5)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=3, max_seq_len=48, max_tail_len=8,
                                       decode_paths=DECODE_PATHS)
    vision, lang_x, mask = random_batch(model.config, ROWS, num_images=3)
    gen = dict(max_new_tokens=6, num_beams=3, eos_token_id=[], length_penalty=-2.0)
    assert torch.equal(fast.generate(vision, lang_x, mask, **gen), model.generate(vision, lang_x, mask, **gen))


@interpreter
@pytest.mark.parametrize("family", ["mpt", "gpt_neox"])
def test_triton_kernels_interpreted_for_alibi_and_partial_rotary(family):
    model = build(family, seed=6)
    fast = FastFlamingo.from_reference(model, backend="triton", max_batch_size=3, max_seq_len=32)
    ids, logits, ref_ids, ref_logits = generate_both(model, fast, new_tokens=4)
    assert torch.equal(ids, ref_ids)
    assert_close(logits, ref_logits, dtype=torch.float32)


def test_default_paths_per_backend():
    assert resolve_decode_paths("triton", None) == frozenset(DECODE_PATHS)
    assert resolve_decode_paths("torch", None) == frozenset({"fused_projections"})  # see DEFAULT_DECODE_PATHS


def test_the_environment_switch_selects_the_old_paths(monkeypatch):
    monkeypatch.setenv(OLD_DECODE_ENV, "decode_attention, rotary_kv_write")
    assert resolve_decode_paths("triton", None) == frozenset({"fused_projections"})
    model = build("llama", seed=7)
    fast = FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=32)
    assert fast.decode_paths == frozenset({"fused_projections"})
    monkeypatch.setenv(OLD_DECODE_ENV, ",".join(DECODE_PATHS))
    model = build("llama", seed=7)
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert FastFlamingo.from_reference(model, backend="torch", max_batch_size=2, max_seq_len=32).decode_paths == set()
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    monkeypatch.setenv(OLD_DECODE_ENV, "rotary")
    with pytest.raises(ValueError, match=rf"{OLD_DECODE_ENV}: unknown \['rotary'\]; expected names from"):
        resolve_decode_paths("torch", None)
    monkeypatch.delenv(OLD_DECODE_ENV)
    with pytest.raises(ValueError, match=r"decode_paths: unknown \['gemv'\]"):
        resolve_decode_paths("torch", ["gemv"])
