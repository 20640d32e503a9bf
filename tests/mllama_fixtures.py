"""Offline builders for Hugging Face Llama 3.2 Vision (`MllamaForConditionalGeneration`): tiny configs with EVERY
parameter random (flamingo_fast.testing.build_mllama_from_config; the default zero gates would switch the
cross-attention layers off), images through transformers' own `MllamaImageProcessor`, and cross_attention_mask from
processing_mllama's own helpers on the token ids. No downloads, no tokenizer. Works with transformers 4.57 and 5.x.

Token ids: pad 0, bos 1, eos 2, words 3..VOCAB-1, `<|image|>` = VOCAB (outside the head's vocabulary, inside the
embedding's 8 extra rows, as in the released models).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from flamingo_fast.compat import import_torchvision_if_installed
from flamingo_fast.testing import build_mllama_from_config

import_torchvision_if_installed()
import transformers  # noqa: E402
from transformers import MllamaConfig  # noqa: E402
from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor  # noqa: E402
from transformers.models.mllama.processing_mllama import (  # noqa: E402
    convert_sparse_cross_attention_mask_to_dense,
    get_cross_attention_token_mask,
)

VOCAB = 96
PAD, BOS, EOS, IMAGE = 0, 1, 2, VOCAB
TILE = 28  # px: 2 x 2 patches of 14 + the class token = 5 tokens a tile, padded to 8 in the encoders
RELEASE = int(transformers.__version__.split(".")[0])

# name -> (vision overrides, text overrides): GQA with llama3 rotary, 4 tiles; MHA with the default rotary, a
# cross-attention layer first and last, 2 tiles with their own tilings.
CONFIGS = {
    "gqa-llama3-4tiles": (
        dict(max_num_tiles=4, num_hidden_layers=3, num_global_layers=1, intermediate_layers_indices=[0, 2]),
        dict(num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3], num_hidden_layers=5,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8)),
    ),
    "mha-default-2tiles": (
        dict(max_num_tiles=2, num_hidden_layers=2, num_global_layers=2, intermediate_layers_indices=[1],
             supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        dict(num_attention_heads=4, num_key_value_heads=4, cross_attention_layers=[0, 3], num_hidden_layers=4,
             rope_scaling=dict(rope_type="default")),
    ),
}


def mllama_config(name: str) -> MllamaConfig:
    vision, text = CONFIGS[name]
    vision = dict(dict(image_size=TILE, patch_size=14, hidden_size=32, attention_heads=2, intermediate_size=64,
                       supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]),
                  **vision)
    vision["vision_output_dim"] = vision["hidden_size"] * (1 + len(vision["intermediate_layers_indices"]))
    text = dict(dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, rope_theta=10000.0,
                     max_position_embeddings=256, rms_norm_eps=1e-5, pad_token_id=PAD, bos_token_id=BOS,
                     eos_token_id=EOS), **text)
    return MllamaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE)


def build_mllama(name: str, seed: int = 0) -> torch.nn.Module:
    return build_mllama_from_config(mllama_config(name), seed=seed)


def image_processor(max_tiles: int) -> MllamaImageProcessor:
    return MllamaImageProcessor(size={"height": TILE, "width": TILE}, max_image_tiles=max_tiles)


def random_image(generator: np.random.Generator, height: int, width: int) -> Image.Image:
    return Image.fromarray(generator.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def batch(rows: list[list], max_tiles: int, seed: int = 0, pictures: list[list] | None = None
          ) -> dict[str, torch.Tensor]:
    """rows: per row a list of word ids and (height, width) image sizes, in prompt order (each image is one
    `<|image|>` token) -> the model's inputs, left-padded: input_ids, attention_mask, and with any image
    pixel_values, aspect_ratio_ids, aspect_ratio_mask (MllamaImageProcessor) and cross_attention_mask
    (processing_mllama's helpers on the ids). pictures: per row, the PIL images to use for its (height, width)
    items, in order (default: random images of those sizes drawn from `seed`).

    A row without images gets what 4.57's processor gives it (zero pixels, aspect ratio id 0, only its first tile
    marked): 5.x's image processor pads pixel_values for such a row but leaves it out of aspect_ratio_ids and
    aspect_ratio_mask (test_mllama_reference.py checks both releases)."""
    g = np.random.default_rng(seed)
    ids = [[IMAGE if isinstance(item, tuple) else item for item in row] for row in rows]
    longest = max(len(r) for r in ids)
    input_ids = torch.tensor([[PAD] * (longest - len(r)) + r for r in ids])
    attention_mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in ids])
    out = dict(input_ids=input_ids, attention_mask=attention_mask)
    images = [[random_image(g, *item) for item in row if isinstance(item, tuple)] for row in rows] \
        if pictures is None else [list(p) for p in pictures]
    if not any(images):
        return out
    with_images = [i for i, row in enumerate(images) if row]
    processed = image_processor(max_tiles)([images[i] for i in with_images], return_tensors="pt")
    slots = processed["pixel_values"].shape[1]
    pixel = torch.zeros(len(rows), *processed["pixel_values"].shape[1:])
    ar_ids = torch.zeros(len(rows), slots, dtype=torch.long)
    ar_mask = torch.zeros(len(rows), slots, max_tiles, dtype=torch.long)
    ar_mask[:, :, 0] = 1
    num_tiles = [[] for _ in rows]
    for k, i in enumerate(with_images):
        pixel[i], ar_ids[i], ar_mask[i] = processed["pixel_values"][k], processed["aspect_ratio_ids"][k], \
            processed["aspect_ratio_mask"][k]
        num_tiles[i] = processed["num_tiles"][k]
    sparse = [get_cross_attention_token_mask(row, IMAGE) for row in input_ids.tolist()]
    cross = convert_sparse_cross_attention_mask_to_dense(sparse, num_tiles, max_tiles, longest)
    return dict(out, pixel_values=pixel, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask,
                cross_attention_mask=torch.from_numpy(cross))


# Image sizes (height, width) in px and the tiles MllamaImageProcessor cuts them into at 28 px tiles, up to 4.
ONE, WIDE2, TALL3, FOUR = (20, 20), (20, 50), (80, 25), (50, 50)


def prompt_batches(max_tiles: int) -> dict[str, list[list]]:
    """Named batches of rows (see `batch`):

    - "mixed": 4 images of 1-4 tiles after text, two of them adjacent; one image first; a text-only row beside
      image rows; left padding;
    - "text_only": no images at all (pixel_values absent: the cross-attention layers are skipped);
    - "single": one row, text, an image, text.
    """
    big = FOUR if max_tiles >= 4 else WIDE2
    tall = TALL3 if max_tiles >= 3 else WIDE2
    return {
        "mixed": [
            [BOS, 5, 6, ONE, 7, 8, WIDE2, big, 9, 10, tall, 11],
            [BOS, big, 12, 13, 14],
            [BOS, 15, 16, 17, 18, 19],
            [BOS, 20, tall, 21, 22],
        ],
        "text_only": [[BOS, 5, 6, 7, 8], [BOS, 9, 10]],
        "single": [[BOS, 30, 31, WIDE2, 32, 33]],
    }
