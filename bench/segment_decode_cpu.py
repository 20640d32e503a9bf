"""The torch twin of the segment cross-attention decode op (Llama 3.2 Vision) on the CPU: its two paths, per
call (one cross-attention layer of one decode step), interleaved A/B so that other load hits both alike.

    python bench/segment_decode_cpu.py [--batch 4 --images 4 --tiles 4 --tile-len 257 --heads 8 --kv-heads 2
                                        --head-dim 64 --dtype float32 --reps 50 --threads 1]

    dense     the GPU path (no host sync, CUDA-graph safe): the whole cache of images x tiles x tile_len keys per
              row, masked to the row's range, K/V zeroed outside it
    gathered  the CPU path (GATHER_ON_CPU): each row's own keys gathered, one host sync

Each row's token sees its last image (what generated tokens see after a prompt of `images` image shots), so the
gathered path reads 1 / images of the keys. Defaults: a small model's shape with 224-px tiles (16 x 16 patches
+ the class token = 257 keys). Against transformers, whose decode step attends over every key with a mask as
the dense path does, the gathered path's ratio is the gain.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import timed

from flamingo_fast.kernels import segment_cross_attention_decode as decode
from flamingo_fast.kernels.segment_cross_attention import tile_ranges_from_mask


def inputs(batch: int, images: int, tiles: int, tile_len: int, heads: int, kv_heads: int, head_dim: int, dtype):
    """q [B, H, d]; K/V [B, Hkv, images * tiles * tile_len, d]; each row's range: its last image, all tiles real."""
    mask = torch.zeros(batch, 1, images, tiles, dtype=torch.long)
    mask[:, :, -1] = 1
    start, end, valid = tile_ranges_from_mask(mask)
    valid[:] = True  # the earlier images' tiles are real too: the dense path must mask them by range
    keys = images * tiles * tile_len
    q = torch.randn(batch, heads, head_dim, dtype=dtype)
    k = torch.randn(batch, kv_heads, keys, head_dim, dtype=dtype)
    v = torch.randn(batch, kv_heads, keys, head_dim, dtype=dtype)
    return q, k, v, start[:, -1].contiguous(), end[:, -1].contiguous(), valid


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--tiles", type=int, default=4)
    parser.add_argument("--tile-len", type=int, default=257)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    q, k, v, start, end, valid = inputs(args.batch, args.images, args.tiles, args.tile_len, args.heads,
                                        args.kv_heads, args.head_dim, getattr(torch, args.dtype))

    def run(gather: bool):
        def call():
            decode.GATHER_ON_CPU = gather
            return decode.segment_cross_attention_decode_ref(q, k, v, start, end, valid, tile_len=args.tile_len)
        return call

    dense, gathered = run(False), run(True)
    torch.testing.assert_close(dense(), gathered(), rtol=1e-4, atol=1e-4)
    times = {"dense": [], "gathered": []}
    for _ in range(10):  # interleaved rounds
        times["dense"] += timed(dense, max(1, args.reps // 10), "cpu")
        times["gathered"] += timed(gathered, max(1, args.reps // 10), "cpu")
    decode.GATHER_ON_CPU = True
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    print(f"B{args.batch} H{args.heads}/{args.kv_heads} d{args.head_dim} {args.images} images x {args.tiles} tiles x "
          f"{args.tile_len} keys, {args.dtype}, {args.threads} thread(s), median of {len(times['dense'])}:")
    print(f"  dense {med['dense']:.3f} ms   gathered {med['gathered']:.3f} ms   "
          f"ratio {med['dense'] / med['gathered']:.2f}x")


if __name__ == "__main__":
    main()
