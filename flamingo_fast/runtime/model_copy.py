"""A converted copy of a reference Flamingo, built block by block: the runtime's own model when it computes in
another dtype, on another device, or with int8 weights (FastFlamingo.from_reference, load_openflamingo).

    copy = converted_copy(model, torch.bfloat16, "cuda", quantize=True)

The copy starts as a skeleton on the meta device. Its tensors are converted in blocks: first everything outside
the LM's decoder layers and gated cross-attention blocks (vision encoder, perceiver, embeddings, final norm,
output head), then each decoder layer and each gated block in turn. With `quantize`, a block's linear layers
become int8 (quantize.py) as soon as the block is converted, before the next one is, so the peak on the target
device is the finished part of the copy plus one block's float tensors and the quantization's temporaries
(never the whole model in the activation dtype). The source is only read; tied tensors stay tied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..validation import check_dtype, check_eval_mode
from .quantize import Int8Linear, check_weights, quantize_block, quantize_output_head

if TYPE_CHECKING:
    from ..reference.model import Flamingo


def _converted(source: Mapping[str, torch.Tensor], names: list[str], prefix: str, dtype: torch.dtype,
               device: torch.device | str | None, fresh: bool) -> dict[str, torch.Tensor]:
    """{name: source[prefix + name] converted} for `names`; a tensor shared under several names is converted once.
    fresh: copy even where `.to` would return the source tensor itself."""
    converted: dict[int, torch.Tensor] = {}
    state = {}
    for name in names:
        tensor = source[prefix + name]
        if id(tensor) not in converted:
            new = tensor.detach().to(device=device, dtype=dtype if tensor.is_floating_point() else None, copy=fresh)
            if isinstance(tensor, nn.Parameter):
                new = nn.Parameter(new, requires_grad=tensor.requires_grad)
            converted[id(tensor)] = new
        state[name] = converted[id(tensor)]
    return state


@torch.no_grad()
def converted_copy(model: Flamingo, dtype: torch.dtype, device: torch.device | str | None = None, *,
                   quantize: bool = False, fresh: bool = False) -> Flamingo:
    """A copy of `model` with its floating-point tensors in `dtype`, on `device` (None: where each tensor is),
    converted block by block (module docstring); `quantize`: the LM's linear layers and output head int8
    (quantize.py). fresh=False shares the source tensors that need no conversion (as `.to` does); fresh=True
    copies them too. In eval mode, like the runtime needs it."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    source = model.state_dict(keep_vars=True)
    lm = copy.lang_encoder
    blocks = [*lm.layers, *lm.gated_cross_attn_layers.values()]
    prefixes = {id(m): name + "." for name, m in copy.named_modules()}
    block_prefixes = tuple(prefixes[id(b)] for b in blocks)
    rest = [name for name in source if not name.startswith(block_prefixes)]
    loaded = copy.load_state_dict(_converted(source, rest, "", dtype, device, fresh), strict=False, assign=True)
    assert not loaded.unexpected_keys and all(k.startswith(block_prefixes) for k in loaded.missing_keys), loaded
    if quantize:
        quantize_output_head(copy)
    for block in blocks:
        prefix = prefixes[id(block)]
        names = [name[len(prefix):] for name in source if name.startswith(prefix)]
        block.load_state_dict(_converted(source, names, prefix, dtype, device, fresh), strict=True, assign=True)
        if quantize:
            quantize_block(block, copy.config.lm.family, decoder_layer=block in lm.layers)
    return copy.eval()


def model_for_runtime(model: Flamingo, dtype: torch.dtype | None, weights: str | None,
                      device: torch.device | str | None) -> Flamingo:
    """The model a FastFlamingo.from_reference runtime executes: `model` itself (its tensors shared) when it already
    is in `dtype` on `device` with the weights asked for, or a converted copy (converted_copy; quantized for
    weights="int8"). A model with int8 layers is used as it is, and is an error to convert."""
    check_eval_mode(model)
    if dtype is not None:
        check_dtype(dtype)
    param = model.lang_encoder.embed_tokens.weight
    check_weights(weights, dtype or param.dtype)
    target = param.device if device is None else torch.empty(0, device=device).device
    moves = target != param.device
    converts = dtype is not None and any(t.is_floating_point() and t.dtype != dtype
                                         for t in model.state_dict().values())
    if any(isinstance(m, Int8Linear) for m in model.modules()):  # already quantized: nothing to do
        if moves or converts:
            raise ValueError(f"dtype={dtype} / device={device!r}: a model with int8 layers is converted only "
                             f"when it is quantized; build from the float model (or move the drop-in with "
                             f"`.to(device)`)")
    elif weights == "int8" or moves or converts:
        model = converted_copy(model, dtype or param.dtype, target, quantize=weights == "int8")
    return model
