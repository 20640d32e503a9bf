"""Kernel-backed Flamingo modules that execute the reference's own parameters.

`KernelOps` picks the implementation of the fused ops: the Triton launchers (`backend="triton"`) or
their pure-torch twins (`backend="torch"`, which runs anywhere and uses the same algorithms: the
segment-indexed cross-attention, the cached media K/V). The modules wrap the reference modules as children,
so their parameters are the very same tensors, under the same names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import decode_attention as _decode_attention
from .kernels import gated_residual as _gated_residual
from .kernels import masked_cross_attention as _xattn
from .kernels import masked_cross_attention_decode as _xattn_decode
from .kernels import perceiver_attention as _perceiver_attention
from .kernels import rotary_kv_write as _rotary_kv_write

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


def kernel_ops(backend: str) -> KernelOps:
    if backend == "triton":
        return KernelOps(
            "triton", _xattn.masked_cross_attention, _xattn_decode.masked_cross_attention_decode,
            _gated_residual.gated_residual, _perceiver_attention.perceiver_attention,
            _decode_attention.decode_attention, _rotary_kv_write.rotary_kv_write,
        )
    if backend == "torch":
        return KernelOps(
            "torch", _xattn.masked_cross_attention_ref, _xattn_decode.masked_cross_attention_decode_ref,
            _gated_residual.gated_residual_ref, _perceiver_attention.perceiver_attention_ref,
            _decode_attention.decode_attention_ref, _rotary_kv_write.rotary_kv_write_ref,
        )
    raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")


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
               queries_per_row: int = 1):
        """x [B * R, 1, D] and x_normed = attn_norm(x) (R = queries_per_row, the hypotheses of a row);
        keys/values [B, H, capacity, dh] read in place; image_index, num_images [B] int32, one per row."""
        b = x.shape[0]
        q = self.block.queries(x_normed)[:, 0]  # [B * R, H, dh]
        out = self.ops.masked_cross_attention_decode(
            q, keys, values, image_index, num_latents=self.num_latents, attend_previous=not self.immediate,
            pre_image_attends_all=self.pre_image_bug, num_images=num_images, queries_per_row=queries_per_row,
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
