"""Which image each text token belongs to (OpenFlamingo's exact semantics, docs/semantics.md).

`media_locations[b, i] = lang_x[b, i] == media_token_id` and `text_time = cumsum(media_locations, -1)`:
token i belongs to image `text_time[b, i]` (1-based, the `<image>` token sees its own image), 0 = none.
The kernels take the same information 0-based as `image_index = text_time - 1` (int32, -1 = no image).

IDEFICS says it with the processor's `image_attention_mask` [B, T, N] instead (a token sees the latest image,
none after `</s>`); `PromptImages` is the fast path's one view of both rules.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    `openflamingo_generated_image_bug`): a step whose input tokens hold an `<image>` re-conditions every
    hypothesis of the batch (every row, every beam) on that one step, so a hypothesis whose token is `<image>`
    now sees image 1 of its row and every other one none, and that holds until the next such step. tokens [H];
    image [H], 1-based (0 = none) -> the image of this step and the next. No host sync."""
    is_image = tokens == media_token_id
    return torch.where(is_image.any(), is_image.to(image.dtype), image)


def image_after_reorder(image: torch.Tensor, index: torch.Tensor, generated_image_bug: bool) -> torch.Tensor:
    """The image state after a search's reorder (hypothesis h continues old hypothesis index[h]): the parent's.
    With `openflamingo_generated_image_bug` it stays where it was when the hypothesis count is unchanged: Hugging
    Face's beam search reorders the KV cache by beam, but OpenFlamingo's layers keep the media locations they
    were conditioned on in batch-slot order, so slot h keeps the state its own token set, whichever beam moves
    in. A reorder that changes the count (score's trie levels, where `<image>` is never an input and every
    hypothesis of a row holds the row's state) gathers it. image [H], index [H'] -> [H']."""
    if generated_image_bug and index.shape[0] == image.shape[0]:
        return image
    return image[index]


@dataclass(frozen=True)
class PromptImages:
    """What a batch of prompts needs from its images, whichever rule the model uses.

    image_index   [B, T] int32: the 0-based image each prompt token attends to, -1 = none
    decode_image  [B] int32: the image every generated (or scored) token of the row attends to, -1 = none
    visible       per row, the image slots some prompt token sees, ascending: the only ones encoded
    """

    image_index: torch.Tensor
    decode_image: torch.Tensor
    visible: list[list[int]]

    @property
    def slots(self) -> list[int]:
        """Per row, the image slots the row's media cache spans: its highest visible slot + 1."""
        return [row[-1] + 1 if row else 0 for row in self.visible]

    @classmethod
    def from_media_tokens(cls, lang_x: torch.Tensor, media_token_id: int,
                          counts: torch.Tensor | None = None) -> PromptImages:
        """OpenFlamingo: a token sees the image of the latest `<image>`; generated tokens the row's last.
        `counts`: images_per_row(lang_x, media_token_id) when the caller has already counted them (validation)."""
        counts = images_per_row(lang_x, media_token_id) if counts is None else counts
        return cls(image_index(lang_x, media_token_id), (counts - 1).to(torch.int32),
                   [list(range(c)) for c in counts.tolist()])

    @classmethod
    def from_image_attention_mask(cls, image_attention_mask: torch.Tensor) -> PromptImages:
        """IDEFICS: the processor's [B, T, N] 0/1 mask; generated tokens see what the row's last prompt token
        sees. A token that sees several images is an error (the processor never makes such masks; the
        reference model computes them densely)."""
        seen = image_attention_mask.bool()
        per_token = seen.sum(dim=-1)
        several = (per_token > 1).nonzero()
        if several.numel():
            b, t = several[0].tolist()
            raise ValueError(f"image_attention_mask: token {t} of row {b} sees {int(per_token[b, t])} images; the fast "
                             f"path supports at most one image per token (what IdeficsProcessor makes); run such "
                             f"masks with the reference (engine='reference')")
        if seen.shape[-1] == 0:  # no images at all
            index = torch.full(per_token.shape, -1, dtype=torch.int32, device=seen.device)
        else:
            index = torch.where(per_token == 1, seen.to(torch.int32).argmax(dim=-1), -1).to(torch.int32)
        visible = [sorted(set(row) - {-1}) for row in index.tolist()]
        return cls(index, index[:, -1].contiguous(), visible)
