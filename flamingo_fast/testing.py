"""Random-weight models and reference rules for tests and benchmarks (as `torch.testing` is for torch's users):
what tests/ and bench/ both need, kept here so that neither imports the other.

- `build_idefics_from_config`: transformers' real IdeficsForVisionText2Text from a config, with EVERY parameter
  random by role (the default zero alphas would switch the gated blocks off, the default norms would hide a wrong
  one), seeded, in eval mode; with more decoupled vocabulary rows than the config declares where asked (as the
  instruct checkpoints have). Try the IDEFICS drop-in offline: `flamingo_fast.from_idefics(build_idefics_from_config(
  transformers.IdeficsConfig(...)))`.
- `build_mllama_from_config`: transformers' real MllamaForConditionalGeneration (Llama 3.2 Vision) from a config, every
  parameter random by the same roles (its tanh gates of both signs, far from 0), seeded, in eval mode.
- `expected_image_index`: the image each token sees under IDEFICS' rule, from the token ids alone (written out
  independently of IdeficsProcessor, against which the tests check it).

Needs transformers only when a model is built (imported inside the function).
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn


def _randomize(model: nn.Module, generator: torch.Generator, head_scale: float) -> None:
    """Every parameter random, by role: norm weights around 1 (+-30%), biases small, alphas and tanh gates of both
    signs and |alpha| in [0.3, 1.3] (tanh of which is far from 0: the gates really open), matrices ~ 1/sqrt(fan_in),
    embeddings, latents and position tables ~ N(0, 1), the output head ~ head_scale/sqrt(D). Drawn on the
    generator's device."""

    def normal(shape):
        return torch.randn(shape, generator=generator, device=generator.device)

    def uniform(shape):
        return torch.rand(shape, generator=generator, device=generator.device)

    for name, p in model.named_parameters():
        with torch.no_grad():
            if "alpha" in name or re.search(r"(^|[._])gate(_attn|_ffn)?$", name):  # IDEFICS alphas, Mllama gates
                sign = torch.where(uniform(p.shape) < 0.5, -1.0, 1.0)
                p.copy_(sign * (0.3 + uniform(p.shape)))
            elif name.endswith(".bias"):
                p.copy_(0.1 * normal(p.shape))
            elif p.dim() == 1 and ("norm" in name or name.endswith(".ln.weight") or "layrnorm" in name):
                p.copy_(1.0 + 0.3 * normal(p.shape))
            elif name.startswith("lm_head"):
                p.copy_(normal(p.shape) * head_scale / math.sqrt(p.shape[-1]))
            elif "embed_tokens" in name or "position_embedding" in name or "class_embedding" in name \
                    or name.endswith("latents"):
                p.copy_(normal(p.shape))
            elif p.dim() >= 2:  # Linear [out, in] and the patch Conv2d [out, C, k, k]
                fan_in = p[0].numel()
                p.copy_(normal(p.shape) / math.sqrt(fan_in))
            else:
                raise AssertionError(f"parameter {name} {tuple(p.shape)} has no randomisation rule")


def build_idefics_from_config(config, seed: int = 0, head_scale: float = 3.0, additional_rows: int | None = None,
                              dtype: torch.dtype = torch.float32) -> nn.Module:
    """transformers' IdeficsForVisionText2Text(config), every parameter random (seeded), eval mode, `dtype`.

    additional_rows: the number of decoupled rows the weights really have, when more than the config's
    additional_vocab_size (the instruct checkpoints' situation: a runtime must read the count from the weights).
    """
    from transformers import IdeficsForVisionText2Text

    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config)
    declared = config.additional_vocab_size
    rows = declared if additional_rows is None else additional_rows
    if rows != declared:
        if rows < declared or declared == 0:
            raise ValueError("additional_rows may only exceed a nonzero additional_vocab_size")
        D = config.hidden_size
        model.model.embed_tokens.additional_embedding = torch.nn.Embedding(rows, D)
        model.lm_head.additional_fc = torch.nn.Linear(D, rows, bias=False)
    _randomize(model, torch.Generator().manual_seed(seed), head_scale)
    model.requires_grad_(False)
    return model.to(dtype).eval()


def build_mllama_from_config(config, seed: int = 0, head_scale: float = 3.0, dtype: torch.dtype = torch.float32,
                             device: str | torch.device | None = None) -> nn.Module:
    """transformers' MllamaForConditionalGeneration(config), every parameter random (seeded), eval mode, `dtype`.
    `device` (e.g. "cuda"): built and drawn there, in `dtype` from the start (an 11B in bf16 on a GPU in seconds,
    no float32 copy on the host); None: the CPU, as before (the same values)."""
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    if device is None:
        model = MllamaForConditionalGeneration(config)
        generator = torch.Generator().manual_seed(seed)
    else:
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = MllamaForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(default)
        generator = torch.Generator(device=torch.device(device)).manual_seed(seed)
    _randomize(model, generator, head_scale)
    model.requires_grad_(False)
    return model.to(dtype).eval()


def expected_image_index(input_ids: torch.Tensor, image_id: int, eos_id: int) -> torch.Tensor:
    """[B, T] index of the image each token sees under IDEFICS' rule (-1: none), written out independently of
    the processor: the latest `<image>` at or before the token, none after a `</s>` until the next `<image>`
    (the `</s>` itself still sees it)."""
    out = torch.full_like(input_ids, -1)
    for b, row in enumerate(input_ids.tolist()):
        count, after_eod = -1, False
        for t, tok in enumerate(row):
            if tok == image_id:
                count, after_eod = count + 1, False
            out[b, t] = -1 if after_eod else count
            if tok == eos_id:
                after_eod = True
    return out
