"""Hugging Face's conventions, shared by the drop-ins (openflamingo.py, idefics.py).

- The generate-option adapter: Hugging Face's generate options, the model's generation_config defaults
  (HF_SUPPORTED, HF_IGNORED, HF_IGNORED_WHEN_OFF, HF_DEFAULTS, hf_generation_defaults, HFGenerateDefaults) ->
  one GenerationOptions (search.generation_options) -> the runner (hf_generate). Options are translated here
  once; the runner's `generate_from_options` does not translate them again.
- Config reading: a transformers model's generation_config (generation_config_of); its rotary parameters as
  transformers 4.x and 5.x write them (rope_of).
- Output types: FlamingoOutput, what a drop-in's forward returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..checks import is_int
from ..generation.search import as_token_id, generation_options, stop_token_ids

# The options of Hugging Face's generate the drop-ins implement, with Hugging Face's defaults (max_new_tokens and
# max_length: None, the length is then hf_new_tokens' rule).
HF_SUPPORTED = {"max_new_tokens": None, "max_length": None, "num_beams": 1, "do_sample": False, "temperature": 1.0,
                "top_k": 50, "top_p": 1.0, "min_new_tokens": 0, "length_penalty": 1.0, "early_stopping": False,
                "num_return_sequences": 1}
# Hugging Face's default length when neither max_new_tokens nor max_length is set: this many new tokens.
HF_DEFAULT_NEW_TOKENS = 20
# generation_config entries that change nothing here: the drop-ins read eos and pad themselves, use_cache is read
# apart (HFGenerateDefaults.use_cache); and what transformers 5 writes at its defaults.
HF_IGNORED = {"transformers_version", "_from_model_config", "bos_token_id", "eos_token_id", "pad_token_id",
              "decoder_start_token_id", "use_cache"}
HF_IGNORED_WHEN_OFF = {"output_attentions", "output_hidden_states", "output_scores", "output_logits",
                       "return_dict_in_generate"}
# Hugging Face options that are not implemented: accepted only at their default.
HF_DEFAULTS = {"no_repeat_ngram_size": 0, "repetition_penalty": 1.0}


def hf_generation_defaults(generation_config: Mapping | None) -> dict:
    """A model's `generation_config.to_diff_dict()` -> the entries that matter to a drop-in's generate."""
    return {k: v for k, v in (generation_config or {}).items()
            if k not in HF_IGNORED and not (k in HF_IGNORED_WHEN_OFF and not v)}


@dataclass(frozen=True)
class HFGenerateDefaults:
    """What a drop-in's model says about generate: its generation_config entries (hf_generation_defaults), the
    stop tokens and pad it uses when the call gives none, where the config came from (for errors), call keywords
    the model takes that are accepted at their defaults only, the options the wrapped generate passes itself unless
    the caller gives them (so the generation_config's value never applies: OpenFlamingo's num_beams=1), and the
    model config's max_position_embeddings, at which transformers stops its default length (None: no limit)."""

    generation_config: Mapping
    eos_token_id: int | Sequence[int] | None
    pad_token_id: int | None
    where: str
    accepted: Mapping = field(default_factory=dict)
    forced: Mapping = field(default_factory=dict)
    max_positions: int | None = None
    use_cache: bool = True  # the generation_config's: what a call that passes no use_cache runs with
    written_by: str | None = None  # the transformers version that wrote the model's generation_config


def with_call_config(defaults: HFGenerateDefaults, config) -> HFGenerateDefaults:
    """`generate(generation_config=config)` as the installed transformers reads it: the call's config replaces the
    model's, its unset entries (those at Hugging Face's defaults) filled from the model's generation_config, in 5.x
    always, in 4.x when the model's config was written by 4.50 or later (before: only its eos and pad tokens, as
    4.x's legacy path does); 4.x then turns sampling off at temperature 0. Keywords of the call still win."""
    if not hasattr(config, "to_diff_dict"):
        raise ValueError(f"generation_config={config!r}: expected a transformers GenerationConfig")
    import transformers  # a GenerationConfig was passed, so transformers is installed

    diff = config.to_diff_dict()
    release = int(transformers.__version__.split(".")[0])
    written = tuple(int(p) for p in (defaults.written_by or "0.0").split(".")[:2] if p.isdigit())
    merges = release >= 5 or written >= (4, 50)
    options = {**defaults.generation_config, **hf_generation_defaults(diff)} if merges else hf_generation_defaults(diff)
    if release < 5 and merges and options.get("temperature") == 0.0:
        options["do_sample"] = False
    eos, pad = diff.get("eos_token_id"), diff.get("pad_token_id")
    use_cache = diff["use_cache"] if diff.get("use_cache") is not None else (defaults.use_cache if merges else True)
    return dataclasses.replace(defaults, generation_config=options, where="generation_config",
                               use_cache=bool(use_cache), eos_token_id=defaults.eos_token_id if eos is None else eos,
                               pad_token_id=defaults.pad_token_id if pad is None else pad)


def hf_new_tokens(prompt_len: int, max_new_tokens: int | None, max_length: int | None,
                  defaults: HFGenerateDefaults) -> int:
    """How many new tokens transformers' generate (4.57 and 5.x alike, given the generation_config's diff dict) asks
    for: max_new_tokens (the call's, else the generation_config's) wins; else max_length (the call's, else the
    generation_config's) is the whole sequence's length, prompt included; else 20 new tokens, stopped at the model's
    max positions. A max_length the prompt already fills is an error naming max_length, as in transformers."""
    config = defaults.generation_config
    if max_new_tokens is None:
        max_new_tokens = config.get("max_new_tokens")
    if max_new_tokens is not None:
        return max_new_tokens
    if max_length is None:
        max_length = config.get("max_length")
    if max_length is None:
        max_length = prompt_len + HF_DEFAULT_NEW_TOKENS
        if defaults.max_positions is not None:
            max_length = min(max_length, defaults.max_positions)
    elif not is_int(max_length):
        raise ValueError(f"max_length={max_length!r}: expected an integer (the whole sequence's length)")
    if prompt_len >= max_length:
        raise ValueError(f"max_length={max_length}: the prompt already has {prompt_len} tokens; expected max_length > "
                         f"the prompt's length (it counts the prompt, as in transformers), or max_new_tokens")
    return max_length - prompt_len


def hf_inferred_mask(lang_x, pad_token_id: int | None, stops: Sequence[int]) -> torch.Tensor | None:
    """The attention mask transformers' generate (4.57 and 5.x) makes when the call gives none: `lang_x !=
    pad_token_id` when the pad occurs in lang_x and is not a stop token, else None (every token real). Only left
    padding can be generated from: a pad after a row's first real token is an error naming attention_mask."""
    if pad_token_id is None or not isinstance(lang_x, torch.Tensor) or pad_token_id in stops:
        return None
    padding = lang_x == pad_token_id
    if not bool(padding.any()):
        return None
    mask = (~padding).long()
    holes = (mask[:, 1:] < mask[:, :-1]).any(dim=-1).nonzero().flatten().tolist()
    if holes:
        raise ValueError(f"attention_mask: None, and lang_x row {holes[0]} holds pad_token_id={pad_token_id} after a "
                         f"real token: transformers would infer a mask with a hole there; expected left padding only, "
                         f"or an explicit attention_mask")
    return mask


def hf_generate(runner, defaults: HFGenerateDefaults, vision_x, lang_x, attention_mask=None,
                image_attention_mask=None, /, *, max_new_tokens: int | None = None, max_length: int | None = None,
                eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
                generator=None, timer=None, return_logits: bool = False, use_cache: bool | None = None,
                generation_config=None, **hf_options):
    """A drop-in's generate call, Hugging Face's options -> GenerationOptions (search.generation_options, the
    one translation) -> `runner.generate_from_options(...)` (a FastFlamingo, or the reference Flamingo).

    `hf_options`: the options of HF_SUPPORTED (GenerationOptions' names, Hugging Face's defaults; None: not given),
    and the others Hugging Face takes that are accepted at their defaults only.

    Each option left at None takes the value the wrapped generate passes itself (`defaults.forced`), else the
    model's generation_config value, else Hugging Face's default (top_k 50 when sampling); the length follows
    hf_new_tokens. An unsupported generation_config entry is an error naming `defaults.where` unless the call
    passes that option's default; any other keyword is accepted only at its default (HF_DEFAULTS and
    `defaults.accepted`). Without attention_mask, the mask is inferred from the pad token as transformers infers
    it (hf_inferred_mask). Finished rows are filled as Hugging Face fills them: the call's pad, else the model's,
    else the first stop token; beam search with `pad_token_id or eos_token_id[0]`. use_cache (default: the
    generation_config's) changes how Hugging Face computes, and what only once OpenFlamingo's model generates
    `<image>`: flamingo_fast always caches, and with `openflamingo_generated_image_bug` it reproduces OpenFlamingo's
    cached generate, so an uncached call is an error there. The inputs are positional-only, so a
    keyword of the same name (e.g. image_attention_mask to a drop-in that takes none) is an unsupported option.
    A `generation_config` given to the call replaces the model's as transformers merges them (with_call_config)."""
    if generation_config is not None:
        defaults = with_call_config(defaults, generation_config)
    given = {k: hf_options.pop(k, None) for k in HF_SUPPORTED if k not in ("max_new_tokens", "max_length")}
    known = {**HF_DEFAULTS, **defaults.accepted}
    unsupported = {k: v for k, v in hf_options.items() if known.get(k, object()) != v}
    if unsupported:
        raise ValueError(f"generate options {sorted(unsupported)}: not supported by flamingo_fast; "
                         f"supported: {', '.join(HF_SUPPORTED)}, eos_token_id, pad_token_id")
    if use_cache is None:
        use_cache, cache_from = defaults.use_cache, f"{defaults.where}.use_cache"
    else:
        cache_from = "the call's use_cache"
    if not use_cache and getattr(runner.config, "openflamingo_generated_image_bug", False):
        raise ValueError(f"use_cache=False ({cache_from}) with openflamingo_generated_image_bug=True: the flag "
                         f"reproduces OpenFlamingo's cached generate; uncached, OpenFlamingo runs every step over "
                         f"the whole sequence, where a generated <image> opens its row's next image, which is not "
                         f"reproduced; expected use_cache=True")
    config = defaults.generation_config
    from_config = sorted(k for k in config if k not in HF_SUPPORTED and k not in hf_options)
    if from_config:
        shown = ", ".join(f"{k}={config[k]!r}" for k in from_config)
        raise ValueError(f"{defaults.where}: {shown} not supported by flamingo_fast; expected the defaults (pass "
                         f"them explicitly to override, e.g. repetition_penalty=1.0)")
    options = {k: v if v is not None else defaults.forced.get(k, config.get(k, HF_SUPPORTED[k]))
               for k, v in given.items()}
    if isinstance(lang_x, torch.Tensor) and lang_x.dim() == 2:  # else check_prompt names what is wrong
        options["max_new_tokens"] = hf_new_tokens(lang_x.shape[1], max_new_tokens, max_length, defaults)
    if not options["do_sample"]:
        options["top_k"] = 0  # Hugging Face's top_k 50 applies only when sampling
    if eos_token_id is None:
        eos_token_id = defaults.eos_token_id
    stops = stop_token_ids(eos_token_id, (), runner.config.lm.vocab_size) if eos_token_id is not None else ()
    if pad_token_id is None:
        pad_token_id = defaults.pad_token_id
    if pad_token_id is not None:
        pad_token_id = as_token_id(pad_token_id, "pad_token_id", runner.config.lm.vocab_size)
    hf_pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else None)  # transformers' pad
    fill = hf_pad if hf_pad is not None else 0
    if options["num_beams"] > 1 and not fill and stops:
        fill = stops[0]
    generation = generation_options(runner.config, eos_token_id=list(stops), pad_token_id=fill, **options)
    if attention_mask is None:
        attention_mask = hf_inferred_mask(lang_x, hf_pad, stops)
    return runner.generate_from_options(vision_x, lang_x, attention_mask, generation, generator=generator, timer=timer,
                                        return_logits=return_logits, image_attention_mask=image_attention_mask)


def generation_config_of(model) -> tuple[object | None, dict]:
    """A transformers model's (or LM's) `generation_config` and its `to_diff_dict()` (None and {} when it has
    none): the entries that differ from Hugging Face's defaults, as Hugging Face merges them into generate."""
    generation = getattr(model, "generation_config", None)
    if not hasattr(generation, "to_diff_dict"):
        return generation, {}
    # to_diff_dict writes the installed release as transformers_version; transformers reads the object's own
    return generation, {**generation.to_diff_dict(), "transformers_version": generation.transformers_version}


class Rope(NamedTuple):
    """A transformers config's rotary embedding: base and the fraction of each head's dims that is rotated."""

    theta: float
    partial_rotary_factor: float


def rope_of(hf: Mapping, where: str, *, theta_keys: Sequence[str] = ("rope_theta",),
            fraction_keys: Sequence[str] = (), default_fraction: float = 1.0,
            scaling_key: str | None = "rope_scaling") -> Rope:
    """A config (`config.to_dict()`, or config.json as a dict) -> its Rope, read the way the transformers that
    wrote it reads it; anything but plain RoPE is an error naming `where`, the key, its value and the expectation.

    transformers 5 keeps `rope_theta`, `partial_rotary_factor` and `rope_type` in one dict, `rope_parameters`;
    a key missing there falls back to the top-level keys (as 5.x's config classes fill it), then to the defaults.
    transformers 4.x has top-level keys, the first of `theta_keys` / `fraction_keys` present wins (GPT-NeoX:
    `rotary_emb_base` before `rope_theta`, `rotary_pct` before `partial_rotary_factor`: 4.57 writes both and its
    model reads the first), and scaling in `scaling_key` (`rope_scaling`: None, or a dict whose `rope_type`, or
    legacy `type`, is "default"). theta_keys=() and scaling_key=None: a 4.x model that reads neither (IDEFICS:
    base 10000 whatever its config says). fraction_keys=(): a model that rotates every dim and ignores
    partial_rotary_factor in either version (LLaMA, IDEFICS)."""

    def first(mapping: Mapping, keys: Sequence[str], default):
        return next((mapping[k] for k in keys if mapping.get(k) is not None), default)

    def rope_type(parameters: Mapping) -> str:
        return parameters.get("rope_type", parameters.get("type", "default"))

    parameters = hf.get("rope_parameters")
    scaling = hf.get(scaling_key) if scaling_key else None
    if scaling and rope_type(scaling) != "default":
        raise ValueError(f"{where}: {scaling_key}={dict(scaling)!r} is not supported; expected None (plain RoPE: "
                         f"flamingo_fast implements no RoPE scaling)")
    theta = float(first(hf, theta_keys, 10000.0))
    fraction = float(first(hf, fraction_keys, default_fraction))
    if not parameters:
        return Rope(theta, fraction)
    if not isinstance(parameters, Mapping) or any(isinstance(v, Mapping) for v in parameters.values()):
        raise ValueError(f"{where}: rope_parameters={parameters!r} is not supported; expected one dict with "
                         f"rope_type 'default' (not one per layer type)")
    if rope_type(parameters) != "default":
        raise ValueError(f"{where}: rope_parameters['rope_type']={rope_type(parameters)!r} is not supported "
                         f"(rope_parameters={dict(parameters)!r}); expected 'default' (plain RoPE: flamingo_fast "
                         f"implements no RoPE scaling)")
    return Rope(float(parameters.get("rope_theta", theta)),
                float(parameters.get("partial_rotary_factor", fraction)) if fraction_keys else fraction)


@dataclass
class FlamingoOutput:
    """What the drop-in's forward returns: OpenFlamingo's callers read `.logits`, and with use_cache
    `.past_key_values`: a handle to the runtime's state of the sequence (prefix_state.PrefixState), None without."""

    logits: torch.Tensor
    past_key_values: object | None = None
