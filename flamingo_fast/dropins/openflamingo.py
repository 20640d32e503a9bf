"""OpenFlamingo drop-in: convert a live `open_flamingo` model, or load its released files, into a FastFlamingo.

    fast = flamingo_fast.from_openflamingo(model)                 # shares the model's tensors, copies nothing
    fast = flamingo_fast.load_openflamingo("checkpoint.pt", "mpt-7b/", "open_clip_model.safetensors",
                                           eoc_token_id=50277, media_token_id=50278)
    out = fast.generate(vision_x, lang_x, attention_mask=mask, max_new_tokens=20)   # OpenFlamingo's call

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

Positions. Hugging Face computes positions from the attention mask only when the model's forward takes
`position_ids`; OpenFlamingo's FlamingoLMMixin.forward does not, so under OpenFlamingo a left-padded row's
positions count its padding. flamingo_fast uses `cumsum(mask) - 1`. Rotary embeddings and ALiBi depend only
on differences of positions within a row, so the two agree up to rounding.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import FlamingoConfig, LMConfig, PerceiverConfig, VisionConfig
from ..modes import runtime_mode
from ..reference.model import Flamingo, build_reference_from_state
from ..runtime.model_copy import converted_copy
from ..runtime.prefix_state import MediaSession
from ..runtime.quantize import check_weights
from ..validation import check_prompt
from .hf import FlamingoOutput, HFGenerateDefaults, generation_config_of, hf_generate, hf_generation_defaults, rope_of
from .module import DropInModule
from .weights_files import common_dtype, load_tensors, read_json

# The decoder layers' attribute in each source layout (OpenFlamingo's `decoder_layers_attr_name`).
LAYERS_ATTR = {"llama": "model.layers", "mpt": "transformer.blocks", "mosaic_gpt": "transformer.blocks",
               "gpt_neox": "gpt_neox.layers"}
# Hugging Face `model_type` -> (our family, source layout).
MODEL_TYPES = {"llama": ("llama", "llama"), "mpt": ("mpt", "mpt"), "mosaic_gpt": ("mpt", "mosaic_gpt"),
               "gpt_neox": ("gpt_neox", "gpt_neox")}
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


def _supported() -> str:
    return ", ".join(f"{t!r}" for t in MODEL_TYPES)


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def lm_config_from_hf(hf: Mapping, vocab_size: int, source: str = "lang_encoder config") -> tuple[LMConfig, str]:
    """A Hugging Face LM config (config.json as a dict) -> (LMConfig, source layout). `vocab_size` is the row
    count of the embedding actually used (OpenFlamingo resizes it to its tokenizer). A size that the config
    lacks is an error naming `source` and the key."""
    try:
        return _lm_config_from_hf(hf, vocab_size)
    except KeyError as error:
        raise ValueError(f"{source}: no {error.args[0]!r}; expected a Hugging Face config.json with the model's "
                         f"sizes") from None


def _lm_config_from_hf(hf: Mapping, vocab_size: int) -> tuple[LMConfig, str]:
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"lang_encoder: model_type={model_type!r} is not supported; expected one of {_supported()}")
    family, layout = MODEL_TYPES[model_type]

    def unsupported(name, value, expected):
        raise ValueError(f"lang_encoder config: {name}={value!r} is not supported; expected {expected}")

    if family == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            unsupported("hidden_act", hf["hidden_act"], "'silu'")
        rope = rope_of(hf, "lang_encoder config")  # transformers' LLaMA rotates every dim of a head
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                unsupported(flag, hf[flag], "False")
        heads = hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
            unsupported("head_dim", hf["head_dim"], f"hidden_size // heads ({hf['hidden_size'] // heads})")
        return LMConfig(
            family="llama", vocab_size=vocab_size, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            intermediate_size=hf["intermediate_size"], rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=rope.theta, max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ), layout
    if family == "gpt_neox":
        if hf.get("hidden_act", "gelu") != "gelu":
            unsupported("hidden_act", hf["hidden_act"], "'gelu'")
        if hf.get("attention_bias") is False:
            unsupported("attention_bias", False, "True")
        # GPTNeoXConfig's defaults (4.x and 5.x) when config.json names neither: rotary_pct 0.25, base 10000
        rope = rope_of(hf, "lang_encoder config", theta_keys=("rotary_emb_base", "rope_theta"),
                       fraction_keys=("rotary_pct", "partial_rotary_factor"), default_fraction=0.25)
        return LMConfig(
            family="gpt_neox", vocab_size=vocab_size, hidden_size=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            num_kv_heads=hf["num_attention_heads"], intermediate_size=hf["intermediate_size"],
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5), rope_theta=rope.theta,
            max_position_embeddings=hf.get("max_position_embeddings", 2048), rotary_pct=rope.partial_rotary_factor,
            parallel_residual=bool(hf.get("use_parallel_residual", True)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        ), layout
    # MPT: llm-foundry / transformers keep the attention options in attn_config; MosaicGPT at the top level.
    attn = dict(hf.get("attn_config") or {}) if layout == "mpt" else {
        "alibi": hf.get("alibi", False), "alibi_bias_max": hf.get("alibi_bias_max", 8),
        "clip_qkv": hf.get("attn_clip_qkv"), "qk_ln": hf.get("attn_qk_ln", False),
        "softmax_scale": hf.get("softmax_scale"), "prefix_lm": hf.get("prefix_lm", False)}
    if not attn.get("alibi", False):
        unsupported("alibi", attn.get("alibi"), "True (only ALiBi MPT models are supported)")
    for name in ("softmax_scale", "prefix_lm", "rope"):
        if attn.get(name):
            unsupported(name, attn[name], "None / False")
    if hf.get("logit_scale") is not None:
        unsupported("logit_scale", hf["logit_scale"], "None")
    d = hf["d_model"]
    ratio = hf.get("expansion_ratio", hf.get("mlp_ratio", 4))
    return LMConfig(
        family="mpt", vocab_size=vocab_size, hidden_size=d, num_layers=hf["n_layers"], num_heads=hf["n_heads"],
        num_kv_heads=hf["n_heads"], intermediate_size=int(ratio * d),
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5), max_position_embeddings=hf.get("max_seq_len", 2048),
        tie_word_embeddings=True, bias=not hf.get("no_bias", True), qk_ln=bool(attn.get("qk_ln", False)),
        clip_qkv=attn.get("clip_qkv"), alibi=True, alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
    ), layout


def _every_n(indices: Sequence[int], num_layers: int) -> int:
    """The cross-attention cadence n from the layers that hold a gated block ((i + 1) % n == 0)."""
    if not indices:
        raise ValueError("gated_cross_attn_layers: none found; expected at least one gated cross-attention block")
    n = min(indices) + 1
    expected = [i for i in range(num_layers) if (i + 1) % n == 0]
    if sorted(indices) != expected:
        raise ValueError(f"gated_cross_attn_layers: blocks at layers {sorted(indices)}; expected every n-th layer "
                         f"((i + 1) % n == 0), e.g. {expected} for n={n}")
    return n


def _perceiver_config(state: Mapping[str, torch.Tensor]) -> PerceiverConfig:
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))})
    for extra in ("perceiver.frame_embs", "perceiver.media_time_embs"):
        if extra in state:
            raise ValueError(f"{extra}: time / frame embeddings are not supported (OpenFlamingo's checkpoints "
                             f"have none)")
    needed = [k for k in ("perceiver.latents", "perceiver.layers.0.0.to_q.weight", "perceiver.layers.0.1.1.weight")
              if k not in state]
    if needed:
        unexpected = sorted(k for k in state if not k.startswith(("vision_encoder.", "lang_encoder.", "perceiver.")))
        raise ValueError(f"missing keys {_listing(needed)}: the perceiver's shape cannot be inferred without them; "
                         f"unexpected keys {_listing(unexpected)}")
    latents = state["perceiver.latents"]
    inner = state["perceiver.layers.0.0.to_q.weight"].shape[0]
    ff_inner = state["perceiver.layers.0.1.1.weight"].shape[0]
    heads = 8  # OpenFlamingo fixes 8 heads x 64 (only the product is visible in the weights)
    return PerceiverConfig(depth=depth, heads=heads, dim_head=inner // heads, num_latents=latents.shape[0],
                           ff_mult=ff_inner // latents.shape[1])


def _vision_config_from_weights(state: Mapping[str, torch.Tensor], heads: int | None, act: str,
                                eps: float = 1e-5) -> VisionConfig:
    conv = state["vision_encoder.conv1.weight"]  # [width, C, p, p]
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    grid = round((state["vision_encoder.positional_embedding"].shape[0] - 1) ** 0.5)
    layers = len({int(m.group(1)) for k in state
                  if (m := re.match(r"vision_encoder\.transformer\.resblocks\.(\d+)\.", k))})
    mlp = state["vision_encoder.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    if heads is None:
        heads = _guess_vit_heads(width, layers, patch, grid * patch)
    return VisionConfig(image_size=grid * patch, patch_size=patch, width=width, layers=layers,
                        heads=heads, mlp_ratio=mlp / width, act=act, in_channels=channels,
                        layer_norm_eps=eps)


# open_clip's ViTs whose heads are not 64 wide (its `head_width`): ViT-H (80), ViT-g (88), ViT-bigG (104), ViT-e
# (112), all with 16 heads. Every other open_clip ViT has 64-wide heads.
OPEN_CLIP_HEADS_NOT_64_WIDE = {1280: 16, 1408: 16, 1664: 16, 1792: 16}


def _guess_vit_heads(width: int, layers: int, patch: int, image_size: int) -> int:
    """The weights do not show the head count: take open_clip's convention (64-wide heads, except its released
    ViTs listed above); a width that fits neither is an error asking for the config."""
    if width in OPEN_CLIP_HEADS_NOT_64_WIDE:
        return OPEN_CLIP_HEADS_NOT_64_WIDE[width]
    if width >= 64 and width % 64 == 0:
        return width // 64
    raise ValueError(
        f"vision: the ViT is {width} wide, which is not a multiple of open_clip's 64-wide heads, and the weights do "
        f"not show the head count; expected the ViT's config: pass vision=VisionConfig(image_size={image_size}, "
        f"patch_size={patch}, width={width}, layers={layers}, heads=..., act=...) or put open_clip's config "
        f"(open_clip_config.json, with vision_cfg) beside the weights"
    )


def _open_clip_vision_heads(vision_path: Path) -> int | None:
    """The head count from an open_clip config beside the vision weights (open_clip_config.json as the hub ships
    it, `{"model_cfg": {"vision_cfg": ...}}`, or a model config `{"vision_cfg": ...}`), None when there is none."""
    folder = vision_path if vision_path.is_dir() else vision_path.parent
    config_file = folder / "open_clip_config.json"
    if not config_file.is_file():
        return None
    config = read_json(config_file, "vision_path")
    vision_cfg = (config.get("model_cfg") or config).get("vision_cfg")
    if not isinstance(vision_cfg, dict) or "width" not in vision_cfg:
        raise ValueError(f"vision_path: {str(config_file)!r} has no vision_cfg with a width; expected open_clip's "
                         f"model config")
    width, head_width = vision_cfg["width"], vision_cfg.get("head_width", 64)
    if not isinstance(width, int) or not isinstance(head_width, int) or head_width < 1 or width % head_width:
        raise ValueError(f"vision_path: {str(config_file)!r}: vision_cfg width={width!r}, head_width={head_width!r}; "
                         f"expected integers, the width a multiple of head_width")
    return width // head_width


def config_from_openflamingo(model: nn.Module, pad_token_id: int | None = None) -> tuple[FlamingoConfig, str]:
    """An open_flamingo `Flamingo` -> (FlamingoConfig, LM layout). Unsupported options are clear errors."""
    visual = model.vision_encoder
    for name, ok in (("attn_pool", getattr(visual, "attn_pool", None) is None),
                     ("final_ln_after_pool", not getattr(visual, "final_ln_after_pool", False)),
                     ("pool_type", getattr(visual, "pool_type", "tok") in ("tok", "avg")),
                     ("ln_pre", isinstance(visual.ln_pre, nn.LayerNorm))):
        if not ok:
            raise ValueError(f"vision_encoder.{name}={getattr(visual, name, None)!r}: unsupported; expected "
                             f"open_clip's default ViT (class token, ln_pre, tokens after ln_post)")
    block = visual.transformer.resblocks[0]
    act = "quick_gelu" if type(block.mlp.gelu).__name__ == "QuickGELU" else "gelu"
    if act == "gelu" and not (isinstance(block.mlp.gelu, nn.GELU) and block.mlp.gelu.approximate == "none"):
        raise ValueError(f"vision_encoder: activation {block.mlp.gelu!r}; expected QuickGELU or exact GELU")
    state = model.state_dict()
    vision = _vision_config_from_weights(state, block.attn.num_heads, act, visual.ln_post.eps)

    lang = model.lang_encoder
    hf = lang.config.to_dict()
    vocab = lang.get_input_embeddings().weight.shape[0]
    lm, layout = lm_config_from_hf(hf, vocab)
    gated = [i for i, b in enumerate(lang.gated_cross_attn_layers) if b is not None]
    first = lang.gated_cross_attn_layers[gated[0]] if gated else None
    if first is not None and first.ff[1].bias is not None:
        raise ValueError("gated_cross_attn_layers: feed-forward with biases; expected OpenFlamingo's bias-free FF")
    bos, eos = hf.get("bos_token_id"), hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    pad = pad_token_id if pad_token_id is not None else hf.get("pad_token_id")
    pad = eos if pad is None else pad
    config = FlamingoConfig(
        vision=vision, perceiver=_perceiver_config(state), lm=lm,
        cross_attn_every_n_layers=_every_n(gated, lm.num_layers),
        xattn_heads=first.attn.heads, xattn_dim_head=first.attn.to_q.out_features // first.attn.heads,
        xattn_ff_mult=first.ff[1].out_features // lm.hidden_size,
        only_attend_immediate_media=first.attn.only_attend_immediate_media,
        openflamingo_pre_image_bug=not first.attn.only_attend_immediate_media,
        bos_token_id=bos if bos is not None else 0, eos_token_id=eos if eos is not None else 0,
        eoc_token_id=model.eoc_token_id, media_token_id=model.media_token_id, pad_token_id=pad,
    )
    return config, layout


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


def _with_weight_shapes(config: FlamingoConfig, canonical: Mapping[str, torch.Tensor]) -> FlamingoConfig:
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
            f"state dict does not match the {lm.family} Flamingo model: missing keys {_listing(missing)}; "
            f"unexpected keys {_listing(unexpected)}"
        )
    wrong = [f"{k}: {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if source[k].shape != v.shape]
    if wrong:
        raise ValueError("state dict shapes do not match the model (got vs expected): " + "; ".join(wrong[:10]))
    return {k: source[k] for k in expected}


def _listing(keys: list[str], limit: int = 20) -> str:
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


# ----------------------------------------------------------------------------------------------------------
# The drop-in
# ----------------------------------------------------------------------------------------------------------


class OpenFlamingoRuntime(DropInModule):
    """A FastFlamingo behind OpenFlamingo's `generate` call (and `forward` for logits), as a `torch.nn.Module`
    over the live model's own tensors (dropin.py: `.to`, `.eval`, `state_dict`, DDP). Every call computes in the
    runtime's construction dtype, whatever autocast region it is in, and is safe in and out of
    `torch.inference_mode()` (modes.py).

    generate(vision_x, lang_x, attention_mask=None, max_new_tokens=None, max_length=None, num_beams=1, do_sample=False,
             temperature=1.0, top_k=50, top_p=1.0, eos_token_id=<|endofchunk|>, min_new_tokens=0,
             pad_token_id=None, length_penalty=1.0, early_stopping=False, num_return_sequences=1, ...)
    -> ids [B * num_return_sequences, T + new], as OpenFlamingo returns them (the length as transformers sets it:
    hf.hf_new_tokens; without attention_mask, the mask transformers infers: hf.hf_inferred_mask; top_k 50
    when sampling; finished rows padded with `pad_token_id`, by default the LM's pad token or else the first
    stop token). Beam search follows Hugging Face's (flamingo_fast/generation/search.py), each row's prompt encoded and
    prefilled once. Options of Hugging Face's generate that are not implemented are an error that names them,
    never ignored. flamingo_fast's own options pass through: generator, timer, return_logits.
    """

    def __init__(self, fast, reference: Flamingo, hf_pad_token_id: int | None,
                 generation_config: Mapping | None = None, model: nn.Module | None = None,
                 max_positions: int | None = None):
        """generation_config: the LM's own generate defaults (Hugging Face's `generation_config.to_diff_dict()`,
        or generation_config.json): its supported entries become this drop-in's defaults, as Hugging Face
        merges them; an unsupported entry that is not at its default makes every generate call an error that
        names it, unless the call passes that option's default explicitly. model: the live open_flamingo model
        whose tensors `fast` shares (registered: the drop-in's parameters are its parameters, under its names).
        max_positions: the LM config's max_position_embeddings, where transformers stops its default length.
        OpenFlamingo's generate passes num_beams=1 and eos_token_id=<|endofchunk|> itself unless the caller gives
        them, so the generation_config's num_beams and eos_token_id never apply; its other entries do."""
        super().__init__(fast, reference, model)
        self.defaults = HFGenerateDefaults(hf_generation_defaults(generation_config), self.config.eoc_token_id,
                                           hf_pad_token_id, "lang_encoder.generation_config",
                                           forced={"num_beams": 1}, max_positions=max_positions,
                                           use_cache=bool((generation_config or {}).get("use_cache", True)))

    _media_session: MediaSession | None = None  # what cache_media() holds until uncache_media()

    @runtime_mode
    def forward(self, vision_x, lang_x, attention_mask=None, labels=None, clear_conditioned_layers: bool = True,
                past_key_values=None, use_cache: bool = False) -> FlamingoOutput:
        """OpenFlamingo's forward -> `.logits` [B, T, vocab] and `.past_key_values` (as Hugging Face's
        CausalLMOutputWithPast; FastFlamingo.forward returns the bare tensor).

        - use_cache=True: `.past_key_values` is a handle to the sequence's state (runtime/prefix_state.py: any number
          may be alive, each owns its memory; another model's, a stale one or anything else is an error naming
          past_key_values).
        - past_key_values=handle: lang_x holds only the new tokens [B, n] (attention_mask None, theirs or the
          whole sequence's); they run over the handle's sequence, which stays unchanged, and see its prompt's
          last image; the result's handle extends it. So OpenFlamingo's per-class loop (EvalModel's
          get_rank_classifications with use_cache=True) gets the values of use_cache=False; `score` computes
          the same in batched passes, much faster.
        - vision_x=None after cache_media(): lang_x (a prompt with its `<image>` tokens) runs with the cached
          images. clear_conditioned_layers=True (the default, as in OpenFlamingo) then releases them, as
          OpenFlamingo clears its conditioned layers; nothing else is kept between calls.
        - labels: not supported (inference only)."""
        if labels is not None:
            raise ValueError("labels: not supported; flamingo_fast computes no loss (expected None)")
        session = self._media_session
        if session is not None and past_key_values is None:
            if vision_x is not None:
                raise ValueError("vision_x: media are cached (cache_media()); expected None, or uncache_media() "
                                 "first")
            if isinstance(lang_x, torch.Tensor) and not bool((lang_x == self.config.media_token_id).any()):
                raise ValueError("lang_x: no <image> token with media cached by cache_media(); expected the prompt "
                                 "with its <image> tokens (continuations go through past_key_values)")
            vision_x = session.vision_x
        if past_key_values is not None or use_cache:
            logits, state = self.fast.forward_with_state(vision_x, lang_x, attention_mask, past_key_values,
                                                         session if past_key_values is None else None)
        else:
            logits, state = self.fast.forward(vision_x, lang_x, attention_mask), None
        if clear_conditioned_layers and session is not None:
            self.uncache_media()
        return FlamingoOutput(logits=logits, past_key_values=state)

    def cache_media(self, input_ids: torch.Tensor, vision_x: torch.Tensor) -> None:
        """OpenFlamingo's cache_media: later forwards with vision_x=None run with these images (a copy: the
        caller may refill its buffer), until uncache_media(). input_ids: the prompt they go with (checked)."""
        check_prompt(self.config, vision_x, input_ids, None)
        self.uncache_media()
        self._media_session = MediaSession(vision_x.detach().clone())

    def uncache_media(self) -> None:
        """Release what cache_media() holds; the handles made with those media become stale."""
        if self._media_session is not None:
            self._media_session.alive = False
        self._media_session = None

    @runtime_mode
    def _encode_vision_x(self, vision_x: torch.Tensor) -> torch.Tensor:
        """OpenFlamingo's image encoding: vision_x [B, T_img, F=1, C, H, W] -> the resampled latents
        [B, T_img, latents, D]. Returned, never stored: forward reads images only from its vision_x or
        cache_media() (OpenFlamingo instead conditions its layers on them)."""
        if not isinstance(vision_x, torch.Tensor) or vision_x.dim() != 6 or vision_x.shape[2] != 1:
            got = tuple(vision_x.shape) if isinstance(vision_x, torch.Tensor) else type(vision_x).__name__
            raise ValueError(f"vision_x: got {got}; expected [B, T_img, 1, C, H, W] (single frames)")
        fast = self.fast
        patch_tokens = fast.model.vision_encoder(vision_x.flatten(0, 2).to(device=fast.device, dtype=fast.dtype))
        return fast.perceiver(patch_tokens.view(*vision_x.shape[:3], *patch_tokens.shape[1:]))

    @property
    def capture_seconds(self) -> float:
        return self.fast.capture_seconds

    @runtime_mode
    def generate(self, vision_x, lang_x, attention_mask=None, **options):
        """OpenFlamingo's call with Hugging Face's options (hf.hf_generate says how each is taken); the
        default stop token is `<|endofchunk|>`."""
        return hf_generate(self.fast, self.defaults, vision_x, lang_x, attention_mask, None, **options)

    @runtime_mode
    def score(self, vision_x, lang_x, attention_mask=None, candidates: Sequence[Sequence[int]] = (),
              normalize_length: bool = False, progress: bool | None = None) -> torch.Tensor:
        """[B, C] float32 log-likelihoods of the candidates (token-id lists, as the tokenizer gives each class
        name without special tokens) after every row: what OpenFlamingo's `get_rank_classifications` returns,
        computed in batched passes over a shared prompt (FastFlamingo.score)."""
        return self.fast.score(vision_x, lang_x, attention_mask, candidates=candidates,
                               normalize_length=normalize_length, progress=progress)


def _output_head_by_role(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live model's state dict with its LM's output head under the name flamingo_fast's maps expect.

    The head is found by its role (`get_output_embeddings()`), not by one spelling: GPT-NeoX names it
    `embed_out` in transformers 4 and `lm_head` in transformers 5."""
    state = model.state_dict(keep_vars=True)
    lang = model.lang_encoder
    head = lang.get_output_embeddings()
    attr = next((name for name, module in lang.named_children() if module is head), None)
    if attr is None:
        raise ValueError("lang_encoder.get_output_embeddings(): not a direct child of the LM; expected the output "
                         "head as an attribute of the causal LM (lm_head or embed_out)")
    expected = "embed_out" if getattr(lang.config, "model_type", None) == "gpt_neox" else "lm_head"
    if attr != expected and f"lang_encoder.{attr}.weight" in state:
        state[f"lang_encoder.{expected}.weight"] = state.pop(f"lang_encoder.{attr}.weight")
    return state


@runtime_mode
def from_openflamingo(model: nn.Module, pad_token_id: int | None = None,
                      openflamingo_generated_image_bug: bool = False, **runtime_options) -> OpenFlamingoRuntime:
    """An open_flamingo `Flamingo` (open_clip vision tower, perceiver, FlamingoLMMixin LM) -> the same model
    run by FastFlamingo. The tensors are shared with `model` (nothing is copied unless `dtype` asks for a
    conversion). The LM's `generation_config` gives the drop-in's generate defaults, as in Hugging Face.
    `openflamingo_generated_image_bug=True`: what OpenFlamingo's cached generate does once the model generates
    `<image>`, batch coupling included, for bit parity (FlamingoConfig says what; a use_cache=False call, by
    argument or by the LM's generation_config, is refused).
    `runtime_options` go to FastFlamingo.from_reference: backend, dtype, device,
    max_batch_size, max_seq_len, max_images, cuda_graphs, stop_check_interval, max_hypotheses, max_tail_len,
    context_cache_bytes, score_bytes, decode_paths, weights. With `weights="int8"` the runtime works from its own
    converted, quantized copy, which the drop-in registers instead of `model` (as with a dtype conversion): the
    float weights of the layers it quantized stay only in `model` (tensors already in the activation dtype that it
    keeps unquantized are shared, not copied); free them with `del model` (and `torch.cuda.empty_cache()` on a
    GPU). Such a drop-in moves between devices (`.to(device)` rebuilds it, still int8) but refuses a dtype
    conversion (dropin.py)."""
    from ..runtime.runtime import FastFlamingo

    config, layout = config_from_openflamingo(model, pad_token_id)
    config = config.replace(openflamingo_generated_image_bug=openflamingo_generated_image_bug)
    state = canonical_state_dict(_output_head_by_role(model), layout)
    config = _with_weight_shapes(config, state)
    tensors = to_reference_state_dict(state, config, layout)
    reference = build_reference_from_state(config, tensors)
    fast = FastFlamingo.from_reference(reference, **runtime_options)
    generation, defaults = generation_config_of(model.lang_encoder)
    hf_pad = getattr(generation, "pad_token_id", None)
    return OpenFlamingoRuntime(fast, reference, pad_token_id if pad_token_id is not None else hf_pad, defaults,
                               model, getattr(model.lang_encoder.config, "max_position_embeddings", None))


# ----------------------------------------------------------------------------------------------------------
# Loading files
# ----------------------------------------------------------------------------------------------------------


def _trainable_as_openflamingo(reference: Flamingo) -> None:
    """requires_grad as OpenFlamingo's create_model_and_transforms leaves it: the perceiver, the gated blocks and
    the input embeddings trainable, the rest frozen. What DDP sees on the drop-in then matches the original
    (DDP refuses a model with nothing trainable, and allocates gradient buckets for everything that is)."""
    reference.requires_grad_(False)
    reference.perceiver.requires_grad_(True)
    reference.lang_encoder.gated_cross_attn_layers.requires_grad_(True)
    reference.lang_encoder.embed_tokens.requires_grad_(True)


@runtime_mode
def load_openflamingo(
    checkpoint_path: str | os.PathLike,
    lm_path: str | os.PathLike,
    vision_path: str | os.PathLike,
    *,
    eoc_token_id: int,
    media_token_id: int,
    pad_token_id: int | None = None,
    vision: VisionConfig | None = None,
    only_attend_immediate_media: bool = True,
    missing_output_rows: str = "error",
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    openflamingo_generated_image_bug: bool = False,
    **runtime_options,
) -> OpenFlamingoRuntime:
    """Build from local files only (no network):

    checkpoint_path  OpenFlamingo's checkpoint.pt: perceiver, gated cross-attention layers, resized embeddings
                     (a training checkpoint with `model_state_dict` works too, and the `module.` prefix of
                     multi-GPU training is stripped, as OpenFlamingo's evaluation does)
    lm_path          the LM's Hugging Face directory: config.json and *.safetensors or pytorch_model*.bin
    vision_path      open_clip weights: a full CLIP state dict (`visual.*` used, the text tower ignored) or the
                     visual tower's own keys
    eoc_token_id, media_token_id   the ids of `<|endofchunk|>` and `<image>` in OpenFlamingo's tokenizer
                     (`tokenizer.encode("<|endofchunk|>")[-1]`); for GPT-NeoX-20B's tokenizer 50277, 50278.
    vision           the ViT's config; default: inferred from the weights, QuickGELU (OpenAI's CLIP, which every
                     OpenFlamingo release uses), the head count from open_clip's config when an
                     open_clip_config.json lies beside the weights, else open_clip's convention (64-wide heads;
                     16 heads for ViT-H, -g, -bigG and -e); a width that fits neither is an error
    openflamingo_generated_image_bug   what OpenFlamingo does once the model generates `<image>`, for bit parity
                     (FlamingoConfig); the LM directory's generation_config.json, when there, gives generate's
                     defaults as in Hugging Face
    dtype            None: the files' own dtype when they agree, float32 when they differ (as OpenFlamingo loads
                     them: e.g. MPT-7B's bf16 weights with a float32 checkpoint and CLIP); else every tensor is
                     converted to `dtype`
    device           where the model is built; the files are memory-mapped and converted block by block
                     (runtime/model_copy.py) into the model on `device`: one decoder layer (or gated block) at a time is
                     read in full, so neither the CPU nor the device holds the files' whole model beside it
    weights          None, "bf16" or "int8" (FastFlamingo.from_reference): with "int8" each block is quantized as
                     soon as it is converted, so the peak on `device` is the int8 model plus one block in `dtype`
                     (measured: tests/test_loading.py, the memory probe)

    Torch pickles are read with weights_only=True. Missing or unexpected keys are an error that lists them; a
    file that cannot be read is an error naming its argument, the file and the cause.
    """
    lm_dir = Path(lm_path)
    config_file = lm_dir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"lm_path={str(lm_path)!r}: no config.json; expected a Hugging Face model directory")
    hf = read_json(config_file, f"lm_path={str(lm_path)!r}")

    visual = load_tensors(vision_path, "vision_path", mapped=True)
    if any(k.startswith("visual.") for k in visual):
        visual = {k[len("visual."):]: v for k, v in visual.items() if k.startswith("visual.")}
    lm_tensors = load_tensors(lm_dir, "lm_path", mapped=True)
    checkpoint = load_tensors(checkpoint_path, "checkpoint_path", mapped=True)
    files = {"checkpoint_path": checkpoint, "lm_path": lm_tensors, "vision_path": visual}
    if dtype is None:
        dtype = common_dtype(files)
    state = {"vision_encoder." + k: v for k, v in visual.items()}
    state.update({"lang_encoder." + k: v for k, v in lm_tensors.items()})
    state.update(checkpoint)  # the checkpoint's resized embeddings replace the LM's

    family, layout = MODEL_TYPES.get(hf.get("model_type"), (None, None))
    if family is None:
        raise ValueError(f"lang_encoder: model_type={hf.get('model_type')!r} is not supported; "
                         f"expected one of {_supported()}")
    canonical = canonical_state_dict(state, layout)
    embed = {"llama": "lang_encoder.model.embed_tokens.weight", "mpt": "lang_encoder.transformer.wte.weight",
             "gpt_neox": "lang_encoder.gpt_neox.embed_in.weight"}[family]
    if embed not in canonical:
        raise ValueError(f"missing keys [{embed}]: no input embedding in the checkpoint or the LM")
    lm, layout = lm_config_from_hf(hf, canonical[embed].shape[0], f"lm_path={str(lm_path)!r}: {str(config_file)!r}")
    gated = sorted({int(m.group(1)) for k in canonical
                    if (m := re.match(r"lang_encoder\.gated_cross_attn_layers\.(\d+)\.", k))})
    gated_q = canonical[f"lang_encoder.gated_cross_attn_layers.{gated[0]}.attn.to_q.weight"] if gated else None
    if vision is None:
        heads = _open_clip_vision_heads(Path(vision_path))
        vision = _vision_config_from_weights(canonical, heads, "quick_gelu", 1e-5)
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    pad = pad_token_id if pad_token_id is not None else hf.get("pad_token_id")
    config = FlamingoConfig(
        vision=vision, perceiver=_perceiver_config(canonical), lm=lm,
        cross_attn_every_n_layers=_every_n(gated, lm.num_layers),
        xattn_heads=8, xattn_dim_head=gated_q.shape[0] // 8 if gated_q is not None else 64,
        xattn_ff_mult=canonical[f"lang_encoder.gated_cross_attn_layers.{gated[0]}.ff.1.weight"].shape[0]
        // lm.hidden_size,
        only_attend_immediate_media=only_attend_immediate_media,
        openflamingo_pre_image_bug=not only_attend_immediate_media,
        openflamingo_generated_image_bug=openflamingo_generated_image_bug,
        bos_token_id=hf.get("bos_token_id") or 0, eos_token_id=eos or 0, eoc_token_id=eoc_token_id,
        media_token_id=media_token_id, pad_token_id=(eos or 0) if pad is None else pad,
    )
    config = _with_weight_shapes(config, canonical)
    tensors = to_reference_state_dict(canonical, config, layout, missing_output_rows)
    mapped = build_reference_from_state(config, tensors)  # over the memory-mapped files
    del tensors, canonical, state, lm_tensors, checkpoint, visual, files
    dtype, weights = dtype or mapped.lang_encoder.embed_tokens.weight.dtype, runtime_options.get("weights")
    check_weights(weights, dtype)
    reference = converted_copy(mapped, dtype, device, quantize=weights == "int8", fresh=True)
    del mapped
    _trainable_as_openflamingo(reference)
    from ..runtime.runtime import FastFlamingo

    generation_file = lm_dir / "generation_config.json"
    defaults = read_json(generation_file, f"lm_path={str(lm_path)!r}") if generation_file.is_file() else {}
    return OpenFlamingoRuntime(FastFlamingo.from_reference(reference, **runtime_options), reference, pad, defaults,
                               max_positions=hf.get("max_position_embeddings"))
