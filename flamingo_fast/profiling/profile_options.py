"""The profiler's options: ProfileOptions (checked on construction) and what parses and checks them for the CLI
(parse_int_list, parse_weights, check_output_path), with the names they take (IMPLEMENTATIONS, DTYPES,
FAST_BACKENDS, WEIGHT_FORMATS, DEFAULT_SHOTS). profiler.py runs them."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checks import check_int, is_int
from ..config import PRESETS, FlamingoConfig, from_name
from ..reference.mllama_config import MLLAMA_PRESETS, MllamaConfig, mllama_from_name
from .prompts import mllama_prompt_length, prompt_length

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLEMENTATIONS = ("reference", "fast", "openflamingo", "idefics", "hf")
# each package runs one model family; "hf": transformers' MllamaForConditionalGeneration.generate (Llama 3.2 Vision)
BASELINE_LAYOUT = {"openflamingo": "openflamingo", "idefics": "idefics", "hf": "mllama"}
# The Llama 3.2 Vision presets (reference/mllama_config.py) run "hf" and "fast" (flamingo_fast.from_mllama) only.
MLLAMA_IMPLEMENTATIONS = ("hf", "fast")
FAST_BACKENDS = ("auto", "triton", "torch")  # FastFlamingo's (runtime.layers.BACKENDS, imported only when profiled)
DEFAULT_SHOTS = (0, 1, 2, 4, 8, 16, 32)
# --weights: the fast runtime's weight format (FastFlamingo.from_reference's `weights`; "none" and "bf16" keep
# the weights in the activation dtype, "int8" quantizes them); several formats give one fast row each
WEIGHT_FORMATS = ("none", "bf16", "int8")


def parse_int_list(text: str, name: str, minimum: int = 0) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else is a ValueError naming `name`, the value and what is expected."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            value = int(item)
        except ValueError:
            raise ValueError(
                f"{name}={text!r}: {item!r} is not an integer; expected comma-separated integers >= {minimum}"
            ) from None
        if value < minimum:
            raise ValueError(f"{name}={text!r}: {value} is below {minimum}; expected integers >= {minimum}")
        if value in values:  # two rows under one key
            raise ValueError(f"{name}={text!r}: {value} is listed twice; expected each value once")
        values.append(value)
    return values


def check_output_path(option: str, path: str | os.PathLike, folder: bool = False) -> None:
    """Before the sweep: `path` (a file, or with `folder` a folder) can be written where it is asked for. Checked
    by doing it, not by permission bits (which pass for root where the file system refuses, as in /sys): the
    missing parent folders are made, the file opened for append (with `folder`: a file made inside the folder),
    and then what did not exist before is removed again. A ValueError names the option, the path and the cause."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{option}={str(path)!r}: exists and is not a folder; expected a folder for the traces")
    if not folder and path.is_dir():
        raise ValueError(f"{option}={str(path)!r}: is a folder; expected a file path")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{option}={str(path)!r}: {str(parent)!r} is not a folder; expected a path under a folder")
    folders = [path] if folder else []
    folders += [p for p in path.parents if not p.exists()]  # deepest first, as they are removed
    made: list[Path] = []
    existed = path.exists()
    try:
        for new in reversed([p for p in folders if not p.exists()]):
            new.mkdir()
            made.append(new)
        if folder:
            with tempfile.NamedTemporaryFile(dir=path, prefix=".flamingo-fast-check-"):
                pass
        else:
            with open(path, "a"):
                pass
            if not existed:
                path.unlink()
    except OSError as error:
        raise ValueError(f"{option}={str(path)!r}: cannot be written ({error.strerror or error}); expected a "
                         f"writable location") from None
    finally:
        for new in reversed(made):
            new.rmdir()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class ProfileOptions:
    """Everything `profile()` needs; checked on construction (errors name the option and the value)."""

    preset: str = "small"  # a config.PRESETS name, or an mllama-* preset (MLLAMA_PRESETS: Llama 3.2 Vision)
    shots: Sequence[int] = DEFAULT_SHOTS
    batch: Sequence[int] = (1,)
    new_tokens: int = 16
    num_beams: int = 1  # > 1: beam search (Hugging Face's semantics), timed per step of all hypotheses
    dtype: str | None = None  # None: bfloat16 on CUDA and meta, float32 on the CPU
    device: str | None = None  # None: cuda if available; "meta": count the weights only (count_weights)
    impls: Sequence[str] | None = None  # None: reference,fast (hf,fast with an mllama-* preset)
    repeats: int = 3
    warmup: int = 1
    seed: int = 0
    caption_tokens: int = 12
    question_tokens: int = 6
    trace_dir: str | None = None
    fast_backend: str = "auto"  # auto, triton or torch
    # WEIGHT_FORMATS, one fast row per format (a str: comma-separated); None: none (bf16,int8 with an mllama-*
    # preset on the meta device, whose table is about what each format needs)
    weights: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS and self.preset not in MLLAMA_PRESETS:
            raise ValueError(f"preset={self.preset!r}: unknown; expected one of {sorted(PRESETS)} or the Llama 3.2 "
                             f"Vision presets {sorted(MLLAMA_PRESETS)}")
        self.shots = _int_list(self.shots, "shots", 0)
        self.batch = _int_list(self.batch, "batch", 1)
        if self.impls is None:
            self.impls = list(MLLAMA_IMPLEMENTATIONS if self.is_mllama else ("reference", "fast"))
        self.impls = [self.impls] if isinstance(self.impls, str) else list(self.impls)
        if not self.impls:
            raise ValueError("impl=[]: expected at least one of " + ", ".join(IMPLEMENTATIONS))
        for impl in self.impls:
            if impl not in IMPLEMENTATIONS:
                raise ValueError(f"impl={impl!r}: unknown implementation; expected one of {list(IMPLEMENTATIONS)}")
        if len(set(self.impls)) != len(self.impls):
            raise ValueError(f"impl={','.join(self.impls)!r}: an implementation is listed twice; expected each once")
        for name, minimum in (("new_tokens", 2), ("repeats", 1), ("warmup", 0), ("caption_tokens", 0),
                              ("question_tokens", 0), ("seed", 0), ("num_beams", 1)):
            why = " (decode timing needs a token after the first)" if name == "new_tokens" else ""
            check_int(name, getattr(self, name), minimum, why)
        if self.num_beams > 1 and self.new_tokens > 64:
            raise ValueError(f"new_tokens={self.new_tokens} with num_beams={self.num_beams}: expected at most 64 "
                             f"(FastFlamingo's default max_tail_len)")
        if self.weights is None:
            meta = self.device is not None and str(self.device).startswith("meta")
            self.weights = ["bf16", "int8"] if self.is_mllama and meta else ["none"]
        self.weights = parse_weights(self.weights)
        if self.fast_backend not in FAST_BACKENDS:
            raise ValueError(f"backend={self.fast_backend!r}: unknown fast runtime backend; expected one of "
                             f"{list(FAST_BACKENDS)}")
        if self.trace_dir is not None:
            check_output_path("trace", self.trace_dir, folder=True)
        self.device = self.device or default_device()
        try:
            device = torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"device={self.device!r}: not a device; expected 'cpu', 'cuda[:N]' or 'meta'") from None
        if device.type not in ("cpu", "cuda", "meta"):
            raise ValueError(f"device={self.device!r}: expected 'cpu', 'cuda[:N]' or 'meta' (count the weights only)")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={self.device!r}: no CUDA device is visible to torch; expected 'cpu'")
        self.dtype = self.dtype or ("float32" if device.type == "cpu" else "bfloat16")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {list(DTYPES)}")
        if self.is_mllama:
            self._check_mllama(device)
            return
        config = from_name(self.preset)
        for impl in self.impls:
            if impl in BASELINE_LAYOUT and BASELINE_LAYOUT[impl] != config.layout:
                raise ValueError(f"impl={impl!r} with preset {self.preset!r} (layout {config.layout!r}): that baseline "
                                 f"runs the {BASELINE_LAYOUT[impl]!r} layout only; expected a matching preset")
        longest = prompt_length(max(self.shots), self.caption_tokens, self.question_tokens, config) + self.new_tokens
        if longest > config.lm.max_position_embeddings:
            raise ValueError(
                f"shots={max(self.shots)}: the prompt ({longest - self.new_tokens} tokens) + new_tokens="
                f"{self.new_tokens} is {longest} positions; preset {self.preset!r} allows "
                f"{config.lm.max_position_embeddings}: expected fewer shots, caption or new tokens"
            )

    def _check_mllama(self, device: torch.device) -> None:
        """An mllama-* preset: the implementations it has, the options its sweep takes, transformers for a run."""
        for impl in self.impls:
            if impl not in MLLAMA_IMPLEMENTATIONS:
                raise ValueError(f"impl={impl!r} with preset {self.preset!r} (Llama 3.2 Vision): expected "
                                 f"{' and/or '.join(MLLAMA_IMPLEMENTATIONS)} (hf: transformers' "
                                 f"MllamaForConditionalGeneration.generate; fast: flamingo_fast.from_mllama)")
        if self.trace_dir is not None:
            raise ValueError(f"trace={self.trace_dir!r} with preset {self.preset!r}: the Llama 3.2 Vision sweep "
                             f"writes no traces; expected no --trace")
        if device.type != "meta" and importlib.util.find_spec("transformers") is None:
            raise ValueError(
                f"device={self.device!r} with preset {self.preset!r}: the timed Llama 3.2 Vision profile builds "
                f"transformers' MllamaForConditionalGeneration (random weights) and runs its generate as the "
                f"baseline, and transformers is not installed in this environment; expected device='meta' (weight "
                f"bytes only), or run it where transformers is installed (make setup-transformers5, then "
                f".venv-transformers5/bin/python -m flamingo_fast profile ...)")
        config = self.mllama_config
        longest = mllama_prompt_length(max(self.shots), self.caption_tokens, self.question_tokens) + self.new_tokens
        if longest > config.text.max_position_embeddings:
            raise ValueError(
                f"shots={max(self.shots)}: the prompt ({longest - self.new_tokens} tokens) + new_tokens="
                f"{self.new_tokens} is {longest} positions; preset {self.preset!r} allows "
                f"{config.text.max_position_embeddings}: expected fewer shots, caption or new tokens"
            )

    @property
    def is_mllama(self) -> bool:
        """A Llama 3.2 Vision preset (reference/mllama_config.py's MLLAMA_PRESETS)."""
        return self.preset in MLLAMA_PRESETS

    @property
    def config(self) -> FlamingoConfig:
        if self.is_mllama:
            raise ValueError(f"preset={self.preset!r}: a Llama 3.2 Vision preset has no FlamingoConfig; expected "
                             f"options.mllama_config")
        return from_name(self.preset)

    @property
    def mllama_config(self) -> MllamaConfig:
        return mllama_from_name(self.preset)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def parse_weights(value: str | Sequence[str]) -> list[str]:
    """'bf16,int8' (or a list) -> ['bf16', 'int8']; a ValueError names the option, the value and the formats."""
    formats = [w.strip() for w in value.split(",")] if isinstance(value, str) else list(value)
    if not formats or any(w not in WEIGHT_FORMATS for w in formats) or len(set(formats)) != len(formats):
        raise ValueError(f"weights={value!r}: expected one or more of {list(WEIGHT_FORMATS)}, comma-separated, "
                         f"each once")
    return formats


def _int_list(value: Any, name: str, minimum: int) -> list[int]:
    if isinstance(value, str):
        return parse_int_list(value, name, minimum)
    values = [value] if isinstance(value, int) else list(value)
    if not values:
        raise ValueError(f"{name}=[]: expected at least one integer >= {minimum}")
    for v in values:
        if not is_int(v) or v < minimum:
            raise ValueError(f"{name}={values!r}: {v!r} is not an integer >= {minimum}")
    if len(set(values)) != len(values):  # two rows under one key
        twice = next(v for i, v in enumerate(values) if v in values[:i])
        raise ValueError(f"{name}={values!r}: {twice} is listed twice; expected each value once")
    return values
