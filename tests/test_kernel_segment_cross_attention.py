"""Prefill segment cross-attention (Llama 3.2 Vision): the Triton kernel (interpreted on the CPU) and its torch
twin against a dense float64 computation from the processor-style mask (tests/segment_cases.py), within 2x the
error of plain torch at the same dtype. Padding rows between tiles, invalid tiles and images a row does not
have hold NaN wherever no token attends them: reading one turns the output into NaN."""

from __future__ import annotations

import inspect

import pytest
import torch
import triton
import triton.language as tl
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

from flamingo_fast.kernels import segment_cross_attention_decode as decode
from flamingo_fast.kernels.segment_cross_attention import (
    ALL_TILES,
    MAX_TILE_ROWS,
    inverse_stride,
    segment_cross_attention,
    segment_cross_attention_ref,
    tile_of,
    tile_ranges_from_mask,
)
from flamingo_fast.runtime.layers import kernel_ops

DTYPES = [torch.float32, torch.bfloat16]
MAX_TILES = 4

# Rows of 30 tokens: text counts and image tokens "I<tiles>". Text before the first image, adjacent images
# (a group), images of 1-4 tiles, a text-only row (every token sees every tile, padded images included), left
# padding (mask rows of 0: every tile), a row whose tokens all see an image (no token sees invalid tiles).
ROWS = [
    [2, "I2", 5, "I4", "I1", 6, "I3", 13],
    [30],
    [3, "I1", "I1", 4, "I2", 20],
    ["I1", 5, "I3", "I2", 22],
]


def make_case(layouts, *, H=4, Hkv=2, d=16, tile_len=12, dtype=torch.float32, seed=0, device="cpu"):
    """-> (q, compact k, v [B, Hkv, n_tiles * tile_len, d] with NaN where no token looks, cross_attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    mask = batch_masks(layouts, MAX_TILES)
    B, T, images, _ = mask.shape
    keys = images * MAX_TILES * tile_len
    q = torch.randn(B, T, H, d, generator=g).transpose(1, 2).to(dtype)
    k = torch.randn(B, Hkv, keys, d, generator=g).to(dtype)
    v = torch.randn(B, Hkv, keys, d, generator=g).to(dtype)
    poison_unread_tiles(k, v, transformers_key_mask(mask, tile_len))
    return q.to(device), k.to(device), v.to(device), mask.to(device)


def check(q, k, v, key_mask, ranges, *, tile_len, tile_stride, scale=None):
    """Kernel (NaN-padded views, NaN out=) and twin against the float64 formula; kernel against twin."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kwargs = dict(tile_len=tile_len, tile_stride=tile_stride, scale=scale)
    inputs = [Padded(q, order=(0, 2, 1, 3)), Padded(stored(k, tile_len, tile_stride)),
              Padded(stored(v, tile_len, tile_stride)), Padded(ranges[0]), Padded(ranges[1]),
              Padded(ranges[2], fill=True)]
    out = nan_out(tuple(q.shape), dtype, order=(0, 2, 1, 3))
    result = segment_cross_attention(*(p.view for p in inputs), out=out.view, **kwargs)
    assert result.data_ptr() == out.view.data_ptr()
    for p in [*inputs, out]:
        p.assert_padding_intact()
    twin = segment_cross_attention_ref(*(p.view for p in inputs), **kwargs)
    ref64 = formula64(q, k, v, key_mask, scale)
    plain = plain_torch(q, k, v, key_mask, scale)
    assert_within_torch_error(result, ref64, plain, dtype)
    assert_within_torch_error(twin, ref64, plain, dtype)
    assert_close(result, twin, dtype)
    nothing = ~key_mask.any(dim=-1)[:, None, :, None].expand_as(result)
    assert bool((result[nothing] == 0).all()) and bool((twin[nothing] == 0).all())
    return result


@interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_processor_masks_match_transformers_rule(dtype):
    """1-4 images of 1-4 tiles, adjacent images, text-only and left-padded rows, GQA 4/2, tiles of 12 keys
    stored every 16 rows: the kernel and the twin against the dense mask transformers builds."""
    q, k, v, mask = make_case(ROWS, dtype=dtype)
    start, end, valid = tile_ranges_from_mask(mask, check=True)
    assert bool((start[1] == ALL_TILES).all()) and bool((start[0, :2] == ALL_TILES).all())
    check(q, k, v, transformers_key_mask(mask, 12), (start, end, valid), tile_len=12, tile_stride=16)


@interpreter
@pytest.mark.parametrize("heads", [(4, 1), (6, 2), (2, 2)], ids=["gqa4", "gqa3", "mha"])
def test_tiles_longer_than_a_key_block(heads):
    """Tiles of 70 keys (stored every 72 rows): key blocks end inside tiles and runs of valid tiles cross tile
    edges; 4 query heads on 1 KV head, 3 per KV head (the query tile's last rows unused), plain multi-head."""
    H, Hkv = heads
    q, k, v, mask = make_case([[1, "I3", "I2", 6], ["I1", 8]], H=H, Hkv=Hkv, d=32, tile_len=70, seed=1)
    ranges = tile_ranges_from_mask(mask)
    check(q, k, v, transformers_key_mask(mask, 70), ranges, tile_len=70, tile_stride=72, scale=0.3)


@interpreter
def test_explicit_ranges_empty_clamped_and_every_tile():
    """Ranges written by hand: empty (end <= start: exactly 0), past the last tile (clamped), every tile
    (ALL_TILES), all tiles invalid but one."""
    g = torch.Generator().manual_seed(2)
    B, H, Hkv, T, d, tile_len, n_tiles = 2, 4, 2, 13, 16, 12, 6
    valid = torch.tensor([[False, False, True, False, False, False], [True, True, False, True, True, False]])
    start = torch.randint(-1, n_tiles, (B, T), generator=g, dtype=torch.int32)
    end = start + torch.randint(-1, 4, (B, T), generator=g, dtype=torch.int32)
    start[0, :3], end[0, :3] = 4, 2  # empty
    start[1, 3], end[1, 3] = 2, 99  # past the last tile: clamped to 6
    start[1, 4], end[1, 4] = 7, 9  # starts past the last tile: empty
    start[0, 5] = ALL_TILES
    q = torch.randn(B, T, H, d, generator=g).transpose(1, 2)
    k, v = torch.randn(2, B, Hkv, n_tiles * tile_len, d, generator=g).unbind(0)
    key_mask = range_key_mask(start, end, valid, tile_len)
    check(q, k, v, key_mask, (start, end, valid), tile_len=tile_len, tile_stride=tile_len)


@interpreter
def test_no_tiles_at_all():
    q = torch.randn(1, 2, 3, 16)
    k = v = torch.zeros(1, 1, 0, 16)
    ranges = (torch.full((1, 3), ALL_TILES, dtype=torch.int32), torch.zeros(1, 3, dtype=torch.int32),
              torch.zeros(1, 0, dtype=torch.bool))
    for fn in (segment_cross_attention, segment_cross_attention_ref):
        assert torch.equal(fn(q, k, v, *ranges, tile_len=5), torch.zeros_like(q))


@triton.jit
def _tile_of_kernel(cols_ptr, out_ptr, n, tile_stride, inv_stride, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.load(cols_ptr + offs, mask=offs < n, other=0)
    tl.store(out_ptr + offs, tile_of(cols, tile_stride, inv_stride), mask=offs < n)


@interpreter
def test_tile_of_is_integer_division_below_the_limit():
    """The kernels' division-free key -> tile map equals //, at tile edges and at random keys, for strides from 1
    to past a million, up to MAX_TILE_ROWS (fp32 1/stride, as a GPU multiplies)."""
    g = torch.Generator().manual_seed(7)
    for stride in (1, 3, 12, 16, 41, 61, 70, 1601, 1608, 6404, 2**20 + 3):  # 41, 61: the estimate is 1 low
        edges = torch.arange(0, MAX_TILE_ROWS, stride)[-2000:]
        cols = torch.cat([edges, edges - 1, edges + 1, torch.randint(0, MAX_TILE_ROWS, (2000,), generator=g)])
        cols = cols.clamp(0, MAX_TILE_ROWS - 1).to(torch.int32)
        out = torch.empty_like(cols)
        _tile_of_kernel[(triton.cdiv(cols.numel(), 8192),)](cols, out, cols.numel(), stride, inverse_stride(stride),
                                                            BLOCK=8192)
        assert torch.equal(out, cols // stride), f"stride {stride}"


def test_twin_larger_rows():
    """The twin is the CPU runtime's path: longer rows, 8 images, GQA 8/2."""
    layouts = [[5, "I4", 30, "I1", "I2", 40, "I4", 20, "I3", "I3", "I1", 30, "I2", 62],
               [195], ["I4", 194]]
    q, k, v, mask = make_case(layouts, H=8, Hkv=2, d=32, tile_len=20, seed=3)
    start, end, valid = tile_ranges_from_mask(mask)
    key_mask = transformers_key_mask(mask, 20)
    out = segment_cross_attention_ref(q, k.nan_to_num(0.0), v.nan_to_num(0.0), start, end, valid, tile_len=20)
    assert_within_torch_error(out, formula64(q, k, v, key_mask, 32**-0.5), plain_torch(q, k, v, key_mask, 32**-0.5),
                              torch.float32)


def test_mask_check_rejects_what_ranges_cannot_hold():
    mask = batch_masks([["I2", "I1", "I3", 3]], MAX_TILES)
    mask[0, 5, 1] = 0  # the last token sees images 0 and 2 but not 1
    with pytest.raises(ValueError, match="cross_attention_mask: token 5 of row 0"):
        tile_ranges_from_mask(mask, check=True)
    start, end, valid = tile_ranges_from_mask(mask)  # no check: no sync, the range spans image 1
    assert (int(start[0, 5]), int(end[0, 5])) == (0, 11)


BAD_INPUTS = [
    ("q rank 3", lambda a: a.update(q=a["q"][0]), "q"),
    ("k heads do not divide", lambda a: a.update(k=a["k"][:, :1].expand(-1, 3, -1, -1), v=a["v"][:, :1]
                                                   .expand(-1, 3, -1, -1)), "k"),
    ("k dtype differs", lambda a: a.update(k=a["k"].half()), "k"),
    ("v shape differs", lambda a: a.update(v=a["v"][:, :, :10]), "v"),
    ("start int64", lambda a: a.update(tile_start=a["tile_start"].long()), "tile_start"),
    ("end wrong T", lambda a: a.update(tile_end=a["tile_end"][:, :2]), "tile_end"),
    ("valid int", lambda a: a.update(tile_valid=a["tile_valid"].int()), "tile_valid"),
    ("too few keys", lambda a: a.update(tile_valid=torch.ones(2, 9, dtype=torch.bool)), "k"),
    ("tile_len 0", lambda a: a.update(tile_len=0), "tile_len"),
    ("stride below len", lambda a: a.update(tile_stride=3), "tile_stride"),
    ("out dtype", lambda a: a.update(out=torch.empty(2, 4, 5, 16, dtype=torch.float16)), "out"),
]


@pytest.mark.parametrize("fn", [segment_cross_attention, segment_cross_attention_ref], ids=["kernel", "twin"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(fn, case):
    _, change, name = case
    args = dict(q=torch.randn(2, 4, 5, 16), k=torch.randn(2, 2, 24, 16), v=torch.randn(2, 2, 24, 16),
                tile_start=torch.zeros(2, 5, dtype=torch.int32), tile_end=torch.ones(2, 5, dtype=torch.int32),
                tile_valid=torch.ones(2, 4, dtype=torch.bool), tile_len=6)
    change(args)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        fn(**args)


def test_backends_dispatch_the_kernel_or_its_twin_under_one_signature():
    pairs = {"segment_cross_attention": (segment_cross_attention, segment_cross_attention_ref),
             "segment_cross_attention_decode": (decode.segment_cross_attention_decode,
                                                decode.segment_cross_attention_decode_ref)}
    for name, (launcher, twin) in pairs.items():
        assert inspect.signature(launcher) == inspect.signature(twin), name
        assert getattr(kernel_ops("triton"), name) is launcher and getattr(kernel_ops("torch"), name) is twin


# ------------------------------------------------------------------------------------------ on a GPU
@pytest.mark.cuda
def test_gpu_llama_3_2_vision_11b_sizes_bf16():
    """32 query heads on 8 KV heads of 128, tiles of 1601 keys stored every 1608 rows, 1-4 images of 1-4 tiles,
    text before the first image, a text-only row."""
    layouts = [[20, "I4", 100, "I2", "I1", 60, "I3", 72], [256], ["I4", 255]]
    q, k, v, mask = make_case(layouts, H=32, Hkv=8, d=128, tile_len=1601, dtype=torch.bfloat16, device="cuda")
    ranges = tile_ranges_from_mask(mask, check=True)
    check(q, k, v, transformers_key_mask(mask, 1601), ranges, tile_len=1601, tile_stride=1608)


@interpreter
def test_rows_beyond_int32_offsets_raise_instead_of_wrapping():
    """4M keys stored [B, S, Hkv, d] (1024 elements per key): a row spans 2**32 elements, past the kernels'
    int32 offsets. Meta tensors: nothing is allocated."""
    tiles, tile_len = 4096, 1024
    k = torch.empty(1, tiles * tile_len, 8, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    valid = torch.empty(1, tiles, dtype=torch.bool, device="meta")
    q = torch.empty(1, 32, 4, 128, device="meta", dtype=torch.bfloat16)
    ranges = [torch.empty(1, 4, dtype=torch.int32, device="meta") for _ in range(2)]
    with pytest.raises(ValueError, match=r"^k: shape \(1, 8, 4194304, 128\) .* expected below 2\*\*31"):
        segment_cross_attention(q, k, k, *ranges, valid, tile_len=tile_len)
    ranges = [torch.empty(1, dtype=torch.int32, device="meta") for _ in range(2)]
    with pytest.raises(ValueError, match=r"^k: shape"):
        decode.segment_cross_attention_decode(q[:, :, 0], k, k, *ranges, valid, tile_len=tile_len)
