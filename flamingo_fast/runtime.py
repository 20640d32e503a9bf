"""FastFlamingo: the reference's parameters, executed the fast way.

    fast = FastFlamingo.from_reference(model)          # shares the parameters; backend "auto"
    out = fast.generate(vision_x, lang_x, attention_mask, max_new_tokens=20)   # same tokens as the reference

One prompt, in order:
    0. which image each token sees (masking.PromptImages): from `<image>` tokens (OpenFlamingo layout) or from
       the processor's image_attention_mask (IDEFICS layout).
    1. vision: only the images some token of a row sees are encoded, all rows' as one batch (images already in
       the context cache are not); resampled by the kernel-backed perceiver.
    2. media K/V: every cross-attention layer's keys/values of all images, once (MediaKVCache).
    3. prefill: the prompt through the LM (segment-indexed cross-attention kernel, SDPA self-attention), its
       keys/values written into the StaticKVCache; logits only for the last position.
    4. decode: one static-shape step per token: embed -> per layer (fused gated cross-attention reading
       only each row's current image, then the decoder layer) -> final norm -> output head. On CUDA the step
       is captured as a CUDA graph per (batch bucket, KV-length bucket) and replayed; on the CPU the same
       function runs eagerly. Token selection and stop bookkeeping stay on the device; the host looks at
       `finished` only every `stop_check_interval` steps, and the output is trimmed to what the reference
       would return.

Prefill and decode share one layer loop (`_layers`). Each LM family (LLaMA, MPT, GPT-NeoX) supplies a small
`DecoderLayerOps`: its norms, its q/k/v projection, and what follows the self-attention. Every residual add
is fused with the norm that reads its result (the post-attention norm, the next gated block's attention norm,
the next layer's input norm or the final norm), so no norm costs a pass of its own. Gated blocks and perceivers
of both layouts are read by role (FastGatedCrossAttention, FastPerceiverResampler). Self-attention is shared: SDPA
over the static KV cache, with a boolean mask (rotary models) or an additive ALiBi bias (MPT). The Triton decode
step instead (DECODE_PATHS, each switchable back for measurements) rotates q/k and writes the new K/V in one
kernel per layer, attends with a split-KV kernel over each row's valid cache columns (no mask; beams: prompt and
tail merged by log-sum-exp), and LLaMA's q/k/v and gate/up run as one GEMM each over fused weights.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import masking
from .attention import merge_attention_states, shared_prefix_attention
from .caches import MediaKVCache, StaticKVCache, TailKVCache
from .context_cache import CacheStats, ContextCache, image_digests
from .fast_modules import FastGatedCrossAttention, FastPerceiverResampler, NormSpec, kernel_ops
from .fused_weights import fuse_linear_weights
from .graphs import DecodeGraphs, DecodeInputs
from .kernels import masked_cross_attention as _xattn_kernel
from .kernels import perceiver_attention as _perceiver_kernel
from .reference import (
    Flamingo,
    alibi_attention_bias,
    alibi_slopes,
    apply_rotary,
    rotary_cos_sin,
    self_attention_mask,
)
from .scoring import check_candidates, score_candidates
from .search import GenerationOptions, generate_ids, generation_options
from .timing import PhaseTimer
from .validation import check_dtype, check_eval_mode, check_generate_options, check_inputs, check_model


def check_backend(config, backend: str) -> None:
    """The Triton kernels' shape limits, checked when the runtime is built rather than at the first call. The
    perceiver kernel's head dims are a floor, not a list: smaller ones are zero-padded (FastPerceiverResampler)."""
    if backend != "triton":
        return
    supported = _xattn_kernel.SUPPORTED_HEAD_DIMS
    if config.xattn_dim_head not in supported:
        raise ValueError(f"config.xattn_dim_head={config.xattn_dim_head}: the Triton kernels support head dims "
                         f"{supported}; expected one of them, or backend='torch'")
    largest = max(_perceiver_kernel.SUPPORTED_HEAD_DIMS)
    if config.perceiver.dim_head > largest:
        raise ValueError(f"config.perceiver.dim_head={config.perceiver.dim_head}: the Triton perceiver kernel takes "
                         f"head dims up to {largest}; expected at most that, or backend='torch'")


def _converted(model: Flamingo, dtype: torch.dtype) -> Flamingo:
    """A copy of `model` in `dtype`, converted tensor by tensor into a skeleton built on the meta device: the
    peak is the converted copy (+1x), never a full copy before converting. Tied tensors stay tied."""
    with torch.device("meta"):
        copy = Flamingo(model.config)
    converted: dict[int, torch.Tensor] = {}
    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in converted:
            new = tensor.detach().to(dtype) if tensor.is_floating_point() else tensor.detach().clone()
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            converted[id(tensor)] = new
        state[name] = converted[id(tensor)]
    copy.load_state_dict(state, strict=True, assign=True)
    return copy.eval()


# ----------------------------------------------------------------------------------------------------------
# The per-family piece of a decoder layer
# ----------------------------------------------------------------------------------------------------------


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads * hd] -> [B, heads, T, hd]."""
    b, n, _ = t.shape
    return t.view(b, n, heads, -1).transpose(1, 2)


def _rotated(q, k, v, rope):
    """rope None: q, k unrotated (the decode step's fused rotary + cache-write kernel rotates them)."""
    return (q, k, v) if rope is None else (apply_rotary(q, *rope), apply_rotary(k, *rope), v)


def _llama_qkv(layer, h, rope):
    attn = layer.self_attn
    q = _split_heads(attn.q_proj(h), attn.num_heads)
    k = _split_heads(attn.k_proj(h), attn.num_kv_heads)
    return _rotated(q, k, _split_heads(attn.v_proj(h), attn.num_kv_heads), rope)


def _neox_qkv(layer, h, rope):
    """The reference's project (rope None: q, k unrotated, for the fused rotary + cache-write kernel)."""
    attn = layer.attention
    if rope is not None:
        return attn.project(h, rope)
    b, t, _ = h.shape
    return attn.query_key_value(h).view(b, t, attn.num_heads, 3 * attn.head_dim).transpose(1, 2).chunk(3, dim=-1)


# `finish(layer, x, attn_out, add_norm, post_norm, next_norm) -> (x, next_norm(x))`: everything after the
# self-attention. Every residual add goes through `add_norm(x, y, spec) -> (x + y, spec's norm of it)`, one
# fused kernel, so the norm that follows an add (the layer's own post-attention norm, then whatever reads the
# layer's output: the next gated block, the next layer or the final norm) costs no extra pass.


def _llama_finish(layer, x, attn_out, add_norm, post_norm, next_norm):
    x, h = add_norm(x, layer.self_attn.o_proj(attn_out), post_norm)
    return add_norm(x, layer.mlp(h), next_norm)


def _mpt_finish(layer, x, attn_out, add_norm, post_norm, next_norm):
    x, h = add_norm(x, layer.attn.out_proj(attn_out), post_norm)
    return add_norm(x, layer.ffn(h), next_norm)


def _neox_finish(layer, x, attn_out, add_norm, post_norm, next_norm):
    attn = layer.attention.dense(attn_out)
    if layer.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x)): ln2 reads the layer's input
        return add_norm(x, attn + layer.mlp(layer.post_attention_layernorm(x)), next_norm)
    x, h = add_norm(x, attn, post_norm)
    return add_norm(x, layer.mlp(h), next_norm)


@dataclass(frozen=True)
class DecoderLayerOps:
    """One LM family's decoder layer, split around its self-attention:

    input_norm(layer) -> the norm module applied to the layer's input (fused into whatever add precedes it)
    post_norm(layer) -> the norm between the attention residual and the MLP (fused into that residual add)
    qkv(layer, h, rope) -> q, k, v [B, H, T, hd] from the normalised input, rotary applied (rope None for ALiBi)
    finish(layer, x, attn_out, add_norm, post_norm, next_norm) -> (the layer's output, next_norm of it)
    """

    input_norm: Callable
    post_norm: Callable
    qkv: Callable
    finish: Callable


FAMILY_LAYER_OPS = {
    "llama": DecoderLayerOps(lambda layer: layer.input_layernorm, lambda layer: layer.post_attention_layernorm,
                             _llama_qkv, _llama_finish),
    "mpt": DecoderLayerOps(lambda layer: layer.norm_1, lambda layer: layer.norm_2,
                           lambda layer, h, rope: layer.attn.project(h), _mpt_finish),
    "gpt_neox": DecoderLayerOps(lambda layer: layer.input_layernorm, lambda layer: layer.post_attention_layernorm,
                                _neox_qkv, _neox_finish),
}


def _fused_llama_ops(fused: dict) -> DecoderLayerOps:
    """LLaMA's layer ops with one GEMM for q/k/v and one for gate/up: `fused[layer]` = (qkv weight, gate_up
    weight), whose row ranges the layer's own q/k/v_proj and gate/up_proj weights are views of."""

    def qkv(layer, h, rope):
        attn = layer.self_attn
        kv_rows = attn.num_kv_heads * attn.head_dim
        q, k, v = F.linear(h, fused[layer][0]).split([attn.num_heads * attn.head_dim, kv_rows, kv_rows], dim=-1)
        return _rotated(_split_heads(q, attn.num_heads), _split_heads(k, attn.num_kv_heads),
                        _split_heads(v, attn.num_kv_heads), rope)

    def finish(layer, x, attn_out, add_norm, post_norm, next_norm):
        x, h = add_norm(x, layer.self_attn.o_proj(attn_out), post_norm)
        gate, up = F.linear(h, fused[layer][1]).chunk(2, dim=-1)
        return add_norm(x, layer.mlp.down_proj(F.silu(gate) * up), next_norm)

    return dataclasses.replace(FAMILY_LAYER_OPS["llama"], qkv=qkv, finish=finish)


# The decode step's new paths (issue 12), each with a switch back to the old one for before/after measurements:
#   fused_projections  LLaMA: one GEMM for q/k/v and one for gate/up (fused weights, the modules' own are views)
#   rotary_kv_write    rotary on q, k and the K/V cache write in one kernel per layer
#   decode_attention   split-KV decode attention over each row's valid cache columns (no mask), and the cascade
#                      (prompt + tails) merged from its log-sum-exps
# FastFlamingo(decode_paths=...) picks them (default: DEFAULT_DECODE_PATHS of the backend); the environment
# variable FLAMINGO_FAST_OLD_DECODE="name,name" turns the named ones off in every instance (bench/gpu_check.sh).
DECODE_PATHS = ("fused_projections", "rotary_kv_write", "decode_attention")
# The torch backend keeps today's attention and rotary + index_copy: their twins are slower on the CPU (the `small`
# preset, 1 thread, bench/decode_ops_cpu.py: attention 1.3-3.7x, rotary + cache write 4.3-5.5x the old ops' time,
# per-call overhead of the general twins); the fused q/k/v GEMM costs the same as three (1.00-1.02x).
DEFAULT_DECODE_PATHS = {"triton": DECODE_PATHS, "torch": ("fused_projections",)}
OLD_DECODE_ENV = "FLAMINGO_FAST_OLD_DECODE"


def resolve_decode_paths(backend: str, decode_paths) -> frozenset[str]:
    """The new decode paths an instance uses: `decode_paths` (None: the backend's default) minus those named in
    FLAMINGO_FAST_OLD_DECODE."""
    chosen = DEFAULT_DECODE_PATHS[backend] if decode_paths is None else tuple(decode_paths)
    old = tuple(n.strip() for n in os.environ.get(OLD_DECODE_ENV, "").split(",") if n.strip())
    for where, names in (("decode_paths", chosen), (OLD_DECODE_ENV, old)):
        unknown = sorted(set(names) - set(DECODE_PATHS))
        if unknown:
            raise ValueError(f"{where}: unknown {unknown}; expected names from {DECODE_PATHS}")
    return frozenset(chosen) - frozenset(old)


class FastFlamingo:
    """Cached, kernel-backed Flamingo inference over a reference model's parameters.

    Holds one set of caches (StaticKVCache, MediaKVCache; TailKVCache from the first beam search on) sized at
    construction and reused by every call; calls are independent (each prompt overwrites what it reads). One
    call runs at a time per instance: concurrent calls from several threads wait for each other on a lock.
    """

    def __init__(self, model: Flamingo, backend: str = "auto", max_batch_size: int = 8,
                 max_seq_len: int | None = None, max_images: int = 33, cuda_graphs: bool = True,
                 stop_check_interval: int = 8, max_hypotheses: int | None = None, max_tail_len: int = 64,
                 context_cache_bytes: int = 1 << 30, decode_paths=None):
        config = model.config
        check_model(model)
        param = model.lang_encoder.output_head.weight
        self.device, self.dtype = param.device, param.dtype
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        check_backend(config, backend)
        if backend == "triton" and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' with the model on {self.device}: expected a CUDA device (or TRITON_INTERPRET=1 "
                f"to run the kernels in Triton's interpreter); use backend='torch' on the CPU"
            )
        max_seq_len = config.lm.max_position_embeddings if max_seq_len is None else max_seq_len
        max_hypotheses = 4 * max_batch_size if max_hypotheses is None else max_hypotheses
        for name, value in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len),
                            ("max_images", max_images), ("stop_check_interval", stop_check_interval),
                            ("max_hypotheses", max_hypotheses), ("max_tail_len", max_tail_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r}: expected an integer >= 1")
        if max_seq_len > config.lm.max_position_embeddings:
            raise ValueError(f"max_seq_len={max_seq_len}: expected at most the model's max positions "
                             f"{config.lm.max_position_embeddings}")
        self.model, self.config, self.backend = model, config, backend
        self.stop_check_interval = stop_check_interval
        self.pre_image_bug = config.openflamingo_pre_image_bug and not config.only_attend_immediate_media
        self.ops = kernel_ops(backend)
        self.perceiver = FastPerceiverResampler(model.perceiver, self.ops, config.perceiver.dim_head)
        self.xattn = {int(i): FastGatedCrossAttention(b, self.ops, config.perceiver.num_latents,
                                                      config.only_attend_immediate_media,
                                                      config.openflamingo_pre_image_bug)
                      for i, b in model.lang_encoder.gated_cross_attn_layers.items()}
        self.xattn_slot = {idx: slot for slot, idx in enumerate(config.xattn_layer_indices)}
        lm = config.lm
        self.decode_paths = resolve_decode_paths(backend, decode_paths)
        self.layer_ops = FAMILY_LAYER_OPS[lm.family]
        if lm.family == "llama" and "fused_projections" in self.decode_paths:
            fused = {layer: (
                fuse_linear_weights([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                fuse_linear_weights([layer.mlp.gate_proj, layer.mlp.up_proj]),
            ) for layer in model.lang_encoder.layers}
            if all(w is not None for pair in fused.values() for w in pair):
                self.layer_ops = _fused_llama_ops(fused)
            else:  # a weight another tensor also holds (a view kept elsewhere): fusing would add a copy, not move it
                self.decode_paths = self.decode_paths - {"fused_projections"}
        layers = model.lang_encoder.layers
        self.input_norms = [NormSpec.of(self.layer_ops.input_norm(layer), lm.norm) for layer in layers]
        self.post_norms = [NormSpec.of(self.layer_ops.post_norm(layer), lm.norm) for layer in layers]
        # What reads each layer's output: the next gated block's attention norm, the next layer's input norm, or
        # the final norm. The embeddings are read by the same rule, through the module itself (no add precedes).
        reader = [self.xattn[i].attn_norm if i in self.xattn else self.input_norms[i] for i in range(len(layers))]
        self.first_norm = self.xattn[0].block.attn_norm if 0 in self.xattn else self.layer_ops.input_norm(layers[0])
        self.next_norms = reader[1:] + [NormSpec.of(model.lang_encoder.final_norm, lm.norm)]
        self.alibi_slopes = alibi_slopes(lm.num_heads, lm.alibi_bias_max, self.device) if lm.alibi else None
        self.kv_cache = StaticKVCache.allocate(config, max_batch_size, max_seq_len, self.dtype, self.device)
        self.media_cache = MediaKVCache.allocate(config, max_batch_size, max_images, self.dtype, self.device)
        self.max_hypotheses, self.max_tail_len = max_hypotheses, max_tail_len
        self.tail_cache: TailKVCache | None = None  # allocated by the first beam search, then kept (graphs read it)
        if isinstance(context_cache_bytes, bool) or not isinstance(context_cache_bytes, int) or context_cache_bytes < 0:
            raise ValueError(f"context_cache_bytes={context_cache_bytes!r}: expected an integer >= 0 (0 disables it)")
        self.context_cache = ContextCache(context_cache_bytes)
        self.lock = threading.Lock()
        use_graphs = cuda_graphs and self.device.type == "cuda"
        self.graphs = DecodeGraphs(self._decode_step, max_batch_size, max_seq_len, self.device,
                                   max_hypotheses=max_hypotheses) if use_graphs else None

    @classmethod
    @torch.no_grad()
    def from_reference(cls, model: Flamingo, backend: str = "auto", dtype: torch.dtype | None = None,
                       **options) -> FastFlamingo:
        """Share `model`'s parameters (no copy). With a different `dtype` (float32, float16 or bfloat16), a
        converted copy is made once, tensor by tensor, and the reference keeps its own dtype. `model` must be in
        eval mode (it is checked, never changed). With the "fused_projections" decode path (LLaMA), the
        model's q/k/v_proj and gate/up_proj weights become views of one fused tensor per layer: same Parameter
        objects, same values, no extra memory (fused_weights.py). Options: max_batch_size, max_seq_len,
        max_images, cuda_graphs, stop_check_interval, max_hypotheses (beams x rows, default 4 x
        max_batch_size), max_tail_len (the most new tokens a beam search may ask for, default 64),
        decode_paths (which of DECODE_PATHS to use; default DEFAULT_DECODE_PATHS of the backend)."""
        check_eval_mode(model)
        if dtype is not None:
            check_dtype(dtype)
        if dtype is not None and any(t.is_floating_point() and t.dtype != dtype for t in model.state_dict().values()):
            model = _converted(model, dtype)
        return cls(model, backend=backend, **options)

    # ------------------------------------------------------------------------------------------ public API

    @torch.no_grad()
    def forward(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """-> logits [B, T, vocab], like the reference's forward."""
        with self.lock:
            attention_mask = check_inputs(self.config, vision_x, lang_x, attention_mask, image_attention_mask)
            prompt = self._prompt_images(vision_x, lang_x, image_attention_mask)
            self._check_capacity(lang_x, prompt, None)
            return self._prefill_prompt(vision_x, lang_x.long(), attention_mask, prompt, None, all_logits=True)

    __call__ = forward

    @torch.no_grad()
    def generate(
        self,
        vision_x: torch.Tensor | None,
        lang_x: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        timer: PhaseTimer | None = None,
        return_logits: bool = False,
        min_new_tokens: int = 0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_return_sequences: int = 1,
        image_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Same signature, options and outputs as `Flamingo.generate` (see there). With beams, each row's
        prompt is encoded and prefilled once; its beams share that KV and keep private tails."""
        config = self.config
        with self.lock:
            attention_mask = check_inputs(config, vision_x, lang_x, attention_mask, image_attention_mask)
            check_generate_options(config, lang_x, attention_mask, max_new_tokens, min_new_tokens)
            options = generation_options(
                config, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams,
                length_penalty=length_penalty, early_stopping=early_stopping,
                num_return_sequences=num_return_sequences, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
            )
            prompt = self._prompt_images(vision_x, lang_x, image_attention_mask)
            self._check_capacity(lang_x, prompt, max_new_tokens, options)
            lang_x = lang_x.long()
            return generate_ids(lambda: self.prefill(vision_x, lang_x, attention_mask, prompt, timer), lang_x,
                                options, config.lm.vocab_size, generator=generator, timer=timer,
                                return_logits=return_logits, stop_check_interval=self.stop_check_interval)

    @torch.no_grad()
    def score(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
              candidates: Sequence[Sequence[int]] = (), normalize_length: bool = False,
              progress: bool | None = None, image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood of every candidate continuation after every row -> [B, C] float32 (scoring.py).

        Each row's prompt is prefilled once; the candidates run as a trie, all rows at once, their hypotheses
        sharing the row's prompt KV and media K/V. A pass holds at most max_hypotheses // B hypotheses per row
        (the tail cache is the memory budget: max_hypotheses x max_tail_len); candidates may be at most
        max_tail_len + 1 tokens long."""
        with self.lock:
            attention_mask = check_inputs(self.config, vision_x, lang_x, attention_mask, image_attention_mask)
            tokens = check_candidates(candidates, self.config.lm.vocab_size, self.config.media_token_id)
            longest = max(len(t) for t in tokens)
            check_generate_options(self.config, lang_x, attention_mask, longest)  # left padding, max positions
            if longest - 1 > self.max_tail_len:
                raise ValueError(f"candidates: the longest has {longest} tokens; this FastFlamingo scores at most "
                                 f"max_tail_len + 1 = {self.max_tail_len + 1}")
            prompt = self._prompt_images(vision_x, lang_x, image_attention_mask)
            self._check_capacity(lang_x, prompt, None)
            per_row = self.max_hypotheses // lang_x.shape[0]
            decoder, first_logits = self.prefill(vision_x, lang_x.long(), attention_mask, prompt)
            decoder.graphs = False  # the hypothesis count changes level by level: eager beats a capture per shape
            return score_candidates(decoder, first_logits, tokens, per_row, normalize_length, progress)

    @torch.no_grad()
    def prefill(self, vision_x, lang_x, attention_mask, prompt: masking.PromptImages,
                timer: PhaseTimer | None = None) -> tuple[FastDecoder, torch.Tensor]:
        """Encode the images each row uses, prefill the prompts -> (decoder over the cached prompts, float32
        logits [B, vocab] of each row's last token). Inputs already checked; call under the lock."""
        logits = self._prefill_prompt(vision_x, lang_x, attention_mask, prompt, timer)
        slots = prompt.slots
        row_images = torch.tensor([max(slots)] * len(slots) if self.pre_image_bug else slots, dtype=torch.int32,
                                  device=lang_x.device)
        last_position = masking.positions_from_mask(attention_mask)[:, -1]
        return FastDecoder(self, lang_x.shape[1], last_position, prompt.decode_image, row_images), logits.float()

    def context_cache_stats(self) -> CacheStats:
        """A copy of the context cache's counters: hits and misses (contexts, images), evictions, bytes held
        (never more than `budget`), entries."""
        with self.lock:
            return dataclasses.replace(self.context_cache.stats)

    def clear_context_cache(self) -> None:
        with self.lock:
            self.context_cache.clear()

    @property
    def capture_seconds(self) -> float:
        """Wall time spent warming up and capturing CUDA graphs so far (0 without graphs)."""
        return self.graphs.capture_seconds if self.graphs is not None else 0.0

    # ------------------------------------------------------------------------------------------ phases

    def _prompt_images(self, vision_x, lang_x, image_attention_mask) -> masking.PromptImages:
        """Which image each token sees and which images are encoded (the rest are padding, never read), by the
        layout's rule: `<image>` tokens (OpenFlamingo) or the image_attention_mask (IDEFICS). In OpenFlamingo's
        all-previous mode with the pre-image bug, text before the first image attends to every image given, so
        all of them are encoded."""
        if self.config.layout == "idefics":
            return masking.PromptImages.from_image_attention_mask(image_attention_mask)
        prompt = masking.PromptImages.from_media_tokens(lang_x, self.config.media_token_id)
        if self.pre_image_bug and vision_x is not None:
            every = list(range(vision_x.shape[1]))
            prompt = dataclasses.replace(prompt, visible=[every] * lang_x.shape[0])
        return prompt

    def _check_capacity(self, lang_x, prompt: masking.PromptImages, max_new_tokens: int | None,
                        options: GenerationOptions | None = None) -> None:
        """max_new_tokens None: a forward call, which generates nothing."""
        batch, prompt_len = lang_x.shape
        if batch > self.kv_cache.max_batch_size:
            raise ValueError(f"lang_x: batch {batch} exceeds max_batch_size={self.kv_cache.max_batch_size} "
                             f"of this FastFlamingo; expected at most that many rows")
        if max_new_tokens is None and prompt_len > self.kv_cache.max_seq_len:
            raise ValueError(f"lang_x: {prompt_len} tokens per row exceed max_seq_len={self.kv_cache.max_seq_len} "
                             f"of this FastFlamingo; expected at most that many")
        beams = options.num_beams if options is not None else 1
        if beams > 1:  # the prompt stays in the static cache; each beam's new tokens go to its tail
            if batch * beams > self.max_hypotheses:
                raise ValueError(f"num_beams={beams}: {batch} rows x {beams} beams exceeds max_hypotheses="
                                 f"{self.max_hypotheses} of this FastFlamingo")
            if max_new_tokens > self.max_tail_len:
                raise ValueError(f"max_new_tokens={max_new_tokens}: beam search keeps at most max_tail_len="
                                 f"{self.max_tail_len} new tokens per beam in this FastFlamingo")
            max_new_tokens = 0
        total = prompt_len + (max_new_tokens or 0)
        if total > self.kv_cache.max_seq_len:
            raise ValueError(f"max_new_tokens={max_new_tokens}: prompt length {prompt_len} + max_new_tokens = {total} "
                             f"exceeds max_seq_len={self.kv_cache.max_seq_len} of this FastFlamingo")
        images = max(prompt.slots)
        if images > self.media_cache.max_images:
            what = "images to encode (the pre-image bug mode reads all of vision_x)" if self.pre_image_bug \
                else "image slots (up to the last one a token sees)" if self.config.layout == "idefics" \
                else "<image> tokens"
            raise ValueError(f"lang_x: a row has {images} {what}; expected at most "
                             f"max_images={self.media_cache.max_images} of this FastFlamingo")

    def _image_keys(self, vision_x, counts: list[int]) -> list[list]:
        """Per row, a content key for each of its first counts[b] images (image_digests, read in place, one host
        sync per row); None for every image when the cache is off (then no two images are taken as equal)."""
        if self.context_cache.budget == 0 or vision_x is None:
            return [[None] * n for n in counts]
        return [image_digests(vision_x[b, :n]) if n else [] for b, n in enumerate(counts)]

    def _fill_media(self, vision_x, needed: list[list[int]], keys: list[list], store: set,
                    timer: PhaseTimer | None) -> None:
        """Media K/V cache: image slot i of row b for every i in needed[b]. Each distinct image is taken from the
        context cache or, when missing, encoded (one batch through the vision encoder, the perceiver and every
        gated layer's to_kv); the new ones whose key is in `store` (context images, never queries) are kept."""
        pairs = [(b, i) for b, slots in enumerate(needed) for i in slots]
        cache = self.context_cache
        entries: dict = {}  # key (or the pair itself with the cache off) -> (keys, values) [X, H, NL, dh]
        missing: dict = {}  # key -> the first (b, i) that holds it
        for b, i in pairs:
            key = keys[b][i] if keys[b][i] is not None else (b, i)
            if key in entries or key in missing:
                continue
            entry = cache.get("image", key) if keys[b][i] is not None else None
            if entry is not None:
                entries[key] = (entry.keys, entry.values)
            else:
                missing[key] = (b, i)
        if missing:
            where = list(missing.values())
            images = vision_x[[b for b, _ in where], [i for _, i in where]]  # [n, F, C, H, W]
            patch_tokens = self.model.vision_encoder(images.flatten(0, 1).to(self.dtype))
            latents = self.perceiver(patch_tokens.view(1, len(where), images.shape[1], *patch_tokens.shape[1:]))[0]
            kv = [block.media_kv(latents[None]) for block in self.xattn.values()]  # per layer [1, H, n * NL, dh]

            def per_image(t):  # [X, H, n * NL, dh] -> [n, X, H, NL, dh]
                return t.unflatten(2, (len(where), self.media_cache.num_latents)).permute(2, 0, 1, 3, 4)

            new_keys = per_image(torch.stack([k[0] for k, _ in kv]))
            new_values = per_image(torch.stack([v[0] for _, v in kv]))
            for m, key in enumerate(missing):
                entries[key] = (new_keys[m], new_values[m])
                if key in store:
                    cache.put("image", key, new_keys[m].clone(), new_values[m].clone())
        if timer is not None:
            timer.lap("vision")
        if pairs:
            chosen = [entries[keys[b][i] if keys[b][i] is not None else (b, i)] for b, i in pairs]
            rows = torch.tensor([b for b, _ in pairs], device=self.device)
            slots = torch.tensor([i for _, i in pairs], device=self.device)
            self.media_cache.write_images(rows, slots, torch.stack([k for k, _ in chosen]),
                                          torch.stack([v for _, v in chosen]))
        if timer is not None:
            timer.lap("media_kv")

    def _prefill_prompt(self, vision_x, lang_x, attention_mask, prompt: masking.PromptImages, timer: PhaseTimer | None,
                        all_logits: bool = False, reuse: bool = True) -> torch.Tensor:
        """Images, then the prompt through the LM into the static cache -> logits (of the last position, or of
        every position with `all_logits`).

        With `reuse` (generate and score, the cache on, not the pre-image-bug mode), a row's context (every token
        before the first one that sees its last image: its last `<image>`) is taken from the context cache when
        its tokens, what each of them sees, and its images were seen before;
        a missing context that several rows share is computed once, alone; one that a single row has runs with
        its prompt and is copied out afterwards; both are stored. Contexts are copied into their rows' cache
        columns and only the rest of the prompt runs: the columns from the earliest row's query on. In the
        immediate mode a row whose context was cached needs only the images its remaining tokens see."""
        batch, prompt_len = lang_x.shape
        reuse = reuse and self.context_cache.budget > 0 and not self.pre_image_bug and not all_logits
        slots = prompt.slots
        keys = self._image_keys(vision_x, slots)
        context_end = [0] * batch  # per row: where its context ends; == real start: no context
        spans: dict[int, tuple] = {}  # row -> (real start, context key)
        if reuse:
            ids, sight = lang_x.tolist(), prompt.image_index.tolist()
            real_start = (attention_mask.long().cumsum(dim=1) == 0).sum(dim=1).tolist()
            for b in range(batch):
                context_end[b] = real_start[b]
                last = prompt.visible[b][-1] if prompt.visible[b] else None
                last_image = next((t for t in range(real_start[b], prompt_len) if sight[b][t] == last), None)
                if last_image is not None and last_image > real_start[b]:
                    context_end[b] = last_image
                    seen = sight[b][real_start[b]:last_image]
                    spans[b] = (real_start[b], (tuple(ids[b][real_start[b]:last_image]), tuple(seen),
                                                tuple(keys[b][:max(seen) + 1])))
        store = {k for _, key in spans.values() for k in key[2]}  # context images are kept, never queries
        # Contexts already cached. A missing one that several rows share is computed below, once, alone; one
        # that a single row has runs with the rest of its prompt and is copied out of its row afterwards.
        cached, rows_of = {}, {}
        for b, (_, key) in spans.items():
            rows_of.setdefault(key, []).append(b)
        for key in rows_of:
            entry = self.context_cache.get("context", key)
            if entry is not None:
                cached[key] = entry
        copy_out = {rows[0]: key for key, rows in rows_of.items() if key not in cached and len(rows) == 1}
        for b in copy_out:
            context_end[b] = spans.pop(b)[0]
        start = min(context_end)
        # Image slots this call reads: all of them, except that (immediate mode) a row whose context is cached
        # reads only the images of its tokens from `start` on (the query's).
        image_index = prompt.image_index[:, start:].tolist() if cached else None
        needed = []
        for b in range(batch):
            if self.config.only_attend_immediate_media and b in spans and spans[b][1] in cached:
                needed.append(sorted({i for i in image_index[b] if i >= 0}))
            else:
                needed.append(prompt.visible[b])
        self._fill_media(vision_x, needed, keys, store, timer)
        num_images = max(slots)
        kv = self.kv_cache
        for b, (first, key) in spans.items():
            entry = cached.get(key)
            if entry is None:
                end = context_end[b]
                entry = cached[key] = self._compute_context(key, b, lang_x[b:b + 1, first:end],
                                                            prompt.image_index[b:b + 1, first:end], len(key[2]))
            kv.keys[:, b, :, first:context_end[b]] = entry.keys
            kv.values[:, b, :, first:context_end[b]] = entry.values
        logits = self._prefill(lang_x, attention_mask, prompt.image_index, num_images, all_logits=all_logits,
                               start=start)
        for b, key in copy_out.items():
            first, length = context_end[b], len(key[0])
            self.context_cache.put("context", key, kv.keys[:, b, :, first:first + length].clone(),
                                   kv.values[:, b, :, first:first + length].clone())
        return logits

    def _compute_context(self, key, row: int, context_ids: torch.Tensor, image_index: torch.Tensor, images: int):
        """Run one row's context alone (static-cache row `row`, whose media are already in place) and store its
        keys/values in the context cache (or keep them for this call only when they exceed the budget)."""
        length = context_ids.shape[1]
        self._prefill(context_ids, torch.ones_like(context_ids), image_index, images, row=row, logits=False)
        kv = self.kv_cache
        return self.context_cache.put("context", key, kv.keys[:, row, :, :length].clone(),
                                      kv.values[:, row, :, :length].clone())

    def _prefill(self, lang_x, attention_mask, image_index: torch.Tensor, num_images: int, all_logits: bool = False,
                 start: int = 0, row: int | None = None, logits: bool = True) -> torch.Tensor | None:
        """The prompt's columns [start, T) through the LM; columns [0, start) are already in the static cache
        (staged contexts). image_index [B, T] int32: the image each token sees; num_images: the media cache's
        slots to span. `row`: run one prompt in that static/media cache row instead of rows [0, B)."""
        lm, model = self.config.lm, self.model.lang_encoder
        batch, prompt_len = lang_x.shape
        rows = slice(0, batch) if row is None else slice(row, row + 1)
        kv = self.kv_cache
        kv.key_valid[rows].zero_()
        kv.key_valid[rows, :prompt_len] = attention_mask.bool()
        positions = masking.positions_from_mask(attention_mask)[:, start:]
        image_index = image_index[:, start:]
        x = model.embed_tokens(lang_x[:, start:])
        queries = prompt_len - start
        rope = None if lm.alibi else rotary_cos_sin(positions, lm.rotary_dim, lm.rope_theta, x.dtype)
        padded = not bool(attention_mask.all())
        allowed = self_attention_mask(attention_mask, queries)
        if lm.alibi:  # an additive bias cannot be combined with is_causal: always a full mask
            mask = alibi_attention_bias(allowed, self.alibi_slopes, x.dtype)
        else:
            mask = allowed if padded or start else None
        causal = mask is None
        gqa = lm.num_heads != lm.num_kv_heads
        span = num_images * self.media_cache.num_latents

        def cross(idx, x, h):
            slot = self.xattn_slot[idx]
            keys = self.media_cache.keys[slot, rows, :, :span] if num_images else None
            values = self.media_cache.values[slot, rows, :, :span] if num_images else None
            return self.xattn[idx].prefill(x, h, keys, values, image_index, self.input_norms[idx])

        def attend(idx, q, k, v):
            kv.keys[idx, rows, :, start:prompt_len] = k
            kv.values[idx, rows, :, start:prompt_len] = v
            keys, values = kv.keys[idx, rows, :, :prompt_len], kv.values[idx, rows, :, :prompt_len]
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

        h = self._layers(x, rope, cross, attend)
        if not logits:
            return None
        return model.output_head(h if all_logits else h[:, -1])

    def _run_decode_step(self, inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool,
                         graphs: bool = True) -> torch.Tensor:
        if self.graphs is not None and graphs:
            return self.graphs.run(inputs, kv_len, per_row, tails)
        return self._decode_step(inputs, kv_len, per_row, tails)

    def _ensure_tail_cache(self) -> TailKVCache:
        """Allocated once, on the first beam search, and never replaced (captured graphs read it)."""
        if self.tail_cache is None:
            self.tail_cache = TailKVCache.allocate(self.config, self.max_hypotheses, self.max_tail_len, self.dtype,
                                                   self.device)
        return self.tail_cache

    def _decode_step(self, inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool) -> torch.Tensor:
        """One token per hypothesis -> logits [H, vocab]. Static shapes, no host sync, no allocation that
        depends on values: the function a CUDA graph captures.

        tails False (one hypothesis per row): each row owns its segment; the token is written to static-cache
        column `kv_column` and attends to columns [0, kv_len). tails True: hypothesis h = b * per_row + r of
        per_row attends to row b's prompt
        (static-cache columns [0, kv_len)) and to its own tail (tail columns [0, kv_column], the token written
        at kv_column), merged by log-sum-exp (attention.py)."""
        lm, model, kv = self.config.lm, self.model.lang_encoder, self.kv_cache
        hypotheses = inputs.token.shape[0]
        rows = hypotheses // per_row
        fused_write = "rotary_kv_write" in self.decode_paths
        kernel_attention = "decode_attention" in self.decode_paths
        ops = self.ops
        x = model.embed_tokens(inputs.token)[:, None]  # [H, 1, D]
        rope = None if lm.alibi else rotary_cos_sin(inputs.rope_position[:, None], lm.rotary_dim, lm.rope_theta,
                                                     x.dtype)
        cos_sin = (None, None) if rope is None else (rope[0][:, 0, 0], rope[1][:, 0, 0])  # [H, rotary_dim] each
        columns = torch.arange(kv_len, device=x.device)
        if not tails:
            kv.key_valid[:rows].index_fill_(1, inputs.kv_column, True)
            if kernel_attention:  # each row's valid columns are [kv_start, kv_column]: left padding only
                kv_end = inputs.kv_column + 1  # (columns past it may be stale within a graph's length bucket)
                kv_start = kv_end - (kv.key_valid[:rows, :kv_len] & (columns < kv_end)).sum(dim=1)
            else:
                mask = kv.key_valid[:rows, None, None, :kv_len]
                if lm.alibi:  # slope * (key column - query column), the token's own column being kv_column
                    bias = self.alibi_slopes[:, None] * (columns - inputs.kv_column).to(torch.float32)
                    mask = bias.to(x.dtype)[None, :, None, :].masked_fill(~mask, float("-inf"))  # [1, H, 1, kv_len]
        else:
            tail = self.tail_cache
            if kernel_attention:  # the prompt's valid columns [kv_start, prompt_columns); the tail's [0, kv_column]
                kv_end = inputs.kv_column + 1
                prompt_valid = kv.key_valid[:rows, :kv_len] & (columns < inputs.prompt_columns)
                kv_start = inputs.prompt_columns - prompt_valid.sum(dim=1)
                prompt_query = inputs.prompt_columns + inputs.kv_column  # ALiBi: the query's column in its sequence
            else:
                groups = lm.num_heads // lm.num_kv_heads
                tail_columns = torch.arange(tail.max_tail_len, device=x.device)
                prompt_bias = torch.zeros(rows, 1, 1, kv_len, device=x.device).masked_fill(
                    ~kv.key_valid[:rows, None, None, :kv_len], float("-inf"))
                tail_bias = torch.zeros(tail.max_tail_len, device=x.device).masked_fill(
                    tail_columns > inputs.kv_column, float("-inf"))
                if lm.alibi:  # distances from the query's column: prompt_columns + kv_column in the whole sequence
                    slopes = self.alibi_slopes.view(lm.num_kv_heads, 1, groups, 1)
                    query = inputs.prompt_columns + inputs.kv_column
                    prompt_bias = prompt_bias + (slopes * (columns - query)).expand(
                        -1, per_row, -1, -1).reshape(lm.num_kv_heads, per_row * groups, kv_len)
                    tail_bias = tail_bias + slopes[:, 0] * (tail_columns - inputs.kv_column)  # [Hkv, G, T]

        def cross(idx, x, h):
            slot = self.xattn_slot[idx]
            return self.xattn[idx].decode(  # a row's hypotheses share its image: the row's first one's index
                x, h, self.media_cache.keys[slot, :rows], self.media_cache.values[slot, :rows],
                inputs.image_index[::per_row], inputs.row_images[::per_row], self.input_norms[idx],
                queries_per_row=per_row,
            )

        def write(q, k, v, cache_keys, cache_values):
            """The token's k, v into column kv_column of its cache rows -> q, as [H, Hq, hd]."""
            if fused_write:  # q, k arrive unrotated (rope_for_qkv below): rotated here, in the same kernel
                return ops.rotary_kv_write(q[:, :, 0], k[:, :, 0], v[:, :, 0], *cos_sin, cache_keys, cache_values,
                                           inputs.kv_column)
            cache_keys.index_copy_(2, inputs.kv_column, k)
            cache_values.index_copy_(2, inputs.kv_column, v)
            return q[:, :, 0]

        def attend(idx, q, k, v):
            if not tails:
                layer_keys, layer_values = kv.keys[idx, :rows], kv.values[idx, :rows]
                q = write(q, k, v, layer_keys, layer_values)
                if kernel_attention:
                    return ops.decode_attention(
                        q, layer_keys[:, :, :kv_len], layer_values[:, :, :kv_len], kv_start, kv_end,
                        alibi_slopes=self.alibi_slopes, query_column=inputs.kv_column if lm.alibi else None,
                    )[:, :, None]
                return F.scaled_dot_product_attention(
                    q[:, :, None], layer_keys[:, :, :kv_len], layer_values[:, :, :kv_len], attn_mask=mask,
                    enable_gqa=lm.num_heads != lm.num_kv_heads,
                )
            tail_keys, tail_values = tail.keys[idx, :hypotheses], tail.values[idx, :hypotheses]
            q = write(q, k, v, tail_keys, tail_values)
            prompt_keys, prompt_values = kv.keys[idx, :rows, :, :kv_len], kv.values[idx, :rows, :, :kv_len]
            if kernel_attention:  # the cascade: prompt (R hypotheses per row at once) and tail, merged in float32
                out32 = torch.empty(q.shape, dtype=torch.float32, device=q.device)
                out_p, lse_p = ops.decode_attention(
                    q, prompt_keys, prompt_values, kv_start, inputs.prompt_columns, queries_per_row=per_row,
                    alibi_slopes=self.alibi_slopes, query_column=prompt_query if lm.alibi else None,
                    return_lse=True, out=out32)
                out_t, lse_t = ops.decode_attention(
                    q, tail_keys, tail_values, None, kv_end, alibi_slopes=self.alibi_slopes,
                    query_column=inputs.kv_column if lm.alibi else None, return_lse=True)
                return merge_attention_states(out_p, lse_p, out_t.float(), lse_t).to(q.dtype)[:, :, None]
            return shared_prefix_attention(
                q[:, :, None], prompt_keys, prompt_values, prompt_bias, tail_keys, tail_values, tail_bias, per_row,
                lm.head_dim**-0.5,
            )

        rope_for_qkv = None if fused_write else rope
        return model.output_head(self._layers(x, rope_for_qkv, cross, attend)[:, 0])

    def _layers(self, x, rope, cross, attend) -> torch.Tensor:
        """The decoder stack, shared by prefill and decode: x [B, T, D] embeddings -> final_norm(output).

        cross(idx, x, normed) runs the gated block before layer idx; attend(idx, q, k, v) -> [B, H, T, hd]
        writes the layer's keys/values into the cache and attends. Each residual add is fused with the norm
        that reads its result, so `h` is always the normalised input of what comes next."""
        ops, h = self.layer_ops, self.first_norm(x)
        batch, length = x.shape[:2]
        for idx, layer in enumerate(self.model.lang_encoder.layers):
            if idx in self.xattn:
                x, h = cross(idx, x, h)
            out = attend(idx, *ops.qkv(layer, h, rope))
            x, h = ops.finish(layer, x, out.transpose(1, 2).reshape(batch, length, -1), self._add_norm,
                              self.post_norms[idx], self.next_norms[idx])
        return h

    def _add_norm(self, x: torch.Tensor, y: torch.Tensor, norm: NormSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, norm(x + y)) in one fused pass."""
        return self.ops.gated_residual(x, y, None, norm=norm.kind, norm_weight=norm.weight, norm_bias=norm.bias,
                                       eps=norm.eps)


class FastDecoder:
    """The search interface (flamingo_fast/search.py) over FastFlamingo's caches, for one call.

    Owned segments (`fork(1)`): the row's new tokens follow its prompt in its static-cache row. Shared prompt
    (`fork(n)` with n > 1, or `shared=True`): the row's hypotheses read its prompt KV and media K/V in place;
    each one's new tokens go to its own TailKVCache row, and `reorder` gathers tails only (the count per row may
    change, as scoring's trie levels do). Each `step` is one decode step (a CUDA-graph replay on a GPU unless
    `graphs` is off) with no host sync."""

    def __init__(self, runtime: FastFlamingo, prompt_len: int, last_position: torch.Tensor,
                 image_index: torch.Tensor, row_images: torch.Tensor):
        self.runtime, self.prompt_len = runtime, prompt_len
        self.last_position, self.image_index, self.row_images = last_position, image_index, row_images
        self.per_row, self.shared, self.tail_len, self.inputs = 1, False, 0, None
        self.graphs = True

    @property
    def rows(self) -> int:
        return self.last_position.shape[0]

    def fork(self, per_row: int, shared: bool | None = None) -> None:
        """Every row becomes `per_row` hypotheses with empty tails, from its prompt (again, if forked before)."""
        self.per_row, self.tail_len = per_row, 0
        self.shared = per_row > 1 if shared is None else shared
        if self.shared:
            self.runtime._ensure_tail_cache()
            self._check_hypotheses(self.rows * per_row)
        elif per_row != 1:
            raise ValueError(f"fork: per_row={per_row} needs shared=True (rows own their segment only alone)")
        device = self.last_position.device
        self.inputs = DecodeInputs(
            token=torch.zeros(self.rows * per_row, dtype=torch.long, device=device),
            rope_position=self.last_position.repeat_interleave(per_row),
            kv_column=torch.full((1,), -1 if self.shared else self.prompt_len - 1, dtype=torch.long, device=device),
            prompt_columns=torch.full((1,), self.prompt_len, dtype=torch.long, device=device),
            image_index=self.image_index.repeat_interleave(per_row),
            row_images=self.row_images.repeat_interleave(per_row),
        )

    def _check_hypotheses(self, hypotheses: int) -> None:
        if hypotheses > self.runtime.max_hypotheses:
            raise ValueError(f"{hypotheses} hypotheses exceed max_hypotheses={self.runtime.max_hypotheses} of this "
                             f"FastFlamingo")

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        inputs = self.inputs
        inputs.token = tokens
        if self.runtime.config.openflamingo_generated_image_bug:  # 1-based in masking's helper, 0-based here
            inputs.image_index = masking.image_after_generated_tokens(
                tokens, inputs.image_index + 1, self.runtime.config.media_token_id) - 1
        inputs.rope_position = inputs.rope_position + 1
        inputs.kv_column = inputs.kv_column + 1
        self.tail_len += 1
        if self.shared and self.tail_len > self.runtime.max_tail_len:
            raise ValueError(f"step: tail of {self.tail_len} tokens exceeds max_tail_len="
                             f"{self.runtime.max_tail_len} of this FastFlamingo")
        kv_len = self.prompt_len if self.shared else self.prompt_len + self.tail_len
        return self.runtime._run_decode_step(inputs, kv_len, self.per_row, self.shared, self.graphs).float()

    def reorder(self, index: torch.Tensor) -> None:
        """Hypothesis h continues old hypothesis index[h], which must belong to the same row; len(index) may
        be any multiple of the row count."""
        if not self.shared:
            raise ValueError("reorder: rows that own their segment cannot reorder; fork(per_row, shared=True) first")
        self._check_hypotheses(index.shape[0])
        self.runtime.tail_cache.reorder(index, self.tail_len)
        inputs = self.inputs
        inputs.rope_position, inputs.image_index = inputs.rope_position[index], inputs.image_index[index]
        inputs.row_images = inputs.row_images[index]
        self.per_row = index.shape[0] // self.rows
