"""The inputs of a Llama 3.2 Vision call (the Mllama processor's outputs), checked once and put in one form.

    images = MllamaImages.of(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)   # or None
    input_ids, attention_mask, images = check_mllama_call(config, input_ids, attention_mask, images)

Shapes (B rows, T tokens, I image slots, N = config.vision.max_num_tiles tiles a slot):
    input_ids [B, T] integer, attention_mask [B, T] 0/1 (left padding only; None: every token real),
    pixel_values [B, I, N, C, H, W], aspect_ratio_ids [B, I], aspect_ratio_mask [B, I, N],
    cross_attention_mask [B, T, I, N] 0/1 in the processor's form (a token sees a contiguous group of images and,
    of each, its real tiles).

Rows without images. transformers 4.57's MllamaImageProcessor pads every output to the batch (a row without images
gets zero pixels, aspect ratio id 0 and its first tile marked); 5.24's pads pixel_values and the rows without images
between others the same way, but leaves TRAILING rows without images out of aspect_ratio_ids / aspect_ratio_mask
(and fails on a batch whose first row has none), and transformers' own forward then fails on the batch. Here the
rows left out get what 4.57 gives them: both releases' batches then give the same result, 4.57's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference.mllama_config import MllamaConfig


def _shape(value) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


@dataclass(frozen=True)
class MllamaImages:
    """The image inputs of one call, all four tensors of the processor (see the module docstring)."""

    pixel_values: torch.Tensor
    aspect_ratio_ids: torch.Tensor
    aspect_ratio_mask: torch.Tensor
    cross_attention_mask: torch.Tensor

    @classmethod
    def of(cls, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask) -> MllamaImages | None:
        """None without pixel_values (transformers then skips the cross-attention layers, whatever else is given);
        with them the other three are required."""
        if pixel_values is None:
            return None
        missing = [name for name, value in (("aspect_ratio_ids", aspect_ratio_ids),
                                            ("aspect_ratio_mask", aspect_ratio_mask),
                                            ("cross_attention_mask", cross_attention_mask)) if value is None]
        if missing:
            raise ValueError(f"pixel_values given without {', '.join(missing)}; expected all four image outputs of "
                             f"the Mllama processor (without cross_attention_mask transformers' result depends on "
                             f"its attention implementation)")
        return cls(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)

    @property
    def slots(self) -> int:
        return self.pixel_values.shape[1]


def _check_tensor(name: str, value, shape: tuple, integer: bool, expected: str, device=None) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != len(shape) \
            or any(want is not None and got != want for got, want in zip(value.shape, shape, strict=True)):
        raise ValueError(f"{name}: got {_shape(value)}; expected {expected}")
    if integer and (value.is_floating_point() or value.is_complex()):
        raise ValueError(f"{name}: got dtype {value.dtype}; expected an integer or bool tensor ({expected})")
    if value.device.type == "meta":
        raise ValueError(f"{name}: on the meta device (no data); expected a tensor with values on the model's device")
    if device is not None and value.device != device:
        raise ValueError(f"{name}: on {value.device}; expected the device of input_ids ({device})")


def _check_01(name: str, value: torch.Tensor) -> None:
    if not bool(((value == 0) | (value == 1)).all()):
        raise ValueError(f"{name}: holds values other than 0 and 1; expected a 0/1 mask")


def check_text(config: MllamaConfig, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (input_ids long, attention_mask long, every token real when None). Token ids must be rows of the
    embedding (the head's vocabulary and its extra rows, `<|image|>` among them); padding must be on the left."""
    _check_tensor("input_ids", input_ids, (None, None), True, "a [batch, tokens] integer tensor")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: got {_shape(input_ids)}; expected at least one row and one token")
    rows = config.text.embedding_rows
    if bool(((input_ids < 0) | (input_ids >= rows)).any()):
        raise ValueError(f"input_ids: ids outside [0, {rows}) (the embedding's rows); expected token ids")
    if attention_mask is None:
        return input_ids.long(), torch.ones_like(input_ids, dtype=torch.long)
    _check_tensor("attention_mask", attention_mask, tuple(input_ids.shape), True,
                  f"a 0/1 tensor of input_ids' shape {tuple(input_ids.shape)}", input_ids.device)
    _check_01("attention_mask", attention_mask)
    mask = attention_mask.long()
    holes = (mask[:, 1:] < mask[:, :-1]).any(dim=-1) | (mask.sum(dim=-1) == 0)
    if bool(holes.any()):
        row = int(holes.nonzero()[0])
        raise ValueError(f"attention_mask: row {row} is empty or has a padding token after a real one; expected "
                         f"left padding only and at least one real token per row")
    return input_ids.long(), mask


def check_images(config: MllamaConfig, images: MllamaImages | None, input_ids: torch.Tensor) -> MllamaImages | None:
    """The image inputs against input_ids [B, T] and the config -> the same, with the rows 5.x's image processor
    leaves out of aspect_ratio_ids / aspect_ratio_mask filled in as 4.57 fills them (module docstring)."""
    if images is None:
        return None
    vision = config.vision
    b, t = input_ids.shape
    device = input_ids.device
    n, c, size = vision.max_num_tiles, vision.num_channels, vision.image_size
    pixels = images.pixel_values
    _check_tensor("pixel_values", pixels, (b, None, n, c, size, size), False,
                  f"the processor's [batch={b}, images, tiles={n}, channels={c}, {size}, {size}] float tensor", device)
    slots = pixels.shape[1]
    mask = images.cross_attention_mask
    _check_tensor("cross_attention_mask", mask, (b, t, slots, n), True,
                  f"the processor's 0/1 [batch={b}, tokens={t}, images={slots}, tiles={n}] tensor", device)
    _check_01("cross_attention_mask", mask)
    ids, ratio_mask = images.aspect_ratio_ids, images.aspect_ratio_mask
    _check_tensor("aspect_ratio_ids", ids, (None, slots), True, f"the processor's [batch, images={slots}] tensor",
                  device)
    _check_tensor("aspect_ratio_mask", ratio_mask, (ids.shape[0], slots, n), True,
                  f"the processor's [{ids.shape[0]} rows as aspect_ratio_ids, images={slots}, tiles={n}] tensor",
                  device)
    if bool(((ids < 0) | (ids > vision.max_aspect_ratio_id)).any()):
        raise ValueError(f"aspect_ratio_ids: ids outside [0, {vision.max_aspect_ratio_id}]; expected the processor's "
                         f"ids of the config's {vision.max_aspect_ratio_id} supported aspect ratios (0: padding)")
    given = ids.shape[0]
    if given > b or (given < b and bool(mask[given:].any())):
        raise ValueError(f"aspect_ratio_ids: {given} rows for a batch of {b}; expected {b} rows, or (transformers 5's "
                         f"image processor) fewer, with the rows left out being trailing rows without images")
    if given < b:
        full_ids = torch.zeros(b, slots, dtype=ids.dtype, device=device)
        full_mask = torch.zeros(b, slots, n, dtype=ratio_mask.dtype, device=device)
        full_mask[:, :, 0] = 1
        full_ids[:given], full_mask[:given] = ids, ratio_mask
        images = MllamaImages(pixels, full_ids, full_mask, mask)
    return images


def check_mllama_call(config: MllamaConfig, input_ids, attention_mask, images: MllamaImages | None
                      ) -> tuple[torch.Tensor, torch.Tensor, MllamaImages | None]:
    """check_text, then check_images: the one check of a call's inputs."""
    input_ids, attention_mask = check_text(config, input_ids, attention_mask)
    return input_ids, attention_mask, check_images(config, images, input_ids)
