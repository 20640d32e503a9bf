"""The OpenFlamingo config reader: an open_flamingo model or a Hugging Face LM config.json -> FlamingoConfig.

The LM families by Hugging Face `model_type` (MODEL_TYPES), their config as transformers 4.x and 5.x write it
(`hf.rope_of` for the rotary settings), and the vision tower's and perceiver's sizes read from the weights where
the model does not state them. An unsupported option or family is an error that names it."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import FlamingoConfig, LMConfig, PerceiverConfig, VisionConfig
from .hf import rope_of
from .openflamingo_state_dict import key_listing
from .weights_files import read_json

# Hugging Face `model_type` -> (our family, source layout).
MODEL_TYPES = {"llama": ("llama", "llama"), "mpt": ("mpt", "mpt"), "mosaic_gpt": ("mpt", "mosaic_gpt"),
               "gpt_neox": ("gpt_neox", "gpt_neox")}


def supported_model_types() -> str:
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
        raise ValueError(f"lang_encoder: model_type={model_type!r} is not supported; "
                         f"expected one of {supported_model_types()}")
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


def every_n(indices: Sequence[int], num_layers: int) -> int:
    """The cross-attention cadence n from the layers that hold a gated block ((i + 1) % n == 0)."""
    if not indices:
        raise ValueError("gated_cross_attn_layers: none found; expected at least one gated cross-attention block")
    n = min(indices) + 1
    expected = [i for i in range(num_layers) if (i + 1) % n == 0]
    if sorted(indices) != expected:
        raise ValueError(f"gated_cross_attn_layers: blocks at layers {sorted(indices)}; expected every n-th layer "
                         f"((i + 1) % n == 0), e.g. {expected} for n={n}")
    return n


def perceiver_config(state: Mapping[str, torch.Tensor]) -> PerceiverConfig:
    depth = len({int(m.group(1)) for k in state if (m := re.match(r"perceiver\.layers\.(\d+)\.", k))})
    for extra in ("perceiver.frame_embs", "perceiver.media_time_embs"):
        if extra in state:
            raise ValueError(f"{extra}: time / frame embeddings are not supported (OpenFlamingo's checkpoints "
                             f"have none)")
    needed = [k for k in ("perceiver.latents", "perceiver.layers.0.0.to_q.weight", "perceiver.layers.0.1.1.weight")
              if k not in state]
    if needed:
        unexpected = sorted(k for k in state if not k.startswith(("vision_encoder.", "lang_encoder.", "perceiver.")))
        raise ValueError(f"missing keys {key_listing(needed)}: the perceiver's shape cannot be inferred without them; "
                         f"unexpected keys {key_listing(unexpected)}")
    latents = state["perceiver.latents"]
    inner = state["perceiver.layers.0.0.to_q.weight"].shape[0]
    ff_inner = state["perceiver.layers.0.1.1.weight"].shape[0]
    heads = 8  # OpenFlamingo fixes 8 heads x 64 (only the product is visible in the weights)
    return PerceiverConfig(depth=depth, heads=heads, dim_head=inner // heads, num_latents=latents.shape[0],
                           ff_mult=ff_inner // latents.shape[1])


def vision_config_from_weights(state: Mapping[str, torch.Tensor], heads: int | None, act: str,
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


def open_clip_vision_heads(vision_path: Path) -> int | None:
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
    vision = vision_config_from_weights(state, block.attn.num_heads, act, visual.ln_post.eps)

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
        vision=vision, perceiver=perceiver_config(state), lm=lm,
        cross_attn_every_n_layers=every_n(gated, lm.num_layers),
        xattn_heads=first.attn.heads, xattn_dim_head=first.attn.to_q.out_features // first.attn.heads,
        xattn_ff_mult=first.ff[1].out_features // lm.hidden_size,
        only_attend_immediate_media=first.attn.only_attend_immediate_media,
        openflamingo_pre_image_bug=not first.attn.only_attend_immediate_media,
        bos_token_id=bos if bos is not None else 0, eos_token_id=eos if eos is not None else 0,
        eoc_token_id=model.eoc_token_id, media_token_id=model.media_token_id, pad_token_id=pad,
    )
    return config, layout
