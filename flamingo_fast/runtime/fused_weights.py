"""Fused projection weights stored once: several nn.Linear that read the same input become one GEMM (one
weight read per decode step instead of several small GEMVs, each with its own split-K reduce), and the
original modules keep working on views of the fused tensor.

    weight = fuse_linear_weights([attn.q_proj, attn.k_proj, attn.v_proj])   # [q_rows + 2 kv_rows, D]
    q, k, v = F.linear(h, weight).split([q_rows, kv_rows, kv_rows], dim=-1)

Each Linear keeps its own Parameter object (its `.data` is re-pointed at a row range of the fused tensor), so
the reference model, its state_dict, `load_state_dict` (which copies into the views) and anyone holding the
parameters see the same values and memory: the old separate tensors are freed, nothing is copied twice, and
memory does not grow (the peak is one layer's projections, while they are copied). Calling it again on
linears that already are consecutive views of one tensor returns that tensor without copying.

Only weights that nothing else holds are fused: a weight whose storage another tensor also holds (a view kept
somewhere, an autograd graph) would stay alive there, and fusing would add a copy instead of moving it. Then
`fuse_linear_weights` returns None and changes nothing (the caller keeps the separate projections). The check
reads the storage's use count (torch._C._storage_Use_Count, which torch's own CUDA-graph trees use), compared
with a fresh parameter's. The drop-ins share the live model's Parameter objects themselves (not views of them),
so their weights are fused too, and the live Hugging Face / OpenFlamingo model reads the same views afterwards
(measured: an IDEFICS and an OpenFlamingo LLaMA model built by `from_idefics` / `from_openflamingo` run fused).

What breaks the sharing: replacing a parameter's storage afterwards (`module.to(other_dtype_or_device)`,
`param.data = ...`) gives that Linear a new tensor while the fused one keeps the old values. FastFlamingo
shares its reference model's parameters in the same way (see runtime.py): convert before building it. Its next
call sees such a replacement (weight_watch.py: the data pointer changed) and refuses to run; a drop-in rebuilds
its runtime instead. An in-place update (optimizer.step(), load_state_dict) writes through the views into the
fused tensor: nothing to do but empty the context cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def already_fused(weights: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The fused tensor when `weights` are consecutive, contiguous row ranges of one storage; else None."""
    first = weights[0]
    if not all(w.is_contiguous() for w in weights):
        return None
    offset = first.storage_offset()
    for w in weights:
        if w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() or w.storage_offset() != offset:
            return None
        offset += w.numel()
    rows = sum(w.shape[0] for w in weights)
    return first.new_empty(0).set_(first.untyped_storage(), first.storage_offset(), (rows, first.shape[1]))


def _storage_users(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def sole_owner(t: torch.Tensor) -> bool:
    """True when `t` (a Parameter, or a plain tensor such as a buffer) is the only tensor over its storage: as
    many users as a fresh one of its kind has."""
    if not hasattr(torch._C, "_storage_Use_Count"):
        return False  # cannot tell: never risk a second copy
    fresh = nn.Parameter(torch.empty(1, device=t.device)) if isinstance(t, nn.Parameter) \
        else torch.empty(1, device=t.device)  # no other tensor over its storage: made in one expression
    return _storage_users(t) <= _storage_users(fresh)


@torch.no_grad()
def fuse_linear_weights(linears: Sequence[nn.Linear]) -> torch.Tensor | None:
    """Concatenate the weights of bias-free Linears with the same input width, dtype and device along their
    output rows into one contiguous tensor, and make each Linear's weight a view of its rows. -> the fused
    weight [sum of out_features, in_features]; None (nothing changed) when a weight's storage is held elsewhere
    too (fusing would then grow memory)."""
    if not linears:
        raise ValueError("linears: got none, expected at least one nn.Linear")
    weights = [m.weight for m in linears]
    first = weights[0]
    for i, m in enumerate(linears):
        if not isinstance(m, nn.Linear):
            raise ValueError(f"linears[{i}]: got {type(m).__name__}, expected nn.Linear")
        if m.bias is not None:
            raise ValueError(f"linears[{i}]: has a bias; expected bias-free projections (LLaMA's)")
        w = m.weight
        if w.dim() != 2 or w.shape[1] != first.shape[1] or w.dtype != first.dtype or w.device != first.device:
            raise ValueError(f"linears[{i}]: weight {tuple(w.shape)} {w.dtype} on {w.device}, expected "
                             f"[*, {first.shape[1]}] {first.dtype} on {first.device} like linears[0]")
    fused = already_fused([w.data for w in weights])
    if fused is not None:
        return fused
    if not all(sole_owner(w) for w in weights):
        return None
    fused = torch.cat([w.data for w in weights], dim=0)
    row = 0
    for w in weights:
        rows = w.shape[0]
        w.data = fused[row:row + rows]
        row += rows
    return fused


def bytes_by_dtype(module: nn.Module) -> dict[str, int]:
    """The bytes of `module`'s parameters and buffers by dtype name ({"int8": ..., "bfloat16": ...}); a storage
    held under several names (tied embeddings, views of one fused matrix) is counted once. Works on meta too."""
    storages = {}  # the storage's C++ object: one per storage
    for tensor in [*module.parameters(), *module.buffers()]:
        storage = tensor.untyped_storage()
        storages[storage._cdata] = (str(tensor.dtype).removeprefix("torch."), storage.nbytes())
    totals: dict[str, int] = {}
    for dtype_name, nbytes in storages.values():
        totals[dtype_name] = totals.get(dtype_name, 0) + nbytes
    return totals
