"""Random-weight models and prompt batches that several test files share (main environment: flamingo_fast only).

- `FAMILIES`: the tiny preset's LM in the MPT and GPT-NeoX variants (test_families.py, test_int8_weights.py);
- `idefics_batch`: prompts of the idefics-tiny layout with IdeficsProcessor's image_attention_mask rule
  (test_idefics_layout.py, the int8 and drop-in tests).
"""

from __future__ import annotations

import torch

from flamingo_fast.config import from_name

FAMILIES = {
    "mpt": dict(family="mpt", alibi=True, tie_word_embeddings=True, num_kv_heads=4, intermediate_size=256),
    "mpt_1b_style": dict(family="mpt", alibi=True, tie_word_embeddings=True, num_kv_heads=4, qk_ln=True,
                         clip_qkv=0.4, bias=True, num_heads=4),
    "gpt_neox_parallel": dict(family="gpt_neox", num_kv_heads=4, rotary_pct=0.5, parallel_residual=True),
    "gpt_neox_sequential": dict(family="gpt_neox", num_kv_heads=4, rotary_pct=0.25),
}

IDEFICS_TINY = from_name("idefics-tiny")
FAKE = IDEFICS_TINY.lm.vocab_size - IDEFICS_TINY.lm.additional_vocab_size  # <fake_token_around_image>
IMAGE, EOS = IDEFICS_TINY.media_token_id, IDEFICS_TINY.eos_token_id


def idefics_batch(rows: list[list], num_images: int, seed: int = 0):
    """rows: per row a list of segments, ("text", n), "image" (`<fake><image><fake>`, the next image of the
    row) or "eos" (`</s>`); left-padded with <unk>. The mask follows IdeficsProcessor's rule: a token sees the
    row's latest image from its `<image>` token on, and none from a `</s>` until the next image.
    -> vision_x [B, N, 1, C, H, W], input_ids, attention_mask, image_attention_mask [B, T, N]."""
    generator = torch.Generator().manual_seed(seed)
    built = []
    for segments in rows:
        ids, sight, image, seen = [IDEFICS_TINY.bos_token_id], [-1], -1, -1
        for segment in segments:
            if segment == "image":
                image += 1
                ids += [FAKE, IMAGE, FAKE]
                sight += [seen, image, image]
                seen = image
            elif segment == "eos":
                ids.append(EOS)
                seen = -1
                sight.append(seen)
            else:
                n = segment[1]
                ids += torch.randint(3, FAKE, (n,), generator=generator).tolist()
                sight += [seen] * n
        built.append((ids, sight))
    longest = max(len(ids) for ids, _ in built)
    input_ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    image_mask = torch.zeros(len(rows), longest, num_images, dtype=torch.long)
    for b, (ids, sight) in enumerate(built):
        pad = longest - len(ids)
        input_ids[b, pad:] = torch.tensor(ids)
        mask[b, pad:] = 1
        for t, i in enumerate(sight):
            if i >= 0:
                image_mask[b, pad + t, i] = 1
    size = IDEFICS_TINY.vision.image_size
    vision = torch.randn(len(rows), num_images, 1, 3, size, size, generator=generator) if num_images else None
    return vision, input_ids, mask, image_mask
