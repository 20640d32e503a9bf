"""Few-shot prompts over tiny references, for the context-cache tests (test_context_cache.py, test_live_weights.py):
rows that share their demonstrations (`<image>` caption `<|endofchunk|>`) and differ in their queries."""

from __future__ import annotations

import dataclasses

import torch

from flamingo_fast.config import from_name
from flamingo_fast.reference.model import build_reference

TINY = from_name("tiny")
FAMILIES = {
    "llama_gqa": {},
    "mpt": dict(family="mpt", alibi=True, tie_word_embeddings=True, num_kv_heads=4, intermediate_size=256),
    "gpt_neox": dict(family="gpt_neox", num_kv_heads=4, rotary_pct=0.5, parallel_residual=True),
}


def build(family: str = "llama_gqa", seed: int = 0, **overrides):
    lm = dataclasses.replace(TINY.lm, **FAMILIES[family])
    return build_reference(TINY.replace(lm=lm, cross_attn_every_n_layers=2, **overrides), seed=seed)


def few_shot_batch(config, shots: int, question_lengths, context_seed: int = 0, query_seed: int = 1,
                   demo_images: torch.Tensor | None = None):
    """Every row: the same `shots` demonstrations (`<image>` caption `<|endofchunk|>`), then its own query
    (`<image>` question); rows left-padded to the longest. -> vision_x [B, shots + 1, ...], lang_x, mask."""
    g = torch.Generator().manual_seed(context_seed)
    media, eoc, pad = config.media_token_id, config.eoc_token_id, config.pad_token_id
    context = []
    for _ in range(shots):
        context += [media] + torch.randint(3, eoc, (4,), generator=g).tolist() + [eoc]
    size = config.vision.image_size
    demos = torch.randn(shots, 1, 3, size, size, generator=g) if demo_images is None else demo_images
    q = torch.Generator().manual_seed(query_seed)
    rows, images = [], []
    for n in question_lengths:
        rows.append(context + [media] + torch.randint(3, eoc, (n,), generator=q).tolist())
        images.append(torch.cat([demos, torch.randn(1, 1, 3, size, size, generator=q)]))
    longest = max(map(len, rows))
    lang_x = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    return torch.stack(images), lang_x, mask
