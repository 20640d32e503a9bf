"""The torch backend's decode-step ops, old path against the new twins, per layer, on the CPU: whether the twins
(kernels/decode_attention.py, kernels/rotary_kv_write.py) may replace today's torch path (the rule: only
where they are not slower).

    python bench/decode_ops_cpu.py [--preset small --batches 1,4 --kv-lens 64,256,1024 --reps 200 --threads 1]

Per (batch, kv length), interleaved A/B/A/B so that other load on the machine hits both alike; min and median
of `reps` calls of each:
    attention   SDPA with a [B, 1, 1, S] boolean mask and enable_gqa (today)   vs  decode_attention_ref
    rotary+kv   apply_rotary on q and k, two index_copy_ (today)               vs  rotary_kv_write_ref
    qkv         three Linear GEMVs (today)                                      vs  one GEMM on the fused weight
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from common import timed

from flamingo_fast.config import from_name
from flamingo_fast.kernels.decode_attention import decode_attention_ref
from flamingo_fast.kernels.rotary_kv_write import rotary_kv_write_ref
from flamingo_fast.positions import apply_rotary, rotary_cos_sin


def interleaved(a, b, reps: int, rounds: int = 10) -> tuple[list[float], list[float]]:
    ta, tb = [], []
    for _ in range(3):
        a(), b()  # warm-up
    for _ in range(rounds):
        ta += timed(a, reps // rounds)
        tb += timed(b, reps // rounds)
    return ta, tb


def cases(lm, B: int, S: int, with_projections: bool) -> list:
    """(name, old, new) closures over fresh tensors for one batch and KV length."""
    H, Hkv, d, D = lm.num_heads, lm.num_kv_heads, lm.head_dim, lm.hidden_size
    capacity = S + 8
    keys, values = torch.randn(B, Hkv, capacity, d), torch.randn(B, Hkv, capacity, d)
    key_valid = torch.zeros(B, capacity, dtype=torch.bool)
    key_valid[:, 3:S] = True
    column = torch.tensor([S - 1])
    end = column + 1
    q, k, v = torch.randn(B, H, 1, d), torch.randn(B, Hkv, 1, d), torch.randn(B, Hkv, 1, d)
    cos, sin = rotary_cos_sin(torch.full((B, 1), S - 4), d, lm.rope_theta, torch.float32)

    def old_attention():
        mask = key_valid[:, None, None, :S]
        return F.scaled_dot_product_attention(q, keys[:, :, :S], values[:, :, :S], attn_mask=mask,
                                              enable_gqa=H != Hkv)

    def new_attention():
        start = end - key_valid[:, :S].sum(dim=1)
        return decode_attention_ref(q[:, :, 0], keys[:, :, :S], values[:, :, :S], start, end)

    def old_rotary():
        qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        keys.index_copy_(2, column, kr)
        values.index_copy_(2, column, v)
        return qr

    def new_rotary():
        return rotary_kv_write_ref(q[:, :, 0], k[:, :, 0], v[:, :, 0], cos[:, 0, 0], sin[:, 0, 0], keys, values,
                                   column)

    out = [("attention", old_attention, new_attention), ("rotary+kv", old_rotary, new_rotary)]
    if with_projections:  # the projections do not depend on the KV length
        wq, wk, wv = torch.randn(H * d, D), torch.randn(Hkv * d, D), torch.randn(Hkv * d, D)
        fused = torch.cat([wq, wk, wv])
        h = torch.randn(B, 1, D)
        out.append(("qkv", lambda: (F.linear(h, wq), F.linear(h, wk), F.linear(h, wv)),
                    lambda: F.linear(h, fused).split([H * d, Hkv * d, Hkv * d], dim=-1)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--kv-lens", default="64,256,1024")
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = from_name(args.preset).lm
    print(f"preset {args.preset} (H {lm.num_heads}, Hkv {lm.num_kv_heads}, d {lm.head_dim}, D {lm.hidden_size}), "
          f"float32, {args.threads} thread(s), {args.reps} calls each, interleaved; times in us")
    print("| op | batch | kv len | old min | old median | new min | new median | new/old (median) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    kv_lens = [int(s) for s in args.kv_lens.split(",")]
    with torch.no_grad():
        for B in (int(b) for b in args.batches.split(",")):
            for S in kv_lens:
                for name, old, new in cases(lm, B, S, S == kv_lens[0]):
                    to, tn = interleaved(old, new, args.reps)
                    mo, mn = statistics.median(to), statistics.median(tn)
                    print(f"| {name} | {B} | {S} | {1e6 * min(to):.1f} | {1e6 * mo:.1f} | {1e6 * min(tn):.1f} | "
                          f"{1e6 * mn:.1f} | {mn / mo:.2f} |", flush=True)


if __name__ == "__main__":
    main()
