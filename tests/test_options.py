"""RuntimeOptions: FastFlamingo's construction options, checked once (without a model where they can be), resolved
against the model, and the same runtime whether given as a RuntimeOptions or as keywords."""

from __future__ import annotations

import pytest
import torch
from helpers import random_batch

from flamingo_fast.config import from_name
from flamingo_fast.reference.model import build_reference
from flamingo_fast.runtime.options import RuntimeOptions
from flamingo_fast.runtime.runtime import FastFlamingo

TINY = from_name("tiny")


@pytest.mark.parametrize("field, value, match", [
    ("max_batch_size", 0, r"max_batch_size=0: expected an integer >= 1$"),
    ("max_seq_len", True, r"max_seq_len=True: expected an integer >= 1$"),
    ("max_hypotheses", 2.0, r"max_hypotheses=2.0: expected an integer >= 1$"),
    ("context_cache_bytes", -1, r"context_cache_bytes=-1: expected an integer >= 0 \(0 disables it\)"),
    ("score_bytes", 0, r"score_bytes=0: expected an integer >= 1 \(the bytes one scoring pass may hold\)"),
    ("backend", "cuda", r"backend='cuda': expected one of \('triton', 'torch'\)"),
])
def test_options_are_checked_without_a_model(field, value, match):
    with pytest.raises(ValueError, match=match):
        RuntimeOptions(**{field: value})


def test_resolve_fills_in_what_the_model_decides():
    resolved = RuntimeOptions(max_batch_size=3).resolve(TINY, torch.device("cpu"))
    assert (resolved.backend, resolved.max_seq_len, resolved.max_hypotheses) == \
        ("torch", TINY.lm.max_position_embeddings, 12)
    assert resolved.decode_paths == frozenset({"fused_projections"})  # the torch backend's default
    too_long = TINY.lm.max_position_embeddings + 1
    with pytest.raises(ValueError, match=rf"max_seq_len={too_long}: expected at most the model's max positions"):
        RuntimeOptions(max_seq_len=too_long).resolve(TINY, torch.device("cpu"))


def test_a_runtime_from_options_equals_one_from_keywords():
    model = build_reference(TINY, seed=3)
    options = RuntimeOptions(backend="torch", max_batch_size=2, max_seq_len=48)
    given = FastFlamingo(model, options=options)
    keywords = FastFlamingo(model, backend="torch", max_batch_size=2, max_seq_len=48)
    assert given.options == keywords.options == options  # kept as given: a drop-in rebuilds from them
    vision, lang_x, mask = random_batch(TINY, [([0], 8), ([2], 6)], num_images=1)
    assert torch.equal(given.generate(vision, lang_x, mask, max_new_tokens=3),
                       keywords.generate(vision, lang_x, mask, max_new_tokens=3))
    with pytest.raises(ValueError, match=r"options and \['max_batch_size'\]: expected a RuntimeOptions or its fields"):
        FastFlamingo(model, options=options, max_batch_size=2)
