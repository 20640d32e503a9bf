"""IDEFICS v1 drop-in: a live transformers `IdeficsForVisionText2Text`, run by FastFlamingo.

    runtime = flamingo_fast.from_idefics(model)                   # shares the model's tensors, copies nothing
    inputs = processor(prompts, return_tensors="pt")              # IdeficsProcessor, unchanged
    ids = runtime.generate(**inputs, max_new_tokens=20)           # the call and output of model.generate
    logits = runtime(**inputs).logits                             # and of model(...)

The reference model's IDEFICS layout (FlamingoConfig.layout == "idefics", reference/model.py) uses transformers' own
parameter names below its three parts, so the map is a change of prefix, plus one renumbering:

    ours                                              transformers
    vision_encoder.{embeddings,pre_layrnorm,encoder}.*  model.vision_model.*
    perceiver.*                                       model.perceiver_resampler.*
    lang_encoder.model.{embed_tokens,layers,norm}.*   model.{embed_tokens,layers,norm}.*
    lang_encoder.lm_head.*                            lm_head.*
    lang_encoder.gated_cross_attn_layers.{i}.*        model.gated_cross_attn_layers.{i // interval}.*
                                                      (ours keyed by the decoder layer the block precedes)

Ignored on purpose: `model.vision_model.post_layernorm` (it normalises only the pooled class token, which
IDEFICS never reads). Any other key that maps to nothing is an error.

Everything the weights say is read from them, not from the config: the added vocabulary rows (the instruct
models have more than their configs say), the gate shapes (alpha_type), the q/k norms, the number of latents
and the MLP widths.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..config import FlamingoConfig, LMConfig, PerceiverConfig, VisionConfig
from ..modes import runtime_mode
from ..reference.model import Flamingo, build_reference_from_state
from ..validation import check_eval_mode
from .hf import FlamingoOutput, HFGenerateDefaults, generation_config_of, hf_generate, hf_generation_defaults, rope_of
from .module import DropInModule

PREFIXES = (  # transformers prefix -> ours
    ("model.vision_model.", "vision_encoder."),
    ("model.perceiver_resampler.", "perceiver."),
    ("model.embed_tokens.", "lang_encoder.model.embed_tokens."),
    ("model.layers.", "lang_encoder.model.layers."),
    ("model.norm.", "lang_encoder.model.norm."),
    ("lm_head.", "lang_encoder.lm_head."),
)
IGNORED = (r"^model\.vision_model\.post_layernorm\.",)
ENGINES = ("fast", "reference")


def _unsupported(name: str, value, expected: str) -> ValueError:
    return ValueError(f"model.config.{name}={value!r}: not supported by flamingo_fast; expected {expected}")


def _rope_theta(model: nn.Module) -> float:
    """transformers 4.x's IdeficsEmbedding has its own base (10000) and reads nothing from the config, not even
    the rope_parameters a config.json written by 5.x brings; 5.x's rotary reads config.rope_parameters."""
    rotary = model.model.layers[0].self_attn.rotary_emb
    if hasattr(rotary, "base"):
        return float(rotary.base)
    return rope_of({"rope_parameters": getattr(model.config, "rope_parameters", None)}, "model.config",
                   theta_keys=(), scaling_key=None).theta


def config_from_idefics(model: nn.Module) -> FlamingoConfig:
    """The FlamingoConfig of a live IdeficsForVisionText2Text: shapes from its config, checked against and
    completed by its weights."""
    hf = model.config
    state = model.state_dict()
    if not getattr(hf, "use_resampler", True):
        raise _unsupported("use_resampler", False, "True (every released IDEFICS model uses the perceiver)")
    if getattr(hf, "hidden_act", "silu") != "silu":
        raise _unsupported("hidden_act", hf.hidden_act, "'silu' (LLaMA's SwiGLU)")
    layers, interval = hf.num_hidden_layers, hf.cross_layer_interval
    if interval < 1 or layers % interval:
        raise _unsupported("cross_layer_interval", interval,
                           f"an interval that divides num_hidden_layers={layers} (transformers builds "
                           f"{layers} // {interval} gated blocks but indexes one per multiple of the interval)")
    vc, pc = hf.vision_config, hf.perceiver_config
    if vc.hidden_act not in ("gelu", "quick_gelu"):
        raise _unsupported("vision_config.hidden_act", vc.hidden_act, "'gelu' or 'quick_gelu'")
    width = vc.embed_dim
    mlp = state["model.vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
    vision = VisionConfig(image_size=vc.image_size, patch_size=vc.patch_size, width=width,
                          layers=vc.num_hidden_layers, heads=vc.num_attention_heads, mlp_ratio=mlp / width,
                          act=vc.hidden_act, in_channels=vc.num_channels, layer_norm_eps=vc.layer_norm_eps)
    ff = state["model.perceiver_resampler.blocks.0.1.fc.weight"].shape[0]
    if ff % width:
        raise ValueError(f"model.perceiver_resampler.blocks.0.1.fc.weight: {ff} rows; expected a multiple of the "
                         f"vision width {width}")
    perceiver = PerceiverConfig(
        depth=pc.resampler_depth, heads=pc.resampler_n_heads, dim_head=pc.resampler_head_dim,
        num_latents=state["model.perceiver_resampler.latents"].shape[0], ff_mult=ff // width,
        qk_norm="model.perceiver_resampler.blocks.0.0.q_layer_norm.weight" in state,
    )
    added = state["model.embed_tokens.additional_embedding.weight"].shape[0] \
        if "model.embed_tokens.additional_embedding.weight" in state else 0
    base = state["model.embed_tokens.weight"].shape[0]
    head_added = state["lm_head.additional_fc.weight"].shape[0] if "lm_head.additional_fc.weight" in state else 0
    if head_added != added or state["lm_head.weight"].shape[0] != base:
        raise ValueError(f"lm_head: {state['lm_head.weight'].shape[0]} + {head_added} rows; expected the "
                         f"embedding's {base} + {added}")
    lm = LMConfig(family="llama", vocab_size=base + added, additional_vocab_size=added, hidden_size=hf.hidden_size,
                  num_layers=layers, num_heads=hf.num_attention_heads, num_kv_heads=hf.num_attention_heads,
                  intermediate_size=hf.intermediate_size, rms_norm_eps=hf.rms_norm_eps,
                  rope_theta=_rope_theta(model),
                  # 4.x's IdeficsConfig has no such field (transformers grows its rotary table on demand); IDEFICS
                  # was trained on 2048-token sequences
                  max_position_embeddings=getattr(hf, "max_position_embeddings", 2048),
                  tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))
    alpha = state["model.gated_cross_attn_layers.0.alpha_cross_attn"]
    if tuple(alpha.shape) not in ((1,), (1, 1, hf.hidden_size)):
        raise ValueError(f"model.gated_cross_attn_layers.0.alpha_cross_attn: shape {tuple(alpha.shape)}; expected "
                         f"(1,) (alpha_type 'float') or (1, 1, {hf.hidden_size}) ('vector')")
    image_token = getattr(hf, "image_token_id", None)
    return FlamingoConfig(
        vision=vision, perceiver=perceiver, lm=lm, cross_attn_every_n_layers=interval, layout="idefics",
        xattn_heads=lm.num_heads, xattn_dim_head=lm.head_dim, xattn_ff_mult=1,
        xattn_qk_norm="model.gated_cross_attn_layers.0.cross_attn.q_layer_norm.weight" in state,
        xattn_gate_per_channel=alpha.dim() == 3,
        bos_token_id=hf.bos_token_id, eos_token_id=hf.eos_token_id, eoc_token_id=None,
        # `<image>`: only used to refuse it as a scoring candidate; IDEFICS's tokenizer puts it after
        # `<fake_token_around_image>`, the first added row.
        media_token_id=image_token if image_token is not None else base + 1 if added >= 2 else base - 1,
        pad_token_id=hf.pad_token_id if hf.pad_token_id is not None else 0,
    )


def our_name(name: str, config: FlamingoConfig) -> str | None:
    """A transformers IDEFICS parameter name -> the reference's (None: ignored on purpose; KeyError: unknown)."""
    if any(re.match(p, name) for p in IGNORED):
        return None
    block = re.match(r"model\.gated_cross_attn_layers\.(\d+)\.(.*)", name)
    if block:
        return f"lang_encoder.gated_cross_attn_layers.{int(block.group(1)) * config.cross_attn_every_n_layers}." \
               f"{block.group(2)}"
    for theirs, ours in PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs):]
    raise KeyError(name)


def reference_state_dict(model: nn.Module, config: FlamingoConfig) -> dict[str, torch.Tensor]:
    """Our names -> the live model's tensors (the same objects: nothing copied)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        try:
            ours = our_name(name, config)
        except KeyError:
            unknown.append(name)
            continue
        if ours is not None:
            out[ours] = tensor
    if unknown:
        raise ValueError(f"model: state dict keys {unknown[:10]} map to nothing in flamingo_fast's IDEFICS layout")
    return out


class IdeficsRuntime(DropInModule):
    """A FastFlamingo (or the reference, engine="reference") behind IdeficsForVisionText2Text's call, as a
    `torch.nn.Module` over the live model's own tensors (module.py: `.to`, `.eval`, `state_dict`, DDP). Every call
    computes in the runtime's construction dtype, whatever autocast region it is in, and is safe in and out of
    `torch.inference_mode()` (modes.py).

    generate(input_ids, attention_mask=None, pixel_values=None, image_attention_mask=None, max_new_tokens=None,
             max_length=None, num_beams=1, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, eos_token_id=</s>,
             min_new_tokens=0, pad_token_id=None, length_penalty=1.0, early_stopping=False,
             num_return_sequences=1, ...)
    -> ids [B * num_return_sequences, T + new], prompt included, as transformers returns them. Generated tokens
    see what the last prompt token sees (transformers repeats the mask's last row). Options left at None take
    the model's generation_config value, else transformers' default (the length: hf.hf_new_tokens; a missing
    attention_mask: hf.hf_inferred_mask); unsupported options are a named error.
    forward(input_ids, attention_mask=None, pixel_values=None, image_attention_mask=None) -> `.logits`
    [B, T, vocab incl. the added rows], float32 from the fast engine.
    """

    # Call keywords transformers' IDEFICS takes that the drop-in accepts only at their defaults.
    ACCEPTED = {"interpolate_pos_encoding": False, "image_encoder_embeddings": None, "perceiver_embeddings": None}

    def __init__(self, engine, reference: Flamingo, eos_token_id, pad_token_id: int | None,
                 generation_config: Mapping | None = None, model: nn.Module | None = None,
                 max_positions: int | None = None):
        """model: the live IdeficsForVisionText2Text whose tensors the engine shares (registered: the drop-in's
        parameters are its parameters, under its names). max_positions: its config's max_position_embeddings
        (5.x has one, 4.x none), where transformers stops its default length."""
        super().__init__(engine, reference, model)
        self.defaults = HFGenerateDefaults(hf_generation_defaults(generation_config), eos_token_id, pad_token_id,
                                           "model.generation_config", self.ACCEPTED, max_positions=max_positions,
                                           written_by=(generation_config or {}).get("transformers_version"))

    def _vision(self, pixel_values):
        """The processor's pixel_values [B, N, C, H, W] -> vision_x [B, N, 1, C, H, W] (one frame per image)."""
        if pixel_values is None:
            return None
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 5:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values: got {got}; expected the processor's [batch, images, C, H, W] tensor")
        if pixel_values.device.type == "meta":
            raise ValueError(f"pixel_values: on the meta device (shape {tuple(pixel_values.shape)}, no data); "
                             f"expected a tensor with values on a real device (the model's)")
        return pixel_values[:, :, None]

    @runtime_mode
    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_attention_mask=None,
                **hf_options) -> FlamingoOutput:
        """Other keywords of transformers' forward are accepted only at their defaults (ACCEPTED): precomputed
        image_encoder_embeddings / perceiver_embeddings, labels and the rest are a named error."""
        unsupported = sorted(k for k, v in hf_options.items() if self.ACCEPTED.get(k, object()) != v)
        if unsupported:
            raise ValueError(f"forward options {unsupported}: not supported by flamingo_fast; expected input_ids, "
                             f"attention_mask, pixel_values, image_attention_mask")
        vision_x = self._vision(pixel_values)
        mask = self._mask(image_attention_mask, input_ids, vision_x)
        return FlamingoOutput(logits=self.engine.forward(vision_x, input_ids, attention_mask, mask).float())

    def _mask(self, image_attention_mask, input_ids, vision_x):
        """The processor's mask; with no images (pixel_values=None) an empty [B, T, 0] one is the same thing."""
        if image_attention_mask is None and vision_x is None and isinstance(input_ids, torch.Tensor):
            return torch.zeros(*input_ids.shape, 0, dtype=torch.long, device=input_ids.device)
        return image_attention_mask

    @runtime_mode
    def generate(self, input_ids, attention_mask=None, pixel_values=None, image_attention_mask=None, **options):
        """IdeficsForVisionText2Text's call with Hugging Face's options (hf.hf_generate says how each is taken);
        the default stop token is the model's eos (`</s>`)."""
        vision_x = self._vision(pixel_values)  # other image inputs: hf_generate accepts them only at ACCEPTED
        mask = self._mask(image_attention_mask, input_ids, vision_x)
        return hf_generate(self.engine, self.defaults, vision_x, input_ids, attention_mask, mask, **options)

    @runtime_mode
    def score(self, input_ids, attention_mask=None, pixel_values=None, image_attention_mask=None,
              candidates: Sequence[Sequence[int]] = (), normalize_length: bool = False) -> torch.Tensor:
        """[B, C] float32 log-likelihoods of the candidates (token-id lists) after every row; candidate tokens
        see what the last prompt token sees (FastFlamingo.score)."""
        vision_x = self._vision(pixel_values)
        mask = self._mask(image_attention_mask, input_ids, vision_x)
        return self.engine.score(vision_x, input_ids, attention_mask, candidates=candidates,
                                 normalize_length=normalize_length, image_attention_mask=mask)

    @property
    def capture_seconds(self) -> float:
        return getattr(self.engine, "capture_seconds", 0.0)


@runtime_mode
def from_idefics(model: nn.Module, engine: str = "fast", **runtime_options) -> IdeficsRuntime:
    """A transformers IdeficsForVisionText2Text -> the same model behind its own call, run by FastFlamingo
    (engine="fast") or by the eager reference (engine="reference"). The tensors are shared with `model`
    (nothing is copied unless `dtype` asks for a conversion); `model` must be in eval mode. `runtime_options`
    go to FastFlamingo.from_reference: backend, dtype, device, max_batch_size, max_seq_len, max_images, cuda_graphs,
    stop_check_interval, max_hypotheses, max_tail_len, context_cache_bytes, score_bytes, weights. With
    `weights="int8"` the runtime works from its own converted, quantized copy, which the drop-in registers instead
    of `model`: the float weights of the layers it quantized stay only in `model` (tensors already in the activation
    dtype that it keeps unquantized are shared, not copied); free them with `del model` (and
    `torch.cuda.empty_cache()` on a GPU). `.to(device)` rebuilds it, still int8; a dtype conversion is refused.
    `batch_invariant=True` (a runtime option too): every row computed alone (runtime/invariant.py)."""
    from ..runtime.runtime import FastFlamingo

    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: expected one of {list(ENGINES)}")
    check_eval_mode(model)  # transformers' dropout would make its outputs differ from ours
    if engine == "reference" and runtime_options:
        raise ValueError(f"engine='reference' takes no runtime options; got {sorted(runtime_options)}")
    config = config_from_idefics(model)
    reference = build_reference_from_state(config, reference_state_dict(model, config))
    runner = reference if engine == "reference" else FastFlamingo.from_reference(reference, **runtime_options)
    generation, defaults = generation_config_of(model)
    # transformers' eos and pad: the generation_config's (pad None: its first eos); the model config's only
    # without a generation_config
    source = generation if generation is not None else model.config
    eos, pad = source.eos_token_id, source.pad_token_id
    return IdeficsRuntime(runner, reference, eos, pad, defaults, model,
                          getattr(model.config, "max_position_embeddings", None))
