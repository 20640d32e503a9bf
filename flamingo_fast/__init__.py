"""flamingo_fast: a kernel-accelerated inference runtime for Flamingo-style vision-language models."""

from .config import FlamingoConfig, LMConfig, PerceiverConfig, VisionConfig, from_name
from .dropins.idefics import from_idefics
from .dropins.mllama import from_mllama
from .dropins.mllama_weights import load_mllama_hf
from .dropins.openflamingo import from_openflamingo, load_openflamingo
from .reference.model import Flamingo, build_reference
from .runtime.runtime import FastFlamingo
from .timing import PhaseTimer

__all__ = [
    "FastFlamingo",
    "Flamingo",
    "FlamingoConfig",
    "LMConfig",
    "PerceiverConfig",
    "PhaseTimer",
    "VisionConfig",
    "build_reference",
    "from_idefics",
    "from_mllama",
    "from_name",
    "from_openflamingo",
    "load_mllama_hf",
    "load_openflamingo",
]
__version__ = "0.1.0"
