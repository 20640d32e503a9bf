"""Per-request state, as explicit objects allocated once and written in place (never on modules).

StaticKVCache   self-attention keys/values of every decoder layer, [layers, B_max, H_kv, S_max, hd], plus which
                key columns hold real tokens (left padding stays invalid).
MediaKVCache    cross-attention keys/values of every image, computed once per prompt for each cross-attention
                layer, [xattn_layers, B_max, H, max_images * num_latents, dh]. Decoding reads only each row's
                current image, so a decode step costs the same at 0 and 32 shots.
TailKVCache     self-attention keys/values of the tokens each beam generated, [layers, H_max, H_kv, T_max, hd]:
                the beams of a row share its prompt's KV in the StaticKVCache and keep only their tails here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import FlamingoConfig


@dataclass
class StaticKVCache:
    keys: torch.Tensor  # [layers, B_max, H_kv, S_max, hd]
    values: torch.Tensor
    key_valid: torch.Tensor  # [B_max, S_max] bool

    @classmethod
    def allocate(cls, config: FlamingoConfig, max_batch_size: int, max_seq_len: int, dtype, device) -> StaticKVCache:
        lm = config.lm
        shape = (lm.num_layers, max_batch_size, lm.num_kv_heads, max_seq_len, lm.head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(max_batch_size, max_seq_len, dtype=torch.bool, device=device),
        )

    @property
    def max_batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[3]


@dataclass
class MediaKVCache:
    keys: torch.Tensor  # [xattn_layers, B_max, H, max_images * num_latents, dh]
    values: torch.Tensor
    num_latents: int

    @classmethod
    def allocate(
        cls, config: FlamingoConfig, max_batch_size: int, max_images: int, dtype, device
    ) -> MediaKVCache:
        n = config.perceiver.num_latents
        shape = (len(config.xattn_layer_indices), max_batch_size, config.xattn_heads, max_images * n,
                 config.xattn_dim_head)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device), n)

    @property
    def max_images(self) -> int:
        return self.keys.shape[3] // self.num_latents

    def write_images(self, rows: torch.Tensor, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Image slots[j] of row rows[j] gets keys[j], values[j] ([X, H, NL, dh]: every cross-attention layer's)."""
        x, b, h, _, dh = self.keys.shape
        shape = (x, b, h, self.max_images, self.num_latents, dh)
        self.keys.view(shape)[:, rows, :, slots] = keys
        self.values.view(shape)[:, rows, :, slots] = values


@dataclass
class TailKVCache:
    """The private tails of hypotheses that share their row's prompt (beams): each hypothesis's generated
    tokens' keys/values, [layers, H_max, H_kv, T_max, hd]. Reordering beams gathers tails only, never the
    prompt's KV (which stays in the StaticKVCache, one copy per row)."""

    keys: torch.Tensor  # [layers, H_max, H_kv, T_max, hd]
    values: torch.Tensor

    @classmethod
    def allocate(cls, config: FlamingoConfig, max_hypotheses: int, max_tail_len: int, dtype, device) -> TailKVCache:
        lm = config.lm
        shape = (lm.num_layers, max_hypotheses, lm.num_kv_heads, max_tail_len, lm.head_dim)
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @property
    def max_hypotheses(self) -> int:
        return self.keys.shape[1]

    @property
    def max_tail_len(self) -> int:
        return self.keys.shape[3]

    def reorder(self, index: torch.Tensor, length: int) -> None:
        """Hypothesis h continues old hypothesis index[h]: gather the first `length` columns in place."""
        h = index.shape[0]
        self.keys[:, :h, :, :length] = self.keys[:, index, :, :length]
        self.values[:, :h, :, :length] = self.values[:, index, :, :length]
