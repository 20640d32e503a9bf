"""Attention over a shared prefix plus private tails (a cascade: FlashInfer's, Hydragen's).

Each of a row's R hypotheses (its beams) attends to the row's prompt and to its own tail. The two parts are
computed apart, each returning its output and log-sum-exp, and merged exactly:

    out = (exp(lse_p) * out_p + exp(lse_t) * out_t) / (exp(lse_p) + exp(lse_t))

All R queries of a row (times the query heads that share a KV head) meet the prompt's keys in one
matrix-matrix product, Hydragen's form: the prompt's KV is read once per row, never copied per beam.
Computed in float32. This is the torch form; the Triton decode step computes each part with the split-KV kernel
(kernels/decode_attention.py, which returns the log-sum-exp) and merges them with `merge_attention_states`.
"""

from __future__ import annotations

import torch


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [..., M, d], k, v [..., N, d], bias broadcastable to [..., M, N] (additive; -inf = masked) ->
    (out [..., M, d] float32, lse [..., M] float32). Every query must see at least one key."""
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(scores, dim=-1)
    return torch.exp(scores - lse[..., None]) @ v.float(), lse


def merge_attention_states(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                           lse_b: torch.Tensor) -> torch.Tensor:
    """Two partial attentions of the same queries over disjoint keys -> the attention over all of them."""
    lse = torch.logaddexp(lse_a, lse_b)
    return out_a * torch.exp(lse_a - lse)[..., None] + out_b * torch.exp(lse_b - lse)[..., None]


def shared_prefix_attention(q: torch.Tensor, prefix_k: torch.Tensor, prefix_v: torch.Tensor,
                            prefix_bias: torch.Tensor, tail_k: torch.Tensor, tail_v: torch.Tensor,
                            tail_bias: torch.Tensor, per_row: int, scale: float) -> torch.Tensor:
    """One new token per hypothesis against its row's prefix and its own tail.

    q            [B * R, Hq, 1, d]       hypothesis h = b * R + r belongs to row b
    prefix_k, v  [B, Hkv, P, d]          the row's prompt (Hq = Hkv * G, grouped heads)
    prefix_bias  broadcastable to [B, Hkv, R * G, P], queries ordered (r, g)
    tail_k, v    [B * R, Hkv, T, d]      each hypothesis's own generated tokens
    tail_bias    broadcastable to [B * R, Hkv, G, T]
    -> [B * R, Hq, 1, d] in q's dtype.
    """
    hyps, hq, _, d = q.shape
    rows, hkv = prefix_k.shape[:2]
    groups = hq // hkv
    q_rows = q.reshape(rows, per_row, hkv, groups, d).permute(0, 2, 1, 3, 4).reshape(rows, hkv, per_row * groups, d)
    out_p, lse_p = attention_with_lse(q_rows, prefix_k, prefix_v, prefix_bias, scale)
    out_p = out_p.view(rows, hkv, per_row, groups, d).permute(0, 2, 1, 3, 4).reshape(hyps, hkv, groups, d)
    lse_p = lse_p.view(rows, hkv, per_row, groups).permute(0, 2, 1, 3).reshape(hyps, hkv, groups)
    out_t, lse_t = attention_with_lse(q.reshape(hyps, hkv, groups, d), tail_k, tail_v, tail_bias, scale)
    return merge_attention_states(out_p, lse_p, out_t, lse_t).reshape(hyps, hq, 1, d).to(q.dtype)
