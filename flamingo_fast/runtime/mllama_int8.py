"""Weight-only int8 for Llama 3.2 Vision (runtime/quantize.py's format: symmetric, one scale per output row).

    quantized = int8_reference(reference)        # a new MllamaReference; `reference` is left as it is

The language model's Linears are quantized, layer by layer: each self-attention layer's q/k/v and gate/up as one
int8 matrix each (row views of it, quantize.quantize_block), each cross-attention layer's q/k/v/o and MLP, and the
output head. The vision tower, the projector, the embedding and the norms keep the reference's tensors (shared, not
copied): they run once per image or cost nothing per token. The float weights of the quantized layers are held by
the reference's owner only (the live transformers model); the copy holds none of them.

A transformers model loaded with `load_mllama_hf(folder, weights="int8")` already holds those Int8Linear modules, made
as this module makes them (`quantize_hf_layer`, `quantize_hf_head`, on the same float tensors: the same int8 values
and scales) and bound to the torch twin's matmul for transformers' own forward: `int8_hf_reference(model)` is then the
reference over the model's tensors with those very modules (no float copy, nothing quantized again).
"""

from __future__ import annotations

import torch
from torch import nn

from ..reference.mllama import (
    MllamaCrossAttentionLayer,
    MllamaReference,
    installed_intermediate_from,
    key_layout,
    our_key,
    reference_state,
)
from ..reference.mllama_config import mllama_config_from_hf
from .quantize import Int8Linear, quantize_block, quantize_per_channel

INT8_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The Linears of transformers' Mllama text decoder layers that weights="int8" quantizes (quantize_block's roles).
SELF_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                "mlp.up_proj", "mlp.down_proj")
CROSS_LINEARS = ("cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@torch.no_grad()
def int8_reference(reference: MllamaReference) -> MllamaReference:
    """A MllamaReference over `reference`'s tensors whose language-model Linears are Int8Linear (module docstring);
    bind their matmul with quantize.bind_int8_linears before use."""
    dtype = reference.language_model.embed_tokens.weight.dtype
    if dtype not in INT8_DTYPES:
        raise ValueError(f"weights='int8' with a {dtype} model: expected float32, float16 or bfloat16 weights")
    with torch.device("meta"):
        copy = MllamaReference(reference.config)
    copy.load_state_dict(reference.state_dict(keep_vars=True), strict=True, assign=True)  # the same tensors
    copy.eval()
    for layer in copy.language_model.layers:
        quantize_block(layer, "llama", decoder_layer=not isinstance(layer, MllamaCrossAttentionLayer))
    copy.lm_head = Int8Linear(*quantize_per_channel(copy.lm_head.weight))
    return copy


def hf_layer_linears(model: nn.Module, index: int) -> tuple[str, ...]:
    """The Linears (names below the layer) quantize_block quantizes in text decoder layer `index` of a transformers
    Mllama model: a cross-attention layer's or a self-attention layer's."""
    cross = index in model.config.text_config.cross_attention_layers
    return CROSS_LINEARS if cross else SELF_LINEARS


def check_quantizable(model: nn.Module) -> None:
    """ValueError naming the first module of a transformers Mllama model (e.g. on the meta device) that
    weights="int8" cannot quantize as int8_reference does: each text decoder layer's Linears (hf_layer_linears) and
    the head must be bias-free torch.nn.Linear, and a layer must hold no other Linear."""
    prefix = "model.language_model.layers"
    layers = model.get_submodule(prefix)
    for index, layer in enumerate(layers):
        expected = hf_layer_linears(model, index)
        for name in expected:
            module = layer.get_submodule(name) if _has(layer, name) else None
            if type(module) is not nn.Linear or module.bias is not None:
                what = "missing" if module is None else f"a {type(module).__module__}.{type(module).__qualname__}" + (
                    " with a bias" if type(module) is nn.Linear else "")
                raise ValueError(f"weights='int8': {prefix}.{index}.{name} is {what}; expected a bias-free "
                                 f"torch.nn.Linear (transformers' Mllama text layer: {', '.join(expected)})")
        extra = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n not in expected]
        if extra:
            raise ValueError(f"weights='int8': {prefix}.{index} has Linears {extra} that weights='int8' does not "
                             f"quantize; expected only {', '.join(expected)}")
    head = model.lm_head
    if type(head) is not nn.Linear or head.bias is not None:
        raise ValueError(f"weights='int8': lm_head is a {type(head).__module__}.{type(head).__qualname__}; expected "
                         f"a bias-free torch.nn.Linear")


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


@torch.no_grad()
def quantize_hf_layer(model: nn.Module, index: int) -> None:
    """Text decoder layer `index` of a transformers Mllama model (its float weights loaded) -> its Linears replaced
    in place by Int8Linear, as int8_reference quantizes the reference's layer (the same quantize_block)."""
    layer = model.model.language_model.layers[index]
    quantize_block(layer, "llama", decoder_layer=index not in model.config.text_config.cross_attention_layers)


@torch.no_grad()
def quantize_hf_head(model: nn.Module) -> None:
    """The head of a transformers Mllama model -> an Int8Linear (a head tied to the embedding leaves the embedding its
    float table), as int8_reference quantizes the reference's."""
    model.lm_head = Int8Linear(*quantize_per_channel(model.lm_head.weight))


def holds_int8(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


def int8_hf_reference(model: nn.Module) -> MllamaReference:
    """A transformers Mllama model whose language-model Linears and head are Int8Linear (load_mllama_hf(...,
    weights="int8")) -> the MllamaReference over its tensors holding those same modules (nothing copied, nothing
    quantized again). A model where some of them are int8 and others float is an error naming both."""
    modules = {name: m for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    config = mllama_config_from_hf(model.config.to_dict(), intermediate_from=installed_intermediate_from(model))
    state = model.state_dict(keep_vars=True)
    layout = key_layout(state)
    ours = {name: our_key(name + ".weight", layout).removesuffix(".weight") for name in modules}
    with torch.device("meta"):
        reference = MllamaReference(config)
    reference.load_state_dict(reference_state({k: v for k, v in state.items() if k.rpartition(".")[0] not in modules}),
                              strict=False, assign=True)
    for name, module in modules.items():
        parent, _, leaf = ours[name].rpartition(".")
        owner = reference.get_submodule(parent) if parent else reference
        expected = tuple(getattr(owner, leaf).weight.shape)
        if tuple(module.weight.shape) != expected:  # e.g. 4.57's head tied to the embedding's extra rows
            raise ValueError(f"model: {name} holds an int8 weight of shape {tuple(module.weight.shape)}; expected "
                             f"{expected} (the config's sizes)")
        setattr(owner, leaf, module)
    left = [f"language_model.layers.{n}" for n, m in reference.language_model.layers.named_modules()
            if type(m) is nn.Linear] + (["lm_head"] if type(reference.lm_head) is nn.Linear else [])
    if left:
        raise ValueError(f"model: holds int8 layers ({next(iter(modules))}, ...) and float ones where weights='int8' "
                         f"quantizes too ({left[:3]} in flamingo_fast's names); expected every language-model Linear "
                         f"and the head in int8 (load_mllama_hf(..., weights='int8')) or none")
    unset = [n for n, t in reference.state_dict(keep_vars=True).items() if t.is_meta]
    if unset:
        raise ValueError(f"model: {unset[:3]} (flamingo_fast's names) found no tensor in the model's state_dict; "
                         f"expected transformers' MllamaForConditionalGeneration")
    return reference.eval()
