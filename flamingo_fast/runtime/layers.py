"""Kernel-backed Flamingo modules that execute the reference's own parameters.

`KernelOps` picks the implementation of the fused ops: the Triton launchers (`backend="triton"`) or
their pure-torch twins (`backend="torch"`, which runs anywhere and uses the same algorithms: the
segment-indexed cross-attention, the cached media K/V). The modules wrap the reference modules as children,
so their parameters are the very same tensors, under the same names. This module is the only door to
kernels/: `check_backend` reads the kernels' head-dim limits here too.

The decoder stack is wired here as well, for prefill and decode alike (`LayerStack`). Each LM family (LLaMA, MPT,
GPT-NeoX) supplies a small `DecoderLayerOps`: its norms, its q/k/v projection, and what follows the
self-attention. Every residual add is fused with the norm that reads its result (the post-attention norm, the
next gated block's attention norm, the next layer's input norm or the final norm), so no norm costs a pass of
its own.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import decode_attention as _decode_attention
from ..kernels import gated_residual as _gated_residual
from ..kernels import int8_matmul as _int8_matmul
from ..kernels import masked_cross_attention as _xattn
from ..kernels import masked_cross_attention_decode as _xattn_decode
from ..kernels import perceiver_attention as _perceiver_attention
from ..kernels import rotary_kv_write as _rotary_kv_write
from ..kernels import segment_cross_attention as _segment_xattn
from ..kernels import segment_cross_attention_decode as _segment_xattn_decode
from ..positions import alibi_slopes, apply_rotary
from .fused_weights import fuse_linear_weights
from .quantize import Int8Linear, fused_int8_linear

BACKENDS = ("triton", "torch")


@dataclass(frozen=True)
class NormSpec:
    """The normalisation a decoder layer applies to its input, as the fused gated residual needs it:
    kind "rmsnorm" (LLaMA) or "layernorm" (MPT, bias optional; GPT-NeoX), and the module's own tensors."""

    kind: str
    weight: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    @classmethod
    def of(cls, module: nn.Module, kind: str) -> NormSpec:
        return cls(kind, module.weight, getattr(module, "bias", None), module.eps)


@dataclass(frozen=True)
class KernelOps:
    """The fused ops one backend provides; every one has the signature of its kernel launcher."""

    name: str
    masked_cross_attention: Callable[..., torch.Tensor]
    masked_cross_attention_decode: Callable[..., torch.Tensor]
    gated_residual: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    perceiver_attention: Callable[..., torch.Tensor]
    decode_attention: Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
    rotary_kv_write: Callable[..., torch.Tensor]
    int8_linear: Callable[..., torch.Tensor]  # x [..., K] @ (int8 weight [N, K] * scales[:, None]).T
    # Llama 3.2 Vision: text tokens against the vision tokens of a tile range (kernels/segment_cross_attention*.py)
    segment_cross_attention: Callable[..., torch.Tensor]
    segment_cross_attention_decode: Callable[..., torch.Tensor]


def kernel_ops(backend: str) -> KernelOps:
    if backend == "triton":
        return KernelOps(
            "triton", _xattn.masked_cross_attention, _xattn_decode.masked_cross_attention_decode,
            _gated_residual.gated_residual, _perceiver_attention.perceiver_attention,
            _decode_attention.decode_attention, _rotary_kv_write.rotary_kv_write,
            _int8_matmul.int8_weight_matmul, _segment_xattn.segment_cross_attention,
            _segment_xattn_decode.segment_cross_attention_decode,
        )
    if backend == "torch":
        return KernelOps(
            "torch", _xattn.masked_cross_attention_ref, _xattn_decode.masked_cross_attention_decode_ref,
            _gated_residual.gated_residual_ref, _perceiver_attention.perceiver_attention_ref,
            _decode_attention.decode_attention_ref, _rotary_kv_write.rotary_kv_write_ref,
            _int8_matmul.int8_weight_matmul_ref, _segment_xattn.segment_cross_attention_ref,
            _segment_xattn_decode.segment_cross_attention_decode_ref,
        )
    raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")


def check_backend(config, backend: str) -> None:
    """The Triton kernels' shape limits, checked when the runtime is built rather than at the first call. The
    perceiver kernel's head dims are a floor, not a list: smaller ones are zero-padded (FastPerceiverResampler)."""
    if backend != "triton":
        return
    supported = _xattn.SUPPORTED_HEAD_DIMS
    if config.xattn_dim_head not in supported:
        raise ValueError(f"config.xattn_dim_head={config.xattn_dim_head}: the Triton kernels support head dims "
                         f"{supported}; expected one of them, or backend='torch'")
    largest = max(_perceiver_attention.SUPPORTED_HEAD_DIMS)
    if config.perceiver.dim_head > largest:
        raise ValueError(f"config.perceiver.dim_head={config.perceiver.dim_head}: the Triton perceiver kernel takes "
                         f"head dims up to {largest}; expected at most that, or backend='torch'")


class FastGatedCrossAttention(nn.Module):
    """A reference gated block (OpenFlamingo's GatedCrossAttentionBlock or IDEFICS's), executed with cached
    media K/V and fused kernels. The block is read by role (attn_norm, queries, media_kv, attn_out, attn_gate,
    ff_norm, ff_body, ff_gate), never by attribute spelling: LayerNorm + GELU with scalar gates and RMSNorm +
    SwiGLU with per-channel gates run the same code.

    Each method returns `(x, normed)`: the block's output and `next_norm(x)` computed in the same fused pass
    as the last gated residual (the decoder layer that follows needs exactly that normalised input; its
    kind, RMSNorm or LayerNorm, comes with it as a NormSpec).
    """

    def __init__(self, block: nn.Module, ops: KernelOps, num_latents: int, immediate: bool, pre_image_bug: bool):
        super().__init__()
        self.block = block
        self.ops = ops
        self.num_latents = num_latents
        self.immediate = immediate
        self.pre_image_bug = pre_image_bug and not immediate
        self.attn_norm = NormSpec.of(block.attn_norm, block.attn_norm_kind)
        self.ff_norm = NormSpec.of(block.ff_norm, block.ff_norm_kind)

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, N_img, n, Dv] -> keys, values [B, H, N_img * n, dh]."""
        b, n_img, n, _ = latents.shape
        return self.block.media_kv(latents.reshape(b, n_img * n, -1))

    def _finish(self, x, attn_out, next_norm: NormSpec):
        """x + tanh(attn_gate) * attn_out(attn) -> FF -> x + tanh(ff_gate) * FF, and next_norm(x)."""
        block, ff = self.block, self.ff_norm
        x, h = self.ops.gated_residual(x, block.attn_out(attn_out), block.attn_gate, norm=ff.kind,
                                       norm_weight=ff.weight, norm_bias=ff.bias, eps=ff.eps)
        return self.ops.gated_residual(
            x, block.ff_body(h), block.ff_gate, norm=next_norm.kind, norm_weight=next_norm.weight,
            norm_bias=next_norm.bias, eps=next_norm.eps,
        )

    def prefill(self, x, x_normed, keys, values, image_index, next_norm: NormSpec):
        """x [B, T, D] and x_normed = attn_norm(x) (fused upstream); keys/values [B, H, N_img * n, dh] or None;
        image_index [B, T] int32 (-1 = no image: the attention contributes exactly 0)."""
        q = self.block.queries(x_normed).transpose(1, 2)  # [B, H, T, dh]
        if keys is None:  # no images at all: the attention branch is exactly zero
            attn = x.new_zeros(x.shape[0], x.shape[1], q.shape[1] * q.shape[3])
        else:
            out = self.ops.masked_cross_attention(
                q, keys, values, image_index, num_latents=self.num_latents,
                attend_previous=not self.immediate, pre_image_attends_all=self.pre_image_bug,
            )
            attn = out.transpose(1, 2).flatten(2)
        return self._finish(x, attn, next_norm)

    def decode(self, x, x_normed, keys, values, image_index, num_images, next_norm: NormSpec,
               queries_per_row: int = 1, index_per_query: bool = False):
        """x [B * R, 1, D] and x_normed = attn_norm(x) (R = queries_per_row, the hypotheses of a row);
        keys/values [B, H, capacity, dh] read in place; num_images [B] int32, one per row; image_index [B] int32,
        one per row, or [B * R], one per hypothesis, with `index_per_query` (immediate mode only)."""
        b = x.shape[0]
        q = self.block.queries(x_normed)[:, 0]  # [B * R, H, dh]
        out = self.ops.masked_cross_attention_decode(
            q, keys, values, image_index, num_latents=self.num_latents, attend_previous=not self.immediate,
            pre_image_attends_all=self.pre_image_bug, num_images=num_images, queries_per_row=queries_per_row,
            index_per_query=index_per_query,
        )
        return self._finish(x, out.reshape(b, 1, -1), next_norm)


def _padded_head_dim(dim_head: int, supported: tuple[int, ...]) -> int:
    """The smallest head dim the kernel supports that holds `dim_head` (IDEFICS's perceiver: 96 -> 128)."""
    fits = [d for d in supported if d >= dim_head]
    if not fits:
        raise ValueError(f"perceiver head dim {dim_head}: larger than the kernel's largest, {max(supported)}")
    return fits[0]


class FastPerceiverResampler(nn.Module):
    """A reference resampler (OpenFlamingo's or IDEFICS's) with the attention over [media; latents] done by one
    fused op that never materialises the concatenation. Norms and projections stay torch (cuBLAS GEMMs); each
    attention block is read by role (`project`, `out`, `scale`). A head dim the Triton kernel does not take
    (IDEFICS's 96) is zero-padded to one it does: zeros change no dot product, and the padded output columns
    are dropped."""

    def __init__(self, resampler: nn.Module, ops: KernelOps, dim_head: int):
        super().__init__()
        self.resampler = resampler
        self.ops = ops
        self.dim_head = dim_head
        self.padded = dim_head if ops.name != "triton" else _padded_head_dim(
            dim_head, _perceiver_attention.SUPPORTED_HEAD_DIMS)

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """media [B, T_img, F, v, D] -> latents [B, T_img, num_latents, D]."""
        r = self.resampler
        b, t, f, v, d = media.shape
        media = media.reshape(b * t, f * v, d)
        latents = r.latents.to(media.dtype).expand(b * t, -1, -1)
        pad = self.padded - self.dim_head
        for attn, ff in r.blocks:
            q, k_media, v_media, k_lat, v_lat = attn.project(media, latents)
            if pad:
                q, k_media, v_media, k_lat, v_lat = (F.pad(z, (0, pad)) for z in (q, k_media, v_media, k_lat, v_lat))
            out = self.ops.perceiver_attention(q, k_media, v_media, k_lat, v_lat, scale=attn.scale)
            if pad:
                out = out[..., : self.dim_head]
            latents = attn.out(out.transpose(1, 2).flatten(2)) + latents
            latents = ff(latents) + latents
        return r.output_norm(latents).view(b, t, -1, d)


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
    """LLaMA's layer ops with one GEMM for q/k/v and one for gate/up: `fused[layer]` = (qkv projection, gate_up
    projection), callables over fused weights whose row ranges the layer's own q/k/v_proj and gate/up_proj
    weights are views of (float: F.linear over the fused tensor; int8: an Int8Linear over the fused rows)."""

    def qkv(layer, h, rope):
        attn = layer.self_attn
        kv_rows = attn.num_kv_heads * attn.head_dim
        q, k, v = fused[layer][0](h).split([attn.num_heads * attn.head_dim, kv_rows, kv_rows], dim=-1)
        return _rotated(_split_heads(q, attn.num_heads), _split_heads(k, attn.num_kv_heads),
                        _split_heads(v, attn.num_kv_heads), rope)

    def finish(layer, x, attn_out, add_norm, post_norm, next_norm):
        x, h = add_norm(x, layer.self_attn.o_proj(attn_out), post_norm)
        gate, up = fused[layer][1](h).chunk(2, dim=-1)
        return add_norm(x, layer.mlp.down_proj(F.silu(gate) * up), next_norm)

    return dataclasses.replace(FAMILY_LAYER_OPS["llama"], qkv=qkv, finish=finish)


def _fused_projection(linears) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """h -> the concatenated outputs of `linears` in one GEMM (None: they cannot share one weight without a
    copy). Int8 projections (quantize.py) already are row views of one matrix; float ones are fused here."""
    if isinstance(linears[0], Int8Linear):
        return fused_int8_linear(linears)
    weight = fuse_linear_weights(linears)
    return None if weight is None else functools.partial(F.linear, weight=weight)


class LayerStack:
    """The decoder stack's wiring, shared by prefill and decode: the LM's modules, its family's layer ops (fused
    LLaMA projections when asked and possible), the gated block before each of its layers, the norm each fused
    residual add applies, and the ALiBi slopes (MPT). Built once per runtime over the model's own tensors.

    input_norms[i]  layer i's input norm (the gated block before it normalises for it)
    post_norms[i]   layer i's post-attention norm
    next_norms[i]   what reads layer i's output: the next gated block's attention norm, the next layer's input
                    norm, or the final norm
    first_norm      the embeddings' reader, by the same rule, as the module itself (no add precedes it)
    """

    def __init__(self, model: nn.Module, ops: KernelOps, fuse_projections: bool):
        config = model.config
        lm = self.lm = config.lm
        self.lang_encoder, self.ops = model.lang_encoder, ops
        self.xattn = {int(i): FastGatedCrossAttention(b, ops, config.perceiver.num_latents,
                                                      config.only_attend_immediate_media,
                                                      config.openflamingo_pre_image_bug)
                      for i, b in model.lang_encoder.gated_cross_attn_layers.items()}
        self.xattn_slot = {idx: slot for slot, idx in enumerate(config.xattn_layer_indices)}
        self.layer_ops = FAMILY_LAYER_OPS[lm.family]
        self.fused_projections = False  # whether LLaMA's q/k/v and gate/up run as one GEMM each
        if lm.family == "llama" and fuse_projections:
            fused = {layer: (
                _fused_projection([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                _fused_projection([layer.mlp.gate_proj, layer.mlp.up_proj]),
            ) for layer in model.lang_encoder.layers}
            if all(w is not None for pair in fused.values() for w in pair):
                self.layer_ops, self.fused_projections = _fused_llama_ops(fused), True
            # else a weight another tensor also holds (a view kept elsewhere): fusing would add a copy, not move it
        layers = model.lang_encoder.layers
        self.input_norms = [NormSpec.of(self.layer_ops.input_norm(layer), lm.norm) for layer in layers]
        self.post_norms = [NormSpec.of(self.layer_ops.post_norm(layer), lm.norm) for layer in layers]
        # What reads each layer's output: the next gated block's attention norm, the next layer's input norm, or
        # the final norm. The embeddings are read by the same rule, through the module itself (no add precedes).
        reader = [self.xattn[i].attn_norm if i in self.xattn else self.input_norms[i] for i in range(len(layers))]
        self.first_norm = self.xattn[0].block.attn_norm if 0 in self.xattn else self.layer_ops.input_norm(layers[0])
        self.next_norms = reader[1:] + [NormSpec.of(model.lang_encoder.final_norm, lm.norm)]
        device = model.lang_encoder.output_head.weight.device
        self.alibi_slopes = alibi_slopes(lm.num_heads, lm.alibi_bias_max, device) if lm.alibi else None

    def layers(self, x, rope, cross, attend) -> torch.Tensor:
        """The decoder stack, shared by prefill and decode: x [B, T, D] embeddings -> final_norm(output).

        cross(idx, x, normed) runs the gated block before layer idx; attend(idx, q, k, v) -> [B, H, T, hd]
        writes the layer's keys/values into the cache and attends. Each residual add is fused with the norm
        that reads its result, so `h` is always the normalised input of what comes next."""
        ops, h = self.layer_ops, self.first_norm(x)
        batch, length = x.shape[:2]
        for idx, layer in enumerate(self.lang_encoder.layers):
            if idx in self.xattn:
                x, h = cross(idx, x, h)
            out = attend(idx, *ops.qkv(layer, h, rope))
            x, h = ops.finish(layer, x, out.transpose(1, 2).reshape(batch, length, -1), self.add_norm,
                              self.post_norms[idx], self.next_norms[idx])
        return h

    def add_norm(self, x: torch.Tensor, y: torch.Tensor, norm: NormSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + y, norm(x + y)) in one fused pass."""
        return self.ops.gated_residual(x, y, None, norm=norm.kind, norm_weight=norm.weight, norm_bias=norm.bias,
                                       eps=norm.eps)
