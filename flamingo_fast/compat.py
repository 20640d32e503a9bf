"""Workarounds for the comparison packages: torchvision beside a CPU torch, and OpenFlamingo under transformers 5.

`import_torchvision`: importing torchvision beside a CPU build of torch (open_clip and transformers' IDEFICS import
it).

PyPI's torchvision wheels for x86_64 Linux are CUDA builds. Beside the CPU torch their C extension does not
load (it links libtorch_cuda), and torchvision 0.28 then fails at import anyway: it registers fake kernels for
`torchvision::nms` and `torchvision::qnms` without checking that the extension defined them ("operator
torchvision::nms does not exist"). `import_torchvision` defines the schemas of those two ops when, and only
when, that import fails, then imports again: torchvision's Python parts (the transforms open_clip uses) work,
its compiled ops stay unavailable (`torchvision.extension._has_ops()` is False), and nothing here calls them.
Where torchvision imports by itself (a GPU machine with matched builds), nothing is defined.
`import_torchvision_if_installed` does the same where torchvision is installed and nothing where it is not.

`OptionalMaskMixin`: transformers 5's generate passes no attention_mask when the mask is all ones (4.57 passes
it), and OpenFlamingo's FlamingoLMMixin.forward requires one, so OpenFlamingo's generate fails on every unpadded
batch under 5.x. Mixed in over FlamingoLMMixin (`extend_instance(lm, OptionalMaskMixin)` after
`extend_instance(lm, FlamingoLMMixin)`) it passes None on, which FlamingoLMMixin hands to the Hugging Face LM,
where None means all ones: the model computes the same thing. Used by the profiler's OpenFlamingo baseline
(baselines.to_openflamingo) and the tests' OpenFlamingo models.
"""

from __future__ import annotations

import importlib.util
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


def import_torchvision_if_installed() -> ModuleType | None:
    """-> import_torchvision() where torchvision is installed, else None (nothing imported)."""
    return import_torchvision() if importlib.util.find_spec("torchvision") is not None else None


class OptionalMaskMixin:
    """Makes FlamingoLMMixin.forward's `attention_mask` optional (see the module docstring); the next class in
    the instance's MRO (FlamingoLMMixin, mixed in before this) does the work."""

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return super().forward(input_ids, attention_mask, **kwargs)
