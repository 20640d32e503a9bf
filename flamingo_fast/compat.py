"""Importing torchvision beside a CPU build of torch, for the OpenFlamingo comparison (open_clip imports it).

PyPI's torchvision wheels for x86_64 Linux are CUDA builds. Beside the CPU torch their C extension does not
load (it links libtorch_cuda), and torchvision 0.28 then fails at import anyway: it registers fake kernels for
`torchvision::nms` and `torchvision::qnms` without checking that the extension defined them ("operator
torchvision::nms does not exist"). `import_torchvision` defines the schemas of those two ops when, and only
when, that import fails, then imports again: torchvision's Python parts (the transforms open_clip uses) work,
its compiled ops stay unavailable (`torchvision.extension._has_ops()` is False), and nothing here calls them.
Where torchvision imports by itself (a GPU machine with matched builds), nothing is defined.
"""

from __future__ import annotations

import sys
from types import ModuleType

import torch

# The schemas torchvision 0.28's _meta_registrations.py registers fake kernels for, unconditionally.
_UNGUARDED_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_schemas: list[torch.library.Library] = []  # kept alive: a Library's definitions go with it


def import_torchvision() -> ModuleType:
    """-> the torchvision module, importable beside a CPU torch (see the module docstring)."""
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::" not in str(error) or _schemas:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the half-imported package, so the second import runs from the start
        library = torch.library.Library("torchvision", "DEF")
        for schema in _UNGUARDED_OPS:
            library.define(schema)
        _schemas.append(library)
        import torchvision
    return torchvision
