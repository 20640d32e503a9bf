"""GPU compile gate, without a GPU: every kernel in every configuration the runtime launches compiles ahead
of time for sm_80 and sm_90, without register spills, within the shared memory of the architecture, and
the sm_90 code of the bf16/fp16 attention kernels uses Hopper's matrix instructions (HGMMA).

It runs bench/compile_report.py in a subprocess: under TRITON_INTERPRET=1 (set by conftest.py on a CPU)
`@triton.jit` returns an interpreter object, so the kernels must be imported fresh with it unset. Measured on
2 cores (2026-12-04, 226 compiles, before the int8 matmul added 42): about 98 s with a cold Triton cache, 7 s
warm (the cache is ~/.triton/cache);
cuobjdump dumps the SASS only where HGMMA is asserted (it was 150 s of the gate). The configurations run in
SHARDS interleaved shards, one subprocess each, so that the suite's two workers compile at once: with a cold
cache the gate was the last test to finish, on one core. The segment cross-attention kernels (Llama 3.2 Vision)
added 14 compiles: 14 s of 100 s cold, in-process (5.6 s in shard 0, 8.2 s in shard 1; shards 50.0 s / 49.9 s),
2026-12-07."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

ROOT = Path(__file__).resolve().parent.parent
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


SHARDS = 2


@pytest.mark.skipif(not CUOBJDUMP.exists(), reason=f"triton ships no cuobjdump here ({CUOBJDUMP})")
@pytest.mark.parametrize("shard", range(SHARDS))
def test_every_kernel_configuration_compiles_for_sm80_and_sm90_without_spills(tmp_path, shard):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    results = tmp_path / "compile.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compile_report.py"), "--json", str(results),
         "--shard", f"{shard}/{SHARDS}"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert results.exists(), f"compile_report.py crashed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    report = json.loads(results.read_text())
    configs = report["configs"]
    assert configs, f"shard {shard}/{SHARDS} compiled nothing"
    failures = [
        f"sm_{arch} {c['kernel']} [{c['config']}]: {r['error']}"
        for c in configs for arch, r in c["results"].items() if not r["ok"]
    ]
    assert not failures, "\n".join(failures)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert set(report["kernels"]) == {
        "masked_cross_attention", "masked_cross_attention_decode", "gated_residual", "perceiver_attention",
        "decode_attention", "decode_attention_combine", "rotary_kv_write", "int8_weight_matmul",
        "int8_weight_matmul_combine", "segment_cross_attention", "segment_cross_attention_decode",
        "segment_decode_combine"}
    hopper_mma = [c for c in configs if c["kernel"] in ("masked_cross_attention", "perceiver_attention",
                                                         "segment_cross_attention")
                  and not c["config"].startswith("fp32")]
    assert hopper_mma and all(c["results"]["90"]["hgmma"] for c in hopper_mma)
    assert {c["kernel"] for c in configs} <= set(report["kernels"])
