"""A tiny reference written out as OpenFlamingo's three files (checkpoint.pt, the LM's Hugging Face folder,
open_clip's weights), for the loading tests (test_loading.py, test_hf_configs.py, test_dropin_module.py): the
shape OpenFlamingo's loader assumes (`TINY`), the files (`write_files`), the options that load them back and the
check that a loaded model computes the reference's logits."""

from __future__ import annotations

import dataclasses
import json
import re

import torch
from helpers import assert_close, random_batch
from safetensors.torch import save_file

from flamingo_fast.config import from_name

TINY = from_name("tiny")
# What OpenFlamingo fixes and the loader therefore assumes: QuickGELU (OpenAI's CLIP), 8 heads in the resampler
# and in the gated blocks (only heads x dim_head is visible in the weights).
TINY = TINY.replace(vision=dataclasses.replace(TINY.vision, act="quick_gelu"),
                    perceiver=dataclasses.replace(TINY.perceiver, heads=8, dim_head=16), xattn_heads=8,
                    xattn_dim_head=16)
LM_CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 160, "rms_norm_eps": 1e-6, "max_position_embeddings": 256,
             "vocab_size": TINY.lm.vocab_size, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 98}
OPEN_CLIP_CONFIG = {"model_cfg": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 2, "width": 48,
                                                                  "head_width": 24, "patch_size": 8}}}
OPTIONS = dict(eoc_token_id=TINY.eoc_token_id, media_token_id=TINY.media_token_id, backend="torch",
               max_batch_size=2, max_seq_len=64)


def write_files(model, folder, lm_dtype=torch.float32, checkpoint_wrap=lambda state: state, clip_config=True,
                lm_config=None):
    """The reference's tensors as OpenFlamingo's files: the perceiver and the gated blocks (under the name its
    training script saves them) in checkpoint.pt; the LM's own weights and config.json in lm/; the ViT, as a
    full CLIP file's `visual.*`, in clip/open_clip_model.safetensors (with open_clip's config beside it)."""
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    checkpoint, lm, visual = {}, {}, {}
    for name, tensor in state.items():
        if name.startswith("vision_encoder."):
            visual["visual." + name[len("vision_encoder."):]] = tensor
        elif m := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.(.*)", name):
            checkpoint[f"lang_encoder.model.layers.{m.group(1)}.gated_cross_attn_layer.{m.group(2)}"] = tensor
        elif name.startswith("lang_encoder."):
            lm[name[len("lang_encoder."):]] = tensor.to(lm_dtype)
        else:
            checkpoint[name] = tensor
    (folder / "lm").mkdir()
    (folder / "lm" / "config.json").write_text(json.dumps(lm_config or LM_CONFIG))
    save_file(lm, str(folder / "lm" / "model.safetensors"))
    (folder / "clip").mkdir()
    save_file(visual, str(folder / "clip" / "open_clip_model.safetensors"))
    if clip_config:
        (folder / "clip" / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    torch.save(checkpoint_wrap(checkpoint), folder / "checkpoint.pt")
    return folder / "checkpoint.pt", folder / "lm", folder / "clip" / "open_clip_model.safetensors"


def logits_agree(fast, model):
    vision, lang_x, mask = random_batch(TINY, [([0, 5], 11), ([2], 8)], num_images=2)
    out = fast(vision, lang_x, mask)
    assert_close(out.logits, model(vision, lang_x, mask), dtype=torch.float32)  # the drop-in returns `.logits`
