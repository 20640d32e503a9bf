"""The reference's media path, both layouts: vision towers and perceiver resamplers.

OpenFlamingo's layout: open_clip's VisionTransformer (patch tokens, class token dropped) and OpenFlamingo's
PerceiverResampler (helpers.py parameter names). IDEFICS v1: transformers' CLIP vision tower (class token kept,
no final LayerNorm) and IdeficsPerceiverResampler. Both perceivers run through `resample`, which reads them by
role. `feed_forward` (OpenFlamingo's LN -> Linear -> GELU -> Linear) is shared with the gated cross-attention
blocks (xattn.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PerceiverConfig, VisionConfig

# ----------------------------------------------------------------------------------------------------------
# Vision encoder (open_clip's VisionTransformer layout)
# ----------------------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class VisionSelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * width, width)))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(b, n, self.heads, w // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        w = config.width
        self.ln_1 = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.attn = VisionSelfAttention(w, config.heads)
        self.ln_2 = nn.LayerNorm(w, eps=config.layer_norm_eps)
        act = QuickGELU() if config.act == "quick_gelu" else nn.GELU()
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(w, config.mlp_width))
        self.mlp.add_module("gelu", act)
        self.mlp.add_module("c_proj", nn.Linear(config.mlp_width, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisionBlocks(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(VisionBlock(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP-style ViT. Returns the patch tokens after the final LayerNorm: class token dropped, no projection."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.conv1 = nn.Conv2d(config.in_channels, w, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.positional_embedding = nn.Parameter(torch.randn(config.num_patches + 1, w) * w**-0.5)
        self.ln_pre = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.transformer = VisionBlocks(config)
        self.ln_post = nn.LayerNorm(w, eps=config.layer_norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, num_patches, width]."""
        patches = self.conv1(images).flatten(2).transpose(1, 2)  # [N, P, w]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.positional_embedding.to(patches.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x)[:, 1:]


# ----------------------------------------------------------------------------------------------------------
# Perceiver resampler (OpenFlamingo's helpers.py layout)
# ----------------------------------------------------------------------------------------------------------


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    """LN -> Linear(no bias) -> GELU(exact) -> Linear(no bias); indices 0..3 as in OpenFlamingo."""
    inner = dim * mult
    return nn.Sequential(
        nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False)
    )


class PerceiverAttention(nn.Module):
    """Latents attend to concat(media tokens, latents); queries come from the latents only."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        inner = heads * dim_head
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def project(self, media: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The fast path's view (FastPerceiverResampler): media [N, M, D], latents [N, L, D] -> q [N, h, L, dh] and
        the keys/values of the media and of the latents, [N, h, M, dh] and [N, h, L, dh], computed apart."""
        n, h, dh = media.shape[0], self.heads, self.dim_head
        xm, lat = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(lat).view(n, -1, h, dh).transpose(1, 2)
        k_media, v_media = self.to_kv(xm).view(n, -1, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
        k_lat, v_lat = self.to_kv(lat).view(n, -1, 2, h, dh).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k_media, v_media, k_lat, v_lat

    def out(self, attended: torch.Tensor) -> torch.Tensor:
        return self.to_out(attended)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media [N, M, D], latents [N, L, D] -> [N, L, D] (the update, before the residual add)."""
        n, m, _ = media.shape
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(n, -1, self.heads, self.dim_head).transpose(1, 2) for t in (q, k, v))
        scores = (q * self.scale) @ k.transpose(-1, -2)
        attn = scores.float().softmax(dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(n, -1, self.heads * self.dim_head)
        return self.to_out(out)


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_latents: int, ff_mult: int):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    @property
    def blocks(self) -> nn.ModuleList:
        """(attention, feed-forward) pairs, by role: the same accessor as IdeficsPerceiverResampler's."""
        return self.layers

    @property
    def output_norm(self) -> nn.Module:
        return self.norm

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """media [B, T_img, F, v, D] -> latents [B, T_img, num_latents, D] (frames are concatenated)."""
        return resample(self, media)


def resample(resampler: nn.Module, media: torch.Tensor) -> torch.Tensor:
    """The perceiver of either layout, read by role (`latents`, `blocks`, `output_norm`): learned latents attend
    to [media; latents] in each (attention, feed-forward) block, each with a residual; then the output norm.
    media [B, T_img, F, v, D] -> latents [B, T_img, num_latents, D]."""
    b, t, f, v, d = media.shape
    media = media.reshape(b * t, f * v, d)
    latents = resampler.latents.to(media.dtype).expand(b * t, -1, -1)
    for attn, ff in resampler.blocks:
        latents = attn(media, latents) + latents
        latents = ff(latents) + latents
    return resampler.output_norm(latents).view(b, t, -1, d)


# ----------------------------------------------------------------------------------------------------------
# IDEFICS v1 vision tower and perceiver (Hugging Face's IdeficsForVisionText2Text), names as in transformers
# ----------------------------------------------------------------------------------------------------------


class IdeficsVisionAttention(nn.Module):
    """CLIP attention with separate biased q/k/v projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, w = x.shape
        q, k, v = (p(x).view(b, n, self.heads, w // self.heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, w))


class IdeficsVisionLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        w = config.width
        self.layer_norm1 = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.self_attn = IdeficsVisionAttention(w, config.heads)
        self.layer_norm2 = nn.LayerNorm(w, eps=config.layer_norm_eps)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(w, config.mlp_width))
        self.mlp.add_module("act", QuickGELU() if config.act == "quick_gelu" else nn.GELU())
        self.mlp.add_module("fc2", nn.Linear(config.mlp_width, w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class IdeficsVisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        w = config.width
        self.patch_embedding = nn.Conv2d(config.in_channels, w, config.patch_size, stride=config.patch_size,
                                         bias=False)
        self.class_embedding = nn.Parameter(torch.randn(w) * w**-0.5)
        self.position_embedding = nn.Embedding(config.num_patches + 1, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(images).flatten(2).transpose(1, 2)  # [N, P, w]
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight.to(patches.dtype)


class IdeficsVisionEncoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(IdeficsVisionLayer(config) for _ in range(config.layers))


class IdeficsVisionTransformer(nn.Module):
    """IDEFICS's CLIP ViT. Returns the last layer's tokens as they are: class token included, no final
    LayerNorm (transformers applies `post_layernorm` to the pooled class token only, which IDEFICS never uses),
    no projection."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = IdeficsVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.width, eps=config.layer_norm_eps)  # transformers' spelling
        self.encoder = IdeficsVisionEncoder(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, num_patches + 1, width]."""
        x = self.pre_layrnorm(self.embeddings(images))
        for layer in self.encoder.layers:
            x = layer(x)
        return x


class IdeficsPerceiverAttention(nn.Module):
    """Latents attend to concat(image tokens, latents), with separate q/k/v projections and, with `qk_norm`, a
    LayerNorm over each head's queries and keys."""

    def __init__(self, dim: int, dim_head: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.dim_head, self.scale = heads, dim_head, dim_head**-0.5
        inner = heads * dim_head
        self.context_layer_norm = nn.LayerNorm(dim)
        self.latents_layer_norm = nn.LayerNorm(dim)
        self.qk_norm = qk_norm
        if qk_norm:
            self.q_layer_norm = nn.LayerNorm(dim_head)
            self.k_layer_norm = nn.LayerNorm(dim_head)
        self.q_proj = nn.Linear(dim, inner, bias=False)
        self.k_proj = nn.Linear(dim, inner, bias=False)
        self.v_proj = nn.Linear(dim, inner, bias=False)
        self.output_proj = nn.Linear(inner, dim, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)

    def project(self, media: torch.Tensor, latents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """media [N, M, D], latents [N, L, D] -> q [N, h, L, dh], media keys/values [N, h, M, dh], latent
        keys/values [N, h, L, dh] (q/k norms applied)."""
        context, lat = self.context_layer_norm(media), self.latents_layer_norm(latents)
        q = self._heads(self.q_proj(lat))
        k_media, v_media = self._heads(self.k_proj(context)), self._heads(self.v_proj(context))
        k_lat, v_lat = self._heads(self.k_proj(lat)), self._heads(self.v_proj(lat))
        if self.qk_norm:
            q, k_media, k_lat = self.q_layer_norm(q), self.k_layer_norm(k_media), self.k_layer_norm(k_lat)
        return q, k_media, v_media, k_lat, v_lat

    def out(self, attended: torch.Tensor) -> torch.Tensor:
        return self.output_proj(attended)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media [N, M, D], latents [N, L, D] -> [N, L, D] (the update, before the residual add)."""
        q, k_media, v_media, k_lat, v_lat = self.project(media, latents)
        k, v = torch.cat([k_media, k_lat], dim=2), torch.cat([v_media, v_lat], dim=2)
        attn = ((q * self.scale) @ k.transpose(-1, -2)).float().softmax(dim=-1).to(v.dtype)
        return self.out((attn @ v).transpose(1, 2).flatten(2))


class IdeficsPerceiverMLP(nn.Module):
    """LayerNorm -> Linear -> ReLU -> Linear, no biases."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, inner, bias=False)
        self.c_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.fc(self.ln(x))))


class IdeficsPerceiverResampler(nn.Module):
    def __init__(self, dim: int, p: PerceiverConfig):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(p.num_latents, dim))
        self.blocks = nn.ModuleList(
            nn.ModuleList([IdeficsPerceiverAttention(dim, p.dim_head, p.heads, p.qk_norm),
                           IdeficsPerceiverMLP(dim, dim * p.ff_mult)])
            for _ in range(p.depth)
        )
        self.layer_norm = nn.LayerNorm(dim)

    @property
    def output_norm(self) -> nn.Module:
        return self.layer_norm

    def forward(self, media: torch.Tensor) -> torch.Tensor:
        """media [B, T_img, F, v, D] -> latents [B, T_img, num_latents, D] (IDEFICS images have one frame)."""
        return resample(self, media)
