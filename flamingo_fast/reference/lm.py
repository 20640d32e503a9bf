"""The reference's language models: LLaMA, MPT and GPT-NeoX, with Hugging Face's parameter names.

Also what they share with the fast path: RMSNorm and IDEFICS's decoupled vocabulary (DecoupledEmbedding,
DecoupledLinear); and the reference's decode cache (`ReferenceKVCache`, an explicit object: no state is kept on
modules between calls). The position math (rotary, ALiBi, the causal / padding mask) is in ../positions.py, shared
with the runtime. The gated cross-attention blocks that FlamingoLM inserts between these layers live in xattn.py;
FlamingoLM itself in model.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LMConfig
from ..positions import apply_rotary

# ----------------------------------------------------------------------------------------------------------
# The reference KV cache
# ----------------------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------------------
# RMSNorm and the decoupled vocabulary (IDEFICS's added tokens stored apart)
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
# LLaMA-style language model (Hugging Face parameter names)
# ----------------------------------------------------------------------------------------------------------


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
