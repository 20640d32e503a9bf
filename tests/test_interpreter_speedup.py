"""tests/interpreter_speedup.py is in effect (conftest installs it) and does what it says: a kernel launch that
calls @triton.jit helpers patches triton.language no more often than one that calls none, restores it afterwards,
and computes the same values; the remembered numpy dtypes are the interpreter's own."""

from __future__ import annotations

import interpreter_speedup
import pytest
import torch
import triton
import triton.language as tl

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is visible: Triton compiles, nothing "
                                                                 "is interpreted")


@triton.jit
def _times_two_plus_zero(x):
    return x * 2 + tl.sum(tl.zeros([4], dtype=tl.float32), axis=0)


@triton.jit
def _kernel(x_ptr, out_ptr, N: tl.constexpr, HELPER_CALLS: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    x = tl.load(x_ptr + offs)
    for _ in tl.static_range(HELPER_CALLS):
        x = _times_two_plus_zero(x)
    tl.store(out_ptr + offs, x)


def patchings(monkeypatch, helper_calls: int) -> tuple[int, torch.Tensor]:
    import triton.runtime.interpreter as interpreter

    count = [0]
    original = interpreter._patch_builtin

    def counted(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(interpreter, "_patch_builtin", counted)
    x = torch.arange(12, dtype=torch.float32)
    out = torch.empty_like(x)
    _kernel[(3,)](x, out, N=4, HELPER_CALLS=helper_calls)
    monkeypatch.undo()
    return count[0], out


def test_helper_calls_inside_a_launch_do_not_patch_again(monkeypatch):
    assert interpreter_speedup.install(), ("Triton's interpreter is not the one tests/interpreter_speedup.py was "
                                           f"written against (triton {triton.__version__}): read it again")
    plain, out_plain = patchings(monkeypatch, helper_calls=0)
    nested, out_nested = patchings(monkeypatch, helper_calls=5)
    assert plain > 0 and nested == plain
    assert torch.equal(out_plain, torch.arange(12.0))
    assert torch.equal(out_nested, torch.arange(12.0) * 32)
    # restored after the launch: the language's builtins are Triton's own again (a patched one is a lambda)
    assert tl.core.full.__name__ == "full" and tl.full.__name__ == "full"


def test_the_remembered_numpy_dtypes_are_the_interpreters():
    import triton.runtime.interpreter as interpreter

    numpy_dtype = getattr(interpreter._get_np_dtype, "original", None)
    assert numpy_dtype is not None, "interpreter._get_np_dtype is not numpy_dtype_once's wrapper"
    scalars = [tl.int1, tl.int8, tl.uint8, tl.int16, tl.int32, tl.uint32, tl.int64, tl.float16, tl.bfloat16,
               tl.float32, tl.float64, tl.float8e5, tl.float8e4nv]
    types = scalars + [tl.block_type(t, [4, 8]) for t in scalars] + [tl.pointer_type(tl.float32),
                                                                      tl.block_type(tl.pointer_type(tl.bfloat16), [4])]
    for tt in types * 2:  # the second time from what it remembered
        assert interpreter._get_np_dtype(tt) == numpy_dtype(tt), tt

