"""Kernels on a CUDA GPU: correctness at real sizes and `triton.testing.do_bench` medians against the torch
twins and the dense baselines, written as one markdown table (and JSON).

    python bench/gpu_kernels.py --out DIR              on a GPU: DIR/kernels_gpu.md, DIR/kernels_gpu.json
    python bench/gpu_kernels.py --out DIR --dry-run    on a CPU: Triton interpreter, tiny shapes, perf_counter

Sizes are OpenFlamingo-9B's (bf16): cross-attention 8 heads x 64 with 64 latents per image, T up to 2048
with up to 32 images; the perceiver over 256 patch tokens; the gated residual at LM width 4096. Each case
is independent: a failure is recorded (with its traceback) and the script goes on. The correctness rule is
the tests' one: max |kernel - float64| <= 2 * max |plain torch at dtype - float64| + atol[dtype]. The whole
run stays under --budget-s (default 100 s); cases past it are recorded as skipped.

Llama 3.2 Vision 11B (the `mllama` cases, bf16): 32 query heads on 8 KV heads of 128, tiles of 1601 vision tokens.
Bytes one decode step moves in the segment cross-attention, per row whose token sees one 4-tile image:
- K and V of the image, per layer: 8 KV heads x 128 x (4 x 1601 = 6,404 keys) x 2 (K, V) x 2 B = 26,230,784 B
  (25.0 MiB); over the 8 cross-attention layers 209,846,272 B (200 MiB). Padding rows (tiles stored every
  1608 rows) and invalid tiles are never loaded, so the count is the same for those layouts.
- split partials: 26 splits of 256 keys; each writes [32 heads x (128 + 1)] float32 per query, the combine
  reads them back: 2 x 32 x 26 x 129 x 4 B = 858,624 B per layer, 6.9 MB over 8 layers (3.3% of the K/V).
- q and out: 2 x 32 x 128 x 2 B = 16 KiB per layer: negligible.
Total about 216.8 MB per row per step: at least 65 us at an H100 SXM's 3.35 TB/s, 45 us at an H200's 4.8 TB/s.
Beam hypotheses of a row share its K/V (only their partials multiply); B rows move B times as much. Next to the
~21 GB of weights a token reads (6.3 ms on an H100), the cross-attention K/V is 1% at batch 1 and as large as
the weights at batch ~97. `segment_decode_case` reports triton_GBps (these bytes over the CUDA-graph time) to
compare with the card's bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

if "--dry-run" in sys.argv:  # before any kernel module is imported: @triton.jit reads it at decoration
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from common import median_seconds  # noqa: E402

from flamingo_fast.kernels.gated_residual import gated_residual, gated_residual_ref  # noqa: E402
from flamingo_fast.kernels.masked_cross_attention import (  # noqa: E402
    masked_cross_attention,
    masked_cross_attention_ref,
)
from flamingo_fast.kernels.masked_cross_attention_decode import (  # noqa: E402
    masked_cross_attention_decode,
    masked_cross_attention_decode_ref,
)
from flamingo_fast.kernels.perceiver_attention import perceiver_attention, perceiver_attention_ref  # noqa: E402
from flamingo_fast.kernels.segment_cross_attention import (  # noqa: E402
    segment_cross_attention,
    segment_cross_attention_ref,
    tile_ranges_from_mask,
)
from flamingo_fast.kernels.segment_cross_attention_decode import (  # noqa: E402
    num_splits,
    segment_cross_attention_decode,
    segment_cross_attention_decode_ref,
)

ROOT = Path(__file__).resolve().parent.parent
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # tests/helpers.py TOLERANCE
NL = 64
DRY = os.environ.get("TRITON_INTERPRET") == "1" and not torch.cuda.is_available()
DEVICE = "cpu" if DRY else "cuda"


# --------------------------------------------------------------------------------------------- helpers
def bench_ms(fn, graph: bool = False) -> float:
    """Median ms. GPU: do_bench (launch overhead included) or do_bench_cudagraph (kernel time alone)."""
    if DRY:
        return median_seconds(fn, repeats=3, warmup=1) * 1e3
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")
    return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")


def check(result, ref64, plain, dtype) -> dict:
    """The tests' rule, as data: {'max_err', 'bound', 'ok'}."""
    err = (result.double() - ref64).abs().max().item()
    torch_err = (plain.double() - ref64).abs().max().item()
    bound = 2 * torch_err + ATOL[dtype]
    ok = bool(err <= bound) and not bool(torch.isnan(result).any())
    return {"max_err": err, "bound": bound, "ok": ok}


def attention_formula64(q, k, v, allowed, uniform_keys=None):
    """Dense float64 attention with an explicit [B, T, K] mask; rows with no allowed key give 0. Rows where
    `uniform_keys` ([B, T, K]) has any key give the plain mean of v over those keys (the pre-image bug)."""
    q, k, v = q.double(), k.double(), v.double()
    scores = torch.einsum("bhtd,bhkd->bhtk", q, k) * q.shape[-1] ** -0.5
    w = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), dim=-1).nan_to_num(0.0)
    out = torch.where(allowed.any(-1)[:, None, :, None], w @ v, 0.0)
    return _uniform_rows(out, v, uniform_keys)


def attention_plain(q, k, v, allowed, uniform_keys=None):
    """OpenFlamingo's masked attention at the inputs' dtype (the error yardstick; also a timing baseline)."""
    sim = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
    sim = sim.masked_fill(~allowed[:, None], -torch.finfo(sim.dtype).max)
    attn = (sim - sim.amax(dim=-1, keepdim=True)).softmax(dim=-1)
    out = attn.masked_fill(~allowed.any(-1)[:, None, :, None], 0.0) @ v
    return _uniform_rows(out, v, uniform_keys)


def _uniform_rows(out, v, uniform_keys):
    if uniform_keys is None:
        return out
    weights = uniform_keys.to(v.dtype) / uniform_keys.sum(-1, keepdim=True).clamp(min=1).to(v.dtype)
    mean = torch.einsum("btk,bhkd->bhtd", weights, v)
    return torch.where(uniform_keys.any(-1)[:, None, :, None], mean, out)


def prompt_layout(batch: int, T: int, shots: int) -> torch.Tensor:
    """[B, T] int32: row b has max(1, shots - b) images after 4 + 16 b text tokens, equal segments."""
    t = torch.arange(T)
    rows = []
    for b in range(batch):
        n, start = max(1, shots - b), min(4 + 16 * b, T - 1)
        seg = max(1, (T - start) // n)
        rows.append(torch.where(t < start, -1, ((t - start) // seg).clamp(max=n - 1)))
    return torch.stack(rows).to(torch.int32)


def media_kv(batch, heads, keys, dim, dtype):
    """K and V as strided views of one [B, keys, 2, H, d] projection, as the runtime's to_kv produces."""
    kv = torch.randn(batch, keys, 2, heads, dim, device=DEVICE, dtype=dtype)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
    return k, v


# ----------------------------------------------------------------------------------------------- cases
def xattn_prefill_case(batch=4, shots=32, mode="immediate", dtype=torch.bfloat16, heads=8) -> dict:
    attend_previous, bug = mode != "immediate", mode == "all-previous+bug"
    T = (64 if not DRY else 48) * max(shots, 1)
    index = prompt_layout(batch, T, shots).to(DEVICE)
    q = torch.randn(batch, T, heads, 64, device=DEVICE, dtype=dtype).transpose(1, 2)
    k, v = media_kv(batch, heads, shots * NL, 64, dtype)
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=bug)
    key_image = torch.arange(shots * NL, device=DEVICE) // NL
    idx = index.long()[:, :, None]
    allowed = (key_image <= idx) if attend_previous else (key_image == idx)
    uniform = ((index < 0)[:, :, None] & (key_image >= 0)) if bug else None
    ref64, plain = attention_formula64(q, k, v, allowed, uniform), attention_plain(q, k, v, allowed, uniform)
    row = check(masked_cross_attention(q, k, v, index, **kwargs), ref64, plain, dtype)
    row["twin_ok"] = check(masked_cross_attention_ref(q, k, v, index, **kwargs), ref64, plain, dtype)["ok"]
    del ref64
    mask = (allowed if uniform is None else allowed | uniform)[:, None]
    ms = {
        "triton": bench_ms(lambda: masked_cross_attention(q, k, v, index, **kwargs)),
        "twin": bench_ms(lambda: masked_cross_attention_ref(q, k, v, index, **kwargs)),
        "dense sdpa": bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)),
        "dense reference": bench_ms(lambda: attention_plain(q, k, v, allowed, uniform)),
    }
    return {"case": f"xattn prefill {mode}", "shape": f"B{batch} H{heads} T{T} N_img{shots} d64",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "dense sdpa", **row}


def decode_case(batch=8, mode="immediate", dtype=torch.bfloat16, heads=8, capacity_images=32) -> dict:
    attend_previous, bug = mode != "immediate", mode == "all-previous+bug"
    rows = [capacity_images, 1, 8, 0, 17, capacity_images, 5, 2][:batch]
    num_images = torch.tensor(rows, dtype=torch.int32, device=DEVICE)
    index = (num_images - 1).to(torch.int32)
    index[min(2, batch - 1)] = -1
    q = torch.randn(batch, heads, 64, device=DEVICE, dtype=dtype)
    k, v = media_kv(batch, heads, capacity_images * NL, 64, dtype)
    kwargs = dict(attend_previous=attend_previous, pre_image_attends_all=bug, num_images=num_images)
    key_image = torch.arange(capacity_images * NL, device=DEVICE) // NL
    idx = index.long()[:, None, None]
    allowed = (key_image <= idx) if attend_previous else (key_image == idx)  # [B, 1, K]
    # the pre-image bug: uniform over the row's own images only
    uniform = ((index < 0)[:, None, None] & (key_image < num_images.long()[:, None, None])) if bug else None
    q4 = q[:, :, None]
    ref64 = attention_formula64(q4, k, v, allowed, uniform)[:, :, 0]
    plain = attention_plain(q4, k, v, allowed, uniform)[:, :, 0]
    out = torch.empty_like(q)
    row = check(masked_cross_attention_decode(q, k, v, index, out=out, **kwargs), ref64, plain, dtype)
    row["twin_ok"] = check(masked_cross_attention_decode_ref(q, k, v, index, **kwargs), ref64, plain, dtype)["ok"]
    out_twin = torch.empty_like(q)
    ms = {
        "triton": bench_ms(lambda: masked_cross_attention_decode(q, k, v, index, out=out, **kwargs)),
        "twin": bench_ms(lambda: masked_cross_attention_decode_ref(q, k, v, index, out=out_twin, **kwargs)),
        "triton graph": bench_ms(lambda: masked_cross_attention_decode(q, k, v, index, out=out, **kwargs), True),
        "twin graph": bench_ms(lambda: masked_cross_attention_decode_ref(q, k, v, index, out=out_twin, **kwargs),
                               True),
    }
    return {"case": f"xattn decode {mode}", "shape": f"B{batch} H{heads} capacity {capacity_images} images d64",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "twin", **row}


# Llama 3.2 Vision 11B's cross-attention: 32 query heads on 8 KV heads of 128, tiles of 1601 vision tokens (560 px)
MLLAMA = dict(heads=32, kv_heads=8, head_dim=128, tile_len=1601, max_tiles=4)


def mllama_mask(batch: int, T: int, images: int, tiles: int) -> torch.Tensor:
    """A processor-style cross_attention_mask [B, T, images, 4]: row b opens with 8 + 4 b text tokens, then its
    images at even spacing, each seen by the tokens up to the next image (row 0's first two images are adjacent:
    a group, so the tokens after them see both); image i of row b has tiles - (i + b) % 2 real tiles (>= 1)."""
    mask = torch.zeros(batch, T, images, MLLAMA["max_tiles"], dtype=torch.long)
    for b in range(batch):
        first = min(8 + 4 * b, T - images)
        at = [first + i * max(1, (T - first) // images) for i in range(images)]
        if b == 0 and images > 1:
            at[1] = at[0] + 1
        for t in range(first, T):  # the processor's rule: the most recent group of adjacent image tokens
            group = [max(i for i in range(images) if at[i] <= t)]
            while group[0] > 0 and at[group[0] - 1] == at[group[0]] - 1:
                group.insert(0, group[0] - 1)
            for i in group:
                mask[b, t, i, : max(1, tiles - (i + b) % 2)] = 1
    return mask.to(DEVICE)


def _transformers_keys(mask: torch.Tensor, tile_len: int) -> torch.Tensor:
    """[B, T, n_tiles * tile_len]: transformers' key mask (an all-masked token row made all-visible)."""
    keys = (mask != 0).flatten(2).repeat_interleave(tile_len, dim=-1)
    return keys | ~keys.any(dim=-1, keepdim=True)


def _gqa_formula(q, k, v, allowed, plain_dtype):
    """(float64 formula, plain torch at the dtype) for q [B, H, T, d], k, v [B, Hkv, S, d], allowed [B, T, S]."""
    groups = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return attention_formula64(q, kk, vv, allowed), attention_plain(q, kk, vv, allowed)


def segment_prefill_case(batch=2, images=2, tiles=4, T=1024, dtype=torch.bfloat16, tile_stride=None) -> dict:
    """Prefill at 11B's sizes. Checked on row 0 and its first two KV heads (a float64 [8, T, S] reference per
    row; all of it would be 6 GiB at B 1, 4 images); timed on the whole batch against the twin and against a
    dense masked SDPA with the KV heads shared (transformers' way: every token scores every vision token)."""
    H, Hkv, d, tile_len = MLLAMA["heads"], MLLAMA["kv_heads"], MLLAMA["head_dim"], MLLAMA["tile_len"]
    if DRY:
        H, Hkv, d, tile_len = 4, 2, 16, 12
    stride = tile_stride or tile_len
    mask = mllama_mask(batch, T, images, tiles)
    start, end, valid = tile_ranges_from_mask(mask)
    n_tiles = valid.shape[1]
    q = torch.randn(batch, T, H, d, device=DEVICE, dtype=dtype).transpose(1, 2)
    k, v = media_kv(batch, Hkv, n_tiles * stride, d, dtype)
    kwargs = dict(tile_len=tile_len, tile_stride=stride)
    rows = (torch.arange(n_tiles, device=DEVICE)[:, None] * stride + torch.arange(tile_len, device=DEVICE)).flatten()
    allowed = _transformers_keys(mask, tile_len)
    g = H // Hkv
    ref64, plain = _gqa_formula(q[:1, : 2 * g], k[:1, :2, rows], v[:1, :2, rows], allowed[:1], dtype)
    row = check(segment_cross_attention(q, k, v, start, end, valid, **kwargs)[:1, : 2 * g], ref64, plain, dtype)
    row["twin_ok"] = check(segment_cross_attention_ref(q, k, v, start, end, valid, **kwargs)[:1, : 2 * g], ref64,
                           plain, dtype)["ok"]
    del ref64, plain
    k_dense, v_dense = k[:, :, rows], v[:, :, rows]
    dense_mask = allowed[:, None]
    ms = {
        "triton": bench_ms(lambda: segment_cross_attention(q, k, v, start, end, valid, **kwargs)),
        "twin": bench_ms(lambda: segment_cross_attention_ref(q, k, v, start, end, valid, **kwargs)),
        "dense sdpa": bench_ms(lambda: F.scaled_dot_product_attention(q, k_dense, v_dense, attn_mask=dense_mask,
                                                                      enable_gqa=True)),
    }
    return {"case": f"mllama xattn prefill{' stride ' + str(stride) if tile_stride else ''}",
            "shape": f"B{batch} H{H}/{Hkv} T{T} {images} images x {tiles} tiles of {tile_len} d{d}",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "dense sdpa", **row}


def segment_decode_case(batch=1, images=1, tiles=4, beams=1, dtype=torch.bfloat16) -> dict:
    """One decode step at 11B's sizes: each row's new token(s) against the tiles of its last mask row. The row's
    range is its last image (the few-shot case: the cache holds `images` images, the token reads one). Checked on
    rows 0 and 1 (with 2 images, row 0's two are a group: its token sees both), timed on all.
    triton_GBps = the K/V bytes the rows' ranges hold (+ the split partials) / kernel time (CUDA graph)."""
    H, Hkv, d, tile_len = MLLAMA["heads"], MLLAMA["kv_heads"], MLLAMA["head_dim"], MLLAMA["tile_len"]
    if DRY:
        H, Hkv, d, tile_len = 4, 2, 16, 12
    T = 16 * images + 16
    mask = mllama_mask(batch, T, images, tiles)
    start, end, valid = tile_ranges_from_mask(mask)
    start, end = start[:, -1].contiguous(), end[:, -1].contiguous()
    n_tiles = valid.shape[1]
    q = torch.randn(batch * beams, H, d, device=DEVICE, dtype=dtype)
    k, v = media_kv(batch, Hkv, n_tiles * tile_len, d, dtype)
    kwargs = dict(tile_len=tile_len, queries_per_row=beams)
    allowed = _transformers_keys(mask[:, -1:], tile_len).repeat_interleave(beams, dim=0)  # [N, 1, S]
    n = 2 * beams  # checked on the first two rows' queries: the float64 reference repeats K/V per query and head
    kq, vq = k[:2].repeat_interleave(beams, dim=0), v[:2].repeat_interleave(beams, dim=0)
    ref64, plain = _gqa_formula(q[:n, :, None], kq, vq, allowed[:n], dtype)
    out, out_twin = torch.empty_like(q), torch.empty_like(q)
    row = check(segment_cross_attention_decode(q, k, v, start, end, valid, out=out, **kwargs)[:n], ref64[:, :, 0],
                plain[:, :, 0], dtype)
    row["twin_ok"] = check(segment_cross_attention_decode_ref(q, k, v, start, end, valid, **kwargs)[:n],
                           ref64[:, :, 0], plain[:, :, 0], dtype)["ok"]
    del ref64, plain, kq, vq
    call = lambda: segment_cross_attention_decode(q, k, v, start, end, valid, out=out, **kwargs)  # noqa: E731
    twin = lambda: segment_cross_attention_decode_ref(q, k, v, start, end, valid, out=out_twin, **kwargs)  # noqa: E731
    ms = {"triton": bench_ms(call), "twin": bench_ms(twin), "triton graph": bench_ms(call, True),
          "twin graph": bench_ms(twin, True)}
    keys_read = int(allowed[::beams, 0].sum())
    splits = num_splits(k.shape[2])
    moved = keys_read * Hkv * d * 2 * k.element_size() + batch * beams * H * splits * (d + 1) * 4 * 2
    row["triton_GBps"] = moved / (ms["triton graph"] * 1e-3) / 1e9
    return {"case": f"mllama xattn decode {beams} hypotheses", "shape": f"B{batch} H{H}/{Hkv} cache {images} "
            f"images x {tiles} tiles of {tile_len} (reads the last) d{d}", "dtype": str(dtype).replace("torch.", ""),
            "ms": ms, "baseline": "twin", **row}


def gated_residual_case(norm="layernorm", per_channel=False, rows=8192, width=4096, dtype=torch.bfloat16) -> dict:
    x = torch.randn(rows, width, device=DEVICE, dtype=dtype)
    y = torch.randn(rows, width, device=DEVICE, dtype=dtype)
    gate = torch.rand(width if per_channel else 1, device=DEVICE) * 1.6 - 0.8
    weight = (1 + 0.3 * torch.randn(width, device=DEVICE)).to(dtype) if norm else None
    bias = (0.2 * torch.randn(width, device=DEVICE)).to(dtype) if norm == "layernorm" else None
    eps = 1e-5
    kwargs = dict(norm=norm, norm_weight=weight, norm_bias=bias, eps=eps)

    def unfused():
        out = x + torch.tanh(gate.to(dtype)) * y
        if norm == "layernorm":
            return out, F.layer_norm(out, (width,), weight, bias, eps)
        if norm == "rmsnorm":
            o32 = out.float()
            return out, weight * (o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
        return out, None

    o64 = x.double() + torch.tanh(gate.double()) * y.double()
    if norm == "layernorm":
        n64 = torch.nn.functional.layer_norm(o64, (width,), weight.double(), bias.double(), eps)
    elif norm == "rmsnorm":
        n64 = o64 * torch.rsqrt((o64**2).mean(-1, keepdim=True) + eps) * weight.double()
    got = gated_residual(x, y, gate, **kwargs)
    got_twin = gated_residual_ref(x, y, gate, **kwargs)
    plain = unfused()
    if norm is None:
        got, got_twin = (got, None), (got_twin, None)
    row = check(got[0], o64, plain[0], dtype)
    twin_ok = check(got_twin[0], o64, plain[0], dtype)["ok"]
    if norm is not None:
        normed = check(got[1], n64, plain[1], dtype)
        # Report the output (sum or norm) closest to its own bound; mixing one's error with the other's bound
        # would print an error above a bound that was never applied to it.
        worst = max(row, normed, key=lambda c: c["max_err"] / c["bound"])
        row = {"max_err": worst["max_err"], "bound": worst["bound"], "ok": row["ok"] and normed["ok"]}
        twin_ok = twin_ok and check(got_twin[1], n64, plain[1], dtype)["ok"]
    row["twin_ok"] = twin_ok
    ms = {
        "triton": bench_ms(lambda: gated_residual(x, y, gate, **kwargs)),
        "twin": bench_ms(lambda: gated_residual_ref(x, y, gate, **kwargs)),
        "unfused torch": bench_ms(unfused),
    }
    moved = x.numel() * x.element_size() * (4 if norm else 3)  # read x, y; write out (+ normed)
    row["triton_GBps"] = moved / (ms["triton"] * 1e-3) / 1e9
    gate_name = "gate[D]" if per_channel else "gate[1]"
    return {"case": f"gated residual {norm or 'no norm'} {gate_name}", "shape": f"{rows}x{width}",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "unfused torch", **row}


def perceiver_case(images=32, heads=8, latents=64, media=256, dtype=torch.bfloat16) -> dict:
    q = torch.randn(images, latents, heads, 64, device=DEVICE, dtype=dtype).transpose(1, 2)
    km, vm = media_kv(images, heads, media, 64, dtype)
    kl, vl = media_kv(images, heads, latents, 64, dtype)
    k_all, v_all = torch.cat([km, kl], dim=2), torch.cat([vm, vl], dim=2)
    allowed = torch.ones(images, latents, media + latents, dtype=torch.bool, device=DEVICE)
    row = check(perceiver_attention(q, km, vm, kl, vl), attention_formula64(q, k_all, v_all, allowed),
                attention_plain(q, k_all, v_all, allowed), dtype)
    row["twin_ok"] = check(perceiver_attention_ref(q, km, vm, kl, vl), attention_formula64(q, k_all, v_all, allowed),
                           attention_plain(q, k_all, v_all, allowed), dtype)["ok"]

    def reference_way():  # OpenFlamingo: concat, then plain attention
        k, v = torch.cat([km, kl], dim=2), torch.cat([vm, vl], dim=2)
        sim = (q * 64**-0.5) @ k.transpose(-1, -2)
        return (sim - sim.amax(-1, keepdim=True)).softmax(-1) @ v

    ms = {
        "triton": bench_ms(lambda: perceiver_attention(q, km, vm, kl, vl)),
        "twin": bench_ms(lambda: perceiver_attention_ref(q, km, vm, kl, vl)),
        "reference": bench_ms(reference_way),
    }
    return {"case": "perceiver attention", "shape": f"images {images} H{heads} L{latents} M{media} d64",
            "dtype": str(dtype).replace("torch.", ""), "ms": ms, "baseline": "reference", **row}


def plan(dry: bool) -> list[tuple[str, object]]:
    """(name, thunk) for every case, the most important first (a budget overrun drops the tail)."""
    p = []
    if dry:
        p += [(f"xattn {m} 2 shots", lambda m=m: xattn_prefill_case(1, 2, m, heads=2))
              for m in ("immediate", "all-previous", "all-previous+bug")]
        p += [(f"decode {m}", lambda m=m: decode_case(4, m, heads=2, capacity_images=3))
              for m in ("immediate", "all-previous", "all-previous+bug")]
        p += [("gated ln", lambda: gated_residual_case("layernorm", rows=16, width=256)),
              ("gated rms gate[D]", lambda: gated_residual_case("rmsnorm", True, rows=16, width=256)),
              ("perceiver", lambda: perceiver_case(images=2, heads=2, media=70))]
        p += [("mllama prefill", lambda: segment_prefill_case(2, 2, 2, T=24, dtype=torch.float32, tile_stride=16)),
              ("mllama decode", lambda: segment_decode_case(2, 2, 3, beams=2, dtype=torch.float32))]
        return p
    for shots in (32, 16, 8, 4, 1):
        p.append((f"xattn immediate B4 {shots} shots", lambda s=shots: xattn_prefill_case(4, s, "immediate")))
    p.append(("xattn immediate B1 32 shots", lambda: xattn_prefill_case(1, 32, "immediate")))
    p += [(f"decode {m}", lambda m=m: decode_case(8, m)) for m in ("immediate", "all-previous", "all-previous+bug")]
    # Llama 3.2 Vision 11B: never run on a GPU before, so a decode and a prefill case early (more at the end)
    p += [("mllama decode B8", lambda: segment_decode_case(8, 1, 4)),
          ("mllama prefill B2 2 images", lambda: segment_prefill_case(2, 2, 4, T=1024))]
    p += [(f"gated {n}", lambda n=n: gated_residual_case(n)) for n in ("layernorm", "rmsnorm", None)]
    p.append(("gated rmsnorm gate[D]", lambda: gated_residual_case("rmsnorm", True)))
    p.append(("perceiver bf16", lambda: perceiver_case()))
    p += [(f"xattn {m} B4 32 shots", lambda m=m: xattn_prefill_case(4, 32, m))
          for m in ("all-previous", "all-previous+bug")]
    p += [(f"xattn immediate fp16/fp32 {d}", lambda d=d: xattn_prefill_case(2, 16, "immediate", d))
          for d in (torch.float16, torch.float32)]
    p += [(f"perceiver {d}", lambda d=d: perceiver_case(dtype=d)) for d in (torch.float16, torch.float32)]
    # Llama 3.2 Vision 11B: decode (one 4-tile image; 8 in the cache, the last one read; beams), then prefill
    p += [("mllama decode B1", lambda: segment_decode_case(1, 1, 4)),
          ("mllama decode B8 8 images", lambda: segment_decode_case(8, 8, 4)),
          ("mllama decode B8 3 beams", lambda: segment_decode_case(8, 1, 4, beams=3)),
          ("mllama prefill B1 8 images", lambda: segment_prefill_case(1, 8, 4, T=2048)),
          ("mllama prefill stride 1608", lambda: segment_prefill_case(2, 2, 4, T=1024, tile_stride=1608))]
    return p


def _commit() -> str:
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else "uncommitted"


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| case | shape | dtype | triton ms | twin ms | baseline | baseline ms | x vs twin | x vs baseline | "
             "max err / bound | kernel ok | twin ok | notes |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | | | | | | | | | | FAILED | | {r['error']} |")
            continue
        ms, base = r["ms"], r["baseline"]
        notes = ", ".join(f"{k} {v:.4f} ms" for k, v in ms.items() if k not in ("triton", "twin", base))
        if "triton_GBps" in r:
            notes = (notes + ", " if notes else "") + f"triton {r['triton_GBps']:.0f} GB/s"
        lines.append(
            f"| {r['case']} | {r['shape']} | {r['dtype']} | {ms['triton']:.4f} | {ms['twin']:.4f} | {base} | "
            f"{ms[base]:.4f} | {ms['twin'] / ms['triton']:.2f} | {ms[base] / ms['triton']:.2f} | "
            f"{r['max_err']:.2e} / {r['bound']:.2e} | {'yes' if r['ok'] else 'NO'} | "
            f"{'yes' if r['twin_ok'] else 'NO'} | {notes} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU: interpreter, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=100.0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if not DRY and not torch.cuda.is_available():
        (args.out / "kernels_gpu.md").write_text("# Kernels on GPU\n\nskipped: no CUDA GPU visible to torch\n")
        print("no CUDA GPU: nothing to run (use --dry-run on a CPU)")
        return 0
    device_name = "CPU (dry run: Triton interpreter)" if DRY else torch.cuda.get_device_name()
    header = (f"# Kernels on GPU\n\n- device: {device_name}; torch {torch.__version__}; triton {triton.__version__}; "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}; commit {_commit()}\n"
              "- times: triton.testing.do_bench medians in ms (decode: also do_bench_cudagraph, the kernel "
              "without Python launch overhead); x = baseline ms / triton ms\n"
              "- check: max |out - float64| <= 2 x plain torch's error at the dtype + atol (tests/helpers.py)")
    start = time.perf_counter()
    rows = []
    for name, thunk in plan(DRY):
        if time.perf_counter() - start > args.budget_s:
            rows.append({"case": name, "error": f"skipped: over the {args.budget_s:.0f} s budget"})
            continue
        t0 = time.perf_counter()
        try:
            row = thunk()
        except Exception as exc:  # record and go on
            row = {"case": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                   "traceback": traceback.format_exc()}
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
        status = row.get("error") or ("ok" if row["ok"] and row["twin_ok"] else "CHECK FAILED")
        print(f"{name:45s} {row['seconds']:6.1f}s {status}", flush=True)
        (args.out / "kernels_gpu.md").write_text(markdown(rows, header))  # rewritten after every case
        (args.out / "kernels_gpu.json").write_text(json.dumps(rows, indent=1, default=str))
        if not DRY:
            torch.cuda.empty_cache()
    failed = [r for r in rows if "error" in r and not r["error"].startswith("skipped")
              or ("ok" in r and not (r["ok"] and r["twin_ok"]))]
    print(f"{len(rows) - len(failed)} of {len(rows)} cases ok in {time.perf_counter() - start:.0f} s; "
          f"table: {args.out / 'kernels_gpu.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
