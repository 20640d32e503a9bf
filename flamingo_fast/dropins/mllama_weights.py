"""Hugging Face Llama 3.2 Vision checkpoint folders -> transformers' `MllamaForConditionalGeneration`, loaded block by
block from memory-mapped safetensors shards.

    model = load_mllama_hf("Llama-3.2-11B-Vision-Instruct/", dtype=torch.bfloat16, device="cuda")

The model is built on the meta device from the folder's config.json (transformers' `MllamaConfig`, as the installed
release reads it: no memory, no random init); the shards are memory-mapped (their pages belong to the page cache, not
the process); then one block at a time (a decoder layer, a vision encoder layer, or one other tensor: the embedding,
the head, the projector, a gate) is converted to `dtype` on `device` and put in place. The process holds the
finished part of the model plus the block being converted, never a second copy of the model.

Both key layouts are read (reference/mllama.py's KEY_MAPS): "legacy" (`language_model.model.*`, `vision_model.*`,
`language_model.lm_head.*`: the released checkpoints, and what `save_pretrained` writes in transformers 4.57 and 5.24)
and "model" (`model.language_model.*`, `model.vision_model.*`, `lm_head.*`: the live models' own names since 4.52).
Every key is checked before anything is converted: an unknown key, a missing one or a wrong shape is a ValueError
naming the folder, the key, its shard and what was expected. A head tied to the embedding (as the installed
transformers builds it from the config) needs no head key; one in the files is then ignored, as transformers does.
Non-persistent buffers (the rotary inverse frequencies) are computed on `device` by the module that owns them, as
transformers' constructor computes them. generation_config.json, when present, becomes `model.generation_config`.

weights="int8": each text decoder layer, once loaded in `dtype`, has its Linears quantized in place
(runtime/mllama_int8.py, the function from_mllama(model, weights="int8") quantizes with, so the int8 values and scales
are bitwise the same) before the next block loads, and so has the head; their float weights are freed then. The
process holds the model as it ends (int8 Linears, everything else in `dtype`) plus one float block. The int8 modules
(runtime/quantize.py's Int8Linear: int8 weight, float32 scales, kept float32 by `.to(dtype)`) run transformers' own
forward and generate through the torch twin of the int8 matmul; `from_mllama(model)` runs its int8 runtime over those
same modules.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..reference.mllama import KEY_MAPS, key_layout, our_key
from ..runtime.layers import kernel_ops
from ..runtime.mllama_int8 import INT8_DTYPES, check_quantizable, quantize_hf_head, quantize_hf_layer
from ..runtime.quantize import bind_int8_linears
from .weights_files import load_tensors, read_json

INDEX = "model.safetensors.index.json"
# A block converted at once: one decoder layer of the LM, one layer of the local or global vision encoder.
BLOCK = re.compile(r"^(model\.language_model\.layers\.\d+\."
                   r"|model\.vision_model\.(?:global_)?transformer\.layers\.\d+\.)")


def live_name(name: str, layout: str) -> str:
    """A checkpoint key of `layout` ("model" or "legacy") -> the live model's parameter name (the "model" layout)
    (KeyError: it maps to nothing)."""
    ours = our_key(name, layout)
    for theirs, prefix in KEY_MAPS["model"]:
        if ours.startswith(prefix):
            return theirs + ours[len(prefix):]
    raise KeyError(name)


def shard_files(folder: Path, where: str) -> list[Path]:
    """The folder's safetensors shards: those model.safetensors.index.json lists (each must exist), else every
    *.safetensors file."""
    if (folder / INDEX).is_file():
        weight_map = read_json(folder / INDEX, where).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{where}: {INDEX} has no 'weight_map'; expected an object of keys -> shard files")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ValueError(f"{where}: {INDEX} lists shards {missing} that are not in the folder; expected all "
                             f"{len(names)} shards {names}")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{where}: no *.safetensors weights in this folder; expected a Hugging Face checkpoint "
                         f"(model.safetensors, or shards with {INDEX})")
    return files


def mapped_tensors(files: list[Path], where: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every shard's tensors memory-mapped -> (key -> tensor, key -> its shard's file name)."""
    tensors: dict[str, torch.Tensor] = {}
    shard: dict[str, str] = {}
    for file in files:
        for key, tensor in load_tensors(file, "path", mapped=True).items():
            if key in tensors:
                raise ValueError(f"{where}: {key!r} is in both {shard[key]} and {file.name}; expected each key once")
            tensors[key], shard[key] = tensor, file.name
    return tensors, shard


def build_meta_model(folder: Path, where: str) -> nn.Module:
    """transformers' MllamaForConditionalGeneration from the folder's config.json, on the meta device."""
    from ..compat import import_torchvision_if_installed

    import_torchvision_if_installed()  # transformers imports it where installed (compat: beside a CPU torch)
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    if not (folder / "config.json").is_file():
        raise ValueError(f"{where}: no config.json; expected a Hugging Face checkpoint folder")
    model_type = read_json(folder / "config.json", where).get("model_type")
    if model_type != "mllama":
        raise ValueError(f"{where}: config.json has model_type={model_type!r}; expected 'mllama' (Llama 3.2 Vision)")
    config = MllamaConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = MllamaForConditionalGeneration(config)
    model.tie_weights()  # whatever the installed release ties for this config (a no-op where nothing is tied)
    return model


def matched_keys(model: nn.Module, tensors: dict[str, torch.Tensor], shard: dict[str, str],
                 where: str) -> dict[str, str]:
    """The live model's parameter name -> the checkpoint key holding it, every key and shape checked."""
    try:
        layout = key_layout(tensors)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    params = dict(model.named_parameters())  # a tied parameter once, under its first name (the embedding)
    aliases = set(dict(model.named_parameters(remove_duplicate=False))) - set(params)
    out: dict[str, str] = {}
    for key, tensor in tensors.items():
        try:
            name = live_name(key, layout)
        except KeyError:
            name = None
        if name in aliases:
            continue  # a tied head's own copy: transformers ignores it too
        if name not in params:
            example = next(_layout_keys(params, layout))
            raise ValueError(f"{where}: key {key!r} in {shard[key]} is not a parameter of this config.json's "
                             f"MllamaForConditionalGeneration; expected keys of the {layout!r} layout "
                             f"({', '.join(p for p, _ in KEY_MAPS[layout])}), like {example!r}")
        expected = tuple(params[name].shape)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{where}: key {key!r} in {shard[key]} has shape {tuple(tensor.shape)}; expected "
                             f"{expected} (config.json's sizes)")
        out[name] = key
    missing = [n for n in params if n not in out]
    if missing:
        theirs = {name: key for key in _layout_keys(params, layout) for name in [live_name(key, layout)]}
        keys = [theirs.get(n, n) for n in missing]
        raise ValueError(f"{where}: {len(missing)} keys missing from the shards ({layout!r} layout): {keys[:10]}"
                         f"{' ...' if len(keys) > 10 else ''}; expected every parameter of this config.json's model")
    return out


def _layout_keys(params: dict[str, nn.Parameter], layout: str) -> Iterator[str]:
    """The checkpoint keys of `layout` for the live model's parameter names (for the missing-key message)."""
    inverse = {ours: theirs for theirs, ours in KEY_MAPS[layout]}
    for name in params:
        for live, ours in KEY_MAPS["model"]:
            if name.startswith(live):
                rest = ours + name[len(live):]
                prefix = next(p for p in inverse if rest.startswith(p))
                yield inverse[prefix] + rest[len(prefix):]
                break


def blocks(names: list[str]) -> Iterator[list[str]]:
    """Parameter names in model order, grouped: a decoder or vision layer's together, every other name alone."""
    group: list[str] = []
    prefix = None
    for name in names:
        found = BLOCK.match(name)
        here = found.group(1) if found else name
        if group and here != prefix:
            yield group
            group = []
        group.append(name)
        prefix = here
    if group:
        yield group


def tied_names(model: nn.Module) -> dict[str, str]:
    """Each second name of a parameter the model shares between two places -> its first name (a tied head ->
    the embedding)."""
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            out[name] = first[id(param)]
        else:
            first[id(param)] = name
    return out


def set_parameter(model: nn.Module, name: str, value: nn.Parameter) -> None:
    module_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(module_name), leaf, value)


def files_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """dtype=None: the files' floating-point dtype, float32 when they mix several."""
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def real_buffers(model: nn.Module, device: torch.device) -> None:
    """Buffers left on the meta device (non-persistent: the rotary inverse frequencies) computed on `device` by a
    fresh module of the same class and config, as transformers' constructor computes them."""
    for name, module in model.named_modules():
        meta = [b for b, t in module.named_buffers(recurse=False) if t is not None and t.is_meta]
        if not meta:
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise ValueError(f"model.{name}: buffers {meta} are not in the checkpoint and the module has no config "
                             f"to compute them from; expected a transformers rotary embedding")
        with torch.device(device):
            fresh = type(module)(config=config)
        for buffer in meta:
            setattr(module, buffer, getattr(fresh, buffer))


TEXT_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")


def quantize_loaded(model: nn.Module, first: str) -> None:
    """weights="int8", after the block whose first parameter is `first` loaded: a text decoder layer's Linears or
    the head quantized in place (mllama_int8.py); other blocks are left as they are."""
    layer = TEXT_LAYER.match(first)
    if layer:
        quantize_hf_layer(model, int(layer.group(1)))
    elif first == "lm_head.weight":
        quantize_hf_head(model)


def load_mllama_hf(path: str | os.PathLike, dtype: torch.dtype | None = None,
                   device: str | torch.device = "cpu", weights: str | None = None) -> nn.Module:
    """A Hugging Face Llama 3.2 Vision checkpoint folder -> transformers' MllamaForConditionalGeneration in eval
    mode, its weights in `dtype` (None: the files' dtype, float32 where they mix) on `device`, loaded block by
    block from the memory-mapped shards (module docstring). weights="int8": the language model's Linears and head
    quantized block by block as they load (module docstring). Needs transformers (4.57 or 5.x)."""
    if weights not in (None, "int8"):
        raise ValueError(f"weights={weights!r}: expected None (the files' float weights) or 'int8'")
    folder = Path(path)
    where = f"path={str(path)!r}"
    if not folder.is_dir():
        raise ValueError(f"{where}: not a folder; expected a Hugging Face checkpoint folder (config.json and "
                         f"*.safetensors)")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r}: expected a floating-point torch.dtype or None (the files' dtype)")
    device = torch.device(device)
    model = build_meta_model(folder, where)
    tensors, shard = mapped_tensors(shard_files(folder, where), where)
    keys = matched_keys(model, tensors, shard, where)
    tied = tied_names(model)
    target = dtype or files_dtype(tensors)
    if weights == "int8":
        if target not in INT8_DTYPES:
            raise ValueError(f"weights='int8' with dtype={target}: expected float32, float16 or bfloat16 (the "
                             f"activations' dtype)")
        check_quantizable(model)
    for block in blocks(list(keys)):
        for name in block:
            source = tensors[keys[name]]
            value = torch.empty(source.shape, dtype=target if source.is_floating_point() else source.dtype,
                                device=device)
            value.copy_(source)
            set_parameter(model, name, nn.Parameter(value))  # requires_grad as from_pretrained leaves it
        if weights == "int8":
            quantize_loaded(model, block[0])
    for alias, name in tied.items():  # the head shares the loaded embedding where the model ties them
        set_parameter(model, alias, model.get_parameter(name))
    if weights == "int8":
        if tied:  # a tied head had no block of its own: quantized from the embedding, which stays float
            quantize_hf_head(model)
        bind_int8_linears(model, kernel_ops("torch").int8_linear)
    real_buffers(model, device)
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder)
    return model.eval()
