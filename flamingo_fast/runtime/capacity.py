"""Whether a call fits a FastFlamingo's caches (batch, sequence, beams, images), and which images its prompt
encodes: the checks every entry point makes before it prefills."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .. import masking
from ..config import FlamingoConfig
from ..generation.search import GenerationOptions


@dataclass(frozen=True)
class CallLimits:
    """What one call may ask of a FastFlamingo, fixed at its construction."""

    max_batch_size: int
    max_seq_len: int
    max_hypotheses: int
    max_tail_len: int
    max_images: int
    pre_image_bug: bool
    layout: str


def prompt_images(config: FlamingoConfig, pre_image_bug: bool, vision_x, lang_x, image_attention_mask,
                  prompt: masking.PromptImages | None = None) -> masking.PromptImages:
    """Which image each token sees and which images are encoded (the rest are padding, never read), by the
    layout's rule: `<image>` tokens (OpenFlamingo) or the image_attention_mask (IDEFICS); `prompt`: that
    rule's PromptImages when the input checks made it already (validation.check_prompt). In OpenFlamingo's
    all-previous mode with the pre-image bug, text before the first image attends to every image given, so
    all of them are encoded; with the generated-image bug, every row's first image is."""
    if prompt is None and config.layout == "idefics":
        return masking.PromptImages.from_image_attention_mask(image_attention_mask)
    if prompt is None:
        prompt = masking.PromptImages.from_media_tokens(lang_x, config.media_token_id)
    if pre_image_bug and vision_x is not None:
        every = list(range(vision_x.shape[1]))
        prompt = dataclasses.replace(prompt, visible=[every] * lang_x.shape[0])
    elif config.openflamingo_generated_image_bug and vision_x is not None and vision_x.shape[1]:
        # a generated <image> turns a hypothesis to its row's first image, which a row without <image>
        # tokens shows none of its tokens: every row's first image is encoded
        prompt = dataclasses.replace(prompt, visible=[sorted({0, *row}) for row in prompt.visible])
    return prompt


def check_capacity(limits: CallLimits, lang_x, prompt: masking.PromptImages, max_new_tokens: int | None,
                   options: GenerationOptions | None = None) -> None:
    """Whether a call fits a FastFlamingo's caches (batch, sequence, beams, images); max_new_tokens None: a
    forward call, which generates nothing."""
    batch, prompt_len = lang_x.shape
    if batch > limits.max_batch_size:
        raise ValueError(f"lang_x: batch {batch} exceeds max_batch_size={limits.max_batch_size} "
                         f"of this FastFlamingo; expected at most that many rows")
    if max_new_tokens is None and prompt_len > limits.max_seq_len:
        raise ValueError(f"lang_x: {prompt_len} tokens per row exceed max_seq_len={limits.max_seq_len} "
                         f"of this FastFlamingo; expected at most that many")
    beams = options.hypotheses_per_row if options is not None else 1  # beams, or samples
    if beams > 1:  # the prompt stays in the static cache; each hypothesis's new tokens go to its tail
        what = (f"num_beams={options.num_beams}" if options.num_beams > 1
                else f"num_return_sequences={options.num_return_sequences}")
        if batch * beams > limits.max_hypotheses:
            raise ValueError(f"{what}: {batch} rows x {beams} hypotheses exceeds max_hypotheses="
                             f"{limits.max_hypotheses} of this FastFlamingo")
        if max_new_tokens > limits.max_tail_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} with {what}: the hypotheses keep at most "
                             f"max_tail_len={limits.max_tail_len} new tokens each in this FastFlamingo")
        max_new_tokens = 0
    total = prompt_len + (max_new_tokens or 0)
    if total > limits.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens}: prompt length {prompt_len} + max_new_tokens = {total} "
                         f"exceeds max_seq_len={limits.max_seq_len} of this FastFlamingo")
    images = max(prompt.slots)
    if images > limits.max_images:
        what = "images to encode (the pre-image bug mode reads all of vision_x)" if limits.pre_image_bug \
            else "image slots (up to the last one a token sees)" if limits.layout == "idefics" \
            else "<image> tokens"
        raise ValueError(f"lang_x: a row has {images} {what}; expected at most "
                         f"max_images={limits.max_images} of this FastFlamingo")
