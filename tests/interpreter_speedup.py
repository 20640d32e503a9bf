"""One patching of triton.language per kernel launch under Triton's CPU interpreter (TRITON_INTERPRET=1).

Triton 3.9's interpreter patches triton.language (tl, and every language module the kernel's globals name) for the
interpreter when a kernel launches, and restores it when the launch ends. It also does the whole patching again on
every call of a @triton.jit helper made inside the kernel (tl.zeros and tl.cdiv are such helpers, and so are
ours in kernels/): inspect.getmembers over tl, tl.core, tl.math and tl.tensor each time, about 1.3 ms a call.
Those nested patchings are never restored, and they are what patches tl.core (which the standard library's helpers
use) when the kernel's module names only tl. A decode step calls helpers thousands of times: measured on
tests/test_scoring.py::test_triton_interpreted_score_matches_reference, 15.6 s without this and 10.8 s with it
(2026-12-07, this 2-core CPU). It also remembers the numpy dtype of each Triton type (`numpy_dtype_once`): the
interpreter rebuilt a table of numpy dtypes at each of its hundreds of thousands of look-ups (6-8 us each).

`install()` makes a launch patch tl and tl.core at once (what the nested calls would have patched), and makes the
calls inside a running launch skip the repeat; the launch restores everything when it ends, as before. What a kernel
computes is unchanged: the same interpreted builtins run, patched once instead of again and again. The interpreted
kernel tests compare against the torch twins either way. Nothing is patched when TRITON_INTERPRET is not 1 or when
the interpreter's internals are not the ones this was written against (then `install` returns False and
tests/test_interpreter_speedup.py fails, which says to look again).
"""

from __future__ import annotations

import os
import types

INSTALLED = False


def install() -> bool:
    """Patch Triton's interpreter as the module docstring says; True if it is (now or before) patched."""
    global INSTALLED
    if INSTALLED:
        return True
    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    import triton.language as tl
    import triton.runtime.interpreter as interpreter

    needed = ("_patch_lang", "GridExecutor", "_LangPatchScope", "InterpretedFunction", "_get_np_dtype")
    if not all(hasattr(interpreter, name) for name in needed):
        return False
    patch_lang = interpreter._patch_lang
    launch = interpreter.GridExecutor.__call__
    every_language = types.SimpleNamespace(__globals__={"tl": tl, "core": tl.core})
    running = [0]  # launches in progress (a launch runs inside no other, but count anyway)

    def patch_once(fn):
        if running[0]:
            return interpreter._LangPatchScope()  # inside a launch: already patched, nothing to restore
        return patch_lang(fn)

    def launch_patched_once(self, *args, **kwargs):
        scope = patch_lang(every_language)
        running[0] += 1
        try:
            return launch(self, *args, **kwargs)
        finally:
            running[0] -= 1
            scope.restore()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = launch_patched_once
    interpreter._get_np_dtype = numpy_dtype_once(interpreter._get_np_dtype)
    INSTALLED = True
    return True


def numpy_dtype_once(numpy_dtype):
    """The interpreter's Triton type -> numpy dtype, remembered per scalar type: the original builds a table of 19
    numpy dtypes at every call (17 us; hundreds of thousands of calls in a decode test). A block's dtype is its
    element's (the original reads it off element_ty too); a type that cannot be hashed goes to the original."""
    import triton.language as tl

    known = {}

    def remembered(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(scalar, tl.pointer_type):
            return numpy_dtype(scalar)  # already quick
        try:
            return known[scalar]
        except KeyError:
            known[scalar] = numpy_dtype(scalar)
            return known[scalar]
        except TypeError:  # unhashable
            return numpy_dtype(tt_dtype)

    remembered.original = numpy_dtype
    return remembered
