"""The Llama 3.2 Vision tiled ViT, eager, with transformers' parameter names below `vision_model.`
(MllamaVisionModel's), as transformers 4.57 and 5.x compute it.

One image slot = `max_num_tiles` tiles of image_size^2 px (the processor pads missing tiles and missing images with
zeros; `aspect_ratio_mask` [B, N, tiles] marks the real tiles, `aspect_ratio_ids` [B, N] the tiling, 0 for a padded
image slot):
    patches (conv, no bias) + tanh(gate) * the tiling's pre-tile embedding (one vector per tile)
    -> class token first -> + (1 - tanh(g)) * position embedding + tanh(g) * the tiling's tile-position embedding
    -> LayerNorm -> pad each tile to a multiple of 8 tokens -> local encoder over all tiles of the image
    -> LayerNorm -> + tanh(gate) * post-tile embedding -> global encoder (tanh-gated residuals) -> padding removed
    -> [global output | the intermediate layers' states, stacked on a last axis and flattened] (vision_output_dim).

The encoders' attention mask is transformers' (and Meta's): a token is "padding" when its tile is not real or it is
one of the multiple-of-8 pad tokens; only padding-to-padding pairs are masked (a real token attends to padding,
padding attends to real tokens), additively with the dtype's finfo.min. Every padding length here is 3, 6 or 7:
(image_size / patch_size)^2 + 1 is never a multiple of 8 (a square is 0, 1 or 4 mod 8), so transformers'
`[..., -0:]` slice, which would mask every token, never fires.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .mllama_config import MllamaVisionConfig


def empty_embedding(rows: int, dim: int) -> nn.Embedding:
    """An nn.Embedding left uninitialised (its values are loaded): skips the normal_ fill, which on the meta device
    goes through torch's slow reference path the first time (seconds)."""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class MllamaVisionAttention(nn.Module):
    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = config.num_heads, config.hidden_size // config.num_heads
        d = config.hidden_size
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [M, S, D]; bias [M, 1, S, S] additive."""
        m, s, _ = x.shape
        q, k, v = (p(x).view(m, s, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(m, s, -1))


class MllamaVisionMLP(nn.Module):
    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MllamaVisionLayer(nn.Module):
    """Pre-LN block; the global encoder's blocks scale both residual branches by tanh of their gates."""

    def __init__(self, config: MllamaVisionConfig, gated: bool):
        super().__init__()
        self.gated = gated
        self.self_attn = MllamaVisionAttention(config)
        self.mlp = MllamaVisionMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.norm_eps)
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), bias)
        x = x + (self.gate_attn.tanh() * attn if self.gated else attn)
        ff = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * ff if self.gated else ff)


class MllamaVisionEncoder(nn.Module):
    def __init__(self, config: MllamaVisionConfig, num_layers: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList(MllamaVisionLayer(config, gated) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, bias: torch.Tensor, record: tuple[int, ...] = (),
                record_output: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> the last layer's output and, for each index in `record`, that layer's output (record_output) or
        input."""
        recorded = {}
        for i, layer in enumerate(self.layers):
            if i in record and not record_output:
                recorded[i] = x
            x = layer(x, bias)
            if i in record and record_output:
                recorded[i] = x
        return x, [recorded[i] for i in record]


class TilingEmbedding(nn.Module):
    """One learned vector per (tiling, tile), tanh-gated: transformers' MllamaPrecomputedAspectRatioEmbedding."""

    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.tiles, self.dim = config.max_num_tiles, config.hidden_size
        self.embedding = empty_embedding(config.max_aspect_ratio_id + 1, config.max_num_tiles * config.hidden_size)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        """x [M, tiles, S, D]; aspect_ratio_ids [M]."""
        return x + self.embedding(aspect_ratio_ids).view(-1, self.tiles, 1, self.dim) * self.gate.tanh()


class GatedPositionalEmbedding(nn.Module):
    """(1 - tanh(g)) * a position embedding shared by all tiles + tanh(g) * the tiling's per-tile table."""

    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.tiles, self.tokens, self.dim = config.max_num_tiles, config.num_patches, config.hidden_size
        self.gate = nn.Parameter(torch.zeros(1))
        self.embedding = nn.Parameter(torch.zeros(self.tokens, self.dim))
        self.tile_embedding = empty_embedding(config.max_aspect_ratio_id + 1, self.tiles * self.tokens * self.dim)

    def forward(self, x: torch.Tensor, aspect_ratio_ids: torch.Tensor) -> torch.Tensor:
        g = self.gate.tanh()
        x = x + ((1 - g) * self.embedding).view(1, 1, self.tokens, self.dim)
        return x + g * self.tile_embedding(aspect_ratio_ids).view(-1, self.tiles, self.tokens, self.dim)


def encoder_attention_bias(aspect_ratio_mask: torch.Tensor, num_patches: int, padded: int,
                           dtype: torch.dtype) -> torch.Tensor:
    """aspect_ratio_mask [M, tiles] -> additive bias [M, 1, tiles * padded, tiles * padded]: finfo.min where the
    query and the key are both padding (a padded tile's token, or one of a tile's pad tokens), else 0."""
    m, tiles = aspect_ratio_mask.shape
    token = torch.arange(padded, device=aspect_ratio_mask.device) < num_patches
    real = (aspect_ratio_mask.bool()[:, :, None] & token).reshape(m, tiles * padded)
    both_pad = ~real[:, :, None] & ~real[:, None, :]
    bias = torch.zeros(both_pad.shape, dtype=dtype, device=aspect_ratio_mask.device)
    return bias.masked_fill(both_pad, torch.finfo(dtype).min)[:, None]


class MllamaVisionModel(nn.Module):
    def __init__(self, config: MllamaVisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, d, config.patch_size, stride=config.patch_size,
                                         bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.gated_positional_embedding = GatedPositionalEmbedding(config)
        self.pre_tile_positional_embedding = TilingEmbedding(config)
        self.post_tile_positional_embedding = TilingEmbedding(config)
        self.layernorm_pre = nn.LayerNorm(d)  # transformers builds both with the default eps (1e-5)
        self.layernorm_post = nn.LayerNorm(d)
        self.transformer = MllamaVisionEncoder(config, config.num_layers, gated=False)
        self.global_transformer = MllamaVisionEncoder(config, config.num_global_layers, gated=True)

    def forward(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                aspect_ratio_mask: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, N, tiles, C, H, W]; aspect_ratio_ids [B, N]; aspect_ratio_mask [B, N, tiles]
        -> [B, N, tiles, num_patches, vision_output_dim]."""
        c = self.config
        b, n, tiles = pixel_values.shape[:3]
        m, p, pp, d = b * n, c.num_patches, c.padded_patches, c.hidden_size
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.reshape(m * tiles, *pixel_values.shape[3:]).to(w.device, w.dtype))
        x = x.flatten(2).transpose(1, 2).reshape(m, tiles, p - 1, d)
        ids = aspect_ratio_ids.reshape(m)
        x = self.pre_tile_positional_embedding(x, ids)
        x = torch.cat([self.class_embedding.expand(m, tiles, 1, d), x], dim=2)
        x = self.layernorm_pre(self.gated_positional_embedding(x, ids))
        x = F.pad(x, (0, 0, 0, pp - p))  # [m, tiles, pp, d]
        bias = encoder_attention_bias(aspect_ratio_mask.reshape(m, tiles), p, pp, x.dtype)
        x, intermediate = self.transformer(x.reshape(m, tiles * pp, d), bias, c.intermediate_layers,
                                           record_output=c.intermediate_from == "layer_output")
        x = self.post_tile_positional_embedding(self.layernorm_post(x).view(m, tiles, pp, d), ids)
        x, _ = self.global_transformer(x.reshape(m, tiles * pp, d), bias)
        # [final | intermediates], the intermediates interleaved as transformers stacks them (on a last axis)
        stacked = torch.stack(intermediate, dim=-1).reshape(m, tiles, pp, -1)
        out = torch.cat([x.view(m, tiles, pp, d), stacked], dim=-1)[:, :, :p]
        return out.reshape(b, n, tiles, p, -1)
