"""Weight-only int8: symmetric, one scale per output row, round to nearest, no calibration (docs/int8.md).

    q, scales = quantize_per_channel(weight)        # weight [N, K] float -> int8 [N, K], float32 [N]
    weight ~= q * scales[:, None]                   # |weight - q * s| <= s / 2 elementwise

`quantize_block(block, ...)` replaces, in place, the nn.Linear modules of one decoder layer or gated
cross-attention block by `Int8Linear`, and `quantize_output_head(model)` the LM's output head;
model_copy.converted_copy calls them block by block as it converts. The vision encoder and the perceiver keep the
activation dtype (they run once per image). LLaMA's q/k/v and gate/up are quantized as one matrix each and the
separate projections become row views of it (`fused_int8_linear` recognises them, so LayerStack runs one GEMM
each without a copy): each row keeps its own scale, so this equals quantizing them apart. FastFlamingo binds the
matmul of its backend (KernelOps.int8_linear) with `bind_int8_linears`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..reference.lm import DecoupledLinear
from .fused_weights import already_fused, sole_owner

WEIGHT_FORMATS = (None, "bf16", "int8")


def check_weights(weights, dtype: torch.dtype) -> None:
    """`weights` (None, "bf16" or "int8") against the activation dtype the runtime will compute in."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r}: expected one of {list(WEIGHT_FORMATS)}")
    if weights == "int8" and dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"weights='int8' with a {dtype} model: expected activations in float32, float16 or bfloat16 "
                         f"(pass dtype=torch.bfloat16)")


@torch.no_grad()
def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (int8 [N, K], scales [N] float32): scale = max|row| / 127 (1 for an all-zero row),
    q = round(weight / scale) clamped to [-127, 127] (symmetric: -128 is never used)."""
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"weight: got {tuple(weight.shape)} {weight.dtype}, expected a 2-D float tensor [N, K]")
    w = weight.float()
    scales = w.abs().amax(dim=1) / 127
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.div(w, scales[:, None]).round_().clamp_(-127, 127).to(torch.int8)  # one float temporary
    return q, scales


class Int8Linear(nn.Module):
    """y = x @ (weight * scales[:, None]).T (+ bias), through `matmul(x, weight, scales)` (the backend's
    KernelOps.int8_linear, bound by FastFlamingo; x [..., K] -> [..., N]). weight int8 [N, K]; scales float32
    [N]; bias [N] in the activation dtype or None. Buffers, not parameters: nothing here trains."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
                 matmul: Callable[..., torch.Tensor] | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        # float32 whatever the activation dtype: kept out of state_dict, whose float tensors validation.check_model
        # requires in one dtype (a state_dict of the runtime's copy is not a checkpoint format)
        self.register_buffer("scales", scales, persistent=False)
        self.register_buffer("bias", bias)
        self.matmul = matmul
        self.eval()  # inference only: a model holding one passes FastFlamingo's eval-mode check

    def _apply(self, fn, recurse: bool = True):
        """Module._apply (`.to`, `.cuda`, `.half` ...), the scales kept float32: a dtype conversion converts the bias
        only; the scales follow the device (moved from the float32 originals, never rounded)."""
        scales = self.scales
        super()._apply(fn, recurse)
        if self.scales.dtype != scales.dtype:
            self.scales = scales.to(self.scales.device)
        return self

    @classmethod
    def of(cls, linear: nn.Module) -> Int8Linear:
        q, scales = quantize_per_channel(linear.weight)
        bias = getattr(linear, "bias", None)
        return cls(q, scales, None if bias is None else bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul is None:
            raise RuntimeError("Int8Linear: no matmul bound (FastFlamingo binds its backend's int8_linear)")
        y = self.matmul(x, self.weight, self.scales)  # [..., K] -> [..., N]
        return y if self.bias is None else y + self.bias


def _row_views(linears: Sequence[nn.Linear]) -> list[Int8Linear]:
    """Quantize bias-free Linears into one int8 matrix (each row has its own scale, so quantizing them apart and
    concatenating the int8 rows is the same as quantizing the concatenation, without a float copy of it); -> one
    Int8Linear per Linear over its rows of it."""
    parts = [quantize_per_channel(m.weight) for m in linears]
    q, scales = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    del parts
    out, row = [], 0
    for m in linears:
        rows = m.weight.shape[0]
        out.append(Int8Linear(q[row:row + rows], scales[row:row + rows]))
        row += rows
    return out


@torch.no_grad()
def fused_int8_linear(linears: Sequence[Int8Linear]) -> Int8Linear | None:
    """One Int8Linear over the rows of `linears` (LLaMA's q/k/v or gate/up): without copying when they are
    consecutive row views of one matrix (as `quantize_block` leaves them); else (e.g. after `.to(device)` moved
    each buffer on its own) their int8 weights and scales are concatenated once and each module's buffers
    re-pointed at its rows, as fused_weights.py does for float weights, provided nothing else holds them. None
    when they have a bias or a buffer is held elsewhere (fusing would add a copy)."""
    if any(m.bias is not None for m in linears):
        return None
    weight = already_fused([m.weight for m in linears])
    scales = already_fused([m.scales[:, None] for m in linears])
    if weight is None or scales is None:
        if not all(sole_owner(t) for m in linears for t in (m.weight, m.scales)):
            return None
        weight = torch.cat([m.weight for m in linears])
        scales = torch.cat([m.scales for m in linears])[:, None]
        row = 0
        for m in linears:
            rows = m.weight.shape[0]
            m.weight, m.scales = weight[row:row + rows], scales[row:row + rows, 0]
            row += rows
    return Int8Linear(weight, scales[:, 0], None, linears[0].matmul)


@torch.no_grad()
def quantize_output_head(model: nn.Module) -> None:
    """Replace the LM's output head by an Int8Linear (a decoupled head's two matrices as one); a head tied to the
    embedding leaves the embedding its float table (token lookup reads it)."""
    lm = model.lang_encoder
    head = lm.output_head
    weight = head.weight
    if isinstance(head, DecoupledLinear):  # logits of [weight; additional_fc.weight]: one matrix, one GEMM
        weight = torch.cat([weight, head.additional_fc.weight])
    setattr(lm, "embed_out" if model.config.lm.family == "gpt_neox" else "lm_head",
            Int8Linear(*quantize_per_channel(weight)))


@torch.no_grad()
def quantize_block(block: nn.Module, family: str, decoder_layer: bool) -> None:
    """Replace, in place, the nn.Linear modules of one decoder layer or gated cross-attention block by
    Int8Linear (LLaMA's q/k/v and gate/up as one matrix each, left as row views of it). The float weights go
    with the modules (freed unless held elsewhere)."""
    if decoder_layer and family == "llama":
        attn, mlp = block.self_attn, block.mlp
        attn.q_proj, attn.k_proj, attn.v_proj = _row_views([attn.q_proj, attn.k_proj, attn.v_proj])
        mlp.gate_proj, mlp.up_proj = _row_views([mlp.gate_proj, mlp.up_proj])
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear.of(child))


def bind_int8_linears(model: nn.Module, matmul: Callable[..., torch.Tensor] | None) -> int:
    """Point every Int8Linear of `model` at `matmul` (None: unbind them) -> how many there are. The layers serve
    one backend at a time: layers bound to another matmul (another FastFlamingo's backend over the same model)
    are an error, since rebinding them would switch that runtime's backend under it."""
    found = [m for m in model.modules() if isinstance(m, Int8Linear)]
    other = next((m.matmul for m in found if m.matmul is not None and m.matmul is not matmul), None)
    if other is not None and matmul is not None:
        raise ValueError(f"model: its int8 layers run {other.__module__}.{other.__name__} for another FastFlamingo "
                         f"over the same model; expected {matmul.__module__}.{matmul.__name__}: build this one with "
                         f"the same backend, or from the float model (from_reference(..., weights='int8') quantizes "
                         f"its own copy)")
    for m in found:
        m.matmul = matmul
    return len(found)
