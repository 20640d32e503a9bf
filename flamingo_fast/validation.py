"""Input checks shared by the reference and the fast runtime. Every error names the argument, the value
and what was expected; nothing is silently coerced.

`check_prompt` is `check_inputs` that also hands back which image each token sees (masking.PromptImages), from
the same count of `<image>` tokens the check makes: a call counts them once."""

from __future__ import annotations

import torch

from . import masking
from .checks import check_int
from .config import FlamingoConfig


def check_inputs(config: FlamingoConfig, vision_x: torch.Tensor | None, lang_x: torch.Tensor,
                 attention_mask: torch.Tensor | None, image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Validate a forward/generate call; returns the attention mask (all ones when none was given).
    `image_attention_mask` [B, T, images] 0/1 is the IDEFICS layout's (required there, refused otherwise)."""
    return check_prompt(config, vision_x, lang_x, attention_mask, image_attention_mask, images=False)[0]


def check_prompt(
    config: FlamingoConfig,
    vision_x: torch.Tensor | None,
    lang_x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_attention_mask: torch.Tensor | None = None,
    *,
    images: bool = True,
) -> tuple[torch.Tensor, masking.PromptImages | None]:
    """check_inputs -> (the attention mask, masking.PromptImages by the layout's rule; None when not `images`).
    The OpenFlamingo layout's `<image>` tokens are counted once, for the check and the PromptImages both. The
    IDEFICS layout's mask must also give each token at most one image (PromptImages.from_image_attention_mask:
    the fast path's limit)."""
    for name, tensor in (("lang_x", lang_x), ("vision_x", vision_x), ("attention_mask", attention_mask),
                         ("image_attention_mask", image_attention_mask)):
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "meta":
            raise ValueError(f"{name}: on the meta device (shape {tuple(tensor.shape)}, no data); expected a tensor "
                             f"with values on a real device (the model's)")
    if not isinstance(lang_x, torch.Tensor) or lang_x.dim() != 2:
        got = tuple(lang_x.shape) if isinstance(lang_x, torch.Tensor) else type(lang_x).__name__
        raise ValueError(f"lang_x: got shape {got}; expected a rank-2 tensor of token ids [batch, seq]")
    if lang_x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"lang_x: got dtype {lang_x.dtype}; expected torch.int64 or torch.int32 token ids")
    batch, seq = lang_x.shape
    if batch == 0:
        raise ValueError(f"lang_x: got 0 rows (shape {tuple(lang_x.shape)}); expected at least one row")
    if seq == 0:
        raise ValueError("lang_x: got an empty sequence (shape [B, 0]); expected at least one token per row")
    if seq > config.lm.max_position_embeddings:
        raise ValueError(f"lang_x: {seq} tokens per row; expected at most the model's max positions "
                         f"{config.lm.max_position_embeddings}")
    vocab = config.lm.vocab_size
    lo, hi = int(lang_x.min()), int(lang_x.max())
    if lo < 0 or hi >= vocab:
        raise ValueError(f"lang_x: token ids span [{lo}, {hi}]; expected ids in [0, {vocab})")

    if attention_mask is None:
        attention_mask = torch.ones_like(lang_x, dtype=torch.long)
    else:
        if attention_mask.shape != lang_x.shape:
            raise ValueError(
                f"attention_mask: got shape {tuple(attention_mask.shape)}; expected lang_x's shape {(batch, seq)}"
            )
        if attention_mask.dtype not in (torch.bool, torch.int64, torch.int32):
            raise ValueError(f"attention_mask: got dtype {attention_mask.dtype}; expected bool or integer 0/1")
        if not ((attention_mask == 0) | (attention_mask == 1)).all():
            raise ValueError("attention_mask: expected only 0/1 values")
        if not attention_mask.bool().any(dim=-1).all():
            raise ValueError("attention_mask: a row has no real token (all zeros); expected at least one")
        attention_mask = attention_mask.long()

    num_images = 0
    if vision_x is not None:
        if not isinstance(vision_x, torch.Tensor) or vision_x.dim() != 6:
            got = tuple(vision_x.shape) if isinstance(vision_x, torch.Tensor) else type(vision_x).__name__
            raise ValueError(f"vision_x: got shape {got}; expected rank 6 [batch, images, frames, C, H, W]")
        if not vision_x.is_floating_point():
            raise ValueError(f"vision_x: got dtype {vision_x.dtype}; expected a floating-point image tensor")
        v = config.vision
        expected_chw = (v.in_channels, v.image_size, v.image_size)
        if vision_x.shape[0] != batch or tuple(vision_x.shape[3:]) != expected_chw:
            raise ValueError(
                f"vision_x: got shape {tuple(vision_x.shape)}; expected [{batch}, images, frames, "
                f"{expected_chw[0]}, {expected_chw[1]}, {expected_chw[2]}] (batch of lang_x, preset's image size)"
            )
        if vision_x.shape[2] < 1:
            raise ValueError(f"vision_x: got {vision_x.shape[2]} frames; expected at least 1")
        num_images = vision_x.shape[1]
    if config.layout == "idefics":
        _check_image_attention_mask(image_attention_mask, batch, seq, num_images)
        if not images:
            return attention_mask, None
        return attention_mask, masking.PromptImages.from_image_attention_mask(image_attention_mask)
    if image_attention_mask is not None:
        raise ValueError("image_attention_mask: given to a model of layout 'openflamingo', where <image> tokens "
                         "decide what each token sees; expected None (it is the IDEFICS layout's input)")
    images_in_row = masking.images_per_row(lang_x, config.media_token_id)
    too_many = (images_in_row > num_images).nonzero().flatten().tolist()
    if too_many:
        row = too_many[0]
        raise ValueError(
            f"lang_x: row {row} has {int(images_in_row[row])} <image> tokens but vision_x holds {num_images} "
            f"images per row; expected at most {num_images} <image> tokens per row"
        )
    if not images:
        return attention_mask, None
    return attention_mask, masking.PromptImages.from_media_tokens(lang_x, config.media_token_id, images_in_row)


def _check_image_attention_mask(mask: torch.Tensor | None, batch: int, seq: int, num_images: int) -> None:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"image_attention_mask: got {type(mask).__name__}; the IDEFICS layout needs the processor's "
                         f"[batch, seq, images] 0/1 tensor")
    if tuple(mask.shape) != (batch, seq, num_images):
        raise ValueError(f"image_attention_mask: got shape {tuple(mask.shape)}; expected {(batch, seq, num_images)} "
                         f"([batch, seq] of lang_x, the images of vision_x)")
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"image_attention_mask: got dtype {mask.dtype}; expected bool or integer 0/1")
    if mask.numel() and not ((mask == 0) | (mask == 1)).all():
        raise ValueError("image_attention_mask: expected only 0/1 values")


def check_generate_options(
    config: FlamingoConfig, lang_x: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
    min_new_tokens: int = 0,
) -> None:
    check_int("max_new_tokens", max_new_tokens, 0)
    check_int("min_new_tokens", min_new_tokens, 0)
    total = lang_x.shape[1] + max_new_tokens
    limit = config.lm.max_position_embeddings
    if total > limit:
        raise ValueError(
            f"max_new_tokens={max_new_tokens}: prompt length {lang_x.shape[1]} + max_new_tokens = {total} "
            f"exceeds the model's max positions {limit}"
        )
    # Generation appends on the right, so padding must be on the left: a 0 after a 1 is right padding.
    right_padded = (attention_mask[:, 1:] < attention_mask[:, :-1]).any(dim=-1).nonzero().flatten().tolist()
    if right_padded:
        raise ValueError(
            f"attention_mask: row {right_padded[0]} is right-padded; generation expects left padding "
            f"(zeros only before the first real token)"
        )


# The dtypes the kernels (and their torch twins, which share their checks) compute in.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_dtype(dtype: torch.dtype, name: str = "dtype") -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}={dtype}: unsupported by FastFlamingo; expected one of "
                         f"{dtype_names(SUPPORTED_DTYPES)}")


def check_eval_mode(model: torch.nn.Module) -> None:
    """FastFlamingo runs inference only; it checks the mode instead of calling `.eval()` on the caller's model."""
    training = [name or "model" for name, module in model.named_modules() if module.training]
    if training:
        more = " ..." if len(training) > 3 else ""
        raise ValueError(f"model: in training mode ({', '.join(training[:3])}{more}); expected a model in eval "
                         f"mode: call model.eval() first")


def check_model(model: torch.nn.Module) -> None:
    """Refuse what FastFlamingo cannot run, before anything is built: a model in training mode, floating-point
    tensors in more than one dtype, or in a dtype the kernels do not support."""
    check_eval_mode(model)
    dtypes: dict[torch.dtype, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.is_floating_point():
            dtypes.setdefault(tensor.dtype, name)
    if len(dtypes) > 1:
        found = "; ".join(f"{str(d).replace('torch.', '')} (e.g. {name})" for d, name in dtypes.items())
        raise ValueError(f"model: tensors in several dtypes: {found}; expected one dtype: pass "
                         f"dtype= to from_reference to convert")
    for dtype in dtypes:
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"model: tensors in {dtype}, unsupported by FastFlamingo; expected one of "
                             f"{dtype_names(SUPPORTED_DTYPES)}: pass dtype= to from_reference to convert")
