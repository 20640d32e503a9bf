"""The two alternatives inside a decode step, each in two forms, so that decode.decode_step reads as one path.

    step = attention.prepare(state, inputs, kv_len, per_row, tails)   # per-step tensors, once for every layer
    q = kv_write.write(q, k, v, cos_sin, cache_keys, cache_values, inputs.kv_column)
    out = attention.attend(step, idx, q)                              # [H, Hq, 1, hd]

Self-attention (the "decode_attention" path, decode.DECODE_PATHS):
- `KernelAttention`: the split-KV kernel (KernelOps.decode_attention) over each row's valid cache columns, given as a
  range per row (no mask); with tails, the prompt and the tail are two launches merged by their log-sum-exps.
- `MaskedAttention`: SDPA over the static cache with a boolean mask or an additive ALiBi bias; with tails,
  attention.shared_prefix_attention over the prompt and the tail with additive biases.
K/V write (the "rotary_kv_write" path):
- `FusedKVWrite`: rotary on q and k and the cache write in one kernel (KernelOps.rotary_kv_write); the layers
  hand it q, k unrotated.
- `PlainKVWrite`: the layers rotate q, k; the new K/V go in with index_copy.

Everything here runs inside a captured step: static shapes, no host sync, nothing allocated from values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention import merge_attention_states, shared_prefix_attention
from .graphs import DecodeInputs


@dataclass
class StepTensors:
    """What one attention form computes once per step and every layer reads: the step's shape (hypotheses, rows,
    hypotheses per row, tails or not, the columns read) and the form's own tensors (`parts`)."""

    hypotheses: int
    rows: int
    per_row: int
    tails: bool
    kv_len: int
    inputs: DecodeInputs
    parts: dict


def _step(inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool, **parts) -> StepTensors:
    hypotheses = inputs.token.shape[0]
    return StepTensors(hypotheses, hypotheses // per_row, per_row, tails, kv_len, inputs, parts)


def mark_token_valid(state, inputs: DecodeInputs, rows: int, tails: bool) -> None:
    """A row that owns its segment writes its token at static-cache column kv_column: that column becomes valid.
    (A tail's columns [0, kv_column] are valid by position.)"""
    if not tails:
        state.kv.key_valid[:rows].index_fill_(1, inputs.kv_column, True)


def write_target(state, step: StepTensors, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where layer idx's new K/V go: each hypothesis's tail row (tails) or its row of the static cache."""
    if step.tails:
        return state.tail.keys[idx, :step.hypotheses], state.tail.values[idx, :step.hypotheses]
    return state.kv.keys[idx, :step.rows], state.kv.values[idx, :step.rows]


def prompt_kv(state, step: StepTensors, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer idx's static-cache keys and values the step reads: its rows, columns [0, kv_len)."""
    return state.kv.keys[idx, :step.rows, :, :step.kv_len], state.kv.values[idx, :step.rows, :, :step.kv_len]


class KernelAttention:
    """Split-KV decode attention: each row's valid columns as a range [kv_start, kv_end), read in place."""

    def prepare(self, state, inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool) -> StepTensors:
        hypotheses = inputs.token.shape[0]
        rows = hypotheses // per_row
        mark_token_valid(state, inputs, rows, tails)
        columns = torch.arange(kv_len, device=inputs.token.device)
        kv_end = inputs.kv_column + 1  # (columns past it may be stale within a graph's length bucket)
        if not tails:  # each row's valid columns are [kv_start, kv_column]: left padding only
            kv_start = kv_end - (state.kv.key_valid[:rows, :kv_len] & (columns < kv_end)).sum(dim=1)
            return _step(inputs, kv_len, per_row, tails, kv_start=kv_start, kv_end=kv_end)
        # the prompt's valid columns [kv_start, prompt_columns); the tail's [0, kv_column]
        prompt_valid = state.kv.key_valid[:rows, :kv_len] & (columns < inputs.prompt_columns)
        kv_start = inputs.prompt_columns - prompt_valid.sum(dim=1)
        prompt_query = inputs.prompt_columns + inputs.kv_column  # ALiBi: the query's column in its sequence
        return _step(inputs, kv_len, per_row, tails, kv_start=kv_start, kv_end=kv_end,
                     prompt_query=prompt_query)

    def attend(self, state, step: StepTensors, idx: int, q: torch.Tensor) -> torch.Tensor:
        """q [H, Hq, hd] -> [H, Hq, 1, hd]."""
        ops, lm, alibi = state.stack.ops, state.stack.lm, state.stack.alibi_slopes
        inputs, parts = step.inputs, step.parts
        prompt_keys, prompt_values = prompt_kv(state, step, idx)
        if not step.tails:
            return ops.decode_attention(
                q, prompt_keys, prompt_values, parts["kv_start"], parts["kv_end"], alibi_slopes=alibi,
                query_column=inputs.kv_column if lm.alibi else None,
            )[:, :, None]
        tail_keys, tail_values = write_target(state, step, idx)
        # the cascade: prompt (R hypotheses per row at once) and tail, merged in float32
        out32 = torch.empty(q.shape, dtype=torch.float32, device=q.device)
        out_p, lse_p = ops.decode_attention(
            q, prompt_keys, prompt_values, parts["kv_start"], inputs.prompt_columns, queries_per_row=step.per_row,
            alibi_slopes=alibi, query_column=parts["prompt_query"] if lm.alibi else None, return_lse=True, out=out32)
        out_t, lse_t = ops.decode_attention(
            q, tail_keys, tail_values, None, parts["kv_end"], alibi_slopes=alibi,
            query_column=inputs.kv_column if lm.alibi else None, return_lse=True)
        return merge_attention_states(out_p, lse_p, out_t.float(), lse_t).to(q.dtype)[:, :, None]


class MaskedAttention:
    """SDPA over the static cache with a mask (or ALiBi's additive bias); the cascade in torch with tails."""

    def prepare(self, state, inputs: DecodeInputs, kv_len: int, per_row: int, tails: bool) -> StepTensors:
        lm, alibi = state.stack.lm, state.stack.alibi_slopes
        hypotheses = inputs.token.shape[0]
        rows = hypotheses // per_row
        mark_token_valid(state, inputs, rows, tails)
        device = inputs.token.device
        columns = torch.arange(kv_len, device=device)
        dtype = state.kv.keys.dtype
        if not tails:
            mask = state.kv.key_valid[:rows, None, None, :kv_len]
            if lm.alibi:  # slope * (key column - query column), the token's own column being kv_column
                bias = alibi[:, None] * (columns - inputs.kv_column).to(torch.float32)
                mask = bias.to(dtype)[None, :, None, :].masked_fill(~mask, float("-inf"))  # [1, H, 1, kv_len]
            return _step(inputs, kv_len, per_row, tails, mask=mask)
        tail = state.tail
        groups = lm.num_heads // lm.num_kv_heads
        tail_columns = torch.arange(tail.max_tail_len, device=device)
        prompt_bias = torch.zeros(rows, 1, 1, kv_len, device=device).masked_fill(
            ~state.kv.key_valid[:rows, None, None, :kv_len], float("-inf"))
        tail_bias = torch.zeros(tail.max_tail_len, device=device).masked_fill(
            tail_columns > inputs.kv_column, float("-inf"))
        if lm.alibi:  # distances from the query's column: prompt_columns + kv_column in the whole sequence
            slopes = alibi.view(lm.num_kv_heads, 1, groups, 1)
            query = inputs.prompt_columns + inputs.kv_column
            prompt_bias = prompt_bias + (slopes * (columns - query)).expand(
                -1, per_row, -1, -1).reshape(lm.num_kv_heads, per_row * groups, kv_len)
            tail_bias = tail_bias + slopes[:, 0] * (tail_columns - inputs.kv_column)  # [Hkv, G, T]
        return _step(inputs, kv_len, per_row, tails, prompt_bias=prompt_bias, tail_bias=tail_bias)

    def attend(self, state, step: StepTensors, idx: int, q: torch.Tensor) -> torch.Tensor:
        """q [H, Hq, hd] -> [H, Hq, 1, hd]."""
        lm, parts = state.stack.lm, step.parts
        prompt_keys, prompt_values = prompt_kv(state, step, idx)
        if not step.tails:
            return F.scaled_dot_product_attention(q[:, :, None], prompt_keys, prompt_values, attn_mask=parts["mask"],
                                                  enable_gqa=lm.num_heads != lm.num_kv_heads)
        tail_keys, tail_values = write_target(state, step, idx)
        return shared_prefix_attention(q[:, :, None], prompt_keys, prompt_values, parts["prompt_bias"], tail_keys,
                                       tail_values, parts["tail_bias"], step.per_row, lm.head_dim**-0.5)


class FusedKVWrite:
    """Rotary on q, k and the K/V write in one kernel: the layers hand over q, k unrotated."""

    rotates = True  # this write applies the rotary embedding itself

    def write(self, ops, q, k, v, cos_sin, cache_keys, cache_values, kv_column) -> torch.Tensor:
        """q, k, v [H, heads, 1, hd] -> q [H, Hq, hd]; k, v written at column kv_column of the cache rows."""
        return ops.rotary_kv_write(q[:, :, 0], k[:, :, 0], v[:, :, 0], *cos_sin, cache_keys, cache_values, kv_column)


class PlainKVWrite:
    """The layers rotate q, k; the new K/V go in with index_copy."""

    rotates = False

    def write(self, ops, q, k, v, cos_sin, cache_keys, cache_values, kv_column) -> torch.Tensor:
        cache_keys.index_copy_(2, kv_column, k)
        cache_values.index_copy_(2, kv_column, v)
        return q[:, :, 0]
