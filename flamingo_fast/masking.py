"""Which image each text token belongs to (OpenFlamingo's exact semantics, DESIGN.md).

`media_locations[b, i] = lang_x[b, i] == media_token_id` and `text_time = cumsum(media_locations, -1)`:
token i belongs to image `text_time[b, i]` (1-based, the `<image>` token sees its own image), 0 = none.
The kernels take the same information 0-based as `image_index = text_time - 1` (int32, -1 = no image).
"""

from __future__ import annotations

import torch


def text_time(lang_x: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """[B, T] long: the 1-based image each token belongs to, 0 for tokens before the first image."""
    return (lang_x == media_token_id).cumsum(dim=-1)


def image_index(lang_x: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """[B, T] int32: the 0-based image each token belongs to, -1 for tokens before the first image."""
    return (text_time(lang_x, media_token_id) - 1).to(torch.int32)


def images_per_row(lang_x: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """[B] long: the number of `<image>` tokens in each row.

    Cached decoding: every generated token belongs to image `images_per_row` (1-based) of its row, whatever
    it is. OpenFlamingo resets this when the model generates an `<image>` token; we do not copy that bug.
    """
    return (lang_x == media_token_id).sum(dim=-1)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] long: per-row positions for left-padded batches (0 at the first real token; pads get 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


def image_after_generated_tokens(tokens: torch.Tensor, image: torch.Tensor, media_token_id: int) -> torch.Tensor:
    """OpenFlamingo's cached generate when the model generates `<image>` (only with
    `openflamingo_generated_image_bug`): a step whose input tokens hold an `<image>` re-conditions every row on
    that one step, so a row whose token is `<image>` now sees image 1 and every other row none, and that holds
    until the next such step. tokens [H]; image [H], 1-based (0 = none) -> the image of this step and the next.
    No host sync."""
    is_image = tokens == media_token_id
    return torch.where(is_image.any(), is_image.to(image.dtype), image)
