"""Decode-step segment cross-attention (Llama 3.2 Vision): each row's new token (and its beam hypotheses) against
the row's cached vision K/V over the tile range of the row's last mask row, split over fixed-size key chunks.
Kernel (interpreted) and twin against the dense float64 formula (tests/segment_cases.py); batch invariance of
the splits, bit for bit."""

from __future__ import annotations

import pytest
import torch
from helpers import Padded, assert_close, assert_within_torch_error, interpreter, nan_out
from segment_cases import (
    batch_masks,
    formula64,
    plain_torch,
    poison_unread_tiles,
    range_key_mask,
    stored,
    transformers_key_mask,
)

from flamingo_fast.kernels import segment_cross_attention_decode as decode_module
from flamingo_fast.kernels.segment_cross_attention import ALL_TILES, tile_ranges_from_mask
from flamingo_fast.kernels.segment_cross_attention_decode import (
    num_splits,
    segment_cross_attention_decode,
    segment_cross_attention_decode_ref,
)

DTYPES = [torch.float32, torch.bfloat16]
MAX_TILES = 4
# Prompts of 12 tokens; the decode token sees the last mask row: images 1-2 (a group, 4 + 1 tiles), image 0
# (1 valid tile of 4), a text-only row (every tile of its 3 padded images), image 2 of 3 (2 tiles).
ROWS = [[2, "I2", 5, "I4", "I1", 2], ["I1", 11], [12], ["I3", 2, "I1", 3, "I2", 4]]


def make_case(layouts, *, R=1, H=4, Hkv=2, d=16, tile_len=12, dtype=torch.float32, seed=0, device="cpu"):
    """-> (q [B * R, H, d], compact k, v with NaN where the decode token does not look, last-row key mask [B, keys],
    (tile_start, tile_end) [B] of the last mask row, tile_valid)."""
    g = torch.Generator().manual_seed(seed)
    mask = batch_masks(layouts, MAX_TILES)
    B, _, images, _ = mask.shape
    keys = images * MAX_TILES * tile_len
    q = torch.randn(B * R, H, d, generator=g).to(dtype)
    k = torch.randn(B, Hkv, keys, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, keys, d, generator=g).to(dtype)
    key_mask = transformers_key_mask(mask[:, -1:], tile_len)[:, 0]  # [B, keys]
    poison_unread_tiles(k, v, key_mask[:, None])
    start, end, valid = tile_ranges_from_mask(mask, check=True)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(q), to(k), to(v), to(key_mask), (to(start[:, -1].contiguous()), to(end[:, -1].contiguous())),
            to(valid))


def per_query(x: torch.Tensor, R: int) -> torch.Tensor:
    return x.repeat_interleave(R, dim=0)


def check(q, k, v, key_mask, ranges, valid, *, R, tile_len, tile_stride, split_keys=None, scale=None):
    """Kernel (NaN-padded views, NaN out=) and twin against the float64 formula, query by query."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kwargs = dict(tile_len=tile_len, tile_stride=tile_stride, scale=scale, queries_per_row=R)
    inputs = [Padded(q), Padded(stored(k, tile_len, tile_stride)), Padded(stored(v, tile_len, tile_stride)),
              Padded(ranges[0]), Padded(ranges[1]), Padded(valid, fill=True)]
    out = nan_out(tuple(q.shape), dtype)
    result = segment_cross_attention_decode(*(p.view for p in inputs), out=out.view, split_keys=split_keys, **kwargs)
    assert result.data_ptr() == out.view.data_ptr()
    for p in [*inputs, out]:
        p.assert_padding_intact()
    twin = segment_cross_attention_decode_ref(*(p.view for p in inputs), **kwargs)  # CPU: rows gathered
    with pytest.MonkeyPatch.context() as patch:  # the GPU's sync-free path: the whole cache, masked
        patch.setattr(decode_module, "GATHER_ON_CPU", False)
        twin_dense = segment_cross_attention_decode_ref(*(p.view for p in inputs), **kwargs)
    # the formula as prefill with T = 1: query n of row n // R, the row's K/V and key mask repeated per query
    q4, k4, v4, m4 = q[:, :, None], per_query(k, R), per_query(v, R), per_query(key_mask, R)[:, None]
    ref64 = formula64(q4, k4, v4, m4, scale)[:, :, 0]
    plain = plain_torch(q4, k4, v4, m4, scale)[:, :, 0]
    assert_within_torch_error(result, ref64, plain, dtype)
    assert_within_torch_error(twin, ref64, plain, dtype)
    assert_within_torch_error(twin_dense, ref64, plain, dtype)
    assert_close(result, twin, dtype)
    nothing = ~per_query(key_mask, R).any(dim=-1)
    assert all(bool((x[nothing] == 0).all()) for x in (result, twin, twin_dense))
    return result


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("R", [1, 3])
def test_last_mask_row_matches_transformers_rule(R, dtype):
    """Adjacent images, a one-tile image of four, a text-only row (every tile), GQA 4/2, 12-key tiles stored
    every 16 rows, split into 64-key chunks (several per row); R hypotheses per row share its cache."""
    q, k, v, key_mask, ranges, valid = make_case(ROWS, R=R, dtype=dtype)
    assert int(ranges[0][2]) == ALL_TILES
    check(q, k, v, key_mask, ranges, valid, R=R, tile_len=12, tile_stride=16, split_keys=64)


@interpreter
def test_explicit_ranges_and_tiles_longer_than_a_block():
    """Hand-written ranges (empty: 0; past the last tile: clamped; every tile), tiles of 70 keys, 3 query heads
    per KV head, chunks of 96 keys that end inside tiles."""
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, d, tile_len, n_tiles, R = 4, 6, 2, 32, 70, 4, 2  # 3 query heads per KV head
    valid = torch.tensor([[True, False, True, True], [False, True, False, False], [True] * 4, [True] * 4])
    start = torch.tensor([0, 3, 2, ALL_TILES], dtype=torch.int32)
    end = torch.tensor([9, 1, 2, 0], dtype=torch.int32)
    q = torch.randn(B * R, H, d, generator=g)
    k, v = torch.randn(2, B, Hkv, n_tiles * tile_len, d, generator=g).unbind(0)
    key_mask = range_key_mask(start, end, valid, tile_len)
    check(q, k, v, key_mask, (start, end), valid, R=R, tile_len=tile_len, tile_stride=72, split_keys=96, scale=0.2)


@interpreter
def test_a_rows_result_does_not_depend_on_the_batch():
    """Row 0 alone (its cache: 1 image, 4 tiles, one split of 256 keys) and in a batch whose other row has 3
    images (a cache of 3 x 4 tiles: 3 splits): the same bits, though the launches differ in splits and rows."""
    layouts = [["I4", 5], ["I2", "I4", "I3", 3]]
    q, k, v, _, (start, end), valid = make_case(layouts, H=8, Hkv=2, d=32, tile_len=60, seed=5)
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    tile_len, row_keys = 60, 4 * 60
    batched = segment_cross_attention_decode(q, k, v, start, end, valid, tile_len=tile_len)
    alone = segment_cross_attention_decode(q[:1], k[:1, :, :row_keys], v[:1, :, :row_keys], start[:1], end[:1],
                                           valid[:1, :4], tile_len=tile_len)
    assert num_splits(k.shape[2]) == 3 and num_splits(row_keys) == 1
    assert torch.equal(batched[:1], alone)


@pytest.mark.parametrize("gather", [True, False], ids=["gathered", "dense"])
def test_twin_matches_formula_at_a_larger_cache(gather, monkeypatch):
    monkeypatch.setattr(decode_module, "GATHER_ON_CPU", gather)
    layouts = [[3, "I4", "I4", 20, "I2", 5, "I1", "I3", 36], ["I1", 68], [69]]
    q, k, v, key_mask, ranges, valid = make_case(layouts, R=2, H=8, Hkv=2, d=32, tile_len=40, seed=6)
    out = segment_cross_attention_decode_ref(q, k, v, *ranges, valid, tile_len=40, queries_per_row=2)
    q4, k4, v4, m4 = q[:, :, None], per_query(k, 2), per_query(v, 2), per_query(key_mask, 2)[:, None]
    assert_within_torch_error(out, formula64(q4, k4, v4, m4, 32**-0.5)[:, :, 0],
                              plain_torch(q4, k4, v4, m4, 32**-0.5)[:, :, 0], torch.float32)


BAD_INPUTS = [
    ("q rank 4", lambda a: a.update(q=a["q"][None]), "q"),
    ("q not whole rows", lambda a: a.update(queries_per_row=4), "q"),
    ("k rows differ", lambda a: a.update(k=a["k"][:1], v=a["v"][:1]), "k"),
    ("start per query", lambda a: a.update(tile_start=torch.zeros(6, dtype=torch.int32)), "tile_start"),
    ("end int64", lambda a: a.update(tile_end=a["tile_end"].long()), "tile_end"),
    ("valid rows", lambda a: a.update(tile_valid=a["tile_valid"][:1]), "tile_valid"),
    ("split_keys 0", lambda a: a.update(split_keys=0), "split_keys"),
    ("out shape", lambda a: a.update(out=torch.empty(6, 4, 8)), "out"),
]


@pytest.mark.parametrize("fn", [segment_cross_attention_decode, segment_cross_attention_decode_ref],
                         ids=["kernel", "twin"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fn, case):
    _, change, name = case
    args = dict(q=torch.randn(6, 4, 16), k=torch.randn(2, 2, 24, 16), v=torch.randn(2, 2, 24, 16),
                tile_start=torch.zeros(2, dtype=torch.int32), tile_end=torch.ones(2, dtype=torch.int32),
                tile_valid=torch.ones(2, 4, dtype=torch.bool), tile_len=6, queries_per_row=3)
    change(args)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        fn(**args)


# ------------------------------------------------------------------------------------------ on a GPU
GPU_ROWS = [[2, "I4", 8, "I2", "I1", 3], [16], ["I4", 15], ["I1", 3, "I3", 11]]


@pytest.mark.cuda
@pytest.mark.parametrize("R", [1, 3])
def test_gpu_llama_3_2_vision_11b_sizes_bf16(R):
    """32 query heads on 8 KV heads of 128, tiles of 1601 keys stored every 1608 rows (26+ splits per row)."""
    q, k, v, key_mask, ranges, valid = make_case(GPU_ROWS, R=R, H=32, Hkv=8, d=128, tile_len=1601,
                                                 dtype=torch.bfloat16, device="cuda")
    check(q, k, v, key_mask, ranges, valid, R=R, tile_len=1601, tile_stride=1608)


@pytest.mark.cuda
@pytest.mark.parametrize("fn", [segment_cross_attention_decode, segment_cross_attention_decode_ref],
                         ids=["kernel", "twin"])
def test_gpu_cuda_graph_replay_matches_eager(fn):
    """Captured once, replayed with new queries and new row ranges: the same as eager calls. The capture itself
    fails if the op syncs with the host or allocates outside the graph's pool."""
    q, k, v, _, (start, end), valid = make_case(GPU_ROWS, R=2, H=32, Hkv=8, d=128, tile_len=1601,
                                                dtype=torch.bfloat16, device="cuda")
    k, v = k.nan_to_num(0.0), v.nan_to_num(0.0)
    q_static, start_static, end_static, out_static = q.clone(), start.clone(), end.clone(), torch.empty_like(q)
    kwargs = dict(tile_len=1601, queries_per_row=2)

    def step():
        fn(q_static, k, v, start_static, end_static, valid, out=out_static, **kwargs)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: compilation stays out of the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(3):
        q_static.copy_(torch.randn_like(q))
        start_static.copy_(torch.tensor([trial, ALL_TILES, 4 * trial, 0], dtype=torch.int32, device="cuda"))
        end_static.copy_(torch.tensor([4 + trial, 0, 16, 4 * trial], dtype=torch.int32, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        eager = fn(q_static, k, v, start_static, end_static, valid, **kwargs)
        if fn is segment_cross_attention_decode:  # the same kernels on the same inputs: the same bits
            torch.testing.assert_close(out_static, eager, rtol=0, atol=0)
        else:  # the twin's SDPA may pick another backend when captured
            assert_close(out_static, eager)
