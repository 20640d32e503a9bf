"""The eager PyTorch reference of Flamingo: the ground truth every fast path is tested against.

Written to read like the paper and to behave exactly like OpenFlamingo (DESIGN.md, "Exact semantics"):

    images -> CLIP-style ViT (patch tokens, class token dropped) -> Perceiver Resampler (64 latents / image)
    text   -> decoder-only LM (LLaMA, MPT or GPT-NeoX); before every `cross_attn_every_n_layers`-th layer a
              gated tanh cross-attention block lets each token attend to the latents of its own image.

Parameter names follow OpenFlamingo's state dict (`perceiver.layers.0.0.to_q.weight`,
`lang_encoder.gated_cross_attn_layers.3.attn_gate`, ...), the vision tower follows open_clip's, and each LM
family follows its Hugging Face model (`lang_encoder.model.*` LLaMA, `lang_encoder.transformer.*` MPT,
`lang_encoder.gpt_neox.*` GPT-NeoX), fused weights in their native layout, so checkpoints map onto this model
tensor for tensor (flamingo_fast/openflamingo.py holds the explicit name maps). No state is kept on modules
between calls: the decode KV cache is an explicit `ReferenceKVCache` object.

This model is deliberately slow where OpenFlamingo is slow: cross-attention is dense over all images and
masked, and its keys/values are recomputed from the latents at every decode step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import masking
from .config import FlamingoConfig, LMConfig, PerceiverConfig, VisionConfig
from .scoring import check_candidates, score_candidates
from .search import generate_ids, generation_options
from .timing import PhaseTimer
from .validation import check_generate_options, check_inputs

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
# Gated cross-attention
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
# LLaMA-style language model (Hugging Face parameter names)
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] (HF's non-interleaved rotate-half layout).

    `head_dim` is the number of rotated dims: the whole head for LLaMA, `rotary_dim` for GPT-NeoX."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of each head (all of them for LLaMA); the rest pass through."""
    rotary = cos.shape[-1]
    if rotary != x.shape[-1]:  # GPT-NeoX's partial rotary
        return torch.cat([apply_rotary(x[..., :rotary], cos, sin), x[..., rotary:]], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def alibi_slopes(num_heads: int, bias_max: float, device=None) -> torch.Tensor:
    """[H] float32 ALiBi slopes as MPT computes them: 2^(-bias_max * i / n) for i = 1..n (n the power of two
    >= H); for other head counts the odd-indexed slopes, then the even-indexed ones, first H kept."""
    n = 2 ** math.ceil(math.log2(num_heads))
    slopes = 2.0 ** (-torch.arange(1, n + 1, device=device, dtype=torch.float32) * (bias_max / n))
    if n != num_heads:
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:num_heads]
    return slopes


def alibi_attention_bias(allowed: torch.Tensor, slopes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """allowed [B, 1, T_q, T_k] bool (the last T_q key positions are the queries) -> additive bias
    [B, H, T_q, T_k]: slope * (key index - query index), -inf where not allowed. MPT adds
    slope * (key index - last key index), which differs by a constant per query row: the same softmax."""
    t_q, t_k = allowed.shape[-2:]
    q_idx = torch.arange(t_k - t_q, t_k, device=allowed.device)[:, None]
    distance = (torch.arange(t_k, device=allowed.device)[None, :] - q_idx).float()
    bias = (slopes[:, None, None] * distance).to(dtype)  # [H, T_q, T_k]
    return bias.masked_fill(~allowed, float("-inf"))


@dataclass
class ReferenceKVCache:
    """The reference's decode cache: per decoder layer, keys and values grown by concatenation."""

    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)

    @classmethod
    def empty(cls, num_layers: int) -> ReferenceKVCache:
        return cls([None] * num_layers, [None] * num_layers)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class LlamaAttention(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)

    def forward(self, x, rope, allowed: torch.Tensor, cache: ReferenceKVCache | None) -> torch.Tensor:
        """x [B, T, D]; rope = (cos, sin); allowed [B, 1, T, T_total] bool (causal + padding)."""
        cos, sin = rope
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, rope, mask, cache: ReferenceKVCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        added = config.additional_vocab_size
        self.embed_tokens = DecoupledEmbedding(config.vocab_size - added, added, config.hidden_size) if added \
            else nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


# ----------------------------------------------------------------------------------------------------------
# MPT (MPT-7B / transformers' MptForCausalLM names; MPT-1B's MosaicGPT names are mapped onto these)
# ----------------------------------------------------------------------------------------------------------


def _layer_norm(config: LMConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps, bias=config.bias)


class MptAttention(nn.Module):
    """Fused Wqkv ([q; k; v] rows), optional clamp and q/k LayerNorms over the full width, ALiBi in `mask`."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.num_heads, self.head_dim = layer_idx, config.num_heads, config.head_dim
        self.clip_qkv = config.clip_qkv
        h = config.hidden_size
        self.Wqkv = nn.Linear(h, 3 * h, bias=config.bias)
        if config.qk_ln:
            self.q_ln, self.k_ln = _layer_norm(config), _layer_norm(config)
        self.out_proj = nn.Linear(h, h, bias=config.bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q, k, v [B, H, T, hd] (the runtime calls this too)."""
        b, t, _ = x.shape
        qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)
        if hasattr(self, "q_ln"):
            q, k = self.q_ln(q), self.k_ln(k)
        return tuple(z.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))

    def forward(self, x, rope, mask, cache: ReferenceKVCache | None) -> torch.Tensor:
        """mask [B, H, T, T_total] float: ALiBi bias, -inf where not allowed."""
        b, t, _ = x.shape
        q, k, v = self.project(x)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class MptMLP(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class MptBlock(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.norm_1 = _layer_norm(config)
        self.attn = MptAttention(config, layer_idx)
        self.norm_2 = _layer_norm(config)
        self.ffn = MptMLP(config)

    def forward(self, x, rope, mask, cache: ReferenceKVCache | None) -> torch.Tensor:
        x = x + self.attn(self.norm_1(x), rope, mask, cache)
        return x + self.ffn(self.norm_2(x))


class MptModel(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(MptBlock(config, i) for i in range(config.num_layers))
        self.norm_f = _layer_norm(config)


# ----------------------------------------------------------------------------------------------------------
# GPT-NeoX (transformers' GPTNeoXForCausalLM names)
# ----------------------------------------------------------------------------------------------------------


class GPTNeoXAttention(nn.Module):
    """Fused query_key_value laid out per head as [q | k | v]; rotary on the first `rotary_dim` dims."""

    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.num_heads, self.head_dim = layer_idx, config.num_heads, config.head_dim
        h = config.hidden_size
        self.query_key_value = nn.Linear(h, 3 * h)
        self.dense = nn.Linear(h, h)

    def project(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D], rope = (cos, sin) -> q, k, v [B, H, T, hd], q and k rotated (the runtime calls this too)."""
        b, t, _ = x.shape
        qkv = self.query_key_value(x).view(b, t, self.num_heads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        return apply_rotary(q, *rope), apply_rotary(k, *rope), v

    def forward(self, x, rope, mask, cache: ReferenceKVCache | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.project(x, rope)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: LMConfig, layer_idx: int):
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, layer_idx)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, x, rope, mask, cache: ReferenceKVCache | None) -> torch.Tensor:
        attn = self.attention(self.input_layernorm(x), rope, mask, cache)
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x))
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(GPTNeoXLayer(config, i) for i in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def self_attention_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """key_valid [B, T_total] (0/1) -> allowed [B, 1, T_q, T_total] for the last T_q positions.

    Causal and padding-aware. A padding query (which sees no valid key) may attend to itself, so its row is
    finite; its output is never used."""
    total = key_valid.shape[1]
    q_pos = torch.arange(total - num_queries, total, device=key_valid.device)[:, None]
    k_pos = torch.arange(total, device=key_valid.device)[None, :]
    allowed = (k_pos <= q_pos)[None] & key_valid.bool()[:, None, :]
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


class FlamingoLM(nn.Module):
    """The decoder with gated cross-attention blocks inserted before every n-th layer.

    The decoder sits under its Hugging Face attribute (`model` LLaMA, `transformer` MPT, `gpt_neox`
    GPT-NeoX) with its output head (`lm_head`; `embed_out` for GPT-NeoX; MPT's is tied to `transformer.wte`);
    `embed_tokens`, `layers`, `final_norm` and `output_head` name the same modules for every family."""

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        self.config = config
        lm = config.lm
        if lm.family == "llama":
            self.model = LlamaModel(lm)
            added = lm.additional_vocab_size
            self.lm_head = DecoupledLinear(lm.hidden_size, lm.vocab_size - added, added) if added \
                else nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        elif lm.family == "mpt":
            self.transformer = MptModel(lm)
            self.lm_head = nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        else:
            self.gpt_neox = GPTNeoXModel(lm)
            self.embed_out = nn.Linear(lm.hidden_size, lm.vocab_size, bias=False)
        if lm.tie_word_embeddings or lm.family == "mpt":
            self.output_head.weight = self.embed_tokens.weight
            if lm.additional_vocab_size:
                self.output_head.additional_fc.weight = self.embed_tokens.additional_embedding.weight
        block = IdeficsGatedCrossAttentionBlock if config.layout == "idefics" else GatedCrossAttentionBlock
        self.gated_cross_attn_layers = nn.ModuleDict({str(i): block(config) for i in config.xattn_layer_indices})

    @property
    def embed_tokens(self) -> nn.Embedding:
        family = self.config.lm.family
        return self.model.embed_tokens if family == "llama" else self.transformer.wte if family == "mpt" \
            else self.gpt_neox.embed_in

    @property
    def layers(self) -> nn.ModuleList:
        family = self.config.lm.family
        return self.model.layers if family == "llama" else self.transformer.blocks if family == "mpt" \
            else self.gpt_neox.layers

    @property
    def final_norm(self) -> nn.Module:
        family = self.config.lm.family
        return self.model.norm if family == "llama" else self.transformer.norm_f if family == "mpt" \
            else self.gpt_neox.final_layer_norm

    @property
    def output_head(self) -> nn.Module:
        return self.embed_out if self.config.lm.family == "gpt_neox" else self.lm_head

    def position_inputs(self, positions: torch.Tensor, allowed: torch.Tensor, dtype: torch.dtype):
        """-> (rope, mask) for the decoder layers: rotary (cos, sin) and the boolean mask, or for ALiBi
        models no rope and an additive float mask."""
        lm = self.config.lm
        if lm.alibi:
            slopes = alibi_slopes(lm.num_heads, lm.alibi_bias_max, allowed.device)
            return None, alibi_attention_bias(allowed, slopes, dtype)
        return rotary_cos_sin(positions, lm.rotary_dim, lm.rope_theta, dtype), allowed

    def forward(
        self,
        input_ids: torch.Tensor,
        media: torch.Tensor | None,
        sight: torch.Tensor,
        positions: torch.Tensor,
        key_valid: torch.Tensor,
        cache: ReferenceKVCache | None = None,
    ) -> torch.Tensor:
        """input_ids, positions [B, T]; key_valid [B, T_total] over cache + new tokens -> logits. `sight`: what
        each token sees, in the layout's form: text_time [B, T] (OpenFlamingo: the 1-based image, 0 = none) or
        the image_attention_mask [B, T, N] bool (IDEFICS)."""
        x = self.embed_tokens(input_ids)
        rope, mask = self.position_inputs(positions, self_attention_mask(key_valid, input_ids.shape[1]), x.dtype)
        for idx, layer in enumerate(self.layers):
            if str(idx) in self.gated_cross_attn_layers:
                x = self.gated_cross_attn_layers[str(idx)](x, media, sight)
            x = layer(x, rope, mask, cache)
        return self.output_head(self.final_norm(x))


# ----------------------------------------------------------------------------------------------------------
# IDEFICS v1 (Hugging Face's IdeficsForVisionText2Text), parameter names as in transformers
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


class DecoupledEmbedding(nn.Module):
    """An embedding table in two parts, as IDEFICS stores it: rows [0, base) in `weight`, the added rows
    [base, base + added) in `additional_embedding`."""

    def __init__(self, base: int, added: int, dim: int):
        super().__init__()
        self.base = base
        self.weight = nn.Parameter(torch.empty(base, dim))
        self.additional_embedding = nn.Embedding(added, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        added = ids >= self.base
        low = F.embedding(ids.masked_fill(added, 0), self.weight)
        high = self.additional_embedding((ids - self.base).clamp(min=0))
        return torch.where(added[..., None], high, low)


class DecoupledLinear(nn.Module):
    """An output head in two parts: logits of rows [0, base) from `weight`, then of the added rows from
    `additional_fc`, concatenated."""

    def __init__(self, dim: int, base: int, added: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(base, dim))
        self.additional_fc = nn.Linear(dim, added, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.linear(x, self.weight), self.additional_fc(x)], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Flamingo
# ----------------------------------------------------------------------------------------------------------


class Flamingo(nn.Module):
    """Reference Flamingo: `forward(vision_x, lang_x, attention_mask) -> logits` and `generate(...)`.

    vision_x: [B, T_img, F, C, H, W] float images (or None for text-only prompts); lang_x: [B, T] token ids
    with `<image>` marking where each image sits; attention_mask: [B, T] 0/1, left padding. In the IDEFICS
    layout every call also takes `image_attention_mask` [B, T, T_img] (0/1, the processor's): which images each
    token sees; generated tokens see what the last prompt token sees.
    """

    def __init__(self, config: FlamingoConfig):
        super().__init__()
        self.config = config
        p = config.perceiver
        if config.layout == "idefics":
            self.vision_encoder = IdeficsVisionTransformer(config.vision)
            self.perceiver = IdeficsPerceiverResampler(config.vision_dim, p)
        else:
            self.vision_encoder = VisionTransformer(config.vision)
            self.perceiver = PerceiverResampler(config.vision_dim, p.depth, p.dim_head, p.heads, p.num_latents,
                                                p.ff_mult)
        self.lang_encoder = FlamingoLM(config)
        self.apply(_init_linear_and_embedding)

    def sight(self, lang_x: torch.Tensor, image_attention_mask: torch.Tensor | None) -> torch.Tensor:
        """What each prompt token sees, in FlamingoLM's form (checked inputs)."""
        if self.config.layout == "idefics":
            return image_attention_mask.bool()
        return masking.text_time(lang_x, self.config.media_token_id)

    def encode_vision(self, vision_x: torch.Tensor) -> torch.Tensor:
        """[B, T_img, F, C, H, W] -> latents [B, T_img, num_latents, D_vision]. No images (T_img = 0): no
        latents, which the cross-attention treats as no media."""
        b, t, f = vision_x.shape[:3]
        if t == 0:
            dtype = self.perceiver.latents.dtype
            return vision_x.new_zeros(b, 0, self.config.perceiver.num_latents, self.config.vision_dim, dtype=dtype)
        dtype = self.perceiver.latents.dtype
        tokens = self.vision_encoder(vision_x.reshape(b * t * f, *vision_x.shape[3:]).to(dtype))
        return self.perceiver(tokens.view(b, t, f, tokens.shape[1], tokens.shape[2]))

    def forward(
        self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
        image_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """-> logits [B, T, vocab]."""
        attention_mask = check_inputs(self.config, vision_x, lang_x, attention_mask, image_attention_mask)
        media = self.encode_vision(vision_x) if vision_x is not None else None
        return self.lang_encoder(lang_x, media, self.sight(lang_x, image_attention_mask),
                                 masking.positions_from_mask(attention_mask), attention_mask)

    @torch.no_grad()
    def prefill(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor,
                timer: PhaseTimer | None = None, image_attention_mask: torch.Tensor | None = None,
                ) -> tuple[ReferenceDecoder, torch.Tensor]:
        """Encode the images, run the prompt once -> (decoder over the cached prompt, float32 logits [B, vocab]
        of each row's last token). Inputs already checked."""
        config = self.config
        media = self.encode_vision(vision_x) if vision_x is not None and vision_x.shape[1] else None
        if timer is not None:
            timer.lap("vision")
        cache = ReferenceKVCache.empty(config.lm.num_layers)
        positions = masking.positions_from_mask(attention_mask)
        sight = self.sight(lang_x, image_attention_mask)
        logits = self.lang_encoder(lang_x, media, sight, positions, attention_mask, cache)[:, -1]
        if config.layout == "idefics":  # generated tokens see what the last prompt token sees
            decode_sight = sight[:, -1]
        else:  # the last image of the row (1-based)
            decode_sight = masking.images_per_row(lang_x, config.media_token_id)
        image_token = config.media_token_id if config.openflamingo_generated_image_bug else None
        decoder = ReferenceDecoder(self.lang_encoder, cache, media, decode_sight, positions[:, -1], attention_mask,
                                   image_token)
        return decoder, logits.float()

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
        """Greedy, sampled or beam-searched continuation -> ids [B * num_return_sequences, T + new].

        Greedy and sampling (num_beams=1): a row stops at its first stop token (default: `<|endofchunk|>` or the
        LM's eos; `eos_token_id=[]` never stops) and is then filled with `pad_token_id`; generation ends when
        every row has stopped. The first `min_new_tokens` tokens are never stop tokens. With
        `return_logits=True` returns `(ids, logits)`, logits [B, new, vocab] float32: the scores each new token
        was chosen from. Sampling options are ignored when `do_sample=False`.
        Beam search (num_beams > 1): Hugging Face's, with `length_penalty`, `early_stopping` and
        `num_return_sequences` (flamingo_fast/search.py says exactly which release it follows), searched plainly
        one hypothesis at a time (`beam_search_ref`: the ground truth the fast path's vectorised search is
        tested against); each row's best sequences come best first, padded with `pad_token_id`.
        Every generated token attends to the last image of its row's prompt (IDEFICS: to what the last prompt
        token sees). `timer` records phase times.
        """
        config = self.config
        attention_mask = check_inputs(config, vision_x, lang_x, attention_mask, image_attention_mask)
        check_generate_options(config, lang_x, attention_mask, max_new_tokens, min_new_tokens)
        options = generation_options(
            config, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
            temperature=temperature, top_k=top_k, top_p=top_p, num_beams=num_beams, length_penalty=length_penalty,
            early_stopping=early_stopping, num_return_sequences=num_return_sequences, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )
        lang_x = lang_x.long()
        return generate_ids(lambda: self.prefill(vision_x, lang_x, attention_mask, timer, image_attention_mask),
                            lang_x, options,
                            config.lm.vocab_size, generator=generator, timer=timer, return_logits=return_logits,
                            plain=True)


    @torch.no_grad()
    def score(self, vision_x: torch.Tensor | None, lang_x: torch.Tensor, attention_mask: torch.Tensor | None = None,
              candidates: Sequence[Sequence[int]] = (), normalize_length: bool = False,
              image_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log-likelihood of every candidate continuation after every row -> [B, C] float32: the sum over the
        candidate's tokens (the mean with `normalize_length`) of log p(token | prompt + its earlier tokens).
        Candidate tokens attend to the last image of their row, like generated tokens (scoring.py)."""
        attention_mask = check_inputs(self.config, vision_x, lang_x, attention_mask, image_attention_mask)
        tokens = check_candidates(candidates, self.config.lm.vocab_size, self.config.media_token_id)
        check_generate_options(self.config, lang_x, attention_mask, max(len(t) for t in tokens))
        decoder, first_logits = self.prefill(vision_x, lang_x.long(), attention_mask,
                                             image_attention_mask=image_attention_mask)
        return score_candidates(decoder, first_logits, tokens, len(tokens), normalize_length, progress=False)


class ReferenceDecoder:
    """The search interface (flamingo_fast/search.py) over the reference's grown-by-concatenation cache, done
    plainly: forking repeats every row's cache and media, reordering gathers whole caches."""

    def __init__(self, lm: FlamingoLM, cache: ReferenceKVCache, media: torch.Tensor | None, image: torch.Tensor,
                 position: torch.Tensor, key_valid: torch.Tensor, generated_image_token: int | None = None):
        self.lm, self.cache, self.media = lm, cache, media
        self.image, self.position, self.key_valid = image, position, key_valid  # [H], [H], [H, T so far]
        self.generated_image_token = generated_image_token  # set: OpenFlamingo's generated-<image> behaviour
        self.prompt = (list(cache.keys), list(cache.values), media, image, position, key_valid)  # fork restarts here

    def _select(self, index: torch.Tensor) -> None:
        self.cache.keys = [k.index_select(0, index) for k in self.cache.keys]
        self.cache.values = [v.index_select(0, index) for v in self.cache.values]
        self.media = self.media.index_select(0, index) if self.media is not None else None
        self.image, self.position = self.image[index], self.position[index]
        self.key_valid = self.key_valid[index]

    def fork(self, per_row: int, shared: bool | None = None) -> None:
        """Each prompt row becomes `per_row` hypotheses with empty tails (`shared` changes nothing here)."""
        keys, values, self.media, self.image, self.position, self.key_valid = self.prompt
        self.cache.keys, self.cache.values = list(keys), list(values)
        rows = torch.arange(self.position.shape[0], device=self.position.device)
        self._select(rows.repeat_interleave(per_row))

    def reorder(self, index: torch.Tensor) -> None:
        self._select(index)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every generated token belongs to the last image of its row's prompt (`image`, 1-based; IDEFICS: the
        last prompt token's image_attention_mask row, [H, N]), unless OpenFlamingo's generated-<image> behaviour
        is asked for (config.openflamingo_generated_image_bug)."""
        if self.generated_image_token is not None:
            self.image = masking.image_after_generated_tokens(tokens, self.image, self.generated_image_token)
        self.key_valid = torch.cat([self.key_valid, torch.ones_like(self.key_valid[:, :1])], dim=1)
        self.position = self.position + 1
        logits = self.lm(tokens[:, None], self.media, self.image[:, None], self.position[:, None], self.key_valid,
                         self.cache)
        return logits[:, -1].float()


def _init_linear_and_embedding(module: nn.Module) -> None:
    """A small, LLaMA-like initialisation, so random models have sane activations at every depth."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, VisionSelfAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
    elif isinstance(module, (DecoupledEmbedding, DecoupledLinear)):
        nn.init.normal_(module.weight, std=0.02)


def randomize_gates(model: Flamingo, generator: torch.Generator | None = None, low: float = 0.3, high: float = 1.2):
    """Give every tanh gate a random nonzero value with random sign (OpenFlamingo's zero init hides a broken
    branch). Random-weight benchmarks and every test use this."""
    with torch.no_grad():
        for block in model.lang_encoder.gated_cross_attn_layers.values():
            for gate in (block.attn_gate, block.ff_gate):  # [1], or [D] per channel (IDEFICS "vector")
                magnitude = low + (high - low) * torch.rand(gate.shape, generator=generator)
                sign = torch.where(torch.rand(gate.shape, generator=generator) < 0.5, 1.0, -1.0)
                gate.copy_(sign * magnitude)


def build_reference(config: FlamingoConfig, seed: int = 0, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> Flamingo:
    """A random-weight reference model with nonzero gates, seeded, in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        model = Flamingo(config)  # built where it will run: a 9B model initialises in seconds on a GPU
    randomize_gates(model, generator)
    if config.layout == "idefics":  # norms at exactly 1 would hide a norm applied with the wrong weight
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (nn.LayerNorm, RMSNorm)):
                    module.weight.mul_(1 + 0.2 * torch.randn(module.weight.shape, generator=generator))
    return model.to(dtype=dtype).eval()
