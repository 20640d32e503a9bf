"""The fast path of Llama 3.2 Vision (transformers' MllamaForConditionalGeneration) over the reference's tensors.

    runtime = MllamaRuntime(MllamaReference.from_hf(model), backend="torch")
    logits = runtime.logits(input_ids, attention_mask, images)                 # every position, as forward
    ids = runtime.generate_from_options(images, input_ids, attention_mask, options)   # generation/search.py

One call, in order:
    1. vision: the tiled ViT once per image slot (the reference's, SDPA), then the projector (every slot of every row:
       a token that sees no image attends to all of its row's vision tokens, padded slots included, as transformers
       does, so every slot can be read).
    2. media K/V: each cross-attention layer's keys (k_norm applied) and values of all vision tokens, once, laid out
       as the segment kernels read them: [B, KV heads, slots * tiles * tile_len, head_dim], tile j of a row at rows
       [j * tile_len, (j + 1) * tile_len) (MllamaMedia). The cross_attention_mask becomes per-token tile ranges
       (layers.segment_tile_ranges): a token that sees no image gets the every-tile range, and its MLP branch is
       zeroed (transformers' rule; Meta's code also zeroes its attention).
    3. prefill: the prompt through the LM, the self-attention layers' K/V written into a StaticKVCache (SDPA over
       the causal + padding mask), the cross-attention layers through KernelOps.segment_cross_attention; logits of
       the last position (all positions for `logits`).
    4. decode (MllamaDecoder, generation/search.py's fork / step / reorder): one token per hypothesis and step. The
       hypotheses of a row (beams, or the one greedy / sampled sequence) share its prompt's K/V in the static cache
       and its media K/V in place; each keeps its generated tokens' K/V in its own TailKVCache row, merged with the
       prompt by log-sum-exp (_self_attention_decode); reorder gathers tails only. The cross-attention
       layers read the mask's last row (generated tokens see what the prompt's last token saw: transformers 4.57
       and 5.x both repeat it) through KernelOps.segment_cross_attention_decode, R hypotheses of a row reading the
       row's K/V once.

Both backends run the same code but for one switch; KernelOps picks the segment ops and the fused residual ops (each
layer's residual add with its post-attention RMSNorm in one pass, tanh gates included: kernels/gated_residual.py),
Triton kernels or their torch twins. The switch is the decode step's self-attention (_self_attention_decode): on
Triton, FastFlamingo's fused rotary + K/V write and its split-KV decode kernel over each row's prompt range and
each hypothesis's tail; on torch, rotary and writes in torch and the cascade attention.shared_prefix_attention
over additive masks (the twins of those kernels are slower on the CPU, as for FastFlamingo's torch default).
FLAMINGO_FAST_OLD_DECODE naming rotary_kv_write or decode_attention puts a Triton runtime built after it on the
torch form (decode.resolve_decode_paths), for before/after timings. The
prefill's self-attention is SDPA on both; CUDA graphs of the decode step are not wired here yet. The KV caches are
allocated per call on the parameters' device and dtype, so `.to` needs no rebuild; the image cache (mllama_media.py)
keeps each image's media K/V across calls and is emptied when the weights change. With batch_invariant=True the
entry points run each row alone through the same prefill and decode (mllama_invariant.py).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_int
from ..config import LMConfig
from ..generation.scoring import (
    DEFAULT_SCORE_BYTES,
    check_candidates,
    hypotheses_per_row,
    hypothesis_bytes,
    score_candidates,
)
from ..generation.search import GenerationOptions, generate_ids
from ..masking import positions_from_mask
from ..modes import runtime_mode
from ..positions import apply_rotary, rotary_cos_sin_from_inv_freq, self_attention_mask
from ..reference.mllama import MllamaCrossAttentionLayer, MllamaReference
from . import mllama_invariant
from .attention import merge_attention_states, shared_prefix_attention
from .caches import StaticKVCache, TailKVCache
from .context_cache import CacheStats, ContextCache
from .decode import resolve_decode_paths
from .layers import BACKENDS, SEGMENT_HEAD_DIMS, KernelOps, kernel_ops
from .mllama_inputs import MllamaImages, check_mllama_call
from .mllama_int8 import holds_int8, int8_reference
from .mllama_media import MllamaMedia, encode_media
from .quantize import bind_int8_linears
from .weight_watch import WeightWatch


@dataclass(frozen=True)
class MllamaSearchConfig:
    """What generation/search.py and dropins/hf.py read of a runner's `config`: the head's vocabulary (`lm`), the
    stop and pad tokens; Llama 3.2 Vision has no `<|endofchunk|>` and no generated-image rule."""

    lm: LMConfig
    eos_token_id: int | None
    pad_token_id: int
    media_token_id: int
    eoc_token_id: None = None
    openflamingo_generated_image_bug: bool = False


def _lm_view(reference: MllamaReference) -> LMConfig:
    text = reference.config.text
    return LMConfig(family="llama", vocab_size=reference.lm_head.weight.shape[0], hidden_size=text.hidden_size,
                    num_layers=text.num_layers, num_heads=text.num_heads, num_kv_heads=text.num_kv_heads,
                    intermediate_size=text.intermediate_size, rms_norm_eps=text.rms_norm_eps,
                    rope_theta=text.rope_theta, max_position_embeddings=text.max_position_embeddings)


def _self_attention_kv(layer, h: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A self-attention layer's q, k, v [B, heads, T, head_dim] of the normalised input, rotary applied."""
    attn = layer.self_attn
    b, t, _ = h.shape
    q = attn.q_proj(h).view(b, t, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
    return apply_rotary(q, *rope), apply_rotary(k, *rope), v


def _self_attention_decode(ops: KernelOps, kernels: bool, layer, h: torch.Tensor, decoder: MllamaDecoder, slot: int,
                           rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """One new token per hypothesis through a self-attention layer (step 4 of the module docstring): h [N, 1, D]
    normalised -> attended [N, 1, Hq * hd]; the token's k, v written at the tail's column decoder.tail_len - 1. The
    prompt part reads each row's static cache once for its R hypotheses, the tail part each hypothesis's own.
    kernels=True (the Triton backend): KernelOps.rotary_kv_write (rotary on q, k and the tail write in one
    launch), then KernelOps.decode_attention, the split-KV kernel, over the prompt's valid range [prompt_start, T)
    (left padding only: mllama_inputs checks it) and the tail's [0, column], merged by their log-sum-exps
    (attention.merge_attention_states). kernels=False: torch's rotary and index writes and
    attention.shared_prefix_attention over additive masks."""
    n = h.shape[0]
    kv, tail, per_row = decoder.kv, decoder.tail, decoder.per_row
    tail_keys, tail_values = tail.keys[slot, :n], tail.values[slot, :n]
    if not kernels:
        q, k, v = _self_attention_kv(layer, h, rope)
        span = decoder.tail_len
        tail_keys[:, :, span - 1] = k[:, :, 0]
        tail_values[:, :, span - 1] = v[:, :, 0]
        out = shared_prefix_attention(q, kv.keys[slot], kv.values[slot], decoder.prefix_bias, tail_keys[:, :, :span],
                                      tail_values[:, :, :span], torch.zeros((), dtype=q.dtype, device=q.device),
                                      per_row, layer.self_attn.head_dim ** -0.5)
        return out.transpose(1, 2).reshape(n, 1, -1)
    attn = layer.self_attn
    q = attn.q_proj(h).view(n, attn.num_heads, attn.head_dim)
    k = attn.k_proj(h).view(n, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(h).view(n, attn.num_kv_heads, attn.head_dim)
    cos, sin = (part.reshape(n, -1) for part in rope)
    q = ops.rotary_kv_write(q, k, v, cos, sin, tail_keys, tail_values, decoder.column)
    out32 = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    out_p, lse_p = ops.decode_attention(q, kv.keys[slot], kv.values[slot], decoder.prompt_start, decoder.prompt_end,
                                        queries_per_row=per_row, return_lse=True, out=out32)
    out_t, lse_t = ops.decode_attention(q, tail_keys, tail_values, None, decoder.column + 1, return_lse=True)
    return merge_attention_states(out_p, lse_p, out_t.float(), lse_t).to(q.dtype).reshape(n, 1, -1)


def _gated_cross_finish(ops: KernelOps, layer: MllamaCrossAttentionLayer, x: torch.Tensor,
                        attended: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
    """x + tanh(attn gate) * o_proj(attended) and the post-attention norm of it in one pass (ops.gated_residual),
    then + tanh(mlp gate) * MLP(normed) * sees ([B, T] bool)."""
    norm = layer.ff_norm
    x, h = ops.gated_residual(x, layer.attn_out(attended), layer.attn_gate, norm="rmsnorm", norm_weight=norm.weight,
                              eps=norm.eps)
    return ops.gated_residual(x, layer.ff_body(h) * sees[..., None].to(x.dtype), layer.ff_gate)


def _self_attention_finish(ops: KernelOps, layer: nn.Module, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """A self-attention layer's x + o_proj(attended) and its post-attention norm in one pass, then + MLP(normed)."""
    norm = layer.post_attention_layernorm
    x, h = ops.gated_residual(x, layer.self_attn.o_proj(attended), None, norm="rmsnorm", norm_weight=norm.weight,
                              eps=norm.eps)
    return ops.gated_residual(x, layer.mlp(h), None)


class MllamaDecoder:
    """generation/search.py's decoder over one call's caches: every row's hypotheses share its prompt (static cache,
    media K/V) and keep private tails (module docstring, step 4). `fork(n)` always shares (the `shared` flag is
    accepted for the interface); the tail cache grows when a reorder asks for more hypotheses (scoring's trie)."""

    def __init__(self, runtime: MllamaRuntime, kv: StaticKVCache, media: MllamaMedia | None,
                 last_position: torch.Tensor, max_tail_len: int):
        self.runtime, self.kv, self.media = runtime, kv, media
        self.rows = last_position.shape[0]
        self.last_position, self.max_tail_len = last_position, max(1, max_tail_len)
        self.tail: TailKVCache | None = None
        self.per_row, self.tail_len, self.positions = 1, 0, last_position
        self.column: torch.Tensor | None = None  # [1] long: the tail column of the current step (step())
        # what generated tokens see: the mask's last row
        self.prefix_bias = torch.zeros(kv.key_valid.shape, dtype=kv.keys.dtype, device=kv.keys.device) \
            .masked_fill(~kv.key_valid, float("-inf"))[:, None, None, :]
        # the same as key ranges (left padding only): row b's valid columns are [prompt_start[b], T)
        columns = kv.key_valid.shape[1]
        self.prompt_start = columns - kv.key_valid.sum(dim=1)
        self.prompt_end = torch.full((1,), columns, dtype=torch.long, device=kv.keys.device)
        if media is not None:
            self.last_start, self.last_end = media.tile_start[:, -1].contiguous(), media.tile_end[:, -1].contiguous()
            self.last_sees = media.row_sees[:, -1]

    def _ensure_tail(self, hypotheses: int) -> None:
        if self.tail is not None and self.tail.max_hypotheses >= hypotheses:
            return
        old = self.tail
        self.tail = TailKVCache.allocate(self.runtime.kv_view, max(hypotheses, 2 * old.max_hypotheses if old else 0),
                                         self.max_tail_len, self.kv.keys.dtype, self.kv.keys.device)
        if old is not None:
            self.tail.keys[:, :old.max_hypotheses] = old.keys
            self.tail.values[:, :old.max_hypotheses] = old.values

    def fork(self, per_row: int, shared: bool | None = None) -> None:
        self.per_row, self.tail_len = per_row, 0
        self._ensure_tail(self.rows * per_row)
        self.positions = self.last_position.repeat_interleave(per_row)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.tail_len >= self.max_tail_len:
            raise ValueError(f"step: more than {self.max_tail_len} generated tokens (the tail this call allocated)")
        self.tail_len += 1
        self.column = torch.full((1,), self.tail_len - 1, dtype=torch.long, device=self.kv.keys.device)
        self.positions = self.positions + 1
        return self.runtime.decode_step(self, tokens).float()

    def reorder(self, index: torch.Tensor) -> None:
        """Hypothesis h continues old hypothesis index[h] (of the same row); len(index) any multiple of the rows."""
        self._ensure_tail(index.shape[0])
        self.tail.reorder(index, self.tail_len)
        self.positions = self.positions[index]
        self.per_row = index.shape[0] // self.rows


class MllamaRuntime(nn.Module):
    """Llama 3.2 Vision run the fast way over a MllamaReference's own tensors (registered as `reference`: nothing
    is copied). backend: "torch" (the segment ops' twins), "triton" (the kernels: CUDA, or the CPU with
    TRITON_INTERPRET=1) or "auto" (Triton on CUDA, else torch). context_cache_bytes: the image cache's budget
    (mllama_media.py; 0 disables it). weights="int8": the language model's Linears and head quantized into a copy
    that shares every other tensor (mllama_int8.py), unless the reference holds int8 layers already
    (int8_hf_reference). batch_invariant: every row computed alone, its images one per
    call (mllama_invariant.py)."""

    def __init__(self, reference: MllamaReference, backend: str = "auto", stop_check_interval: int | None = None,
                 context_cache_bytes: int = 1 << 30, weights: str | None = None, batch_invariant: bool = False):
        super().__init__()
        check_int("context_cache_bytes", context_cache_bytes, 0, " (0 disables it)")
        if not isinstance(batch_invariant, bool):
            raise ValueError(f"batch_invariant={batch_invariant!r}: expected True or False")
        self.batch_invariant = batch_invariant
        if weights not in (None, "int8"):
            raise ValueError(f"weights={weights!r}: expected None (the model's own) or 'int8'")
        if weights == "int8" and not holds_int8(reference):  # else the reference's own (mllama_int8.py)
            reference = int8_reference(reference)
        self.reference, self.weights = reference, weights
        if backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected 'auto' or one of {BACKENDS}")
        if stop_check_interval is not None:
            check_int("stop_check_interval", stop_check_interval, 1)
        self.backend_option, self.stop_check_option = backend, stop_check_interval
        self.backend, self.ops, self.stop_check_interval, self.decode_kernels = "", None, 1, False
        self._resolve_backend()
        mllama = reference.config
        lm = _lm_view(reference)
        self.config = MllamaSearchConfig(lm, mllama.eos_token_id, mllama.pad_token_id, mllama.image_token_id)
        layers = reference.language_model.layers
        self.cross_slot = {i: n for n, i in enumerate(i for i, layer in enumerate(layers)
                                                      if isinstance(layer, MllamaCrossAttentionLayer))}
        self.self_slot = {i: n for n, i in enumerate(i for i in range(len(layers)) if i not in self.cross_slot)}
        # the caches' shapes: self-attention layers only
        self.kv_view = SimpleNamespace(lm=dataclasses.replace(lm, num_layers=len(self.self_slot)))
        self.image_cache = ContextCache(context_cache_bytes)  # images only (mllama_media.py says why)
        self.weight_watch = WeightWatch(reference)
        self.lock = threading.Lock()  # one call at a time: the image cache is shared state

    def _resolve_backend(self) -> None:
        """The backend for the weights' device ("auto": Triton on CUDA, else torch), checked; again at each call, so
        that a drop-in moved by `.to` picks the new device's (the int8 layers rebound to its matmul)."""
        device = self.reference.language_model.embed_tokens.weight.device
        backend = self.backend_option
        if backend == "auto":
            backend = "triton" if device.type == "cuda" else "torch"
        if backend == self.backend:
            return
        if backend == "triton":
            head_dim = self.reference.config.text.head_dim
            if head_dim not in SEGMENT_HEAD_DIMS:
                raise ValueError(f"backend='triton': the segment kernels take head dims {SEGMENT_HEAD_DIMS}; the "
                                 f"model's is {head_dim}; expected backend='torch'")
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError(f"backend='triton' with the model on {device}: expected a CUDA device (or "
                                 f"TRITON_INTERPRET=1 to run the kernels in Triton's interpreter); use backend='torch' "
                                 f"on the CPU")
        self.backend, self.ops = backend, kernel_ops(backend)
        # the decode self-attention's kernels: FastFlamingo's decode paths of the backend, which
        # FLAMINGO_FAST_OLD_DECODE can turn off (naming rotary_kv_write or decode_attention) for before/after timings
        self.decode_kernels = {"rotary_kv_write", "decode_attention"} <= resolve_decode_paths(backend, None)
        bind_int8_linears(self.reference, None)
        bind_int8_linears(self.reference, self.ops.int8_linear)
        self.stop_check_interval = self.stop_check_option or (8 if device.type == "cuda" else 1)

    def _settle(self) -> None:
        """At each call, under the lock: weights written in place or replaced (`.to`) since the last call empty the
        image cache (weight_watch.py), and a move may change the backend."""
        if self.weight_watch.check() is not None:
            self.weight_watch.renew()
            self.image_cache.clear()
            self._resolve_backend()

    @property
    def cache_stats(self) -> CacheStats:
        return self.image_cache.stats

    def clear_context_cache(self) -> None:
        self.image_cache.clear()

    @property
    def dtype(self) -> torch.dtype:
        return self.reference.language_model.embed_tokens.weight.dtype

    def media(self, images: MllamaImages, tokens: int, timer=None) -> MllamaMedia:
        """Steps 1 and 2 of the module docstring (mllama_media.py), through the image cache."""
        return encode_media(self.reference, list(self.cross_slot), images, tokens, self.image_cache, self.dtype,
                            alone=self.batch_invariant, timer=timer)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: MllamaImages | None,
                max_tail_len: int, all_positions: bool = False, timer=None) -> tuple[MllamaDecoder, torch.Tensor]:
        """Steps 1-3: -> (the decoder over this call's caches, logits [B, vocab] of the last position, or
        [B, T, vocab] with all_positions). `timer`: the profiler's PhaseTimer ("vision" and "media_kv" laps)."""
        ref = self.reference
        lm = ref.language_model
        b, t = input_ids.shape
        kv = StaticKVCache.allocate(self.kv_view, b, t, self.dtype, input_ids.device)
        kv.key_valid.copy_(attention_mask.bool())
        media = self.media(images, t, timer) if images is not None else None
        x = lm.embed_tokens(input_ids)
        positions = positions_from_mask(attention_mask)
        rope = rotary_cos_sin_from_inv_freq(positions, lm.inv_freq(x.device), x.dtype)
        allowed = self_attention_mask(attention_mask, t)
        for i, layer in enumerate(lm.layers):
            if i in self.cross_slot:
                if media is not None:
                    x = self._cross_prefill(layer, self.cross_slot[i], x, media)
                continue
            q, k, v = _self_attention_kv(layer, layer.input_layernorm(x), rope)
            slot = self.self_slot[i]
            kv.keys[slot].copy_(k)
            kv.values[slot].copy_(v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
            x = _self_attention_finish(self.ops, layer, x, out.transpose(1, 2).reshape(b, t, -1))
        h = lm.norm(x if all_positions else x[:, -1])
        decoder = MllamaDecoder(self, kv, media, positions[:, -1], max_tail_len)
        return decoder, ref.lm_head(h)

    def _cross_prefill(self, layer: MllamaCrossAttentionLayer, slot: int, x: torch.Tensor,
                       media: MllamaMedia) -> torch.Tensor:
        b, t, _ = x.shape
        q = layer.queries(layer.attn_norm(x)).transpose(1, 2)  # [B, H, T, dh]
        out = self.ops.segment_cross_attention(q, media.keys[slot], media.values[slot], media.tile_start,
                                               media.tile_end, media.tile_valid, tile_len=media.tile_len)
        return _gated_cross_finish(self.ops, layer, x, out.transpose(1, 2).reshape(b, t, -1), media.row_sees)

    def decode_step(self, decoder: MllamaDecoder, tokens: torch.Tensor) -> torch.Tensor:
        """One token per hypothesis (h = row * per_row + r) -> logits [H, vocab] (module docstring, step 4)."""
        ref = self.reference
        lm = ref.language_model
        media, per_row = decoder.media, decoder.per_row
        n, kernels = tokens.shape[0], self.decode_kernels
        x = lm.embed_tokens(tokens)[:, None]  # [N, 1, D]
        rope = rotary_cos_sin_from_inv_freq(decoder.positions[:, None], lm.inv_freq(x.device), x.dtype)
        for i, layer in enumerate(lm.layers):
            if i in self.cross_slot:
                if media is not None:
                    slot = self.cross_slot[i]
                    q = layer.queries(layer.attn_norm(x))[:, 0]  # [N, H, dh]
                    out = self.ops.segment_cross_attention_decode(
                        q, media.keys[slot], media.values[slot], decoder.last_start, decoder.last_end,
                        media.tile_valid, tile_len=media.tile_len, queries_per_row=per_row)
                    sees = decoder.last_sees.repeat_interleave(per_row)[:, None]
                    x = _gated_cross_finish(self.ops, layer, x, out.reshape(n, 1, -1), sees)
                continue
            attended = _self_attention_decode(self.ops, kernels, layer, layer.input_layernorm(x), decoder,
                                              self.self_slot[i], rope)
            x = _self_attention_finish(self.ops, layer, x, attended)
        return ref.lm_head(lm.norm(x[:, 0]))

    @runtime_mode
    def logits(self, input_ids, attention_mask=None, images: MllamaImages | None = None) -> torch.Tensor:
        """transformers' forward: logits [B, T, vocab] of every position, in the runtime's dtype."""
        input_ids, attention_mask, images = check_mllama_call(self.reference.config, input_ids, attention_mask, images)
        with self.lock:
            self._settle()
            if self.batch_invariant:
                return mllama_invariant.logits(self, input_ids, attention_mask, images)
            return self.prefill(input_ids, attention_mask, images, 1, all_positions=True)[1]

    @runtime_mode
    def score(self, input_ids, attention_mask=None, images: MllamaImages | None = None, candidates=(),
              normalize_length: bool = False, score_bytes: int = DEFAULT_SCORE_BYTES) -> torch.Tensor:
        """[B, C] float32 log-likelihoods of the candidates (token-id lists) after every row (generation/scoring.py:
        the prompt prefilled once, the candidates as a trie, their hypotheses sharing the row's prompt and media
        K/V); candidate tokens see what the prompt's last token sees. A pass holds as many hypotheses per row as
        `score_bytes` holds (scoring.hypotheses_per_row); batch_invariant: one, each row alone."""
        input_ids, attention_mask, images = check_mllama_call(self.reference.config, input_ids, attention_mask, images)
        tokens = check_candidates(candidates, self.config.lm.vocab_size, self.config.media_token_id)
        longest = max(len(t) for t in tokens)
        rows = 1 if self.batch_invariant else input_ids.shape[0]  # the mode's passes hold one row
        per_row = hypotheses_per_row(tokens, rows, score_bytes,
                                     hypothesis_bytes(self.config, self.dtype, longest - 1))
        with self.lock:
            self._settle()
            if self.batch_invariant:
                return mllama_invariant.score(self, input_ids, attention_mask, images, tokens, normalize_length)
            decoder, first = self.prefill(input_ids, attention_mask, images, longest - 1)
            return score_candidates(decoder, first.float(), tokens, max(per_row, 1), normalize_length, progress=False)

    @runtime_mode
    def generate_from_options(self, images: MllamaImages | None, input_ids, attention_mask,
                              options: GenerationOptions, *, generator: torch.Generator | None = None, timer=None,
                              return_logits: bool = False, image_attention_mask=None):
        """generation/search.py's generate over this model (the Hugging Face options already translated by
        dropins/hf.py's hf_generate) -> ids [B * num_sequences, T + new]."""
        if image_attention_mask is not None:
            raise ValueError("image_attention_mask: not an input of Llama 3.2 Vision; expected cross_attention_mask")
        input_ids, attention_mask, images = check_mllama_call(self.reference.config, input_ids, attention_mask, images)
        with self.lock:
            self._settle()
            if self.batch_invariant:
                return mllama_invariant.generate(self, input_ids, attention_mask, images, options, generator, timer,
                                                 return_logits)
            return generate_ids(lambda: self.prefill(input_ids, attention_mask, images, options.max_new_tokens,
                                                     timer=timer),
                                input_ids, options, self.config.lm.vocab_size, generator=generator, timer=timer,
                                return_logits=return_logits, stop_check_interval=self.stop_check_interval)
