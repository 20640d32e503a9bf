"""Prefill masked cross-attention: the Triton kernel (interpreted on the CPU) and its torch twin, each
against a float64 dense formula written out here, within 2x the error of plain torch at the same dtype."""

from __future__ import annotations

import pytest
import torch
from helpers import Padded, assert_close, assert_within_torch_error, image_layout, interpreter, nan_out
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flamingo_fast.kernels.masked_cross_attention import masked_cross_attention, masked_cross_attention_ref

NL = 64
D_HEAD = 64
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (attend_previous, pre_image_attends_all)
MODES = {"immediate": (False, False), "all-previous": (True, False), "all-previous+bug": (True, True)}


# ---------------------------------------------------------------------------------------------- formulas
def xattn_formula64(q, k, v, image_index, *, num_latents=NL, attend_previous=False, pre_image_attends_all=False,
                    scale=None):
    """Dense float64: every token against every key, an explicit mask of the keys its image rule allows,
    softmax, and the two special cases (no key: 0; the pre-image bug: the mean of all values)."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    idx = image_index.long().to(q.device)
    key_image = torch.arange(k.shape[2], device=q.device) // num_latents
    if attend_previous:
        allowed = key_image[None, None, :] <= idx[:, :, None]
    else:
        allowed = key_image[None, None, :] == idx[:, :, None]
    scores = torch.einsum("bhtd,bhkd->bhtk", q, k) * scale
    weights = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1)
    out = torch.einsum("bhtk,bhkd->bhtd", weights.nan_to_num(0.0), v)
    out = torch.where(allowed.any(-1)[:, None, :, None], out, 0.0)
    if attend_previous and pre_image_attends_all and k.shape[2] > 0:  # no images: nothing to average, 0
        out = torch.where((idx < 0)[:, None, :, None], v.mean(dim=2, keepdim=True), out)
    return out


def xattn_brute_force64(q, k, v, image_index, *, num_latents, attend_previous, pre_image_attends_all, scale):
    """Token by token with Python loops: used only to check `xattn_formula64` itself."""
    B, H, T, d = q.shape
    n_img = k.shape[2] // num_latents
    out = torch.zeros(B, H, T, d, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            i = int(image_index[b, t])
            if i >= 0:
                images = list(range(i + 1)) if attend_previous else [i]
            else:
                images = list(range(n_img)) if attend_previous and pre_image_attends_all else []
            if not images:
                continue
            keys = torch.cat([torch.arange(j * num_latents, (j + 1) * num_latents) for j in images])
            kk, vv = k[b][:, keys].double(), v[b][:, keys].double()
            if i < 0:
                out[b, :, t] = vv.mean(dim=1)
                continue
            w = torch.softmax((kk @ q[b, :, t].double()[:, :, None])[..., 0] * scale, dim=-1)
            out[b, :, t] = (w[:, :, None] * vv).sum(dim=1)
    return out


def xattn_plain_torch(q, k, v, image_index, *, num_latents=NL, attend_previous=False,
                      pre_image_attends_all=False, scale=None):
    """OpenFlamingo's dense masked attention at the inputs' dtype: the 'plain torch' error yardstick."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if k.shape[2] == 0:
        return torch.zeros_like(q)
    idx = image_index.long().to(q.device)
    key_image = torch.arange(k.shape[2], device=q.device) // num_latents
    allowed = (key_image[None, None, :] <= idx[:, :, None]) if attend_previous else (
        key_image[None, None, :] == idx[:, :, None])
    sim = (q * scale) @ k.transpose(-1, -2)
    sim = sim.masked_fill(~allowed[:, None], -torch.finfo(sim.dtype).max)
    attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    if not (attend_previous and pre_image_attends_all):
        attn = attn.masked_fill((idx < 0)[:, None, :, None], 0.0)
    return attn @ v


# ------------------------------------------------------------------------------------------------ cases
def make_case(rows: list[tuple[int, int]], T: int, num_images: int, H: int = 2, dtype=torch.float32, seed: int = 0,
              device="cpu"):
    """rows: (images in that row, text tokens before its first image). Returns q, k, v, image_index."""
    g = torch.Generator().manual_seed(seed)
    B = len(rows)
    index = torch.stack([image_layout(T, n, before, generator=g) for n, before in rows]).to(device)
    q = torch.randn(B, T, H, D_HEAD, generator=g).transpose(1, 2)
    k = torch.randn(B, H, num_images * NL, D_HEAD, generator=g)
    v = torch.randn(B, H, num_images * NL, D_HEAD, generator=g)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), index


CASES = {
    # name: (rows, T, N_img, scale)
    "T1": ([(1, 0), (0, 1)], 1, 1, None),
    "T17-3img-text-first": ([(3, 4), (1, 0)], 17, 3, 0.2),
    "T64-1img": ([(1, 0)], 64, 1, None),
    "T130-many-padding-row": ([(12, 5), (3, 0), (0, 130)], 130, 12, None),
    "T17-text-only": ([(0, 17), (0, 17)], 17, 0, None),
}


def _check_against_formula(name, mode, dtype):
    rows, T, n_img, scale = CASES[name]
    attend_previous, pre_bug = MODES[mode]
    q, k, v, index = make_case(rows, T, n_img, dtype=dtype)
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=pre_bug, scale=scale)
    inputs = [Padded(q, order=(0, 2, 1, 3)), Padded(k), Padded(v), Padded(index)]
    out = nan_out(tuple(q.shape), dtype, order=(0, 2, 1, 3))
    result = masked_cross_attention(*(p.view for p in inputs), out=out.view, **kwargs)
    assert result.data_ptr() == out.view.data_ptr()
    for p in [*inputs, out]:
        p.assert_padding_intact()

    ref64 = xattn_formula64(q, k, v, index, **kwargs)
    plain = xattn_plain_torch(q, k, v, index, **kwargs)
    assert_within_torch_error(result, ref64, plain, dtype)
    twin = masked_cross_attention_ref(*(p.view for p in inputs), **kwargs)
    assert_within_torch_error(twin, ref64, plain, dtype)
    assert_close(result, twin, dtype)
    if not pre_bug:  # tokens before their row's first image: exactly zero
        no_image = (index < 0)[:, None, :, None].expand_as(result)
        assert bool((result[no_image] == 0).all()) and bool((twin[no_image] == 0).all())


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("mode", [m for m in MODES])
@pytest.mark.parametrize("name", [n for n in CASES if n != "T17-text-only"])
def test_kernel_and_twin_match_formula(name, mode, dtype):
    _check_against_formula(name, mode, dtype)


@interpreter
@pytest.mark.parametrize("mode", list(MODES))
def test_text_only_gives_zero(mode):
    _check_against_formula("T17-text-only", mode, torch.float32)


def test_formula_matches_brute_force():
    """The float64 formula the kernels are judged by, checked token by token (both modes, the bug flag)."""
    q, k, v, index = make_case([(3, 2), (1, 5), (0, 9)], 9, 3)
    for attend_previous, pre_bug in MODES.values():
        kwargs = dict(num_latents=NL, attend_previous=attend_previous, pre_image_attends_all=pre_bug, scale=0.3)
        torch.testing.assert_close(xattn_formula64(q, k, v, index, **kwargs),
                                   xattn_brute_force64(q, k, v, index, **kwargs), rtol=1e-12, atol=1e-12)


@interpreter
def test_pre_image_flag_is_ignored_in_immediate_mode():
    q, k, v, index = make_case([(2, 6)], 17, 2)
    plain = masked_cross_attention(q, k, v, index)
    flagged = masked_cross_attention(q, k, v, index, pre_image_attends_all=True)
    assert torch.equal(plain, flagged)
    assert bool((flagged[:, :, :6] == 0).all())


@interpreter
def test_default_output_layout_is_token_major():
    """out=None: [B, H, T, d] stored as [B, T, H, d], so the caller's reshape to [B, T, H*d] is free."""
    q, k, v, index = make_case([(2, 1), (1, 0)], 17, 2, dtype=torch.bfloat16)
    for fn in (masked_cross_attention, masked_cross_attention_ref):
        out = fn(q, k, v, index)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert out.transpose(1, 2).is_contiguous()


@interpreter
def test_other_head_dims_and_latent_counts():
    """d = 32 / 128 and a latent count that is not a power of two (tiles then straddle images)."""
    g = torch.Generator().manual_seed(1)
    for d, num_latents in ((32, 64), (128, 64), (64, 24)):
        index = torch.stack([image_layout(40, 3, 2, generator=g), image_layout(40, 1, 0, generator=g)])
        q = torch.randn(2, 2, 40, d, generator=g)
        k, v = torch.randn(2, 2, 2, 3 * num_latents, d, generator=g).unbind(0)
        for attend_previous in (False, True):
            kwargs = dict(num_latents=num_latents, attend_previous=attend_previous)
            ref64 = xattn_formula64(q, k, v, index, **kwargs)
            plain = xattn_plain_torch(q, k, v, index, **kwargs)
            assert_within_torch_error(masked_cross_attention(q, k, v, index, **kwargs), ref64, plain, torch.float32)
            assert_within_torch_error(masked_cross_attention_ref(q, k, v, index, **kwargs), ref64, plain,
                                      torch.float32)


@interpreter
def test_out_of_range_index_is_clamped_not_read_out_of_bounds():
    """A caller's index >= N_img reads image N_img - 1 (kernel and twin alike), never past the keys."""
    q, k, v, index = make_case([(2, 3)], 30, 2)
    index[0, 20:] = 7
    kp, vp = Padded(k), Padded(v)
    for attend_previous in (False, True):
        result = masked_cross_attention(q, kp.view, vp.view, index, attend_previous=attend_previous)
        expected = xattn_formula64(q, k, v, index.clamp(max=1), attend_previous=attend_previous)
        assert not torch.isnan(result).any()
        assert_close(result, expected.float())
        assert_close(masked_cross_attention_ref(q, kp.view, vp.view, index, attend_previous=attend_previous),
                     expected.float())


@interpreter
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_layouts(data):
    """Random non-decreasing layouts: any T, images per row, text before the first image, both modes."""
    T = data.draw(st.integers(1, 80), label="T")
    num_images = data.draw(st.integers(1, 4), label="N_img")
    rows = []
    for _ in range(data.draw(st.integers(1, 2), label="B")):
        n = data.draw(st.integers(0, min(num_images, T)), label="images in row")
        rows.append((n, data.draw(st.integers(0, T - n), label="text before first image")))
    mode = data.draw(st.sampled_from(sorted(MODES)), label="mode")
    attend_previous, pre_bug = MODES[mode]
    q, k, v, index = make_case(rows, T, num_images, H=1, seed=data.draw(st.integers(0, 2**16), label="seed"))
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=pre_bug)
    ref64 = xattn_formula64(q, k, v, index, **kwargs)
    plain = xattn_plain_torch(q, k, v, index, **kwargs)
    assert_within_torch_error(masked_cross_attention(q, k, v, index, **kwargs), ref64, plain, torch.float32)
    assert_within_torch_error(masked_cross_attention_ref(q, k, v, index, **kwargs), ref64, plain, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("mode", [m for m in MODES])
def test_twin_at_larger_sizes(mode, dtype):
    """The twin is the CPU runtime's path: chunks crossing many images, one image per token, long rows."""
    attend_previous, pre_bug = MODES[mode]
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=pre_bug)
    for rows, T, n_img in (([(20, 7), (5, 0), (0, 300)], 300, 20), ([(40, 0), (39, 1)], 40, 40)):
        q, k, v, index = make_case(rows, T, n_img, H=3, dtype=dtype, seed=T)
        ref64 = xattn_formula64(q, k, v, index, **kwargs)
        plain = xattn_plain_torch(q, k, v, index, **kwargs)
        assert_within_torch_error(masked_cross_attention_ref(q, k, v, index, **kwargs), ref64, plain, dtype)


BAD_INPUTS = [
    # (description, change to the good arguments, argument the message must name)
    ("q rank 3", lambda a: a.update(q=a["q"][0]), "q"),
    ("q int", lambda a: a.update(q=a["q"].to(torch.int32)), "q"),
    ("k dtype differs", lambda a: a.update(k=a["k"].half()), "k"),
    ("k heads differ", lambda a: a.update(k=a["k"][:, :1]), "k"),
    ("k not whole images", lambda a: a.update(k=a["k"][:, :, :100]), "k"),
    ("v shape differs", lambda a: a.update(v=a["v"][:, :, :64]), "v"),
    ("index int64", lambda a: a.update(image_index=a["image_index"].long()), "image_index"),
    ("index wrong T", lambda a: a.update(image_index=a["image_index"][:, :5]), "image_index"),
    ("index rank 1", lambda a: a.update(image_index=a["image_index"][0]), "image_index"),
    ("num_latents 0", lambda a: a.update(num_latents=0), "num_latents"),
    ("out wrong shape", lambda a: a.update(out=torch.empty(2, 2, 16, 64)), "out"),
    ("out wrong dtype", lambda a: a.update(out=torch.empty(2, 2, 17, 64, dtype=torch.float16)), "out"),
    ("scale string", lambda a: a.update(scale="0.1"), "scale"),
    ("scale bool", lambda a: a.update(scale=True), "scale"),  # a bool is an int to Python, never a scale
]


@pytest.mark.parametrize("fn", [masked_cross_attention, masked_cross_attention_ref], ids=["kernel", "twin"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fn, case):
    _, change, name = case
    q, k, v, index = make_case([(2, 1), (1, 0)], 17, 2)
    args = dict(q=q, k=k, v=v, image_index=index)
    change(args)
    q, k, v, index = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("image_index")
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(q, k, v, index, **args)


def test_kernel_rejects_unsupported_head_dim():
    index = torch.zeros(1, 5, dtype=torch.int32)
    q = torch.randn(1, 2, 5, 48)
    with pytest.raises(ValueError, match="^q"):
        masked_cross_attention(q, torch.randn(1, 2, 64, 48), torch.randn(1, 2, 64, 48), index)


# ------------------------------------------------------------------------------------------ on a GPU
GPU_CASES = {
    # name: (rows, T, N_img)
    "B2-T2048-32img": ([(32, 9), (17, 0)], 2048, 32),
    "B8-T1024-8img": ([(8, 30), (8, 0), (5, 100), (1, 0), (0, 1024), (8, 3), (2, 500), (7, 7)], 1024, 8),
}


@pytest.mark.cuda
@pytest.mark.parametrize("mode", [m for m in MODES])
@pytest.mark.parametrize("name", list(GPU_CASES))
def test_gpu_real_sizes_bf16(name, mode):
    rows, T, n_img = GPU_CASES[name]
    attend_previous, pre_bug = MODES[mode]
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=pre_bug)
    q, k, v, index = make_case(rows, T, n_img, H=8, dtype=torch.bfloat16, device="cuda")
    out = nan_out(tuple(q.shape), torch.bfloat16, order=(0, 2, 1, 3), device="cuda")
    kp, vp = Padded(k), Padded(v)
    result = masked_cross_attention(q, kp.view, vp.view, index, out=out.view, **kwargs)
    out.assert_padding_intact()
    ref64 = xattn_formula64(q, k, v, index, **kwargs)
    plain = xattn_plain_torch(q, k, v, index, **kwargs)
    assert_within_torch_error(result, ref64, plain, torch.bfloat16)
    twin = masked_cross_attention_ref(q, k, v, index, **kwargs)
    assert_within_torch_error(twin, ref64, plain, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_gpu_other_dtypes(dtype):
    q, k, v, index = make_case([(16, 4), (3, 0)], 1024, 16, H=8, dtype=dtype, device="cuda")
    for attend_previous in (False, True):
        kwargs = dict(attend_previous=attend_previous)
        ref64 = xattn_formula64(q, k, v, index, **kwargs)
        plain = xattn_plain_torch(q, k, v, index, **kwargs)
        assert_within_torch_error(masked_cross_attention(q, k, v, index, **kwargs), ref64, plain, dtype)
