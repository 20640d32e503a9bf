"""The profiler for Llama 3.2 Vision (transformers' MllamaForConditionalGeneration): the mllama-* presets.

    flamingo-fast profile --preset mllama-11b --device meta            # weight bytes, what fits; nothing runs
    flamingo-fast profile --preset mllama-small --shots 0,1,2,4,8 --impl hf,fast      # needs transformers

`profile_mllama` (the timed sweep): transformers' MllamaForConditionalGeneration built from the preset with random
weights (flamingo_fast.testing.build_mllama_from_config), its own `generate` as the baseline ("hf", timed by
baselines.TimedHFGenerate: "vision" is the vision tower + projector of the first forward, lapped by a hook on the
projector), and flamingo_fast.from_mllama over the same tensors ("fast": one row per --weights format; "vision" the
image cache's look-up and the new images' tower + projector, "media_kv" their cross-attention K/V). Images go
through transformers' MllamaImageProcessor (each a square of 2 x 2 tiles, so 4 tiles: the largest tiling), the
cross_attention_mask through processing_mllama's helpers on the ids, as bench/mllama_cpu.py builds them. Every call
decodes `new_tokens` tokens (min_new_tokens: random weights rarely stop). Per row, as the Flamingo profile
(report.ProfileRow; the first implementation is the baseline): ttft_ms cold (fast: its image cache cleared before
each timed call), ttft_warm_ms (fast: the same demonstrations again with a new query image and question, right
after, so only the demonstrations' images are cached), decode per token p50 / p90, speed-ups, the fraction of
greedy ids equal to the baseline's and the relative error of the last position's logits (one forward of each).

`count_mllama_weights` (`--device meta`): no model is built but the reference on the meta device (no memory, no
transformers): per batch and implementation row, the weight bytes of reference/mllama_sizes.py ("hf": the model in
the activation dtype; "fast" shares it, "fast-int8" computes with the int8 copy of the language model's Linears and
head), the caches a call allocates at the sweep's capacity (self-attention K/V of the longest prompt + new tokens,
the cross-attention K/V of its images), and how many 4-tile images' cross-attention K/V fit beside the weights on
each card (report.format_weights).

Prompt for k shots, per row: `<|begin_of_text|>` then k times `<|image|>` + caption, then the query `<|image|>` +
question; k shots use k + 1 images (prompts.mllama_prompt_length).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import torch
from torch import nn

from ..reference.mllama_config import MllamaConfig
from ..reference.mllama_sizes import (
    mllama_image_kv_bytes,
    mllama_self_kv_bytes,
    mllama_weight_bytes_by_dtype,
)
from ..runtime.fused_weights import bytes_by_dtype
from ..timing import PhaseTimer, ProgressBar
from .baselines import TimedHFGenerate
from .profile_options import ProfileOptions
from .profiler import PeakMemory, SweepEntry, measure_shots
from .prompts import mllama_prompt_length
from .report import ProfileResult, WeightRow, metadata

PROMPT = ("<|begin_of_text|> + shots x (<|image|> caption) + <|image|> question; shots + 1 images of "
          "max_num_tiles tiles")


def _variants(options: ProfileOptions) -> list[tuple[str, str | None]]:
    """(row label, weight format) per row: hf once, fast once per --weights format (fast, fast-bf16, fast-int8)."""
    rows = []
    for impl in options.impls:
        if impl == "fast":
            rows += [("fast" if w == "none" else f"fast-{w}", w) for w in options.weights]
        else:
            rows.append((impl, None))
    return rows


def capacity(options: ProfileOptions) -> tuple[int, int]:
    """(positions, images) per row of the sweep's largest call: the longest prompt + new tokens, shots + 1."""
    longest = mllama_prompt_length(max(options.shots), options.caption_tokens, options.question_tokens)
    return longest + options.new_tokens, max(options.shots) + 1


def count_mllama_weights(options: ProfileOptions) -> list[WeightRow]:
    """`--device meta` with an mllama-* preset: the module docstring's rows; nothing is allocated, nothing runs."""
    if torch.device(options.device).type != "meta" or not options.is_mllama:
        raise ValueError(f"device={options.device!r}, preset={options.preset!r}: count_mllama_weights counts an "
                         f"mllama-* preset on the meta device; expected device='meta' and such a preset")
    config, dtype = options.mllama_config, options.torch_dtype
    positions, images = capacity(options)
    image_kv = mllama_image_kv_bytes(config, dtype)
    own = mllama_weight_bytes_by_dtype(config, None, dtype)
    int8 = mllama_weight_bytes_by_dtype(config, "int8", dtype) if "int8" in options.weights else None
    rows = []
    for batch in options.batch:
        caches = batch * (mllama_self_kv_bytes(config, positions, dtype) + images * image_kv)
        for label, weights in _variants(options):
            held = int8 if weights == "int8" else own
            rows.append(WeightRow(label, batch, weights, dict(held), caches, positions, images,
                                  image_kv_bytes=image_kv))
    return rows


def weights_note(options: ProfileOptions) -> str:
    """What the Llama 3.2 Vision meta table's numbers are (report.format_weights prints it under the table)."""
    text = options.mllama_config.text
    note = ("weight bytes: reference/mllama_sizes.py, counted on the meta device (hf: every parameter in the "
            f"activation dtype, {options.dtype}; fast shares the same tensors; fast-int8: the language model's "
            "Linears and head as int8 with a float32 scale per output row, the rest unchanged). caches: what one "
            "call allocates at the capacity above, in both implementations: the self-attention K/V of "
            f"{text.num_layers - len(text.cross_attention_layers)} layers and each image's cross-attention K/V. "
            "GB left: a card's nominal memory minus weights and caches; activations, fast's image cache (1 GiB by "
            "default) and the CUDA context come on top.")
    if "int8" in options.weights:
        note += (" from_mllama(model, weights='int8') keeps the live model (its float weights) registered beside "
                 "its int8 copy, so today a process holds the bf16 row's bytes + the int8 matrices; the int8 row is "
                 "what the runtime computes with.")
    return note


def image_kv_note(options: ProfileOptions) -> str:
    config = options.mllama_config
    text, vision = config.text, config.vision
    per_layer = mllama_image_kv_bytes(config, options.torch_dtype) // len(text.cross_attention_layers)
    return (f"images: the cross-attention K/V of one image of {vision.max_num_tiles} tiles ({text.num_kv_heads} KV "
            f"heads x {text.head_dim} x {vision.tokens_per_image} vision tokens ({vision.max_num_tiles} x "
            f"{vision.num_patches}) x 2 (K and V) x {options.torch_dtype.itemsize} B = {per_layer / 2**20:.1f} MiB per "
            f"layer, {len(text.cross_attention_layers)} cross-attention layers); images beside the weights: the "
            f"card's nominal memory minus the weights, divided by that (no text K/V, no activations)")



# ----------------------------------------------------------------------------------------------------------
# The timed sweep (needs transformers)
# ----------------------------------------------------------------------------------------------------------


def hf_mllama_config(config: MllamaConfig):
    """transformers' MllamaConfig with the shapes of `config` (4.57 and 5.x take these spellings)."""
    import transformers

    v, t = config.vision, config.text
    vision = dict(image_size=v.image_size, patch_size=v.patch_size, max_num_tiles=v.max_num_tiles,
                  hidden_size=v.hidden_size, num_hidden_layers=v.num_layers, num_global_layers=v.num_global_layers,
                  attention_heads=v.num_heads, intermediate_size=v.intermediate_size,
                  intermediate_layers_indices=list(v.intermediate_layers),
                  supported_aspect_ratios=[list(r) for r in v.supported_aspect_ratios], norm_eps=v.norm_eps,
                  num_channels=v.num_channels, vision_output_dim=v.vision_output_dim)
    scaling = {"rope_type": "default"} if t.rope_scaling is None else dict(
        rope_type="llama3", factor=t.rope_scaling.factor, low_freq_factor=t.rope_scaling.low_freq_factor,
        high_freq_factor=t.rope_scaling.high_freq_factor,
        original_max_position_embeddings=t.rope_scaling.original_max_position_embeddings)
    text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, num_hidden_layers=t.num_layers,
                num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
                intermediate_size=t.intermediate_size, cross_attention_layers=list(t.cross_attention_layers),
                rope_theta=t.rope_theta, rope_scaling=scaling, rms_norm_eps=t.rms_norm_eps,
                max_position_embeddings=t.max_position_embeddings, bos_token_id=config.bos_token_id,
                eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id)
    return transformers.MllamaConfig(vision_config=vision, text_config=text, image_token_index=config.image_token_id)


def _transformers():
    """transformers, imported beside a CPU torch (compat) -> (its MllamaImageProcessor, the mask helpers)."""
    from ..compat import import_torchvision_if_installed

    import_torchvision_if_installed()
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    return MllamaImageProcessor, get_cross_attention_token_mask, convert_sparse_cross_attention_mask_to_dense


def build_inputs(config: MllamaConfig, shots: int, batch: int, caption_tokens: int, question_tokens: int,
                 seed: int, query: int, dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The processor's outputs for the module docstring's prompt: per row `shots` demonstrations (their images and
    captions drawn from (seed, shots, batch)) and a query (image and question drawn from `query` as well), each
    image a random square of 2 x 2 tiles. The same (seed, shots, batch) gives the same demonstrations for every
    `query`: the warm call's."""
    import numpy as np
    from PIL import Image

    processor_type, token_mask, dense_mask = _transformers()
    v = config.vision
    demos = np.random.default_rng([seed, shots, batch])
    queries = np.random.default_rng([seed, shots, batch, 1 + query])
    low = max(config.bos_token_id, config.eos_token_id, config.pad_token_id) + 1
    high = config.text.vocab_size

    def picture(rng) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (2 * v.image_size, 2 * v.image_size, 3), dtype=np.uint8))

    rows, pictures = [], []
    for _ in range(batch):
        ids = [config.bos_token_id]
        for _ in range(shots):
            ids += [config.image_token_id] + demos.integers(low, high, caption_tokens).tolist()
        ids += [config.image_token_id] + queries.integers(low, high, question_tokens).tolist()
        rows.append(ids)
        pictures.append([picture(demos) for _ in range(shots)] + [picture(queries)])
    processor = processor_type(size={"height": v.image_size, "width": v.image_size},
                               max_image_tiles=v.max_num_tiles)
    processed = processor(pictures, return_tensors="pt")
    input_ids = torch.tensor(rows)
    sparse = [token_mask(row, config.image_token_id) for row in rows]
    cross = dense_mask(sparse, processed["num_tiles"], v.max_num_tiles, input_ids.shape[1])
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  pixel_values=processed["pixel_values"].to(dtype),
                  aspect_ratio_ids=processed["aspect_ratio_ids"], aspect_ratio_mask=processed["aspect_ratio_mask"],
                  cross_attention_mask=torch.as_tensor(cross))
    return {name: value.to(device) for name, value in inputs.items()}


class HFMllama(TimedHFGenerate):
    """transformers' MllamaForConditionalGeneration.generate behind the profiler's phase timer."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        projector = next(m for name, m in model.named_modules() if name.endswith("multi_modal_projector"))
        projector.register_forward_hook(lambda *args: self._lap_vision())

    def generate(self, inputs: dict, new_tokens: int, timer: PhaseTimer | None = None,
                 num_beams: int = 1) -> torch.Tensor:
        return self._timed(lambda **options: self.model.generate(**inputs, max_new_tokens=new_tokens,
                                                                 num_beams=num_beams, do_sample=False, **options),
                           new_tokens, [], timer)

    @torch.no_grad()
    def last_logits(self, inputs: dict) -> torch.Tensor:
        return self.model(**inputs).logits[:, -1].float()

    def weight_bytes(self) -> dict[str, int]:
        return bytes_by_dtype(self.model)


class FastMllama:
    """flamingo_fast.from_mllama over the same model, behind the same call."""

    def __init__(self, model: nn.Module, backend: str, weights: str | None):
        from ..dropins.mllama import from_mllama

        self.runtime = from_mllama(model, backend=backend, weights=None if weights in (None, "none", "bf16")
                                   else weights)

    def generate(self, inputs: dict, new_tokens: int, timer: PhaseTimer | None = None,
                 num_beams: int = 1) -> torch.Tensor:
        return self.runtime.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                     num_beams=num_beams, do_sample=False, timer=timer)

    def last_logits(self, inputs: dict) -> torch.Tensor:
        return self.runtime(**inputs).logits[:, -1].float()

    def clear_context_cache(self) -> None:
        self.runtime.engine.clear_context_cache()

    def weight_bytes(self) -> dict[str, int]:
        """The tensors the runtime computes with (with int8: its quantized copy and the shared rest)."""
        return bytes_by_dtype(self.runtime.engine)


def sweep_entry(label: str, impl: HFMllama | FastMllama, weights: str | None, options: ProfileOptions) -> SweepEntry:
    """`impl` as profiler.measure_shots calls it: its warm TTFT (fast only) on the same demonstrations with a new
    query, the last position's logits from one forward."""
    def run(inputs: dict, new_tokens: int) -> tuple[torch.Tensor, PhaseTimer]:
        timer = PhaseTimer(device=options.device)
        return impl.generate(inputs, new_tokens, timer, options.num_beams), timer

    return SweepEntry(label, weights, run, impl.last_logits, lambda: sum(impl.weight_bytes().values()) / 2**20,
                      getattr(impl, "clear_context_cache", None))


def profile_mllama(options: ProfileOptions, progress: bool = True,
                   on_row: Callable[[ProfileResult], None] | None = None) -> ProfileResult:
    """The timed sweep (module docstring); `on_row(result)` after every finished row."""
    if torch.device(options.device).type == "meta" or not options.is_mllama:
        raise ValueError(f"device={options.device!r}, preset={options.preset!r}: the timed sweep runs an mllama-* "
                         f"preset on the CPU or CUDA; expected such a preset, and count_mllama_weights on meta")
    _transformers()  # beside a CPU torch, torchvision through compat first
    import transformers

    from ..testing import build_mllama_from_config

    config, device, dtype = options.mllama_config, options.device, options.torch_dtype
    result = ProfileResult(metadata(options))
    meta = result.metadata
    meta.update(prompt=PROMPT, transformers=transformers.__version__)
    setup_s = meta["setup_s"]
    started = time.perf_counter()
    on_gpu = torch.device(device).type == "cuda"  # built and drawn there: no float32 copy of an 11B on the host
    model = build_mllama_from_config(hf_mllama_config(config), seed=options.seed, dtype=dtype,
                                     device=device if on_gpu else None).to(device)
    setup_s["model"] = round(time.perf_counter() - started, 3)
    variants = _variants(options)
    bar = ProgressBar(len(options.batch) * len(options.shots) * len(variants) * (options.warmup + options.repeats),
                      enabled=progress)
    memory = PeakMemory(torch.device(device))
    for batch in options.batch:
        entries = []
        for label, weights in variants:
            started = time.perf_counter()
            impl = HFMllama(model) if label == "hf" else FastMllama(model, options.fast_backend, weights)
            entries.append(sweep_entry(label, impl, weights, options))
            setup_s[f"{label}_b{batch}"] = round(time.perf_counter() - started, 3)
        for shots in options.shots:
            build = functools.partial(build_inputs, config, shots, batch, options.caption_tokens,
                                      options.question_tokens, options.seed, dtype=dtype, device=device)
            inputs, warm_inputs = build(query=0), build(query=1)
            for _, row in measure_shots(entries, inputs, warm_inputs, batch, shots, inputs["input_ids"].shape[1],
                                        options, bar, memory):
                result.rows.append(row)
                if on_row is not None:
                    on_row(result)
        del entries
    return result
