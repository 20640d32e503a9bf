"""The reference's gated cross-attention blocks, both layouts: text tokens attend to image latents.

OpenFlamingo's layout: MaskedCrossAttention inside GatedCrossAttentionBlock (LayerNorm, scalar tanh gates,
OpenFlamingo's feed-forward). IDEFICS v1: IdeficsCrossAttention inside IdeficsGatedCrossAttentionBlock
(RMSNorms, scalar or per-channel gates, a LLaMA MLP). Both blocks expose the same role accessors (attn_norm,
queries, media_kv, attn_out, ff_norm, ff_body, the gates) that the fast path reads.

Dense over all images and masked, like OpenFlamingo: keys/values are recomputed from the latents at every call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FlamingoConfig
from .lm import LlamaMLP, RMSNorm
from .media import feed_forward

# ----------------------------------------------------------------------------------------------------------
# Gated cross-attention (OpenFlamingo's layout)
# ----------------------------------------------------------------------------------------------------------


class MaskedCrossAttention(nn.Module):
    """Text queries attend to image latents, masked so a token sees only its own image (or, with
    `only_attend_immediate_media=False`, every image up to its own). Dense over all images, like OpenFlamingo."""

    def __init__(
        self, dim: int, dim_visual: int, dim_head: int, heads: int,
        only_attend_immediate_media: bool, openflamingo_pre_image_bug: bool,
    ):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        self.only_attend_immediate_media = only_attend_immediate_media
        self.openflamingo_pre_image_bug = openflamingo_pre_image_bug
        inner = heads * dim_head
        self.norm = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim_visual, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, media: torch.Tensor | None, text_time: torch.Tensor) -> torch.Tensor:
        """x [B, T, D]; media [B, T_img, n, Dv] latents or None; text_time [B, T] (1-based image, 0 = none)."""
        b, t, _ = x.shape
        if media is None or media.shape[1] == 0:
            return torch.zeros_like(x)  # no image to attend to: the attention branch contributes nothing
        t_img, n = media.shape[1], media.shape[2]
        q = self.to_q(self.norm(x)).view(b, t, self.heads, self.dim_head).transpose(1, 2)
        k, v = self.to_kv(media.reshape(b, t_img * n, -1)).chunk(2, dim=-1)
        k, v = (z.view(b, t_img * n, self.heads, self.dim_head).transpose(1, 2) for z in (k, v))
        scores = (q * self.scale) @ k.transpose(-1, -2)  # [B, H, T, T_img * n]

        image_of_key = torch.arange(1, t_img + 1, device=x.device).repeat_interleave(n)  # 1-based
        tt = text_time[:, None, :, None]
        allowed = tt == image_of_key if self.only_attend_immediate_media else tt >= image_of_key
        no_image = (text_time == 0)[:, None, :, None]
        scores = scores.float()
        if self.openflamingo_pre_image_bug and not self.only_attend_immediate_media:
            # OpenFlamingo fills masked scores with -max: a row with every key masked ends up uniform.
            allowed = allowed | no_image
            scores = scores.masked_fill(no_image, 0.0)
        scores = scores.masked_fill(~allowed, float("-inf"))
        attn = torch.where(allowed, scores.softmax(dim=-1), 0.0)  # rows with no allowed key: exactly 0
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, t, self.heads * self.dim_head)
        return self.to_out(out)


class GatedCrossAttentionBlock(nn.Module):
    """x = x + tanh(attn_gate) * attn(x); x = x + tanh(ff_gate) * FF(x). The FF runs on every token."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        dim = config.lm.hidden_size
        self.attn = MaskedCrossAttention(
            dim, config.vision_dim, config.xattn_dim_head, config.xattn_heads,
            config.only_attend_immediate_media, config.openflamingo_pre_image_bug,
        )
        self.attn_gate = nn.Parameter(torch.zeros(1))  # OpenFlamingo initialises both gates to 0
        self.ff = feed_forward(dim, config.xattn_ff_mult)
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, media: torch.Tensor | None, text_time: torch.Tensor) -> torch.Tensor:
        x = x + self.attn_gate.tanh() * self.attn(x, media, text_time)
        return x + self.ff_gate.tanh() * self.ff(x)

    # Roles, read by the fast path (FastGatedCrossAttention) instead of attribute spellings. The same accessors
    # exist on IdeficsGatedCrossAttentionBlock.
    attn_norm_kind = ff_norm_kind = "layernorm"

    @property
    def attn_norm(self) -> nn.Module:
        return self.attn.norm

    @property
    def ff_norm(self) -> nn.Module:
        return self.ff[0]

    def queries(self, normed: torch.Tensor) -> torch.Tensor:
        """attn_norm(x) [B, T, D] -> q [B, T, H, dh]."""
        return self.attn.to_q(normed).unflatten(-1, (self.attn.heads, self.attn.dim_head))

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, M, Dv] -> keys, values [B, H, M, dh] (strided views of one GEMM's output)."""
        b, m, _ = latents.shape
        kv = self.attn.to_kv(latents).view(b, m, 2, self.attn.heads, self.attn.dim_head)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def attn_out(self, attended: torch.Tensor) -> torch.Tensor:
        return self.attn.to_out(attended)

    def ff_body(self, normed: torch.Tensor) -> torch.Tensor:
        """The feed-forward after its norm: Linear -> GELU -> Linear."""
        return self.ff[3](F.gelu(self.ff[1](normed)))


# ----------------------------------------------------------------------------------------------------------
# IDEFICS v1 gated cross-attention (Hugging Face's IdeficsForVisionText2Text), names as in transformers
# ----------------------------------------------------------------------------------------------------------


class IdeficsCrossAttention(nn.Module):
    """Text queries attend to the latents of the images `image_attention_mask` lets them see: in the LM's heads,
    no rotary, with per-head RMSNorms of q and k under `qk_norm`."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        lm = config.lm
        self.heads, self.dim_head, self.scale = lm.num_heads, lm.head_dim, lm.head_dim**-0.5
        inner = self.heads * self.dim_head
        self.q_proj = nn.Linear(lm.hidden_size, inner, bias=False)
        self.k_proj = nn.Linear(config.vision_dim, inner, bias=False)
        self.v_proj = nn.Linear(config.vision_dim, inner, bias=False)
        self.o_proj = nn.Linear(inner, lm.hidden_size, bias=False)
        self.qk_norm = config.xattn_qk_norm
        if self.qk_norm:
            self.q_layer_norm = RMSNorm(self.dim_head, lm.rms_norm_eps)
            self.k_layer_norm = RMSNorm(self.dim_head, lm.rms_norm_eps)

    def queries(self, normed: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(normed).unflatten(-1, (self.heads, self.dim_head))  # [B, T, H, dh]
        return self.q_layer_norm(q) if self.qk_norm else q

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latents [B, M, Dv] -> keys, values [B, H, M, dh]."""
        k = self.k_proj(latents).unflatten(-1, (self.heads, self.dim_head))
        v = self.v_proj(latents).unflatten(-1, (self.heads, self.dim_head))
        if self.qk_norm:
            k = self.k_layer_norm(k)
        return k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, normed: torch.Tensor, media: torch.Tensor, sees: torch.Tensor) -> torch.Tensor:
        """normed [B, T, D]; media [B, N, n, Dv] latents; sees [B, T, N] bool (image_attention_mask) -> [B, T, D].
        A token that sees no image gets exactly 0 (transformers' `cross_attention_gate`)."""
        b, t, _ = normed.shape
        n_img, n = media.shape[1], media.shape[2]
        q = self.queries(normed).transpose(1, 2)
        k, v = self.media_kv(media.reshape(b, n_img * n, -1))
        allowed = sees.repeat_interleave(n, dim=-1)[:, None]  # [B, 1, T, N * n]
        scores = ((q * self.scale) @ k.transpose(-1, -2)).float().masked_fill(~allowed, float("-inf"))
        attn = torch.where(allowed, scores.softmax(dim=-1), 0.0)  # rows that see nothing: exactly 0
        out = (attn.to(v.dtype) @ v).transpose(1, 2).reshape(b, t, -1)
        return self.o_proj(out)


class IdeficsGatedCrossAttentionBlock(nn.Module):
    """x = x + tanh(alpha_cross_attn) * xattn(RMSNorm(x)); x = x + tanh(alpha_dense) * SwiGLU(RMSNorm(x)).
    The gates are scalars (alpha_type "float", shape [1]) or per channel ("vector", [1, 1, D]). The MLP runs on
    every token, also those that see no image."""

    attn_norm_kind = ff_norm_kind = "rmsnorm"

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        lm = config.lm
        self.input_layernorm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)
        self.cross_attn = IdeficsCrossAttention(config)
        self.post_attention_layernorm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)
        self.mlp = LlamaMLP(lm)
        shape = (1, 1, lm.hidden_size) if config.xattn_gate_per_channel else (1,)
        self.alpha_cross_attn = nn.Parameter(torch.zeros(shape))  # transformers' default "zeros" initializer
        self.alpha_dense = nn.Parameter(torch.zeros(shape))

    def forward(self, x: torch.Tensor, media: torch.Tensor | None, sees: torch.Tensor) -> torch.Tensor:
        if media is not None and media.shape[1]:
            x = x + self.alpha_cross_attn.tanh() * self.cross_attn(self.input_layernorm(x), media, sees)
        return x + self.alpha_dense.tanh() * self.mlp(self.post_attention_layernorm(x))

    # Roles (see GatedCrossAttentionBlock).
    @property
    def attn_norm(self) -> nn.Module:
        return self.input_layernorm

    @property
    def ff_norm(self) -> nn.Module:
        return self.post_attention_layernorm

    @property
    def attn_gate(self) -> torch.Tensor:
        return self.alpha_cross_attn.view(-1)

    @property
    def ff_gate(self) -> torch.Tensor:
        return self.alpha_dense.view(-1)

    def queries(self, normed: torch.Tensor) -> torch.Tensor:
        return self.cross_attn.queries(normed)

    def media_kv(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn.media_kv(latents)

    def attn_out(self, attended: torch.Tensor) -> torch.Tensor:
        return self.cross_attn.o_proj(attended)

    def ff_body(self, normed: torch.Tensor) -> torch.Tensor:
        return self.mlp(normed)
