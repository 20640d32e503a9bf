"""One decode step at a fixed context: the reference vs the fast runtime, in the same run.

    pytest bench/bench_decode_step.py --benchmark-only        (or `make bench`)

The prompt (k shots, k + 1 images) is prefilled once; the timed call is then one more token through the LM:
  reference  `lang_encoder(token, media, ...)` on its concatenating KV cache, restored before each call,
             so its cross-attention K/V are recomputed from all latents (the reference's real decode cost);
  fast       `FastFlamingo.run_decode_step` (the CUDA graph replay on a GPU), which rewrites the same cache
             column every call.
Each test times its own implementation with pytest-benchmark (synchronising the GPU inside the call) and
measures both in `extra_info` (median ms, `triton.testing.do_bench` on CUDA, whose timer waits for the GPU),
with `speedup` = reference / fast. FLAMINGO_BENCH_PRESET picks the preset (default small), FLAMINGO_BENCH_DEVICE
the device (default cuda if available).
"""

from __future__ import annotations

import os

import pytest
import torch
from common import median_seconds

from flamingo_fast import masking
from flamingo_fast.config import from_name
from flamingo_fast.profiling.prompts import build_prompt
from flamingo_fast.reference.lm import ReferenceKVCache
from flamingo_fast.reference.model import build_reference

DEVICE = os.environ.get("FLAMINGO_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
PRESET = os.environ.get("FLAMINGO_BENCH_PRESET", "small")
DTYPE = torch.bfloat16 if torch.device(DEVICE).type == "cuda" else torch.float32
SHOTS = (0, 16)
BATCH = 1


def _sync() -> None:
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def _median_ms(step, repeats: int = 10) -> float:
    """Median of `repeats` synchronised calls; do_bench on CUDA."""
    if torch.device(DEVICE).type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median"))
    return 1e3 * median_seconds(step, repeats=repeats, warmup=1)


@pytest.fixture(scope="module")
def model():
    return build_reference(from_name(PRESET), seed=0, dtype=DTYPE, device=DEVICE)


@torch.no_grad()
def reference_step(model, shots: int):
    """-> a callable running one reference decode step after a `shots`-shot prompt (cache restored each call)."""
    config = model.config
    vision_x, lang_x, mask = build_prompt(config, shots, BATCH, 12, 6, seed=0, dtype=DTYPE, device=DEVICE)
    lm = model.lang_encoder
    media = model.encode_vision(vision_x)
    cache = ReferenceKVCache.empty(config.lm.num_layers)
    positions = masking.positions_from_mask(mask)
    logits = lm(lang_x, media, masking.text_time(lang_x, config.media_token_id), positions, mask, cache)[:, -1]
    token = logits.argmax(-1)[:, None]
    decode_time = masking.images_per_row(lang_x, config.media_token_id)[:, None]
    key_valid = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    keys, values = list(cache.keys), list(cache.values)

    @torch.no_grad()
    def step():
        cache.keys, cache.values = list(keys), list(values)  # back to the prompt: every call is the same step
        out = lm(token, media, decode_time, positions[:, -1:] + 1, key_valid, cache)
        _sync()
        return out

    return step


@torch.no_grad()
def fast_step(model, shots: int):
    """-> a callable running one fast decode step after a `shots`-shot prompt (same cache column each call)."""
    from flamingo_fast.runtime.graphs import DecodeInputs
    from flamingo_fast.runtime.runtime import FastFlamingo

    config = model.config
    vision_x, lang_x, mask = build_prompt(config, shots, BATCH, 12, 6, seed=0, dtype=DTYPE, device=DEVICE)
    prompt_len = lang_x.shape[1]
    fast = FastFlamingo.from_reference(model, max_batch_size=BATCH, max_seq_len=prompt_len + 8,
                                       max_images=shots + 1)
    out = fast.generate(vision_x, lang_x, mask, max_new_tokens=1, eos_token_id=[])  # fills both caches
    images = masking.images_per_row(lang_x, config.media_token_id).to(torch.int32)
    inputs = DecodeInputs(
        token=out[:, -1].clone(), rope_position=torch.full((BATCH,), prompt_len, dtype=torch.long, device=DEVICE),
        kv_column=torch.full((1,), prompt_len, dtype=torch.long, device=DEVICE),
        prompt_columns=torch.full((1,), prompt_len, dtype=torch.long, device=DEVICE),
        image_index=images - 1, row_images=images,
    )

    @torch.no_grad()
    def step():
        logits = fast.run_decode_step(inputs, kv_len=prompt_len + 1, per_row=1, tails=False)
        _sync()
        return logits

    return step


_MEASURED: dict[int, tuple[dict, float, float]] = {}


def _both(model, shots: int) -> tuple[dict, float, float]:
    """Both steps for `shots` and their medians, measured once per run and shared by the two tests."""
    if shots not in _MEASURED:
        steps = {"reference": reference_step(model, shots), "fast": fast_step(model, shots)}
        ref_ms, fast_ms = _median_ms(steps["reference"]), _median_ms(steps["fast"])
        print(f"\n{PRESET} shots={shots}: reference {ref_ms:.2f} ms, fast {fast_ms:.2f} ms, x{ref_ms / fast_ms:.2f}")
        _MEASURED[shots] = (steps, ref_ms, fast_ms)
    return _MEASURED[shots]


@pytest.mark.parametrize("shots", SHOTS)
@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_decode_step(benchmark, model, impl, shots):
    steps, ref_ms, fast_ms = _both(model, shots)
    benchmark.group = f"decode step {PRESET} shots={shots} batch={BATCH}"
    benchmark.extra_info.update({
        "preset": PRESET, "device": DEVICE, "dtype": str(DTYPE), "shots": shots, "batch": BATCH,
        "reference_ms": ref_ms, "fast_ms": fast_ms, "speedup": ref_ms / fast_ms,
    })
    benchmark.pedantic(steps[impl], rounds=10, warmup_rounds=2)
