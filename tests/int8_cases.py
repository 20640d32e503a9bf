"""The models and prompts of the int8 tests (test_int8_weights.py, test_int8_runtime.py): one tiny reference per
LM family the int8 path treats differently, and one prompt batch per layout."""

from __future__ import annotations

import dataclasses

import torch
from builders import FAMILIES, idefics_batch
from helpers import random_batch

from flamingo_fast.config import from_name
from flamingo_fast.reference.model import build_reference

TINY = from_name("tiny")
CASES = ("llama", "mpt", "gpt_neox_parallel", "idefics")


def build(case: str, seed: int = 0):
    if case == "idefics":
        return build_reference(from_name("idefics-tiny"), seed=seed)
    lm = TINY.lm if case == "llama" else dataclasses.replace(TINY.lm, **FAMILIES[case])
    return build_reference(TINY.replace(lm=lm, cross_attn_every_n_layers=2), seed=seed)


def batch(model, seed: int = 0):
    """-> (positional inputs, image_attention_mask or None, real-token mask [B, T])."""
    torch.manual_seed(seed)
    if model.config.layout == "idefics":
        vision, ids, mask, image_mask = idefics_batch([[("text", 3), "image", ("text", 9)], [("text", 6)],
                                                       ["image", ("text", 4), "image", ("text", 5)]], 2, seed)
        return (vision, ids, mask), image_mask, mask.bool()
    vision, ids, mask = random_batch(model.config, [([0, 5, 9], 16), ([2], 7), ([], 11)], num_images=3)
    return (vision, ids, mask), None, mask.bool()


# ---------------------------------------------------------------------------------------------- quantize_per_channel
