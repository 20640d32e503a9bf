"""FastFlamingo: the reference's parameters, executed the fast way.

    fast = FastFlamingo.from_reference(model)          # shares the parameters; backend "auto"
    out = fast.generate(vision_x, lang_x, attention_mask, max_new_tokens=20)   # same tokens as the reference

One prompt, in order (and where each phase lives):
    0. which image each token sees (masking.PromptImages, counted once with the input checks:
       validation.check_prompt): from `<image>` tokens (OpenFlamingo layout) or from the processor's
       image_attention_mask (IDEFICS layout).
    1. vision: only the images some token of a row sees are encoded, all rows' as one batch (images already in
       the context cache are not); resampled by the kernel-backed perceiver (prefill.py, layers.py).
    2. media K/V: every cross-attention layer's keys/values of all images, once (MediaKVCache; prefill.py).
    3. prefill: the prompt through the LM (segment-indexed cross-attention kernel, SDPA self-attention), its
       keys/values written into the StaticKVCache; logits only for the last position (prefill.py; which contexts
       the context cache serves: context_cache.plan_contexts).
    4. decode: one static-shape step per token: embed -> per layer (fused gated cross-attention reading
       only each row's current image, then the decoder layer) -> final norm -> output head (decode.py: a function
       of the caches and the layer wiring). On CUDA the step is captured as a CUDA graph per (batch bucket,
       KV-length bucket) and replayed (graphs.py); on the CPU the same function runs eagerly. Token selection and
       stop bookkeeping stay on the device (generation/search.py); the host looks at `finished` only every
       `stop_check_interval` steps, and the output is trimmed to what the reference would return.

Prefill and decode share one layer loop (layers.LayerStack). Each LM family (LLaMA, MPT, GPT-NeoX) supplies
a small `DecoderLayerOps` (layers.py): its norms, its q/k/v projection, and what follows the self-attention.
Every residual add is fused with the norm that reads its result (the post-attention norm, the next gated block's
attention norm, the next layer's input norm or the final norm), so no norm costs a pass of its own. Gated blocks
and perceivers of both layouts are read by role (FastGatedCrossAttention, FastPerceiverResampler). Self-attention
is shared: SDPA over the static KV cache, with a boolean mask (rotary models) or an additive ALiBi bias (MPT). The
Triton decode step instead (decode.DECODE_PATHS, each switchable back for measurements) rotates q/k and writes the
new K/V in one kernel per layer, attends with a split-KV kernel over each row's valid cache columns (no mask;
beams: prompt and tail merged by log-sum-exp), and LLaMA's q/k/v and gate/up run as one GEMM each over fused
weights.

This module: FastFlamingo (construction, capacity, the public entry points, the lock). FastDecoder, the search
interface over its caches, is in decode.py.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .. import masking
from ..generation.scoring import check_candidates, hypotheses_per_row, hypothesis_bytes, score_candidates
from ..generation.search import GenerationOptions, KeywordGenerate, generate_ids
from ..modes import runtime_mode
from ..timing import PhaseTimer
from ..validation import check_generate_options, check_model, check_prompt
from . import invariant, prefix_state
from .caches import MediaKVCache, StaticKVCache, TailKVCache
from .capacity import CallLimits, check_capacity, prompt_images
from .context_cache import CacheStats, ContextCache
from .decode import DecodeState, FastDecoder, decode_step
from .fused_weights import bytes_by_dtype
from .graphs import DecodeGraphs, DecodeInputs
from .layers import FastPerceiverResampler, LayerStack, kernel_ops
from .model_copy import model_for_runtime
from .options import RuntimeOptions
from .prefill import PrefillState, prefill_prompt
from .prefix_state import MediaSession, PrefixState, StagedChain
from .quantize import bind_int8_linears
from .weight_watch import WeightWatch

if TYPE_CHECKING:
    from ..reference.model import Flamingo


class FastFlamingo(KeywordGenerate):
    """Cached, kernel-backed Flamingo inference over a reference model's parameters.

    Holds one set of caches (StaticKVCache, MediaKVCache; TailKVCache from the first beam search on) sized at
    construction and reused by every call; calls are independent (each prompt overwrites what it reads). One
    call runs at a time per instance: concurrent calls from several threads wait for each other on a lock.
    Prefill is prefill.prefill_prompt over `prefill_state`, the decode step decode.decode_step over
    `decode_state` (each: the caches and the layer wiring `stack` it reads). Every entry point runs under
    modes.runtime_mode: it computes in the construction dtype inside any autocast region (build with
    dtype=torch.bfloat16 for bf16), and caches allocated inside `torch.inference_mode()` serve calls outside it
    and the other way round. The reference model's tensors must stay where they were at construction; the
    drop-ins (dropins/module.py) rebuild their FastFlamingo after `.to`. batch_invariant: invariant.py."""

    @runtime_mode
    def __init__(self, model: Flamingo, *, options: RuntimeOptions | None = None, **keywords):
        """`options` (RuntimeOptions), or its fields as keywords (options.py); kept as given in `self.options`
        ("auto", None), so that a drop-in rebuilt after `.to` resolves them again."""
        if options is not None and keywords:
            raise ValueError(f"options and {sorted(keywords)}: expected a RuntimeOptions or its fields as keywords, "
                             f"not both")
        self.options = options = RuntimeOptions(**keywords) if options is None else options
        config = model.config
        check_model(model)
        param = model.lang_encoder.embed_tokens.weight  # never quantized (an int8 output head is not the dtype)
        self.device, self.dtype = param.device, param.dtype
        resolved = options.resolve(config, self.device)
        backend, max_batch_size, max_seq_len = resolved.backend, resolved.max_batch_size, resolved.max_seq_len
        max_hypotheses = resolved.max_hypotheses
        self.model, self.config, self.backend = model, config, backend
        self.stop_check_interval = resolved.stop_check_interval
        self.pre_image_bug = config.openflamingo_pre_image_bug and not config.only_attend_immediate_media
        self.ops = kernel_ops(backend)
        bind_int8_linears(model, self.ops.int8_linear)  # a model from from_reference(weights="int8")
        self.perceiver = FastPerceiverResampler(model.perceiver, self.ops, config.perceiver.dim_head)
        self.decode_paths = resolved.decode_paths
        fuse = "fused_projections" in self.decode_paths
        self.stack = LayerStack(model, self.ops, fuse)
        if fuse and config.lm.family == "llama" and not self.stack.fused_projections:  # a weight held elsewhere
            self.decode_paths = self.decode_paths - {"fused_projections"}
        self.kv_cache = StaticKVCache.allocate(config, max_batch_size, max_seq_len, self.dtype, self.device)
        self.media_cache = MediaKVCache.allocate(config, max_batch_size, resolved.max_images, self.dtype, self.device)
        self.max_hypotheses, self.max_tail_len = max_hypotheses, resolved.max_tail_len
        self.tail_cache: TailKVCache | None = None  # allocated by the first beam search, then kept (graphs read it)
        self.staged_prefix = StagedChain()  # which past_key_values chain the caches hold (prefix_state.py)
        self.decode_state = DecodeState(self.stack, self.kv_cache, self.media_cache, None, self.decode_paths,
                                        image_per_hypothesis=config.openflamingo_generated_image_bug)
        self.context_cache = ContextCache(resolved.context_cache_bytes)
        self.prefill_state = PrefillState(config, model.vision_encoder, self.perceiver, self.stack, self.kv_cache,
                                          self.media_cache, self.context_cache, self.dtype, self.device,
                                          self.pre_image_bug, resolved.batch_invariant)
        self.score_bytes = resolved.score_bytes
        self.limits = CallLimits(self.kv_cache.max_batch_size, self.kv_cache.max_seq_len, max_hypotheses,
                                 self.max_tail_len, self.media_cache.max_images, self.pre_image_bug, config.layout)
        self.lock = threading.Lock()
        use_graphs = resolved.cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(decode_step, max_batch_size, max_seq_len, self.device,
                                   max_hypotheses=max_hypotheses) if use_graphs else None
        self.weight_watch = WeightWatch(model)  # after fusing: what every call compares the weights with

    @classmethod
    @runtime_mode
    def from_reference(cls, model: Flamingo, backend: str = "auto", dtype: torch.dtype | None = None,
                       weights: str | None = None, device: torch.device | str | None = None,
                       **options) -> FastFlamingo:
        """Share `model`'s parameters (no copy). With a different `dtype` (float32, float16 or bfloat16) or
        `device`, a converted copy is made, block by block (model_copy.py), and the reference keeps its own.
        `model` must be in eval mode (it is checked, never changed). With the "fused_projections" decode path
        (LLaMA), the model's q/k/v_proj and gate/up_proj weights become views of one fused tensor per layer: same
        Parameter objects, same values, no extra memory (fused_weights.py). Options: RuntimeOptions' fields
        (options.py: the caches' sizes, cuda_graphs, decode_paths, score_bytes, batch_invariant, ...).

        weights: None or "bf16" (the weights stay in the activation dtype, as above) or "int8": symmetric int8
        with one scale per output row (quantize.py) for the LM's linear layers (LLaMA: q/k/v and gate/up
        quantized as the fused matrices), the gated cross-attention blocks' projections and the output head;
        the vision encoder, the perceiver, norms, gates and embeddings stay in the activation dtype (`dtype`, or
        the model's). With "int8" the runtime always works from its own copy, converted and quantized block by
        block: the target device never holds more than the finished part of the copy plus one decoder layer (or
        gated block) in the activation dtype, e.g. `from_reference(model_on_cpu, device="cuda", weights="int8")`.
        The runtime holds only the int8 weights and their float32 scales for what it quantized; `model` keeps its
        own float weights, untouched (tensors already in the activation dtype on the target device that stay
        unquantized are shared with it): free them (`del model`) if only the runtime is needed. A model that
        already holds int8 layers (the runtime's own `model`) is used as it is. `weight_bytes()` counts what the
        runtime holds. A tied output head (MPT) is quantized, and the embedding keeps its float table for the
        token lookup."""
        model = model_for_runtime(model, dtype, weights, device)
        return cls(model, backend=backend, **options)

    def weight_bytes(self) -> dict[str, int]:
        """The bytes of the weights (parameters and buffers of the model this runtime executes: int8 weights and
        their scales included) by dtype name, e.g. {"int8": ..., "float32": ..., "bfloat16": ...}; a tensor held
        under several names (tied embeddings, views of one fused matrix) is counted once, by its storage."""
        return bytes_by_dtype(self.model)

    # ------------------------------------------------------------------------------------------ public API

    @runtime_mode
    def forward(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits [B, T, vocab], like the reference's forward."""
        with self.lock:
            self._check_weights()
            attention_mask, prompt = check_prompt(self.config, vision_x, lang_x, attention_mask, image_attention_mask)
            prompt = self.prompt_images(vision_x, lang_x, image_attention_mask, prompt)
            self.check_capacity(lang_x, prompt, None)
            if self.options.batch_invariant:  # every row alone (invariant.py), and so in every entry point
                return invariant.forward(self, vision_x, lang_x, attention_mask, image_attention_mask)
            return prefill_prompt(self.prefill_state, vision_x, lang_x.long(), attention_mask, prompt, all_logits=True)

    __call__ = forward

    @runtime_mode
    def forward_with_state(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor,
                           attention_mask: torch.Tensor | None = None, past: PrefixState | None = None,
                           session: MediaSession | None = None) -> tuple[torch.Tensor, PrefixState]:
        """forward that keeps the sequence's state -> (logits [B, T, vocab], a handle: prefix_state.PrefixState).
        With `past` (a handle), lang_x holds only the new tokens [B, n]: they run over past's stored sequence,
        which stays unchanged, and see the prompt's last image; vision_x must be None. `session`: the drop-in's
        cached media the prompt was run with (its handles go stale when they are released)."""
        if past is not None and vision_x is not None:
            raise ValueError("vision_x: expected None with past_key_values (the handle holds its prompt's images)")
        with self.lock:
            self._check_weights()
            return prefix_state.forward_with_state(self, vision_x, lang_x, attention_mask, past, session)

    @runtime_mode
    def generate_from_options(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor,
                              attention_mask: torch.Tensor | None, options: GenerationOptions, *,
                              generator: torch.Generator | None = None, timer: PhaseTimer | None = None,
                              return_logits: bool = False, image_attention_mask: torch.Tensor | None = None,
                              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`generate` with its options already checked (GenerationOptions, built once by the caller): checks the
        inputs against them and this instance's capacity, then runs the search."""
        config = self.config
        with self.lock:
            self._check_weights()
            attention_mask, prompt = check_prompt(config, vision_x, lang_x, attention_mask, image_attention_mask)
            check_generate_options(config, lang_x, attention_mask, options.max_new_tokens, options.min_new_tokens)
            prompt = self.prompt_images(vision_x, lang_x, image_attention_mask, prompt)
            self.check_capacity(lang_x, prompt, options.max_new_tokens, options)
            if self.options.batch_invariant:
                return invariant.generate(self, vision_x, lang_x, attention_mask, image_attention_mask, options,
                                          generator, timer, return_logits)
            lang_x = lang_x.long()
            return generate_ids(lambda: self.prefill(vision_x, lang_x, attention_mask, prompt, timer), lang_x,
                                options, config.lm.vocab_size, generator=generator, timer=timer,
                                return_logits=return_logits, stop_check_interval=self.stop_check_interval)

    @runtime_mode
    def score(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
              candidates: Sequence[Sequence[int]] = (), normalize_length: bool = False,
              progress: bool | None = None, image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood of every candidate continuation after every row -> [B, C] float32 (generation/scoring.py).
        Each row's prompt is prefilled once; the candidates run as a trie, all rows at once, their hypotheses
        sharing the row's prompt KV and media K/V. A pass holds as many hypotheses per row as `score_bytes` (default
        scoring.DEFAULT_SCORE_BYTES = 512 MiB) holds (scoring.hypothesis_bytes each: its tail, its logits), at most
        the trie's widest level (batch_invariant: one). The tail cache is allocated for the call and freed after
        it; max_hypotheses and max_tail_len do not apply. A budget too small for one hypothesis per row is an
        error naming score_bytes."""
        with self.lock:
            self._check_weights()
            attention_mask, prompt = check_prompt(self.config, vision_x, lang_x, attention_mask, image_attention_mask)
            tokens = check_candidates(candidates, self.config.lm.vocab_size, self.config.media_token_id)
            longest = max(len(t) for t in tokens)
            check_generate_options(self.config, lang_x, attention_mask, longest)  # left padding, max positions
            prompt = self.prompt_images(vision_x, lang_x, image_attention_mask, prompt)
            self.check_capacity(lang_x, prompt, None)
            if self.options.batch_invariant:
                return invariant.score(self, vision_x, lang_x, attention_mask, image_attention_mask, tokens,
                                       normalize_length, progress)
            rows = lang_x.shape[0]
            per_row = hypotheses_per_row(tokens, rows, self.score_bytes,
                                         hypothesis_bytes(self.config, self.dtype, longest - 1))
            lang_x = lang_x.long()
            first_logits = prefill_prompt(self.prefill_state, vision_x, lang_x, attention_mask, prompt).float()
            # this call's tails, never the beams' cache (which CUDA graphs read); no graphs: the hypothesis count
            # changes level by level, and eager beats a capture per shape
            tail = TailKVCache.allocate(self.config, rows * per_row, longest - 1, self.dtype, self.device) \
                if per_row else None
            decoder = self.decoder(lang_x, attention_mask, prompt, graphs=False, tail=tail)
            return score_candidates(decoder, first_logits, tokens, max(per_row, 1), normalize_length, progress)

    @runtime_mode
    def prefill(self, vision_x, lang_x, attention_mask, prompt: masking.PromptImages,
                timer: PhaseTimer | None = None) -> tuple[FastDecoder, torch.Tensor]:
        """Encode the images each row uses, prefill the prompts -> (decoder over the cached prompts, float32
        logits [B, vocab] of each row's last token). Inputs already checked; call under the lock."""
        logits = prefill_prompt(self.prefill_state, vision_x, lang_x, attention_mask, prompt, timer)
        return self.decoder(lang_x, attention_mask, prompt), logits.float()

    def decoder(self, lang_x, attention_mask, prompt: masking.PromptImages, graphs: bool = True,
                tail: TailKVCache | None = None) -> FastDecoder:
        """The search interface over the prompts just prefilled into the caches. `graphs` False: its steps run
        eagerly; `tail`: its tail cache for this call (None: the beams', allocated on the first shared fork)."""
        return FastDecoder.over_prompt(self, lang_x, attention_mask, prompt, self.pre_image_bug, graphs, tail)

    def context_cache_stats(self) -> CacheStats:
        """A copy of the context cache's counters: hits and misses (contexts, images), evictions, bytes held
        (never more than `budget`), entries."""
        with self.lock:
            return dataclasses.replace(self.context_cache.stats)

    def stale_after_move(self) -> bool:
        """Whether a replaced weight storage (weight_watch.py: "moved") leaves this runtime over the old ones: its
        fused LLaMA projections or CUDA graphs hold them, or a dtype or device changed. Else it reads the new ones."""
        return bool(self.stack.fused_projections) or self.graphs is not None or self.weight_watch.kinds_changed()

    def _check_weights(self) -> None:
        """At every entry point, under the lock: WeightWatch.settle with this runtime's context cache."""
        self.weight_watch.settle(self.stale_after_move, self.context_cache.clear)

    def clear_context_cache(self) -> None:
        with self.lock:
            self.context_cache.clear()

    @property
    def capture_seconds(self) -> float:
        """Wall time spent warming up and capturing CUDA graphs so far (0 without graphs)."""
        return self.graphs.capture_seconds if self.graphs is not None else 0.0

    # ------------------------------------------------------------------------------------------ phases

    def prompt_images(self, vision_x, lang_x, image_attention_mask,
                      prompt: masking.PromptImages | None = None) -> masking.PromptImages:
        """Which image each token sees and which images are encoded (capacity.prompt_images)."""
        return prompt_images(self.config, self.pre_image_bug, vision_x, lang_x, image_attention_mask, prompt)

    def check_capacity(self, lang_x, prompt: masking.PromptImages, max_new_tokens: int | None,
                       options: GenerationOptions | None = None) -> None:
        """Whether a call fits this instance's caches (capacity.check_capacity); max_new_tokens None: a forward
        call, which generates nothing."""
        check_capacity(self.limits, lang_x, prompt, max_new_tokens, options)

    def run_decode_step(self, inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool,
                        graphs: bool = True, tail: TailKVCache | None = None) -> torch.Tensor:
        """decode.decode_step over this instance's state: replayed as a CUDA graph when there are graphs. `tail`: a
        tail cache other than the instance's (score's, for one call: always eager)."""
        if tail is not None and tail is not self.tail_cache:
            return decode_step(dataclasses.replace(self.decode_state, tail=tail), inputs, kv_len, per_row, tails)
        if self.graphs is not None and graphs:
            return self.graphs.run(self.decode_state, inputs, kv_len, per_row, tails)
        return decode_step(self.decode_state, inputs, kv_len, per_row, tails)

    def beam_tail_cache(self) -> TailKVCache:
        """Allocated once, on the first beam search, and never replaced (captured graphs read it)."""
        if self.tail_cache is None:
            self.tail_cache = TailKVCache.allocate(self.config, self.max_hypotheses, self.max_tail_len, self.dtype,
                                                   self.device)
            self.decode_state = dataclasses.replace(self.decode_state, tail=self.tail_cache)
        return self.tail_cache

