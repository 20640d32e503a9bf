"""A FastFlamingo over weights that change after it was built, and what it keeps after a call: the context cache
follows in-place updates of the shared weights (runtime/weight_watch.py), a replaced storage is a named error, and a
dropped past_key_values handle frees its tensors (runtime/prefix_state.py keeps the staged chain by weak references)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from few_shot import build, few_shot_batch
from helpers import assert_close

from flamingo_fast.runtime.runtime import FastFlamingo

FP32 = torch.float32


def runtime(model, **options):
    return FastFlamingo.from_reference(model, backend="torch", max_batch_size=4, max_seq_len=96, **options)


def sgd_step(model, seed: int) -> None:
    """What one optimizer.step() of SGD writes, in place, into what OpenFlamingo trains (perceiver, gated blocks,
    embeddings), with random gradients (torch.optim itself is not used: building the first optimizer of a process
    imports torch._dynamo, 11 s here)."""
    trained = [*model.perceiver.parameters(), *model.lang_encoder.gated_cross_attn_layers.parameters(),
               model.lang_encoder.embed_tokens.weight]
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        torch._foreach_add_(trained, [torch.randn(p.shape, generator=g) for p in trained], alpha=-0.5)


def test_context_cache_follows_in_place_weight_updates():
    """A warm context (its self-attention KV and its images' media K/V) is recomputed after optimizer.step() and
    after the model's own load_state_dict, so the next few-shot call gives the updated model's tokens and logits."""
    model = build(seed=11)
    fast = runtime(model)
    vision, lang_x, mask = few_shot_batch(model.config, 2, [3, 5])
    options = dict(max_new_tokens=4, eos_token_id=[], return_logits=True)
    fast.generate(vision, lang_x, mask, **options)
    fast.generate(vision, lang_x, mask, **options)  # warm: the context and its two images come from the cache
    assert fast.context_cache_stats().context_hits == 1
    other = build(seed=12).state_dict()
    for update in (lambda: sgd_step(model, seed=13), lambda: model.load_state_dict(other)):
        update()
        ids, logits = fast.generate(vision, lang_x, mask, **options)
        expected, expected_logits = model.generate(vision, lang_x, mask, **options)
        assert_close(logits, expected_logits, dtype=FP32)
        assert torch.equal(ids, expected)
        assert fast.context_cache_stats().contexts == 1, "emptied, then the new context stored again"
    cands = [[5], [7, 8]]
    assert_close(fast.score(vision, lang_x, mask, candidates=cands), model.score(vision, lang_x, mask,
                                                                                candidates=cands), dtype=FP32)


def test_a_replaced_storage_is_read_afresh_or_a_named_error():
    """A runtime that holds nothing over the weights' storages (no fused projections, no CUDA graphs) reads the new
    ones after `param.data = ...`, its context cache emptied, and keeps working when another runtime fuses the same
    model's projections; one that holds fused weights refuses the call by name."""
    model = build(seed=14)
    plain = runtime(model, decode_paths=())
    vision, lang_x, mask = few_shot_batch(model.config, 2, [2])
    options = dict(max_new_tokens=2, eos_token_id=[], return_logits=True)
    plain.generate(vision, lang_x, mask, **options)
    fused = runtime(model)  # re-points the q/k/v and gate/up weights under `plain`
    assert fused.stack.fused_projections and not plain.stack.fused_projections
    latents = model.perceiver.latents
    latents.data = 1.5 * latents.data
    _, logits = plain.generate(vision, lang_x, mask, **options)
    assert_close(logits, model.generate(vision, lang_x, mask, **options)[1], dtype=FP32)
    with pytest.raises(ValueError, match=r"model: a tensor of the model this FastFlamingo runs was replaced"):
        fused.generate(vision, lang_x, mask, max_new_tokens=2)


def test_dropped_handles_free_their_tensors():
    """forward_with_state's handles (the drop-in's past_key_values) own their KV and media K/V: once the caller drops
    them, nothing of the runtime keeps them alive, whether a generate, score or forward ran since or not."""
    model = build(seed=15)
    fast = runtime(model)
    vision, lang_x, mask = few_shot_batch(model.config, 2, [3, 5])
    for after in (None, "generate", "score", "forward"):
        logits, root = fast.forward_with_state(vision, lang_x, mask)
        _, extended = fast.forward_with_state(None, torch.tensor([[5], [6]]), None, past=root)
        if after == "generate":
            fast.generate(vision, lang_x, mask, max_new_tokens=2)
        elif after == "score":
            fast.score(vision, lang_x, mask, candidates=[[5]])
        elif after == "forward":
            fast.forward(vision, lang_x, mask)
        alive = [weakref.ref(t) for t in (root, extended, root.keys, root.media_keys, extended.values)]
        del root, extended, logits
        gc.collect()
        assert [r() is None for r in alive] == [True] * len(alive), f"after {after}: still alive"
