"""Llama 3.2 Vision drop-in: a live transformers `MllamaForConditionalGeneration`, run by the Mllama runtime.

    runtime = flamingo_fast.from_mllama(model)                    # shares the model's tensors, copies nothing
    inputs = processor(images=images, text=prompts, return_tensors="pt")   # MllamaProcessor, unchanged
    ids = runtime.generate(**inputs, max_new_tokens=20)           # the call and output of model.generate
    logits = runtime(**inputs).logits                             # and of model(...)

The reference (reference/mllama.py) is built over the model's own tensors (MllamaReference.from_hf: either key
layout, the installed release's vision-tower convention), and runtime/mllama_runtime.py runs it. Mixed batches of
rows with and without images work from either release's processor, also the batch transformers 5's image processor
makes, which transformers' own forward refuses (runtime/mllama_inputs.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..modes import runtime_mode
from ..reference.mllama import MllamaReference
from ..runtime.mllama_inputs import MllamaImages
from ..runtime.mllama_int8 import holds_int8, int8_hf_reference
from ..runtime.mllama_runtime import MllamaRuntime
from ..validation import check_eval_mode
from .hf import FlamingoOutput, HFGenerateDefaults, generation_config_of, hf_generate, hf_generation_defaults
from .module import DropInModule

# Call keywords transformers' Mllama forward / generate take that the drop-in accepts only at their defaults.
ACCEPTED = {"position_ids": None, "inputs_embeds": None, "labels": None, "cross_attention_states": None,
            "past_key_values": None, "output_attentions": False, "output_hidden_states": False,
            "logits_to_keep": 0, "cache_position": None}


class MllamaDropIn(DropInModule):
    """The Mllama runtime behind MllamaForConditionalGeneration's call, as a `torch.nn.Module` over the live
    model's own tensors (module.py: `.to`, `.eval`, `state_dict`, DDP). Calls compute in the model's dtype, in and
    out of `torch.inference_mode()` and autocast regions (modes.py).

    generate(input_ids, attention_mask=None, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
             cross_attention_mask=None, max_new_tokens=None, max_length=None, num_beams=1, do_sample=False,
             temperature=1.0, top_k=50, top_p=1.0, eos_token_id=None, pad_token_id=None, min_new_tokens=0,
             length_penalty=1.0, early_stopping=False, num_return_sequences=1, generator=None)
    -> ids [B * num_return_sequences, T + new], prompt included, as transformers returns them. Generated tokens see
    what the prompt's last token sees. Options left at None take the model's generation_config value, else
    transformers' default (hf.hf_generate); sampling draws from `generator` (a torch.Generator; None: the global
    RNG). forward(...) -> `.logits` [B, T, vocab] float32."""

    def __init__(self, engine: MllamaRuntime, reference: MllamaReference, generation_config: Mapping | None,
                 eos_token_id, pad_token_id, model: nn.Module, max_positions: int | None):
        super().__init__(engine, reference, model)
        self.defaults = HFGenerateDefaults(hf_generation_defaults(generation_config), eos_token_id, pad_token_id,
                                           "model.generation_config", ACCEPTED, max_positions=max_positions,
                                           written_by=(generation_config or {}).get("transformers_version"))

    @runtime_mode
    def forward(self, input_ids, attention_mask=None, pixel_values=None, aspect_ratio_ids=None,
                aspect_ratio_mask=None, cross_attention_mask=None, **hf_options) -> FlamingoOutput:
        """transformers' forward arguments; the others it takes are accepted only at their defaults (ACCEPTED)."""
        unsupported = sorted(k for k, v in hf_options.items() if ACCEPTED.get(k, object()) != v)
        if unsupported:
            raise ValueError(f"forward options {unsupported}: not supported by flamingo_fast; expected input_ids, "
                             f"attention_mask, pixel_values, aspect_ratio_ids, aspect_ratio_mask, "
                             f"cross_attention_mask")
        images = MllamaImages.of(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        return FlamingoOutput(logits=self.engine.logits(input_ids, attention_mask, images).float())

    @runtime_mode
    def generate(self, input_ids, attention_mask=None, pixel_values=None, aspect_ratio_ids=None,
                 aspect_ratio_mask=None, cross_attention_mask=None, **options):
        """MllamaForConditionalGeneration.generate's call with Hugging Face's options (hf.hf_generate)."""
        images = MllamaImages.of(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        return hf_generate(self.engine, self.defaults, images, input_ids, attention_mask, None, **options)

    @runtime_mode
    def score(self, input_ids, attention_mask=None, pixel_values=None, aspect_ratio_ids=None, aspect_ratio_mask=None,
              cross_attention_mask=None, candidates: Sequence[Sequence[int]] = (), normalize_length: bool = False
              ) -> torch.Tensor:
        """[B, C] float32 log-likelihoods of the candidates (token-id lists) after every row; candidate tokens see
        what the last prompt token sees (MllamaRuntime.score)."""
        images = MllamaImages.of(pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        return self.engine.score(input_ids, attention_mask, images, candidates, normalize_length)


@runtime_mode
def from_mllama(model: nn.Module, backend: str = "auto", stop_check_interval: int | None = None,
                context_cache_bytes: int = 1 << 30, weights: str | None = None, batch_invariant: bool = False
                ) -> MllamaDropIn:
    """A transformers MllamaForConditionalGeneration (4.57 or 5.x; eval mode) -> the same model behind its own
    call, run by the Mllama runtime over its tensors (nothing copied). backend: "auto" (Triton on CUDA, else the
    torch twins), "torch" or "triton" (on the CPU with TRITON_INTERPRET=1). stop_check_interval: how many steps
    pass between the host's looks at whether every row stopped (default 1 on the CPU, 8 on CUDA).
    context_cache_bytes: the image cache's budget (each image's cross-attention K/V kept across calls, emptied when
    the weights change: runtime/mllama_media.py; 0 disables it). weights="int8": the language model's Linears and
    output head run as weight-only int8 from the runtime's own quantized copy (runtime/mllama_int8.py), which shares
    every other tensor with `model`; the drop-in still registers `model` (its float weights stay there). A model
    loaded with load_mllama_hf(..., weights="int8") is run over its own int8 modules (weights="int8" implied; nothing
    quantized again, no float copy; their matmul becomes the runtime backend's).
    batch_invariant=True: each row's tokens, logits and scores are bitwise those of the row processed and run alone,
    whatever shares its batch, its padding, the image cache, beams or score's passes (runtime/mllama_invariant.py)."""
    check_eval_mode(model)  # transformers' dropout would make its outputs differ from ours
    if holds_int8(model):
        if weights not in (None, "int8"):
            raise ValueError(f"weights={weights!r}: the model holds int8 layers (load_mllama_hf(..., weights='int8')); "
                             f"expected None or 'int8'")
        reference, weights = int8_hf_reference(model), "int8"
    else:
        reference = MllamaReference.from_hf(model)
    runtime = MllamaRuntime(reference, backend=backend, stop_check_interval=stop_check_interval,
                            context_cache_bytes=context_cache_bytes, weights=weights, batch_invariant=batch_invariant)
    generation, defaults = generation_config_of(model)
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config.text_config
    source = generation if generation is not None else text
    return MllamaDropIn(runtime, reference, defaults, source.eos_token_id, source.pad_token_id, model,
                        getattr(text, "max_position_embeddings", None))
