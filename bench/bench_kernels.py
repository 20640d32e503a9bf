"""Kernel microbenchmarks (pytest-benchmark): baseline and fast path timed in the same run, ratio reported.

    pytest bench/bench_kernels.py --benchmark-only            (CPU: twin vs dense; CUDA tests skip)

CPU: the segment-indexed torch twin of masked cross-attention against the reference's dense masked
attention (scores against all N_img * 64 latents, mask, softmax) at the `small` preset's shape (B 1, H 8,
d 64, fp32), for 0, 1, 4, 8, 16, 32 shots of 32 tokens (+ 8 text tokens before the first image). The
twin's time per token stays about flat in shots; the dense one grows linearly. `bench/sweep_xattn_cpu.py`
prints the same comparison as a markdown table.

CUDA (skipped without a GPU): Triton kernel vs twin vs dense masked scaled_dot_product_attention, with
`triton.testing.do_bench` medians at OpenFlamingo-9B shapes; the gated residual, perceiver attention and
decode kernels vs their twins; Llama 3.2 Vision 11B's segment cross-attention (prefill and decode, with the
bytes a decode step moves worked out in gpu_kernels.py's docstring). The same cases, with correctness checks,
run as a script in `bench/gpu_kernels.py` (what the GPU check runs).
"""

from __future__ import annotations

import os

import pytest
import torch
from common import median_seconds

from flamingo_fast.kernels.masked_cross_attention import masked_cross_attention_ref

NUM_LATENTS = 64
SHOTS = (0, 1, 4, 8, 16, 32)
TOKENS_PER_SHOT = 32  # <image> + ~30 text tokens + <|endofchunk|>
TEXT_BEFORE_FIRST_IMAGE = 8


def dense_masked_cross_attention(q, k, v, image_index, *, num_latents=NUM_LATENTS, attend_previous=False,
                                 pre_image_attends_all=False, scale=None):
    """The reference's (OpenFlamingo's) way: scores of every token against all N_img * NL latents, a mask
    by image, softmax in fp32, weighted values. Cost O(T * N_img * NL) per head."""
    B, H, T, d = q.shape
    if k.shape[2] == 0:
        return torch.zeros_like(q)
    scale = d**-0.5 if scale is None else scale
    scores = ((q * scale) @ k.transpose(-1, -2)).float()  # [B, H, T, N_img * NL]
    key_image = torch.arange(k.shape[2], device=q.device) // num_latents
    idx = image_index.long()[:, None, :, None]
    allowed = idx >= key_image if attend_previous else idx == key_image
    no_image = idx < 0
    if attend_previous and pre_image_attends_all:
        allowed = allowed | no_image
        scores = scores.masked_fill(no_image, 0.0)
    scores = scores.masked_fill(~allowed, float("-inf"))
    attn = torch.where(allowed, scores.softmax(dim=-1), 0.0)
    return attn.to(v.dtype) @ v


def xattn_prompt(shots: int, heads: int = 8, head_dim: int = 64, batch: int = 1, dtype=torch.float32,
                 device="cpu", seed: int = 0):
    """q [B, H, T, d] (a transposed [B, T, H, d]), k, v [B, H, shots*64, d], image_index [B, T]:
    8 text tokens, then `shots` shots of 32 tokens, each opening with its <image>."""
    g = torch.Generator().manual_seed(seed)
    T = TEXT_BEFORE_FIRST_IMAGE + TOKENS_PER_SHOT * shots
    index = torch.full((T,), -1, dtype=torch.int32)
    index[TEXT_BEFORE_FIRST_IMAGE:] = torch.arange(shots, dtype=torch.int32).repeat_interleave(TOKENS_PER_SHOT)
    q = torch.randn(batch, T, heads, head_dim, generator=g).transpose(1, 2)
    k = torch.randn(batch, heads, shots * NUM_LATENTS, head_dim, generator=g)
    v = torch.randn(batch, heads, shots * NUM_LATENTS, head_dim, generator=g)
    to = lambda t: t.to(device, dtype)
    return to(q), to(k), to(v), index.expand(batch, T).contiguous().to(device)


# ------------------------------------------------------------------------------------------------- CPU
@pytest.fixture
def cpu_threads():
    """One torch thread by default (BENCH_THREADS to change): on a shared 2-core machine more threads
    mostly time the scheduler (measured: 2 threads gave 24 ms +- 20 ms for a 0.2 ms op under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


@pytest.mark.parametrize("shots", SHOTS)
def test_xattn_cpu_twin_vs_dense(benchmark, cpu_threads, shots):
    """pytest-benchmark times the twin; the dense baseline is timed in the same test (same timer, median
    of repeats) and the ratio stored in extra_info."""
    q, k, v, index = xattn_prompt(shots)
    T = q.shape[2]
    twin = lambda: masked_cross_attention_ref(q, k, v, index)
    dense = lambda: dense_masked_cross_attention(q, k, v, index)
    torch.testing.assert_close(twin(), dense(), rtol=1e-5, atol=1e-5)
    dense_s, twin_s = median_seconds(dense), median_seconds(twin)
    benchmark.group = "xattn-cpu"
    benchmark.extra_info.update(
        shots=shots, T=T, threads=cpu_threads, dense_ms=dense_s * 1e3, twin_ms=twin_s * 1e3, ratio=dense_s / twin_s,
        twin_us_per_token=twin_s * 1e6 / T, dense_us_per_token=dense_s * 1e6 / T,
    )
    print(f"\nshots={shots:2d} T={T:5d} dense {dense_s * 1e3:8.3f} ms  twin {twin_s * 1e3:8.3f} ms  "
          f"ratio {dense_s / twin_s:5.2f}x  twin {twin_s * 1e6 / T:6.2f} us/token")
    benchmark(twin)


# ------------------------------------------------------------------------------------------------ CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (do_bench times on one)")


@needs_cuda
@pytest.mark.parametrize("shots", (4, 32))
def test_xattn_cuda_triton_vs_twin_vs_dense_sdpa(benchmark, shots):
    import gpu_kernels  # bench/ is on sys.path when pytest collects this file

    row = gpu_kernels.xattn_prefill_case(batch=4, shots=shots)
    benchmark.extra_info.update(row)
    benchmark.pedantic(lambda: None, rounds=1)  # the timings are do_bench medians, in extra_info


@needs_cuda
def test_mllama_segment_cross_attention_cuda_vs_twins(benchmark):
    """Llama 3.2 Vision 11B's cross-attention: decode (B 1 / 8, one 4-tile image; GB/s against the bytes computed
    in gpu_kernels.py's docstring) and prefill (B 2, 2 images, T 1024) against the twins and dense SDPA."""
    import gpu_kernels

    rows = [gpu_kernels.segment_decode_case(1, 1, 4), gpu_kernels.segment_decode_case(8, 1, 4),
            gpu_kernels.segment_prefill_case(2, 2, 4, T=1024)]
    benchmark.extra_info.update({f"{r['case']} {r['shape']}": r for r in rows})
    benchmark.pedantic(lambda: None, rounds=1)


@needs_cuda
def test_other_kernels_cuda_vs_twins(benchmark):
    import gpu_kernels

    rows = [gpu_kernels.gated_residual_case(), gpu_kernels.perceiver_case(), gpu_kernels.decode_case(batch=8)]
    benchmark.extra_info.update({r["case"]: r for r in rows})
    benchmark.pedantic(lambda: None, rounds=1)
