"""Position math shared by the reference and the runtime: rotary embeddings (HF's rotate-half layout), MPT's ALiBi
slopes and bias, and the causal / padding self-attention mask."""

from __future__ import annotations

import math

import torch


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, 1, T, head_dim] (HF's non-interleaved rotate-half layout).

    `head_dim` is the number of rotated dims: the whole head for LLaMA, `rotary_dim` for GPT-NeoX."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotary_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies of the default rotary: theta^(-2i / head_dim)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_positions: int) -> torch.Tensor:
    """Llama 3.1's `rope_type: llama3` rescaling of rotary inverse frequencies (float32, as transformers computes
    it): wavelengths 2 pi / f longer than original_max_positions / low_freq_factor are slowed by `factor`, those
    shorter than original_max_positions / high_freq_factor kept, and those between interpolated linearly in
    original_max_positions / wavelength between the two."""
    wavelength = 2 * math.pi / inv_freq
    long = wavelength > original_max_positions / low_freq_factor
    short = wavelength < original_max_positions / high_freq_factor
    slowed = torch.where(long, inv_freq / factor, inv_freq)
    ramp = (original_max_positions / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (1 - ramp) * slowed / factor + ramp * slowed
    return torch.where(~short & ~long, between, slowed)


def rotary_cos_sin_from_inv_freq(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """positions [B, T] -> cos, sin [B, 1, T, 2 * len(inv_freq)] (rotary_cos_sin for any inverse frequencies)."""
    freqs = positions.float()[..., None] * inv_freq.to(positions.device)
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
