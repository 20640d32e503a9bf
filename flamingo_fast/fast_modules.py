"""Kernel-backed Flamingo modules that execute the reference's own parameters.

`KernelOps` picks the implementation of the four fused ops: the Triton launchers (`backend="triton"`) or
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

from .kernels import gated_residual as _gated_residual
from .kernels import masked_cross_attention as _xattn
from .kernels import masked_cross_attention_decode as _xattn_decode
from .kernels import perceiver_attention as _perceiver_attention
from .reference import GatedCrossAttentionBlock, PerceiverResampler

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


def kernel_ops(backend: str) -> KernelOps:
    if backend == "triton":
        return KernelOps(
            "triton", _xattn.masked_cross_attention, _xattn_decode.masked_cross_attention_decode,
            _gated_residual.gated_residual, _perceiver_attention.perceiver_attention,
        )
    if backend == "torch":
        return KernelOps(
            "torch", _xattn.masked_cross_attention_ref, _xattn_decode.masked_cross_attention_decode_ref,
            _gated_residual.gated_residual_ref, _perceiver_attention.perceiver_attention_ref,
        )
    raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")


class FastGatedCrossAttention(nn.Module):
    """The reference's GatedCrossAttentionBlock, executed with cached media K/V and fused kernels.

    Each method returns `(x, normed)`: the block's output and `next_norm(x)` computed in the same fused pass
    as the last gated residual (the decoder layer that follows needs exactly that normalised input; its
    kind, RMSNorm or LayerNorm, comes with it as a NormSpec).
    """

    def __init__(self, block: GatedCrossAttentionBlock, ops: KernelOps):
        super().__init__()
        self.block = block
        self.ops = ops
        self.heads, self.dim_head = block.attn.heads, block.attn.dim_head
        self.immediate = block.attn.only_attend_immediate_media
        self.pre_image_bug = block.attn.openflamingo_pre_image_bug and not self.immediate

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, N_img, n, Dv] -> keys, values [B, H, N_img * n, dh] (strided views of one GEMM output)."""
        b, n_img, n, _ = latents.shape
        kv = self.block.attn.to_kv(latents.reshape(b, n_img * n, -1))
        k, v = kv.view(b, n_img * n, 2, self.heads, self.dim_head).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def _finish(self, x, attn_out, next_norm: NormSpec):
        """x + tanh(attn_gate) * to_out(attn) -> FF -> x + tanh(ff_gate) * FF, and next_norm(x)."""
        block, ff = self.block, self.block.ff
        y = block.attn.to_out(attn_out)
        x, h = self.ops.gated_residual(
            x, y, block.attn_gate, norm="layernorm", norm_weight=ff[0].weight, norm_bias=ff[0].bias, eps=ff[0].eps
        )
        y = ff[3](F.gelu(ff[1](h)))
        return self.ops.gated_residual(
            x, y, block.ff_gate, norm=next_norm.kind, norm_weight=next_norm.weight, norm_bias=next_norm.bias,
            eps=next_norm.eps,
        )

    def prefill(self, x, x_normed, keys, values, image_index, next_norm: NormSpec):
        """x [B, T, D] and x_normed = attn.norm(x) (fused upstream); keys/values [B, H, N_img * n, dh] or None;
        image_index [B, T] int32 (-1 = no image)."""
        b, t, _ = x.shape
        q = self.block.attn.to_q(x_normed).view(b, t, self.heads, self.dim_head).transpose(1, 2)
        if keys is None:  # no images at all: the attention branch is exactly zero
            attn = q.new_zeros(b, t, self.heads * self.dim_head)
        else:
            out = self.ops.masked_cross_attention(
                q, keys, values, image_index,
                attend_previous=not self.immediate, pre_image_attends_all=self.pre_image_bug,
            )
            attn = out.transpose(1, 2).reshape(b, t, -1)
        return self._finish(x, attn, next_norm)

    def decode(self, x, x_normed, keys, values, image_index, num_images, next_norm: NormSpec,
               queries_per_row: int = 1):
        """x [B * R, 1, D] and x_normed = attn.norm(x) (R = queries_per_row, the hypotheses of a row);
        keys/values [B, H, capacity, dh] read in place; image_index, num_images [B] int32, one per row."""
        b = x.shape[0]
        q = self.block.attn.to_q(x_normed).view(b, self.heads, self.dim_head)
        out = self.ops.masked_cross_attention_decode(
            q, keys, values, image_index, attend_previous=not self.immediate,
            pre_image_attends_all=self.pre_image_bug, num_images=num_images, queries_per_row=queries_per_row,
        )
        return self._finish(x, out.reshape(b, 1, -1), next_norm)


class FastPerceiverResampler(nn.Module):
    """The reference's PerceiverResampler with the attention over [media; latents] done by one fused op
    that never materialises the concatenation. LayerNorms and projections stay torch (cuBLAS GEMMs)."""

    def __init__(self, resampler: PerceiverResampler, ops: KernelOps):
        super().__init__()
        self.resampler = resampler
        self.ops = ops

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """media [B, T_img, F, v, D] -> latents [B, T_img, num_latents, D]."""
        r = self.resampler
        b, t, f, v, d = media.shape
        media = media.reshape(b * t, f * v, d)
        latents = r.latents.to(media.dtype).expand(b * t, -1, -1)
        for attn, ff in r.layers:
            n, h, dh = b * t, attn.heads, attn.dim_head
            xm, lat = attn.norm_media(media), attn.norm_latents(latents)
            q = attn.to_q(lat).view(n, -1, h, dh).transpose(1, 2)
            k_media, v_media = attn.to_kv(xm).view(n, -1, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
            k_lat, v_lat = attn.to_kv(lat).view(n, -1, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
            out = self.ops.perceiver_attention(q, k_media, v_media, k_lat, v_lat, scale=attn.scale)
            latents = attn.to_out(out.transpose(1, 2).reshape(n, -1, h * dh)) + latents
            latents = ff(latents) + latents
        return r.norm(latents).view(b, t, -1, d)
