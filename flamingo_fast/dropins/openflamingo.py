"""OpenFlamingo drop-in: convert a live `open_flamingo` model, or load its released files, into a FastFlamingo.

    fast = flamingo_fast.from_openflamingo(model)                 # shares the model's tensors, copies nothing
    fast = flamingo_fast.load_openflamingo("checkpoint.pt", "mpt-7b/", "open_clip_model.safetensors",
                                           eoc_token_id=50277, media_token_id=50278)
    out = fast.generate(vision_x, lang_x, attention_mask=mask, max_new_tokens=20)   # OpenFlamingo's call

The config reader is openflamingo_config.py, the state-dict map (OpenFlamingo's weight names -> the
reference's) openflamingo_state_dict.py.

Positions. Hugging Face computes positions from the attention mask only when the model's forward takes
`position_ids`; OpenFlamingo's FlamingoLMMixin.forward does not, so under OpenFlamingo a left-padded row's
positions count its padding. flamingo_fast uses `cumsum(mask) - 1`. Rotary embeddings and ALiBi depend only
on differences of positions within a row, so the two agree up to rounding.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import FlamingoConfig, VisionConfig
from ..modes import runtime_mode
from ..reference.model import Flamingo, build_reference_from_state
from ..runtime.model_copy import converted_copy
from ..runtime.prefix_state import MediaSession
from ..runtime.quantize import check_weights
from ..validation import check_prompt
from .hf import FlamingoOutput, HFGenerateDefaults, generation_config_of, hf_generate, hf_generation_defaults
from .module import DropInModule
from .openflamingo_config import (
    MODEL_TYPES,
    config_from_openflamingo,
    every_n,
    lm_config_from_hf,
    open_clip_vision_heads,
    perceiver_config,
    supported_model_types,
    vision_config_from_weights,
)
from .openflamingo_state_dict import canonical_state_dict, to_reference_state_dict, with_weight_shapes
from .weights_files import common_dtype, load_tensors, read_json

# ----------------------------------------------------------------------------------------------------------
# The drop-in
# ----------------------------------------------------------------------------------------------------------


class OpenFlamingoRuntime(DropInModule):
    """A FastFlamingo behind OpenFlamingo's `generate` call (and `forward` for logits), as a `torch.nn.Module`
    over the live model's own tensors (module.py: `.to`, `.eval`, `state_dict`, DDP). Every call computes in the
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
                                           use_cache=bool((generation_config or {}).get("use_cache", True)),
                                           written_by=(generation_config or {}).get("transformers_version"))

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
    conversion (dropins/module.py).
    `batch_invariant=True` (a runtime option too): every row computed alone (runtime/invariant.py)."""
    from ..runtime.runtime import FastFlamingo

    config, layout = config_from_openflamingo(model, pad_token_id)
    config = config.replace(openflamingo_generated_image_bug=openflamingo_generated_image_bug)
    state = canonical_state_dict(_output_head_by_role(model), layout)
    config = with_weight_shapes(config, state)
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
                         f"expected one of {supported_model_types()}")
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
        heads = open_clip_vision_heads(Path(vision_path))
        vision = vision_config_from_weights(canonical, heads, "quick_gelu", 1e-5)
    eos = hf.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    pad = pad_token_id if pad_token_id is not None else hf.get("pad_token_id")
    config = FlamingoConfig(
        vision=vision, perceiver=perceiver_config(canonical), lm=lm,
        cross_attn_every_n_layers=every_n(gated, lm.num_layers),
        xattn_heads=8, xattn_dim_head=gated_q.shape[0] // 8 if gated_q is not None else 64,
        xattn_ff_mult=canonical[f"lang_encoder.gated_cross_attn_layers.{gated[0]}.ff.1.weight"].shape[0]
        // lm.hidden_size,
        only_attend_immediate_media=only_attend_immediate_media,
        openflamingo_pre_image_bug=not only_attend_immediate_media,
        openflamingo_generated_image_bug=openflamingo_generated_image_bug,
        bos_token_id=hf.get("bos_token_id") or 0, eos_token_id=eos or 0, eoc_token_id=eoc_token_id,
        media_token_id=media_token_id, pad_token_id=(eos or 0) if pad is None else pad,
    )
    config = with_weight_shapes(config, canonical)
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
