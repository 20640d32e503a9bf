"""Weight-only int8 matmul: kernel (interpreted) and torch twin against the float64 formula
x @ (weight * scales[:, None]).T, within 2x the error of plain torch at the activation dtype (dequantize in
that dtype, then F.linear). Weights are a Gaussian matrix quantized per output row, so outputs are O(1).
Shapes are not powers of two (N 53, K 80 or 336), with split-K off, chosen by the launcher and forced."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import Padded, assert_close, assert_within_torch_error, interpreter, nan_out

from flamingo_fast.kernels.int8_matmul import (
    DECODE_MAX_M,
    TARGET_PROGRAMS,
    block_k_of,
    int8_weight_matmul,
    int8_weight_matmul_ref,
    k_chunk,
    launch_params,
    num_k_splits,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
N = 48 + 5


def dtype_id(d):
    return str(d).replace("torch.", "")


def make_inputs(lead, N, K, dtype, *, scale_dtype=None, seed=0, device="cpu"):
    """x [*lead, K] in dtype; weight [N, K] int8 = round(w / scales) of a Gaussian w; scales [N] (dtype)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g).to(device, dtype)
    w = torch.randn(N, K, generator=g) / K**0.5
    scales = (w.abs().amax(1) / 127).to(scale_dtype or dtype)
    weight = torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return x, weight.to(device), scales.to(device)


def formula64(x, weight, scales):
    return x.double() @ (weight.double() * scales.double()[:, None]).T


def plain_torch(x, weight, scales):
    """What a model without the kernel computes at x's dtype: dequantize to that dtype, then F.linear."""
    return F.linear(x, weight.to(x.dtype) * scales.to(x.dtype)[:, None])


def check_against_formula(got, x, weight, scales):
    assert got.dtype == x.dtype and got.shape == (*x.shape[:-1], weight.shape[0])
    assert_within_torch_error(got, formula64(x, weight, scales), plain_torch(x, weight, scales), x.dtype)


# (K, split_k): one fp16 / bf16 K block (two fp32 ones); K 336 in the launcher's chunks (at N 53 one N tile is
# far below TARGET_PROGRAMS, so one BLOCK_K per chunk: 6 of 64, 11 of 32 for fp32) all in one program, each its
# own program (the launcher's choice), and two programs of 3 (fp32: 6 and 5) chunks.
K_SPLITS = [(48, None), (336, 1), (336, None), (336, 2)]


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("M", [1, 3, 17])
@pytest.mark.parametrize("K,split_k", K_SPLITS, ids=[f"K{k}-split{s}" for k, s in K_SPLITS])
def test_decode_kernel_and_twin_match_formula(K, split_k, M, dtype):
    x, weight, scales = make_inputs((M,), N, K, dtype)
    # the weight's padding is -128, a value quantization never writes (a stray read would add x * -128 * s)
    xp, wp, sp = Padded(x, last_dim_only=True), Padded(weight, fill=-128, last_dim_only=True), Padded(scales)
    out = nan_out((M, N), dtype, last_dim_only=True)
    got = int8_weight_matmul(xp.view, wp.view, sp.view, out=out.view, split_k=split_k)
    for p in (xp, wp, sp, out):
        p.assert_padding_intact()
    assert got.data_ptr() == out.view.data_ptr()
    twin = int8_weight_matmul_ref(x, weight, scales, split_k=split_k)
    check_against_formula(got, x, weight, scales)
    check_against_formula(twin, x, weight, scales)


def test_split_k_cases_above_do_split():
    """The split cases of the test above really launch several splits (else they would test nothing new)."""
    for M in (1, 3, 17):
        block_m, block_n, block_k, _, _ = launch_params(torch.bfloat16, M)
        chunk = k_chunk(torch.bfloat16, N, 336)
        assert chunk == block_k == 64 and num_k_splits(M, N, 336, block_m, block_n, chunk) == 6  # cdiv(336, 64)
        assert num_k_splits(M, N, 48, block_m, block_n, k_chunk(torch.bfloat16, N, 48)) == 1


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_prefill_tiles_with_leading_dims(dtype):
    """70 rows (> DECODE_MAX_M): the prefill tiles, no split; x [2, 35, K] keeps its leading dims."""
    x, weight, scales = make_inputs((2, 35), N, 80, dtype)
    assert x.shape[:-1].numel() > DECODE_MAX_M
    out = nan_out((2, 35, N), dtype, last_dim_only=True)
    got = int8_weight_matmul(x, weight, scales, out=out.view)
    out.assert_padding_intact()
    check_against_formula(got, x, weight, scales)
    check_against_formula(int8_weight_matmul_ref(x, weight, scales), x, weight, scales)


@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("split_k", [1, 2])
def test_fp32_scales_with_half_activations(split_k, dtype):
    x, weight, scales = make_inputs((3,), N, 336, dtype, scale_dtype=torch.float32)
    got = int8_weight_matmul(x, weight, scales, split_k=split_k)
    check_against_formula(got, x, weight, scales)
    check_against_formula(int8_weight_matmul_ref(x, weight, scales), x, weight, scales)


@interpreter
def test_the_launchers_splits_never_change_the_bits():
    """The launcher gives each chunk its own program (decode) or all chunks to one (prefill): each chunk summed
    from zero, the sums added in order, by the combine or by the one program alike, so the same bits. A forced
    grouping of several chunks per program (split_k=2) adds in another order: equal to fp32 rounding."""
    x, weight, scales = make_inputs((5,), N, 1100, torch.float32)  # 18 chunks of 2 BLOCK_K (64)
    unsplit = int8_weight_matmul(x, weight, scales, split_k=1)
    chunk = k_chunk(torch.float32, N, 1100)
    chunks = -(-1100 // chunk)
    assert (chunk, chunks) == (64, 18) and num_k_splits(5, N, 1100, *launch_params(torch.float32, 5)[:2], chunk) == 18
    for split_k in (None, chunks):
        assert torch.equal(int8_weight_matmul(x, weight, scales, split_k=split_k), unsplit), split_k
    assert_close(int8_weight_matmul(x, weight, scales, split_k=2), unsplit)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_the_k_reduction_does_not_depend_on_the_row_count(dtype):
    """BLOCK_K and the K chunks come from the dtype, N and K only: every M (decode, prefill) reduces a row's K in
    the same order; M picks only the M tile and how many programs share the chunks."""
    for N_out, K in ((53, 336), (4096, 4096), (4096, 11008), (22016, 4096), (12288, 4096)):
        chunk = k_chunk(dtype, N_out, K)
        assert chunk % block_k_of(dtype) == 0 and 0 < chunk
        for M in (1, 3, 16, 17, 64, 65, 512, 4096):
            block_m, block_n, block_k, _, _ = launch_params(dtype, M)
            assert block_k == block_k_of(dtype) and k_chunk(dtype, N_out, K) == chunk
            splits = num_k_splits(M, N_out, K, block_m, block_n, chunk)
            assert splits == 1 or splits == -(-K // chunk)


@interpreter
def test_no_rows():
    x, weight, scales = make_inputs((0,), N, 80, torch.bfloat16)
    for fn in (int8_weight_matmul, int8_weight_matmul_ref):
        assert fn(x, weight, scales).shape == (0, N)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_twin_matches_formula(dtype):
    """Plain torch (no interpreter): aten._weight_int8pack_mm for bf16, the fp32 fallback for the others."""
    x, weight, scales = make_inputs((2, 9), N, 336, dtype)
    out = nan_out((2, 9, N), dtype, last_dim_only=True)
    got = int8_weight_matmul_ref(x, weight, scales, out=out.view)
    out.assert_padding_intact()
    assert got.data_ptr() == out.view.data_ptr()
    check_against_formula(got, x, weight, scales)


def test_decode_splits_fill_the_gpu_at_9b_shapes():
    """At the 9B decode shapes (M 1..64) a launch reaches TARGET_PROGRAMS programs unless K runs out of
    blocks; prefill never splits."""
    for K, N_out in ((4096, 4096), (4096, 12288), (11008, 4096), (4096, 22016)):
        for M in (1, 8, 64):
            bm, bn, bk, _, _ = launch_params(torch.bfloat16, M)
            tiles = -(-M // bm) * -(-N_out // bn)
            splits = num_k_splits(M, N_out, K, bm, bn, k_chunk(torch.bfloat16, N_out, K))
            assert tiles * splits >= TARGET_PROGRAMS and (splits == 1 or tiles < TARGET_PROGRAMS)
        bm, bn, bk, _, _ = launch_params(torch.bfloat16, 512)
        assert num_k_splits(512, N_out, K, bm, bn, k_chunk(torch.bfloat16, N_out, K)) == 1


BAD_INPUTS = [
    ("x int", lambda a: a.update(x=a["x"].long()), "x"),
    ("x empty K", lambda a: a.update(x=torch.empty(3, 0)), "x"),
    ("weight float", lambda a: a.update(weight=a["weight"].float()), "weight"),
    ("weight rank 1", lambda a: a.update(weight=a["weight"][0]), "weight"),
    ("weight K", lambda a: a.update(weight=a["weight"][:, :40]), "weight"),
    ("weight K strided", lambda a: a.update(weight=a["weight"].t().contiguous().t()), "weight"),
    ("scales shape", lambda a: a.update(scales=a["scales"][:7]), "scales"),
    ("scales fp16 with fp32 x", lambda a: a.update(scales=a["scales"].half()), "scales"),
    ("out shape", lambda a: a.update(out=torch.empty(3, N + 1)), "out"),
    ("out dtype", lambda a: a.update(out=torch.empty(3, N, dtype=torch.float16)), "out"),
    ("split_k 0", lambda a: a.update(split_k=0), "split_k"),
    ("split_k float", lambda a: a.update(split_k=2.0), "split_k"),
]


@pytest.mark.parametrize("fn", [int8_weight_matmul, int8_weight_matmul_ref], ids=["kernel", "twin"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fn, case):
    _, change, name = case
    x, weight, scales = make_inputs((3,), N, 80, torch.float32)
    args = dict(x=x, weight=weight, scales=scales)
    change(args)
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        fn(args.pop("x"), args.pop("weight"), args.pop("scales"), **args)


def test_kernel_rejects_rows_that_do_not_flatten():
    x, weight, scales = make_inputs((4,), N, 80, torch.float32)
    with pytest.raises(ValueError, match="^x"):
        int8_weight_matmul(torch.randn(80, 4).t(), weight, scales)
    with pytest.raises(ValueError, match="^out"):
        int8_weight_matmul(x, weight, scales, out=torch.empty(N, 4).t())


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("M", [1, 8, 64, 300])
@pytest.mark.parametrize("K,N_out", [(4096, 4096), (11008, 4096), (4096, 22016)])
def test_gpu_9b_shapes(K, N_out, M, dtype):
    x, weight, scales = make_inputs((M,), N_out, K, dtype, device="cuda")
    check_against_formula(int8_weight_matmul(x, weight, scales), x, weight, scales)
    check_against_formula(int8_weight_matmul_ref(x, weight, scales), x, weight, scales)
