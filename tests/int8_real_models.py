"""The int8 drop-ins against real models from another package (transformers' IDEFICS in test_idefics.py,
open_flamingo's Flamingo in test_openflamingo.py and test_openflamingo_eval.py). The int8 bound is derived as
tests/test_int8_weights.py derives it (its module docstring), on the real model and prompt: the relative error of
the same outputs when the weights int8 quantizes are rounded to bf16 instead (fp32 activations), times the ratio of
those weights' int8 and bf16 relative rounding errors, times 2. The wiring is checked apart: with fp32 activations
an int8 drop-in computes the real model whose quantized weights are replaced by q * scale, to the fp32 table.

Needs torch and flamingo_fast only: the models come from the test files."""

from __future__ import annotations

import copy

import torch
from helpers import dequantized, relative_error


def with_rounded_weights(model, linears, rounding):
    """A copy of `model` whose `linears(copy)` have the weights `rounding(weight)` (a head tied to the input
    embedding is cut from it: the runtime keeps the embedding's float table) -> (the copy, ||w - rounding(w)|| / ||w||
    over all of them)."""
    copied = copy.deepcopy(model)
    err = norm = 0.0
    for module in linears(copied):
        weight = module.weight.detach()
        rounded = rounding(weight)
        err += (weight.double() - rounded.double()).square().sum().item()
        norm += weight.double().square().sum().item()
        module.weight = torch.nn.Parameter(rounded, requires_grad=False)
    return copied, (err / norm) ** 0.5


def int8_bound(model, linears, outputs):
    """`outputs(model)`: the compared values as one float tensor. -> (the derived bound on the int8 outputs' relative
    error, the weights' int8 relative error, outputs(model), a copy of `model` with the weights dequantized)."""
    with torch.no_grad():
        expected = outputs(model)
        bf16_model, eps_bf16 = with_rounded_weights(model, linears, lambda w: w.to(torch.bfloat16).to(w.dtype))
        dequant_model, eps_int8 = with_rounded_weights(model, linears, dequantized)
        rel_bf16 = relative_error(outputs(bf16_model), expected)
    return 2 * eps_int8 / eps_bf16 * rel_bf16, eps_int8, expected, dequant_model


def margin_safe_steps(new: torch.Tensor, ref_new: torch.Tensor, ref_logits: torch.Tensor, bound: float):
    """Greedy steps whose int8 token must equal the reference's (tests/test_int8_weights.py's greedy test): after the
    same prefix, with a reference margin (top-1 minus top-2 logit) over 4 sigma of the difference of two logits'
    errors, sigma = sqrt(2) x bound x RMS(logits). new, ref_new [B, n]; ref_logits [B, n, V] -> [B, n] bool."""
    equal_so_far = (new == ref_new).cummin(dim=1).values
    same_prefix = torch.cat([torch.ones_like(equal_so_far[:, :1]), equal_so_far[:, :-1]], dim=1)
    logits = ref_logits.double()
    top2 = logits.topk(2, dim=-1).values
    return same_prefix & (top2[..., 0] - top2[..., 1] > 4 * 2 ** 0.5 * bound * logits.square().mean(dim=-1).sqrt())


def assert_greedy_agrees_where_safe(new: torch.Tensor, ref_new: torch.Tensor, ref_logits: torch.Tensor, bound: float,
                                    label: str) -> None:
    """The int8 drop-in's greedy tokens equal the reference's at every margin-safe step (margin_safe_steps); the
    agreement over all of them is printed, not asserted (a flipped near-tie changes the rest of the row)."""
    sure = margin_safe_steps(new, ref_new, ref_logits, bound)
    print(f"{label}: greedy agreement {(new == ref_new).float().mean().item():.3f} over {new.numel()} tokens; "
          f"{int(sure.sum())} steps with a safe margin")
    assert sure.any()  # else the prompts assert nothing
    assert torch.equal(new[sure], ref_new[sure])


def held_tensors(drop_in) -> list[torch.Tensor]:
    """Every tensor the drop-in holds: its own, its reference's, its runtime model's."""
    return [t for module in (drop_in, drop_in.reference, drop_in.fast.model)
            for t in (*module.parameters(), *module.buffers())]
