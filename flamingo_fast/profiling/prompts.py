"""The profiler's prompts: one k-shot prompt per (shots, batch), and OpenFlamingo's evaluation workload.

Prompt for k shots, per row: `<bos>` then k times `<image>` + caption + `<|endofchunk|>`, then the query
`<image>` + question; so k shots use k + 1 images and 0 shots is one query image. Text tokens are random ids
of the base vocabulary (below `<|endofchunk|>`, above bos/eos); images are `torch.randn` at the preset's size.
The IDEFICS layout wraps each image in `<fake_token_around_image>` and ends no shot with a token.
"""

from __future__ import annotations

import torch

from .. import masking
from ..config import FlamingoConfig


def _prompt_pieces(config: FlamingoConfig) -> tuple[list[int], list[int], int]:
    """(tokens of an image, tokens that end a shot, the first special token id) in the layout's prompts:
    OpenFlamingo `<image>` ... `<|endofchunk|>`; IDEFICS `<fake_token_around_image><image><fake_token_around_image>`
    (the first added row, then `<image>`) with nothing after a shot."""
    if config.layout != "idefics":
        return [config.media_token_id], [config.eoc_token_id], config.eoc_token_id
    base = config.lm.vocab_size - config.lm.additional_vocab_size
    return [base, config.media_token_id, base], [], base


def prompt_length(shots: int, caption_tokens: int, question_tokens: int, config: FlamingoConfig | None = None) -> int:
    """<bos> + shots * (<image> caption <|endofchunk|>) + <image> question (OpenFlamingo's layout, also for
    config None; IDEFICS's wraps each image in two `<fake_token_around_image>` and ends no shot with a token)."""
    image, end = (1, 1) if config is None else (len(p) for p in _prompt_pieces(config)[:2])
    return 1 + shots * (image + caption_tokens + end) + image + question_tokens


def mllama_prompt_length(shots: int, caption_tokens: int, question_tokens: int) -> int:
    """Llama 3.2 Vision's prompt (profiling/mllama_profile.py): <|begin_of_text|> + shots * (<|image|> caption) +
    <|image|> question; no end-of-chunk token (the cross-attention mask, not a token, ends an image's span)."""
    return 1 + shots * (1 + caption_tokens) + 1 + question_tokens


def image_attention_mask(config: FlamingoConfig, lang_x: torch.Tensor, num_images: int) -> torch.Tensor | None:
    """The IDEFICS processor's mask for the profiler's prompts, [B, T, num_images] long (None for OpenFlamingo):
    each token sees the latest `<image>` (these prompts hold no `</s>`, which would reset it)."""
    if config.layout != "idefics":
        return None
    time = masking.text_time(lang_x, config.media_token_id)  # 1-based, 0 = none
    return torch.nn.functional.one_hot(time, num_images + 1)[..., 1:].long()


def build_prompt(config: FlamingoConfig, shots: int, batch: int, caption_tokens: int, question_tokens: int,
                 seed: int, dtype: torch.dtype, device: str | torch.device):
    """-> vision_x [batch, shots + 1, 1, C, H, W], lang_x [batch, T] (long), attention_mask [batch, T] (ones).

    Drawn on the CPU from a generator seeded by (seed, shots, batch), so every implementation, device and
    order of rows sees the same prompt."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1009 + shots)
    image, end, high = _prompt_pieces(config)  # the base vocabulary: special tokens sit from `high` up
    low = max(config.bos_token_id, config.eos_token_id) + 1
    if not low < high:
        low = 0

    def text(n: int) -> torch.Tensor:
        return torch.randint(low, high, (batch, n), generator=generator)

    def tokens(ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long).expand(batch, -1)

    pieces = [tokens([config.bos_token_id])]
    for _ in range(shots):
        pieces += [tokens(image), text(caption_tokens), tokens(end)]
    pieces += [tokens(image), text(question_tokens)]
    lang_x = torch.cat(pieces, dim=1)
    v = config.vision
    vision_x = torch.randn(batch, shots + 1, 1, v.in_channels, v.image_size, v.image_size, generator=generator)
    return vision_x.to(device=device, dtype=dtype), lang_x.to(device), torch.ones_like(lang_x, device=device)


def build_workload(config: FlamingoConfig, shots: int, batch: int, batches: int, caption_tokens: int,
                   question_tokens: int, seed: int, dtype: torch.dtype, device: str | torch.device):
    """OpenFlamingo's evaluation: one fixed `shots`-shot context (the same demonstrations and images in every
    row), then `batches` batches of queries (`<image>` + question), each row with its own image and question.
    -> a list of (vision_x, lang_x, attention_mask, image_attention_mask or None: the IDEFICS layout's)."""
    generator = torch.Generator().manual_seed(seed * 7_919 + shots)
    image, end, high = _prompt_pieces(config)
    low = max(config.bos_token_id, config.eos_token_id) + 1
    v = config.vision
    context = [config.bos_token_id]
    for _ in range(shots):
        context += image + torch.randint(low, high, (caption_tokens,), generator=generator).tolist() + end
    demos = torch.randn(shots, 1, v.in_channels, v.image_size, v.image_size, generator=generator)
    out = []
    for _ in range(batches):
        questions = torch.randint(low, high, (batch, question_tokens), generator=generator)
        lang_x = torch.cat([torch.tensor(context + image).expand(batch, -1), questions], dim=1)
        queries = torch.randn(batch, 1, 1, v.in_channels, v.image_size, v.image_size, generator=generator)
        vision_x = torch.cat([demos.expand(batch, -1, -1, -1, -1, -1), queries], dim=1)
        lang_x = lang_x.to(device)
        out.append((vision_x.to(device=device, dtype=dtype), lang_x, torch.ones_like(lang_x, device=device),
                    image_attention_mask(config, lang_x, shots + 1)))
    return out
