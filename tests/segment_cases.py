"""Inputs and float64 formulas for the segment cross-attention tests (Llama 3.2 Vision's cross-attention).

Written from the rules, independently of the kernels' twins: the Mllama processor's mask (a token sees the
images of the most recent group of adjacent image tokens at or before it, and of each image its real tiles),
transformers' reset of an all-zero mask row to all-visible, and a dense float64 softmax over the keys a mask
allows, with grouped KV heads repeated explicitly."""

from __future__ import annotations

import torch


def processor_mask(layout: list, max_images: int, max_tiles: int) -> torch.Tensor:
    """One row's cross_attention_mask [T, max_images, max_tiles] (int64) from a layout: an int n is n text
    tokens, a string "I<k>" an image token whose image has k tiles."""
    tiles, image_token_at, t = [], [], 0
    for item in layout:
        if isinstance(item, int):
            t += item
        else:
            tiles.append(int(item[1:]))
            image_token_at.append(t)
            t += 1
    mask = torch.zeros(t, max_images, max_tiles, dtype=torch.long)
    for token in range(t):
        seen = [i for i, at in enumerate(image_token_at) if at <= token]
        if not seen:
            continue
        group = [seen[-1]]  # walk back over adjacent image tokens
        while group[0] > 0 and image_token_at[group[0] - 1] == image_token_at[group[0]] - 1:
            group.insert(0, group[0] - 1)
        for i in group:
            mask[token, i, : tiles[i]] = 1
    return mask


def batch_masks(layouts: list[list], max_tiles: int) -> torch.Tensor:
    """[B, T, images, max_tiles] for rows of equal token counts; images = the most any row has."""
    images = max(1, max(sum(1 for x in row if isinstance(x, str)) for row in layouts))
    masks = [processor_mask(row, images, max_tiles) for row in layouts]
    assert len({m.shape[0] for m in masks}) == 1, "rows must have the same number of tokens"
    return torch.stack(masks)


def transformers_key_mask(cross_attention_mask: torch.Tensor, tile_len: int) -> torch.Tensor:
    """[B, T, n_tiles * tile_len] bool: each tile's flag repeated over its keys, then an all-masked token row
    made all-visible (transformers' _prepare_cross_attention_mask)."""
    B, T = cross_attention_mask.shape[:2]
    keys = (cross_attention_mask != 0).reshape(B, T, -1).repeat_interleave(tile_len, dim=-1)
    return keys | ~keys.any(dim=-1, keepdim=True)


def range_key_mask(tile_start, tile_end, tile_valid, tile_len: int) -> torch.Tensor:
    """[..., n_tiles * tile_len] bool from explicit ranges ([...] int): tile j in [start, end) and valid; start < 0:
    every tile; ranges clamped to the tiles there are."""
    n_tiles = tile_valid.shape[-1]
    j = torch.arange(n_tiles)
    start, end = tile_start.long()[..., None], tile_end.long()[..., None]
    valid = tile_valid.reshape(tile_valid.shape[0], *([1] * (start.dim() - 2)), n_tiles)
    tiles = (j >= start) & (j < end) & valid
    tiles = torch.where(start < 0, torch.ones_like(tiles), tiles)
    return tiles.repeat_interleave(tile_len, dim=-1)


def stored(compact: torch.Tensor, tile_len: int, tile_stride: int, fill=float("nan")) -> torch.Tensor:
    """[B, Hkv, n_tiles * tile_len, d] -> the kernel layout [B, Hkv, n_tiles * tile_stride, d], the rows
    between tiles filled with `fill` (they must never be read)."""
    B, Hkv, keys, d = compact.shape
    n_tiles = keys // tile_len
    out = torch.full((B, Hkv, n_tiles, tile_stride, d), fill, dtype=compact.dtype)
    out[:, :, :, :tile_len] = compact.view(B, Hkv, n_tiles, tile_len, d)
    return out.view(B, Hkv, n_tiles * tile_stride, d)


def poison_unread_tiles(k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> None:
    """NaN into the compact K/V of every key no token of the row attends (in place): a kernel that loads one
    of them (an invalid tile, an image the row does not have) turns its output into NaN."""
    unread = ~key_mask.reshape(key_mask.shape[0], -1, key_mask.shape[-1]).any(dim=1)  # [B, keys]
    k.masked_fill_(unread[:, None, :, None], float("nan"))
    v.masked_fill_(unread[:, None, :, None], float("nan"))


def formula64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float
              ) -> torch.Tensor:
    """Dense float64 attention. q [B, H, T, d], compact k, v [B, Hkv, keys, d] (KV heads repeated per query
    head here), key_mask [B, T, keys]. A token with no allowed key gives 0."""
    groups = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(groups, dim=1)
    vv = v.double().repeat_interleave(groups, dim=1)
    kk, vv = kk.nan_to_num(0.0), vv.nan_to_num(0.0)  # NaN only where no token attends (poison_unread_tiles)
    scores = torch.einsum("bhtd,bhkd->bhtk", q.double(), kk) * scale
    scores = scores.masked_fill(~key_mask[:, None], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhtk,bhkd->bhtd", weights, vv)


def plain_torch(q, k, v, key_mask, scale: float) -> torch.Tensor:
    """The same dense masked attention with plain torch ops at the inputs' dtype: the error yardstick."""
    groups = q.shape[1] // k.shape[1]
    kk = k.nan_to_num(0.0).repeat_interleave(groups, dim=1)
    vv = v.nan_to_num(0.0).repeat_interleave(groups, dim=1)
    scores = ((q * scale) @ kk.transpose(-1, -2)).masked_fill(~key_mask[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0) @ vv

