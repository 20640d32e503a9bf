"""What makes a drop-in (OpenFlamingoRuntime, IdeficsRuntime) a `torch.nn.Module` over the live model's tensors.

    drop_in = flamingo_fast.from_openflamingo(model)
    drop_in.to(device).eval()                          # moves the live model's tensors; the runtime follows
    ddp = DistributedDataParallel(drop_in)             # .module is drop_in; state_dict() has the model's names

The drop-in registers the children (and direct parameters and buffers) of the module whose tensors the runtime
computes with: the live model itself when the runtime shares its tensors (so `named_parameters()`,
`state_dict()` and `load_state_dict` use the original's names and Parameter objects, requires_grad flags
included: DDP finds the same trainable parameters as on the original), or the converted copy when a `dtype`
was asked for at construction (then the live model is not used and is not registered). Nothing is copied.

With `weights="int8"` the runtime always works from its own converted, quantized copy (runtime/runtime.py,
FastFlamingo.from_reference), which the drop-in registers, as for a dtype conversion; the drop-in (its
`reference` included) then holds no tensor of the live model but those the copy shares because they were already
in the activation dtype (vision encoder, perceiver, embeddings, norms: `.to(dtype)` does not copy them). The live
model's float weights of the quantized layers are held only by the caller: `del model` (and, on a GPU,
`torch.cuda.empty_cache()`) frees them. `.to(device)` moves the int8 copy and rebuilds the runtime over it with
the same options (still int8); a dtype conversion (`.to(dtype)`, `.half()` ...) of an int8 drop-in is an error
raised before anything moves (its float32 scales would be converted too, even by `.to` to the activation dtype);
build a new drop-in with `dtype=`. A conversion to a dtype FastFlamingo does not compute in (`.double()`) is an
error raised the same way, before anything is converted.

`.to()`, `.cuda()`, `.half()` ... (Module._apply) move or convert those tensors in place of the originals'
(the Parameter objects stay the same), and the runtime's own state (caches sized and typed for the old device,
fused LLaMA q/k/v and gate/up weights, which `.to` splits back into one tensor per Linear, CUDA graphs, the
context cache) is dropped then and rebuilt from the moved model, with the options it was built with, on first
use: the rebuilt runtime fuses the moved weights again (runtime/fused_weights.py); what belonged to the old runtime (its
context cache, past_key_values handles) does not carry over. `load_state_dict` copies into the
same tensors (fused views included) and empties the context cache, whose entries were computed with the old
weights. Every call also compares the weights with their fingerprint (runtime/weight_watch.py): written in
place since the last call (`optimizer.step()`, the live model's own `load_state_dict`) empties the context
cache; a storage replaced behind the drop-in's back (`param.data = ...`, the live model's own `.to()`) rebuilds
the runtime.
"""

from __future__ import annotations

import functools
import threading

import torch
from torch import nn

from ..modes import runtime_mode
from ..runtime.quantize import Int8Linear, bind_int8_linears
from ..validation import SUPPORTED_DTYPES, dtype_names


def _signature(model: nn.Module) -> list[tuple]:
    """Where each tensor of `model` lives: a change means the runtime built over it is stale."""
    return [(t.data_ptr(), t.dtype, t.device) for t in (*model.parameters(), *model.buffers())]


class DropInModule(nn.Module):
    """Base of the drop-ins. `engine`: a FastFlamingo, or the reference Flamingo itself (IDEFICS's
    engine="reference"); `reference`: the reference model the drop-in was built from (its config), or the
    engine's own copy when a dtype conversion or `weights="int8"` made one (so the drop-in holds no float copy
    the engine does not compute with); `live`: the caller's model whose tensors the engine
    shares (None: there is none, e.g. load_openflamingo)."""

    def __init__(self, engine, reference: nn.Module, live: nn.Module | None = None):
        super().__init__()
        computed = engine if isinstance(engine, nn.Module) else engine.model  # the model whose tensors run
        shared = live is not None and {id(p) for p in computed.parameters()} <= {id(p) for p in live.parameters()}
        source = live if shared else computed
        for name, child in source.named_children():
            self.add_module(name, child)
        for name, param in source.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buffer in source.named_buffers(recurse=False):
            self.register_buffer(name, buffer, persistent=name not in source._non_persistent_buffers_set)
        self.training = source.training  # the model's own modes are left as they are
        # plain attributes, not submodules (the registered children above are the only ones): _apply moves
        # `_computed` itself
        reference = reference if shared else computed  # without a copy, computed is reference
        self.__dict__.update(reference=reference, config=reference.config, _computed=computed, _engine=engine,
                             _rebuild=None, _rebuild_lock=threading.Lock())

    @property
    def engine(self):
        """The engine; after `.to` moved its tensors, or after a storage of theirs was replaced behind the drop-in's
        back (`param.data = ...`, the live model's own `.to()`: runtime/weight_watch.py), rebuilt here on first use."""
        engine = self._engine
        if engine is not None and not isinstance(engine, nn.Module) and engine.weight_watch.moved() \
                and engine.stale_after_move():
            with self._rebuild_lock:
                if self._engine is engine:
                    self._drop_engine()
        if self._engine is None:
            with self._rebuild_lock:  # threads calling at once after a move build it once
                if self._engine is None:
                    bind_int8_linears(self._computed, None)  # the old engine's backend: it is gone
                    self.__dict__.update(_engine=self._rebuild(), _rebuild=None)
        return self._engine

    @property
    def fast(self):
        """The FastFlamingo (None when the engine is the reference)."""
        engine = self.engine
        return None if isinstance(engine, nn.Module) else engine

    def _apply(self, fn, recurse: bool = True):
        float_tensor = next((t for t in self._computed.parameters() if t.is_floating_point()), None)
        fast = self._rebuild is not None or not isinstance(self._engine, nn.Module)  # the engine is a FastFlamingo
        if float_tensor is not None and fast:
            probe = fn(torch.empty(0, dtype=float_tensor.dtype, device=float_tensor.device)).dtype
            if probe.is_floating_point and probe not in SUPPORTED_DTYPES:  # .double(): the rebuild would refuse it
                raise ValueError(f"converting the drop-in's {float_tensor.dtype} weights to {probe}: unsupported by "
                                 f"FastFlamingo; expected one of {dtype_names(SUPPORTED_DTYPES)} (.float(), .half(), "
                                 f".bfloat16(), .to(dtype)), or a device move")
        if float_tensor is not None and any(isinstance(m, Int8Linear) for m in self._computed.modules()):
            for dtype in (float_tensor.dtype, torch.float32):  # the activations' and the scales' dtype
                probe = fn(torch.empty(0, dtype=dtype, device=float_tensor.device))  # what fn does to dtypes
                if probe.dtype != dtype:
                    raise ValueError(f"converting a drop-in built with weights='int8' ({float_tensor.dtype} "
                                     f"activations, float32 scales) to {probe.dtype}: not supported; expected a device "
                                     f"move only, or a new drop-in built with dtype={probe.dtype}")
        before = _signature(self._computed)
        super()._apply(fn, recurse)
        self._computed._apply(fn, recurse)  # what the live model does not hold (nothing today; a no-op then)
        engine = self._engine
        if engine is not None and not isinstance(engine, nn.Module) and _signature(self._computed) != before:
            self._drop_engine()
        return self

    def _drop_engine(self) -> None:
        """Release the FastFlamingo (caches, fused weights, graphs) now, before the new one allocates; the next
        use of `engine` builds one over the model's tensors as they are, with the same options."""
        engine = self._engine
        rebuild = functools.partial(type(engine), engine.model, options=engine.options)
        self.__dict__.update(_engine=None, _rebuild=rebuild)

    @runtime_mode
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Module.load_state_dict, copying into the shared tensors; then the context cache is emptied (its
        entries were computed with the old weights). `assign=True` would replace the Parameter objects the
        runtime shares: refused."""
        if assign:
            raise ValueError("load_state_dict(assign=True): would replace the tensors the runtime shares with the "
                             "model; expected assign=False (the values are copied into them)")
        result = super().load_state_dict(state_dict, strict=strict)
        if self.fast is not None:
            self.fast.clear_context_cache()
        return result
