"""Perceiver attention over [media; latents] keys without the concatenation: kernel (interpreted) and twin
against a float64 formula (which does concatenate), within 2x the error of plain torch at the same dtype."""

from __future__ import annotations

import pytest
import torch
from helpers import Padded, assert_close, assert_within_torch_error, interpreter, nan_out

from flamingo_fast.kernels.perceiver_attention import perceiver_attention, perceiver_attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
D_HEAD = 64


def perceiver_formula64(q, k_media, v_media, k_latents, v_latents, scale=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = torch.cat([k_media, k_latents], dim=2).double()
    v = torch.cat([v_media, v_latents], dim=2).double()
    weights = torch.softmax(torch.einsum("bhld,bhnd->bhln", q.double(), k) * scale, dim=-1)
    return torch.einsum("bhln,bhnd->bhld", weights, v)


def perceiver_plain_torch(q, k_media, v_media, k_latents, v_latents, scale=None):
    """OpenFlamingo's PerceiverAttention at the inputs' dtype: concat, q * scale, sim - amax, softmax."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k = torch.cat([k_media, k_latents], dim=2)
    v = torch.cat([v_media, v_latents], dim=2)
    sim = (q * scale) @ k.transpose(-1, -2)
    return (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1) @ v


def make_inputs(B, H, L, M, dtype, seed=0, device="cpu"):
    """q / k_latents / v_latents as views of [B, L, H, d] tensors and the media K/V as strided views of one
    [B, M, 2, H, d] projection, the layouts the resampler produces."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, H, D_HEAD, generator=g).transpose(1, 2)
    kv_media = torch.randn(B, M, 2, H, D_HEAD, generator=g).permute(2, 0, 3, 1, 4)
    kv_latents = torch.randn(B, L, 2, H, D_HEAD, generator=g).permute(2, 0, 3, 1, 4)
    to = lambda t: t.to(device, dtype)
    return to(q), to(kv_media[0]), to(kv_media[1]), to(kv_latents[0]), to(kv_latents[1])


CASES = {"L64-M196": (64, 196, None), "L17-M70": (17, 70, 0.3), "L64-M0": (64, 0, None), "L80-M256": (80, 256, None)}


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_and_twin_match_formula(name, dtype):
    L, M, scale = CASES[name]
    args = make_inputs(2, 2, L, M, dtype)
    padded = [Padded(t, order=(0, 2, 1, 3)) for t in args]
    out = nan_out(tuple(args[0].shape), dtype, order=(0, 2, 1, 3))
    result = perceiver_attention(*(p.view for p in padded), scale=scale, out=out.view)
    assert result.data_ptr() == out.view.data_ptr()
    for p in [*padded, out]:
        p.assert_padding_intact()
    ref64 = perceiver_formula64(*args, scale=scale)
    plain = perceiver_plain_torch(*args, scale=scale)
    assert_within_torch_error(result, ref64, plain, dtype)
    twin = perceiver_attention_ref(*(p.view for p in padded), scale=scale)
    assert_within_torch_error(twin, ref64, plain, dtype)
    assert_close(result, twin, dtype)


@interpreter
def test_default_output_layout_is_latent_major():
    args = make_inputs(1, 2, 64, 30, torch.bfloat16)
    for fn in (perceiver_attention, perceiver_attention_ref):
        out = fn(*args)
        assert out.shape == args[0].shape and out.transpose(1, 2).is_contiguous()


BAD_INPUTS = [
    ("q rank 3", lambda a: a.__setitem__(0, a[0][0]), "q"),
    ("k_media dtype", lambda a: a.__setitem__(1, a[1].half()), "k_media"),
    ("k_media head dim", lambda a: a.__setitem__(1, a[1][..., :32]), "k_media"),
    ("v_media rows", lambda a: a.__setitem__(2, a[2][:, :, :5]), "v_media"),
    ("k_latents rows", lambda a: a.__setitem__(3, a[3][:, :, :5]), "k_latents"),
    ("v_latents batch", lambda a: a.__setitem__(4, a[4][:1]), "v_latents"),
]


@pytest.mark.parametrize("fn", [perceiver_attention, perceiver_attention_ref], ids=["kernel", "twin"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fn, case):
    _, change, name = case
    args = list(make_inputs(2, 2, 8, 10, torch.float32))
    change(args)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(*args)
    with pytest.raises(ValueError, match=r"^out\b"):
        fn(*make_inputs(2, 2, 8, 10, torch.float32), out=torch.empty(2, 2, 8, 64, dtype=torch.float16))


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_gpu_real_sizes(dtype):
    """OpenFlamingo-9B's resampler: 8 heads x 64, 64 latents, 256 patch tokens, 32 images."""
    args = make_inputs(32, 8, 64, 256, dtype, device="cuda")
    ref64 = perceiver_formula64(*args)
    plain = perceiver_plain_torch(*args)
    assert_within_torch_error(perceiver_attention(*args), ref64, plain, dtype)
    assert_within_torch_error(perceiver_attention_ref(*args), ref64, plain, dtype)
