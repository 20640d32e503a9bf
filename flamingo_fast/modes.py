"""The grad / inference / autocast mode the runtime always computes in, whatever region its caller is in.

    @runtime_mode
    def generate_from_options(self, ...): ...

Every public entry point of FastFlamingo and of the drop-ins, and every builder, runs under `runtime_mode`:

- `torch.inference_mode(False)` + `torch.no_grad()`: everything the runtime allocates, whenever it allocates it
  (the static, media and tail caches, context-cache entries, CUDA-graph static buffers, a drop-in's engine
  rebuilt after `.to`), is a normal tensor, so a cache made during a call inside `torch.inference_mode()` is
  written in place by the next call outside it, and the other way round. Allocating under inference mode
  instead would make those tensors inference tensors, which no later call outside inference mode may update
  in place; running always under inference mode would hand inference tensors back to callers outside it.
  Inputs made under inference mode are only read, which is allowed. `inference_mode(False)` turns grad mode
  on, hence the `no_grad()` inside it. Nothing is slower for it: no autograd graph is recorded either way.
- autocast off for the CPU and CUDA: the runtime computes in its own construction dtype (the dtype of the
  model it runs, or FastFlamingo.from_reference's `dtype`), never in an autocast region's. An autocast region
  would otherwise mix dtypes in the in-place cache writes (a float32 cache and a bfloat16 value) and change
  results from one call to the next. bfloat16 speed comes from building in bfloat16 (`dtype=torch.bfloat16`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)
AUTOCAST_DEVICES = ("cpu", "cuda")  # the devices the runtime runs on


@contextlib.contextmanager
def runtime_context() -> Iterator[None]:
    """Not inference mode, no autograd, no autocast on the CPU or CUDA (the module docstring says why)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.no_grad())
        for device in AUTOCAST_DEVICES:
            stack.enter_context(torch.autocast(device, enabled=False))
        yield


def runtime_mode(fn: F) -> F:
    """Decorator: run `fn` under runtime_context()."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with runtime_context():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
