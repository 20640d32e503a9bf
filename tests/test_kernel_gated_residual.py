"""Fused tanh-gated residual (+ LayerNorm / RMSNorm of the result): kernel (interpreted) and twin against a
float64 formula, within 2x the error of the unfused torch ops at the same dtype. Gates are nonzero (an
OpenFlamingo checkpoint starts them at 0, which would hide a broken branch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Padded, assert_close, assert_within_torch_error, interpreter, nan_out

from flamingo_fast.kernels.gated_residual import gated_residual, gated_residual_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NORMS = [None, "layernorm", "rmsnorm"]
EPS = {None: 1e-5, "layernorm": 1e-5, "rmsnorm": 1e-6}


def gated_formula64(x, y, gate, norm, weight, bias, eps):
    out = x.double() + torch.tanh(gate.double()) * y.double()
    if norm is None:
        return out, None
    if norm == "layernorm":
        mean = out.mean(-1, keepdim=True)
        var = ((out - mean) ** 2).mean(-1, keepdim=True)
        normed = (out - mean) / torch.sqrt(var + eps) * weight.double()
        return out, normed + bias.double() if bias is not None else normed
    return out, out / torch.sqrt((out**2).mean(-1, keepdim=True) + eps) * weight.double()


def gated_plain_torch(x, y, gate, norm, weight, bias, eps):
    """The unfused modules at the inputs' dtype: `x + attn_gate.tanh() * y`, then nn.LayerNorm / LlamaRMSNorm."""
    out = x + torch.tanh(gate.to(x.dtype)) * y
    if norm is None:
        return out, None
    if norm == "layernorm":
        return out, F.layer_norm(out, (x.shape[-1],), weight, bias, eps)
    o32 = out.float()
    return out, weight * (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def make_inputs(shape, dtype, norm, per_channel, *, with_bias=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    D = shape[-1]
    x = torch.randn(shape, generator=g).to(device, dtype)
    y = torch.randn(shape, generator=g).to(device, dtype)
    gate = (torch.rand(D if per_channel else 1, generator=g) * 1.6 - 0.8).to(device)  # nonzero, both signs
    weight = (1 + 0.3 * torch.randn(D, generator=g)).to(device, dtype) if norm else None
    bias = (0.2 * torch.randn(D, generator=g)).to(device, dtype) if norm == "layernorm" and with_bias else None
    return x, y, gate, weight, bias


SHAPES = {"2x7x96": (2, 7, 96), "3x520": (3, 520)}


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n or "no-norm")
@pytest.mark.parametrize("per_channel", [False, True], ids=["gate[1]", "gate[D]"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_and_twin_match_formula(shape, per_channel, norm, dtype):
    x, y, gate, weight, bias = make_inputs(SHAPES[shape], dtype, norm, per_channel)
    eps = EPS[norm]
    # x keeps its rows (read in place with a row stride); y is padded everywhere (the launcher copies it)
    xp, yp, gp = Padded(x, last_dim_only=True), Padded(y), Padded(gate)
    wp = Padded(weight) if weight is not None else None
    bp = Padded(bias) if bias is not None else None
    out = nan_out(x.shape, dtype, last_dim_only=True)
    normed_out = nan_out(x.shape, dtype, last_dim_only=True) if norm else None
    result = gated_residual(
        xp.view, yp.view, gp.view, norm=norm, norm_weight=wp and wp.view, norm_bias=bp and bp.view, eps=eps,
        out=out.view, norm_out=normed_out and normed_out.view,
    )
    twin = gated_residual_ref(xp.view, yp.view, gp.view, norm=norm, norm_weight=weight, norm_bias=bias, eps=eps)
    for p in (xp, yp, gp, wp, bp, out, normed_out):
        if p is not None:
            p.assert_padding_intact()
    ref64 = gated_formula64(x, y, gate, norm, weight, bias, eps)
    plain = gated_plain_torch(x, y, gate, norm, weight, bias, eps)
    if norm is None:
        result, twin = (result, None), (twin, None)
    assert result[0].data_ptr() == out.view.data_ptr()
    for got, tw, r64, pl in zip(result, twin, ref64, plain, strict=True):
        if r64 is None:
            continue
        assert_within_torch_error(got, r64, pl, dtype)
        assert_within_torch_error(tw, r64, pl, dtype)
        assert_close(got, tw, dtype)


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n or "no-norm")
@pytest.mark.parametrize("shape", list(SHAPES))
def test_without_gate_is_residual_add_then_norm(shape, norm, dtype):
    """gate=None: a decoder layer's `x = x + y; h = norm(x)`, against the float64 formula and unfused torch."""
    x, y, _, weight, bias = make_inputs(SHAPES[shape], dtype, norm, False)
    eps = EPS[norm]
    xp, yp = Padded(x, last_dim_only=True), Padded(y)
    out = nan_out(x.shape, dtype, last_dim_only=True)
    normed_out = nan_out(x.shape, dtype, last_dim_only=True) if norm else None
    result = gated_residual(xp.view, yp.view, None, norm=norm, norm_weight=weight, norm_bias=bias, eps=eps,
                            out=out.view, norm_out=normed_out and normed_out.view)
    twin = gated_residual_ref(x, y, None, norm=norm, norm_weight=weight, norm_bias=bias, eps=eps)
    for p in (xp, yp, out, normed_out):
        if p is not None:
            p.assert_padding_intact()
    # tanh(gate) = 1 exactly in float64 is the same formula; plain torch is the modules' own `x + y`.
    ref64 = gated_formula64(x, y, torch.tensor([float("inf")]), norm, weight, bias, eps)
    plain_sum = x + y
    if norm is None:
        plain = (plain_sum, None)
    elif norm == "layernorm":
        plain = (plain_sum, F.layer_norm(plain_sum, (x.shape[-1],), weight, bias, eps))
    else:
        s32 = plain_sum.float()
        plain = (plain_sum, weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype))
    if norm is None:
        result, twin = (result, None), (twin, None)
    assert torch.equal(result[0], plain_sum) and torch.equal(twin[0], plain_sum)  # one rounding of the sum
    for got, tw, r64, pl in zip(result, twin, ref64, plain, strict=True):
        if r64 is None:
            continue
        assert_within_torch_error(got, r64, pl, dtype)
        assert_within_torch_error(tw, r64, pl, dtype)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_wide_row_one_per_program(dtype):
    """LLaMA-7B width: one row per program, 8 warps; RMSNorm as the next decoder layer needs it."""
    x, y, gate, weight, _ = make_inputs((3, 4096), dtype, "rmsnorm", False)
    result = gated_residual(x, y, gate, norm="rmsnorm", norm_weight=weight, eps=1e-6)
    ref64 = gated_formula64(x, y, gate, "rmsnorm", weight, None, 1e-6)
    plain = gated_plain_torch(x, y, gate, "rmsnorm", weight, None, 1e-6)
    for got, r64, pl in zip(result, ref64, plain, strict=True):
        assert_within_torch_error(got, r64, pl, dtype)


@interpreter
def test_layernorm_without_bias_and_in_place_update():
    x, y, gate, weight, _ = make_inputs((4, 96), torch.bfloat16, "layernorm", False, with_bias=False)
    expected = gated_residual_ref(x, y, gate, norm="layernorm", norm_weight=weight)
    x_in_place = x.clone()
    out, normed = gated_residual(x_in_place, y, gate, norm="layernorm", norm_weight=weight, out=x_in_place)
    assert out.data_ptr() == x_in_place.data_ptr()
    assert_close(out, expected[0])
    assert_close(normed, expected[1])


@interpreter
def test_the_tanh_is_taken_in_the_kernel():
    """Large and tiny gates: tanh saturates at +-1 and is ~gate near 0 (the exp form alone would cancel)."""
    x = torch.zeros(1, 64)
    y = torch.ones(1, 64)
    for g in (-30.0, -2.0, -1e-3, 1e-6, 0.5, 30.0):
        got = gated_residual(x, y, torch.tensor([g]))
        expected = torch.tanh(torch.tensor(g, dtype=torch.float64))
        assert abs(float(got[0, 0]) - float(expected)) <= 2e-7 * max(1.0, abs(float(expected)))
        assert abs(float(got[0, 0]) - float(expected)) <= 1e-6 * abs(float(expected))


@interpreter
def test_empty_rows():
    x = torch.empty(0, 96)
    for fn in (gated_residual, gated_residual_ref):
        assert fn(x, x, torch.ones(1)).shape == (0, 96)


BAD_INPUTS = [
    ("y shape", lambda a: a.update(y=a["y"][:, :5]), "y"),
    ("y dtype", lambda a: a.update(y=a["y"].half()), "y"),
    ("x int", lambda a: a.update(x=a["x"].long(), y=a["y"].long()), "x"),
    ("gate [2]", lambda a: a.update(gate=torch.ones(2)), "gate"),
    ("gate [1, 96]", lambda a: a.update(gate=torch.ones(1, 96)), "gate"),
    ("unknown norm", lambda a: a.update(norm="batchnorm"), "norm"),
    ("norm without weight", lambda a: a.update(norm="layernorm"), "norm_weight"),
    ("weight dtype", lambda a: a.update(norm="rmsnorm", norm_weight=torch.ones(96, dtype=torch.float16)),
     "norm_weight"),
    ("weight shape", lambda a: a.update(norm="rmsnorm", norm_weight=torch.ones(95)), "norm_weight"),
    ("bias with rmsnorm", lambda a: a.update(norm="rmsnorm", norm_weight=torch.ones(96), norm_bias=torch.ones(96)),
     "norm_bias"),
    ("weight without norm", lambda a: a.update(norm_weight=torch.ones(96)), "norm_weight"),
    ("out shape", lambda a: a.update(out=torch.empty(4, 95)), "out"),
    ("norm_out dtype", lambda a: a.update(norm="rmsnorm", norm_weight=torch.ones(96),
                                          norm_out=torch.empty(4, 96, dtype=torch.float16)), "norm_out"),
    ("eps negative", lambda a: a.update(eps=-1.0), "eps"),
]


@pytest.mark.parametrize("fn", [gated_residual, gated_residual_ref], ids=["kernel", "twin"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fn, case):
    _, change, name = case
    args = dict(x=torch.randn(4, 96), y=torch.randn(4, 96), gate=torch.ones(1))
    change(args)
    x, y, gate = args.pop("x"), args.pop("y"), args.pop("gate")
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(x, y, gate, **args)


def test_kernel_rejects_an_out_whose_rows_do_not_flatten():
    x = torch.randn(4, 96)
    with pytest.raises(ValueError, match="^out"):
        gated_residual(x, x, torch.ones(1), out=torch.empty(96, 4).t())


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("norm", NORMS, ids=lambda n: n or "no-norm")
@pytest.mark.parametrize("per_channel", [False, True], ids=["gate[1]", "gate[D]"])
def test_gpu_real_sizes_bf16(norm, per_channel):
    x, y, gate, weight, bias = make_inputs((4, 2048, 4096), torch.bfloat16, norm, per_channel, device="cuda")
    eps = EPS[norm]
    result = gated_residual(x, y, gate, norm=norm, norm_weight=weight, norm_bias=bias, eps=eps)
    twin = gated_residual_ref(x, y, gate, norm=norm, norm_weight=weight, norm_bias=bias, eps=eps)
    ref64 = gated_formula64(x, y, gate, norm, weight, bias, eps)
    plain = gated_plain_torch(x, y, gate, norm, weight, bias, eps)
    if norm is None:
        result, twin = (result, None), (twin, None)
    for got, tw, r64, pl in zip(result, twin, ref64, plain, strict=True):
        if r64 is not None:
            assert_within_torch_error(got, r64, pl, torch.bfloat16)
            assert_within_torch_error(tw, r64, pl, torch.bfloat16)
