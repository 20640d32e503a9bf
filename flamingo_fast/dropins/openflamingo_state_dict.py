"""The OpenFlamingo state-dict map: OpenFlamingo's parameter names -> the reference's.

Weight names. The reference model (reference/model.py) uses OpenFlamingo's own names for the vision tower
(open_clip's `vision_encoder.*`), the resampler (`perceiver.*`) and the gated blocks
(`lang_encoder.gated_cross_attn_layers.{i}.*`), and each LM family's Hugging Face names under
`lang_encoder.*`. What differs, and is mapped here explicitly:

- OpenFlamingo wraps every decoder layer in a FlamingoLayer, so a live model's state dict names a layer's
  weights `...layers.{i}.decoder_layer.*` (and again `lang_encoder.old_decoder_blocks.{i}.*`), and its
  gated block `...layers.{i}.gated_cross_attn_layer.*` (and `lang_encoder.gated_cross_attn_layers.{i}.*`).
  Its training script saves only the second spelling of neither: a checkpoint holds
  `...layers.{i}.gated_cross_attn_layer.*`, the perceiver and the (resized) embeddings.
- MPT comes in two layouts. `mpt` (MPT-7B, OpenFlamingo-9B v2; transformers' MptForCausalLM has the same
  names): `transformer.blocks.{i}.norm_1 / attn.Wqkv / attn.out_proj / norm_2 / ffn.up_proj / ffn.down_proj`,
  `transformer.norm_f`, `transformer.wte` (tied output). `mosaic_gpt` (MPT-1B RedPajama, OpenFlamingo-3B,
  the hub's remote code): `ln_1`, `ln_2`, `mlp.mlp_up`, `mlp.mlp_down`, `ln_f`, with `attn.q_ln / k_ln`
  (QK LayerNorm); mapped onto the first. Only ALiBi MPTs are supported.
- Ignored on purpose (never silently: any other unexpected key is an error): the vision tower's `proj`
  (it projects only the pooled output, which Flamingo does not use), rotary `inv_freq` buffers and
  GPT-NeoX's constant `attention.bias` / `attention.masked_bias` buffers that old checkpoints carry, and a
  full CLIP file's text tower.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch

from ..config import FlamingoConfig
from ..reference.model import Flamingo

# The decoder layers' attribute in each source layout (OpenFlamingo's `decoder_layers_attr_name`).
LAYERS_ATTR = {"llama": "model.layers", "mpt": "transformer.blocks", "mosaic_gpt": "transformer.blocks",
               "gpt_neox": "gpt_neox.layers"}
# mosaic_gpt name -> our (mpt) name, for the parts whose names differ; everything else is identical.
MOSAIC_GPT_RENAMES = (
    (r"^transformer\.blocks\.(\d+)\.ln_1\.", r"transformer.blocks.\1.norm_1."),
    (r"^transformer\.blocks\.(\d+)\.ln_2\.", r"transformer.blocks.\1.norm_2."),
    (r"^transformer\.blocks\.(\d+)\.mlp\.mlp_up\.", r"transformer.blocks.\1.ffn.up_proj."),
    (r"^transformer\.blocks\.(\d+)\.mlp\.mlp_down\.", r"transformer.blocks.\1.ffn.down_proj."),
    (r"^transformer\.ln_f\.", r"transformer.norm_f."),
)
# Keys (after `lang_encoder.` / `vision_encoder.`) that carry nothing the model computes with.
IGNORED = (
    r"^vision_encoder\.proj$",
    r"^lang_encoder\..*\.rotary_emb\.inv_freq$",
    r"^lang_encoder\.gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)$",
)



# ----------------------------------------------------------------------------------------------------------
# Name maps
# ----------------------------------------------------------------------------------------------------------


def canonical_name(name: str, layout: str) -> str:
    """One OpenFlamingo name -> flamingo_fast's name for the same tensor (see the module docstring)."""
    layers = "lang_encoder." + LAYERS_ATTR[layout]
    if m := re.match(rf"^{re.escape(layers)}\.(\d+)\.decoder_layer\.(.*)$", name):
        name = f"{layers}.{m.group(1)}.{m.group(2)}"
    elif m := re.match(r"^lang_encoder\.old_decoder_blocks\.(\d+)\.(.*)$", name):
        name = f"{layers}.{m.group(1)}.{m.group(2)}"
    elif m := re.match(rf"^{re.escape(layers)}\.(\d+)\.gated_cross_attn_layer\.(.*)$", name):
        name = f"lang_encoder.gated_cross_attn_layers.{m.group(1)}.{m.group(2)}"
    if layout == "mosaic_gpt" and name.startswith("lang_encoder."):
        inner = name[len("lang_encoder."):]
        for pattern, replacement in MOSAIC_GPT_RENAMES:
            inner = re.sub(pattern, replacement, inner)
        name = "lang_encoder." + inner
    return name


def canonical_state_dict(state: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """OpenFlamingo's names (live model or checkpoint, FlamingoLayer wrappers and aliases included) -> one
    name per tensor, in flamingo_fast's names. Aliases of one tensor must agree; anything unknown is kept
    (and later reported as unexpected)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        name = canonical_name(name, layout)
        if name in out:
            seen = out[name]
            if seen is not tensor and (seen.shape != tensor.shape or not torch.equal(seen, tensor)):
                raise ValueError(f"{name}: two different tensors under the names OpenFlamingo gives it")
            continue
        out[name] = tensor
    return out


def with_weight_shapes(config: FlamingoConfig, canonical: Mapping[str, torch.Tensor]) -> FlamingoConfig:
    """MPT's MLP width from its weights: transformers' MptForCausalLM builds 4x whatever expansion_ratio says."""
    up = canonical.get("lang_encoder.transformer.blocks.0.ffn.up_proj.weight")
    if config.lm.family == "mpt" and up is not None and up.shape[0] != config.lm.intermediate_size:
        return config.replace(lm=dataclasses.replace(config.lm, intermediate_size=up.shape[0]))
    return config


def to_reference_state_dict(state: Mapping[str, torch.Tensor], config: FlamingoConfig, layout: str,
                            missing_output_rows: str = "error") -> dict[str, torch.Tensor]:
    """OpenFlamingo-named tensors -> exactly the reference model's state dict (same tensor objects, no copy
    unless rows must be filled). Missing or unexpected keys are an error that lists them."""
    source = canonical_state_dict(state, layout)
    with torch.device("meta"):
        expected = Flamingo(config).state_dict()
    lm = config.lm
    embed = {"llama": "lang_encoder.model.embed_tokens.weight", "mpt": "lang_encoder.transformer.wte.weight",
             "gpt_neox": "lang_encoder.gpt_neox.embed_in.weight"}[lm.family]
    head = "lang_encoder.embed_out.weight" if lm.family == "gpt_neox" else "lang_encoder.lm_head.weight"
    tied = lm.family == "mpt" or lm.tie_word_embeddings
    if tied:  # one tensor under both names; MosaicGPT has no lm_head key at all
        if head in source and embed in source and source[head] is not source[embed] \
                and not torch.equal(source[head], source[embed]):
            raise ValueError(f"{head}: differs from {embed}, but the model ties its output head to the embedding")
        if embed in source:
            source[head] = source[embed]
    elif head in source and embed in source and source[head].shape[0] < source[embed].shape[0]:
        source[head] = _fill_output_rows(source[head], source[embed].shape[0], head, missing_output_rows)

    ignored = [re.compile(p) for p in IGNORED]
    unexpected = sorted(k for k in source if k not in expected and not any(p.match(k) for p in ignored))
    missing = sorted(k for k in expected if k not in source)
    if missing or unexpected:
        raise ValueError(
            f"state dict does not match the {lm.family} Flamingo model: missing keys {key_listing(missing)}; "
            f"unexpected keys {key_listing(unexpected)}"
        )
    wrong = [f"{k}: {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if source[k].shape != v.shape]
    if wrong:
        raise ValueError("state dict shapes do not match the model (got vs expected): " + "; ".join(wrong[:10]))
    return {k: source[k] for k in expected}


def key_listing(keys: list[str], limit: int = 20) -> str:
    if not keys:
        return "none"
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return "[" + ", ".join(keys[:limit]) + "]" + more


def _fill_output_rows(weight: torch.Tensor, rows: int, name: str, how: str) -> torch.Tensor:
    """OpenFlamingo's training script saves input embeddings but not an untied LLaMA output head, whose
    rows for the added tokens OpenFlamingo then initialises at random when it resizes the model."""
    if how == "error":
        raise ValueError(
            f"{name}: {weight.shape[0]} rows but the embedding has {rows}: the output rows of the tokens "
            f"OpenFlamingo added are in neither file (OpenFlamingo fills them at random); pass "
            f"missing_output_rows='mean' to fill them with the mean of the existing rows"
        )
    if how != "mean":
        raise ValueError(f"missing_output_rows={how!r}: expected 'error' or 'mean'")
    extra = weight.mean(dim=0, keepdim=True).expand(rows - weight.shape[0], -1)
    return torch.cat([weight, extra])
