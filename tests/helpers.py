"""One tolerance table and one verbose comparison for every test (FlagGems / Liger-Kernel style).

The rule: a fast implementation's error against a float64 reference may be at most twice the
error of plain torch at the same dtype, plus the dtype's atol. Comparing against the error of plain torch
keeps the bound honest: it tightens when the computation is easy and widens only where rounding is real.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from flamingo_fast.reference.lm import DecoupledLinear
from flamingo_fast.runtime.quantize import quantize_per_channel

# atol: the slack added to 2x plain torch's error; rtol: for direct comparisons of two implementations
# that should agree to rounding (for example a kernel and its torch twin at the same dtype).
TOLERANCE = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-10},
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.float16: {"atol": 2e-3, "rtol": 2e-3},
    torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2},
}

# Weight-only int8 (weights="int8"): the row is a rule, not a constant, because int8 changes the weights themselves
# and the error that follows depends on the model and the prompt. It is measured against a yardstick taken on the
# same model and prompt: the same weights rounded to bf16 instead (activations unchanged). A small weight
# perturbation moves an output linearly, so the output's relative error scales with the weights' relative error:
#     rel(int8) <= INT8_SLACK * (eps_int8 / eps_bf16) * rel(bf16 weights)       (int8_relative_bound)
# eps = ||w - rounded(w)|| / ||w|| over the quantized weights upstream of the output (the tiny presets: int8 6.1e-3,
# bf16 1.7e-3). INT8_SLACK = 2 is the project's factor (twice plain torch's error), here for the second-order terms;
# measured, int8's error is 0.47-0.67 of the bound after every layer (test_int8_runtime.py prints it). `int8_bound`
# applies the rule to a model's logits. The other half of an int8 check is the wiring: an int8 runtime equals the
# reference whose quantized weights are replaced by q * scale, to the row of its activation dtype above (fp32).
INT8_SLACK = 2.0


def int8_relative_bound(rel_bf16: float, eps_int8: float, eps_bf16: float) -> float:
    """The int8 row: the bound on an int8 output's relative error, from the same output's relative error with the
    weights rounded to bf16 (rel_bf16) and both roundings' relative weight errors over the weights upstream of it."""
    return INT8_SLACK * eps_int8 / eps_bf16 * rel_bf16


def quantized_weights(model) -> list[tuple[nn.Module, str]]:
    """(module, attribute) of every weight weights="int8" quantizes in a reference Flamingo: the LM's Linears (its
    decoder layers and gated cross-attention blocks) and its output head."""
    lm = model.lang_encoder
    found = [(m, "weight") for m in lm.modules() if type(m) is nn.Linear]
    if isinstance(lm.output_head, DecoupledLinear):
        found.append((lm.output_head, "weight"))
    return found


def dequantized(w: torch.Tensor) -> torch.Tensor:
    """q * scale of weights="int8"'s per-channel quantization, in w's dtype."""
    q, scales = quantize_per_channel(w)
    return (q.float() * scales[:, None]).to(w.dtype)


def bf16_rounded(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.bfloat16).to(w.dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| (Frobenius, in float64)."""
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def weight_rounding_error(weights, rounding) -> float:
    """||w - rounding(w)|| / ||w|| over all of `weights` (tensors) together."""
    err = norm = 0.0
    for w in weights:
        w = w.detach()
        err += (w.double() - rounding(w).double()).square().sum().item()
        norm += w.double().square().sum().item()
    return (err / norm) ** 0.5


def with_weights(model, rounding):
    """A copy of `model` whose quantized weights (quantized_weights) are `rounding(weight)` (ties to the embedding
    are cut: the runtime's embedding keeps the float table) -> (copy, ||w - rounding(w)|| / ||w|| over all of them)."""
    copied = copy.deepcopy(model)
    found = quantized_weights(copied)
    eps = weight_rounding_error([getattr(m, name) for m, name in found], rounding)
    for module, name in found:
        setattr(module, name, nn.Parameter(rounding(getattr(module, name).detach()), requires_grad=False))
    return copied, eps


def int8_bound(model, inputs, extra, real) -> tuple[float, float, torch.Tensor]:
    """The int8 row for `model`'s logits on one prompt: model(*inputs, **extra)[real] against the same with the
    weights rounded to bf16 -> (int8_relative_bound of the logits, the weights' int8 relative error, the reference's
    logits at the real positions)."""
    with torch.no_grad():
        ref = model(*inputs, **extra)[real]
        bf16_model, eps_bf16 = with_weights(model, bf16_rounded)
        eps_int8 = weight_rounding_error([getattr(m, name) for m, name in quantized_weights(model)], dequantized)
        rel_bf16 = relative_error(bf16_model(*inputs, **extra)[real], ref)
    return int8_relative_bound(rel_bf16, eps_int8, eps_bf16), eps_int8, ref


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, limit: int = 5) -> str:
    idx = bad.nonzero()[:limit]
    rows = [
        f"  at {tuple(i.tolist())}: got {actual[tuple(i)].item():.6g}, expected {expected[tuple(i)].item():.6g}"
        for i in idx
    ]
    return f"{int(bad.sum())} of {bad.numel()} elements differ; first ones:\n" + "\n".join(rows)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """allclose with the table's atol/rtol for `dtype` (default: actual's), printing the first mismatches."""
    tol = TOLERANCE[dtype or actual.dtype]
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a, e = actual.double(), expected.double()
    assert not torch.isnan(a).any(), f"NaN in output: {int(torch.isnan(a).sum())} elements"
    bad = (a - e).abs() > tol["atol"] + tol["rtol"] * e.abs()
    assert not bad.any(), describe_mismatch(a, e, bad)


def assert_within_torch_error(
    actual: torch.Tensor, reference64: torch.Tensor, torch_same_dtype: torch.Tensor, dtype: torch.dtype
) -> None:
    """max|actual - ref| <= 2 * max|torch_at_dtype - ref| + atol[dtype]  (ref computed in float64)."""
    assert actual.shape == reference64.shape, f"shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    a, r, t = actual.double(), reference64.double(), torch_same_dtype.double()
    assert not torch.isnan(a).any(), f"NaN in output: {int(torch.isnan(a).sum())} elements"
    err, torch_err = (a - r).abs().max().item(), (t - r).abs().max().item()
    bound = 2 * torch_err + TOLERANCE[dtype]["atol"]
    bad = (a - r).abs() > bound
    assert err <= bound, (
        f"max error {err:.3g} > bound {bound:.3g} (plain torch at {dtype}: {torch_err:.3g})\n"
        + describe_mismatch(a, r, bad)
    )


def record_beam_starts(monkeypatch) -> list[torch.Tensor]:
    """Patches generation.search.beam_search to record the first logits each beam search starts from (a copy per
    call, appended to the returned list), then run as usual."""
    from flamingo_fast.generation import search

    starts: list[torch.Tensor] = []
    plain = search.beam_search

    def recording(decoder, first_logits, *args, **kwargs):
        starts.append(first_logits.clone())
        return plain(decoder, first_logits, *args, **kwargs)

    monkeypatch.setattr(search, "beam_search", recording)
    return starts


def hf_sampling_probs(logits: torch.Tensor, sequences: torch.Tensor, temperature: float, top_k: int,
                      top_p: float) -> torch.Tensor:
    """transformers' own sampling distribution (its warpers, in its order) at each generated position: `logits`
    [B, new, V] teacher-forced over `sequences` [B, T + new] (the prompt's T tokens first) -> [B, new, V]."""
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    new = logits.shape[1]
    t = sequences.shape[1] - new
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k),
                                   TopPLogitsWarper(top_p)])
    return torch.stack([warpers(sequences[:, :t + s], logits[:, s].clone()).softmax(-1) for s in range(new)], dim=1)


def random_prompt(config, image_positions, seq_len: int, pad_left: int = 0):
    """One row: random text ids below the special tokens, `<image>` at `image_positions`, `pad_left` pads."""
    ids = torch.randint(0, config.eoc_token_id, (seq_len,))
    ids[list(image_positions)] = config.media_token_id
    mask = torch.ones(seq_len, dtype=torch.long)
    if pad_left:
        ids = torch.cat([torch.full((pad_left,), config.pad_token_id), ids])
        mask = torch.cat([torch.zeros(pad_left, dtype=torch.long), mask])
    return ids, mask


def random_batch(config, rows, num_images: int, frames: int = 1):
    """rows: [(image_positions, seq_len)], left-padded to the longest. -> vision_x, lang_x, attention_mask."""
    longest = max(seq_len for _, seq_len in rows)
    built = [random_prompt(config, pos, seq_len, pad_left=longest - seq_len) for pos, seq_len in rows]
    size = config.vision.image_size
    vision = torch.randn(len(rows), num_images, frames, 3, size, size) if num_images else None
    return vision, torch.stack([b[0] for b in built]), torch.stack([b[1] for b in built])


class Padded:
    """A copy of `t` living as a view inside a larger buffer full of `fill` (NaN for floats), `pad` extra
    elements on both sides of every dim: a kernel that reads out of bounds picks up NaN, one that writes out
    of bounds overwrites the fill, which `assert_padding_intact` catches.

    `order` stores the dims permuted (e.g. (0, 2, 1, 3) keeps a [B, H, T, d] view as a transposed
    [B, T, H, d] buffer, the layout the runtime passes). `last_dim_only` pads only the last stored dim, so
    the leading dims still flatten into rows with one stride."""

    def __init__(self, t: torch.Tensor, pad: int = 2, fill=None, order: tuple[int, ...] | None = None,
                 last_dim_only: bool = False):
        order = order or tuple(range(t.dim()))
        stored = t.permute(order)
        if fill is None:
            fill = float("nan") if t.is_floating_point() else 2**30
        self.fill = fill
        pads = [0] * (t.dim() - 1) + [pad] if last_dim_only else [pad] * t.dim()
        self.buffer = torch.full([s + 2 * p for s, p in zip(stored.shape, pads, strict=True)], fill, dtype=t.dtype,
                                 device=t.device)
        self.region = tuple(slice(p, p + s) for s, p in zip(stored.shape, pads, strict=True))
        inverse = [order.index(i) for i in range(len(order))]
        self.view = self.buffer[self.region].permute(inverse)
        self.view.copy_(t)

    def assert_padding_intact(self) -> None:
        outside = torch.ones_like(self.buffer, dtype=torch.bool)
        outside[self.region] = False
        rest = self.buffer[outside]
        intact = torch.isnan(rest) if self.buffer.is_floating_point() else rest == self.fill
        assert bool(intact.all()), f"{int((~intact).sum())} elements outside the view were written"


def nan_out(shape, dtype, order: tuple[int, ...] | None = None, device="cpu", last_dim_only: bool = False) -> Padded:
    """An `out=` tensor poisoned with NaN (inside a NaN-padded buffer): the op must overwrite all of it."""
    return Padded(torch.full(shape, float("nan"), dtype=dtype, device=device), order=order,
                  last_dim_only=last_dim_only)


def image_layout(T: int, num_images: int, before_first: int, generator: torch.Generator | None = None):
    """[T] int32 image index: `before_first` tokens of -1, then `num_images` segments of random lengths
    (each >= 1) starting at the first image. num_images == 0: all -1."""
    index = torch.full((T,), -1, dtype=torch.int32)
    if num_images == 0:
        return index
    if before_first + num_images > T:
        raise ValueError(f"{num_images} images do not fit in T={T} after {before_first} text tokens")
    starts = torch.randperm(T - before_first - 1, generator=generator)[: num_images - 1] + before_first + 1
    starts = torch.cat([torch.tensor([before_first]), starts.sort().values])
    marks = torch.zeros(T, dtype=torch.int32)
    marks[starts] = 1
    return marks.cumsum(0).to(torch.int32) - 1


# The marks of a test (or of one parameter, `pytest.param(..., marks=INTERPRETER_MARKS)`) that runs Triton kernels
# on CPU tensors: `pytest -m interpreter` selects it. It needs TRITON_INTERPRET=1, which conftest.py sets on a
# machine without CUDA; on a GPU machine it skips (the `cuda` tests run the same checks there on GPU tensors).
INTERPRETER_MARKS = (pytest.mark.interpreter,
                     pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                        reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1"))


def interpreter(test):
    """Mark a whole test with INTERPRETER_MARKS."""
    for mark in INTERPRETER_MARKS:
        test = mark(test)
    return test
