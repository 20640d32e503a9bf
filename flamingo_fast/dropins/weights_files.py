"""Reading weights and config files from disk, for the loaders (load_openflamingo): one weights file or a Hugging
Face directory of shards, a JSON object, and the dtype several files load in. Every error names the caller's
argument, the file and the cause."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch


def load_tensors(path: str | os.PathLike, argument: str = "path", mapped: bool = False) -> dict[str, torch.Tensor]:
    """One weights file (safetensors, or a torch pickle read with weights_only=True) or a Hugging Face
    directory (all its *.safetensors shards, else all its *.bin shards). mapped: the tensors are memory-mapped
    from the files (read-only use; pages are read when touched, and belong to the page cache, not the process:
    a loader converts them block by block into its own copy); a torch pickle of the legacy (non-zip) format is
    read whole. `argument` is the caller's name for
    `path`: every error names it, the file and the cause (not a weights file, empty, truncated, a value that is
    not a tensor). An OpenFlamingo training checkpoint's `model_state_dict` is unwrapped, and the `module.`
    prefix of its multi-GPU (DDP / FSDP) training stripped, as OpenFlamingo's evaluation does."""
    path = Path(path)
    where = f"{argument}={str(path)!r}"
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("pytorch_model*.bin"))
        if not files:
            raise ValueError(f"{where}: no *.safetensors or pytorch_model*.bin weights in this directory")
        out: dict[str, torch.Tensor] = {}
        for file in files:
            out.update(load_tensors(file, argument, mapped))
        return out
    if not path.is_file():
        raise ValueError(f"{where}: no such file")
    if path.stat().st_size == 0:
        raise ValueError(f"{where}: the file is empty; expected a weights file (safetensors or a torch checkpoint)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            if mapped:
                with safe_open(str(path), framework="pt") as file:
                    return {name: file.get_tensor(name) for name in file.keys()}
            return load_file(str(path))
        except SafetensorError as error:
            raise ValueError(f"{where}: not a readable safetensors file (truncated or corrupt?): {error}") from error
    try:
        data = _load_pickle(path, mapped)
    except Exception as error:  # torch raises many types here: UnpicklingError, RuntimeError, KeyError, EOFError
        cause = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise ValueError(f"{where}: not a readable torch checkpoint (not a weights file, truncated or corrupt?): "
                         f"{cause}") from error
    if isinstance(data, dict) and "model_state_dict" in data:  # OpenFlamingo's training checkpoint
        data = data["model_state_dict"]
    if not isinstance(data, dict):
        raise ValueError(f"{where}: holds a {type(data).__name__}; expected a state dict (names -> tensors)")
    data = {k.removeprefix("module.") if isinstance(k, str) else k: v for k, v in data.items()}
    for name, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{where}: {name!r} holds a {type(value).__name__}; expected a tensor (a state dict "
                             f"of weights)")
    return data


def _load_pickle(path: Path, mapped: bool):
    if mapped and zipfile.is_zipfile(path):  # torch.load maps only the zip format (torch.save's default since 1.6)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(path, map_location="cpu", weights_only=True)


def read_json(path: Path, argument: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{argument}: {str(path)!r} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{argument}: {str(path)!r} holds a JSON {type(data).__name__}; expected an object")
    return data


def common_dtype(files: Mapping[str, Mapping[str, torch.Tensor]]) -> torch.dtype | None:
    """None when every file's floating-point tensors share one dtype (it is kept); float32 when they differ
    (MPT-7B ships bf16 weights beside float32 checkpoints and CLIP): the dtype OpenFlamingo computes in when it
    loads the same files (Hugging Face's from_pretrained loads float32 unless told otherwise)."""
    dtypes = {t.dtype for tensors in files.values() for t in tensors.values() if t.is_floating_point()}
    return torch.float32 if len(dtypes) > 1 else None
