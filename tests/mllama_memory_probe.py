"""The CPU memory probe of the Llama 3.2 Vision loader (tests/test_mllama_weights.py), in a process of its own:

    python tests/mllama_memory_probe.py FOLDER DTYPE      # or measure_in_fork(folder, dtype) from a test

-> {"loader": peak, "whole": peak, "model_bytes": ..., "largest_block": ...} (one JSON line). The test forks its
own process (measure_in_fork) instead of starting an interpreter: the fork has torch and transformers imported
already (a fresh interpreter spends ~9 s importing them here, torchvision alone 4 s), and allocates nothing else
while it measures; before each probe the free memory it inherited is handed back (released()). glibc's mmap
threshold is set to 64 KiB first (mallopt, as MALLOC_MMAP_THRESHOLD_=65536 does
for tests/memory_probe.py): every larger tensor is its own mapping, returned on free. Each peak is the
process's anonymous memory above its level just before the call (memory_probe.PeakProbe: the files' mapped pages
are the page cache's, not counted):
    loader  flamingo_fast.dropins.mllama_weights.load_mllama_hf(FOLDER, dtype=DTYPE)
    whole   the other way, for contrast: every tensor of the files read into memory (as a reader that does not map
            them holds them), converted to DTYPE as a whole, then given to the model built on the meta device (the
            files' copy and the model's, both whole at once)
model_bytes: the loaded model's parameters and buffers; largest_block: its largest block (one decoder layer, one
vision layer, or another single tensor), in DTYPE. Needs transformers.

measure_in_fork(folder, dtype, weights="int8") measures the loader with weights="int8" only (no contrast) ->
{"loader": peak, "model_bytes": the int8 model's parameters and buffers, "float_bytes": the same model's in DTYPE
(from the meta model: what loading in float holds), "largest_block": its largest block in DTYPE, "temporaries": what
quantize_per_channel allocates beside the largest matrix it quantizes (at most three float32 copies: the float32 weight
when DTYPE is another, |w|, w / scale)}. There the loader
frees a float block after quantizing it: glibc keeps freed chunks resident in the heap the child inherited (a parent
that built a model leaves large free chunks there, which malloc reuses before mapping new memory, even above the mmap
threshold), so the free memory is handed back (malloc_trim, as released() does) after each quantized block too;
without it the same load peaked at 14 to 33 MiB depending on what the parent had run before the fork (13-14 with it).
"""

from __future__ import annotations

import ctypes
import gc
import json
import multiprocessing
import sys
from pathlib import Path

import torch
from memory_probe import PeakProbe

from flamingo_fast.dropins import mllama_weights
from flamingo_fast.dropins.mllama_weights import blocks, build_meta_model, live_name, load_mllama_hf
from flamingo_fast.dropins.weights_files import load_tensors
from flamingo_fast.reference.mllama import key_layout

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def released() -> None:
    """Free memory handed back to the kernel (glibc's malloc_trim: the free pages of every arena, not only the top),
    so that an allocation reusing it faults new pages in and shows in RssAnon. A forked child inherits its parent's
    heap: without this, tensors placed in chunks the parent had freed (still resident) would not count, and what a
    probe sees would depend on what the parent process ran before."""
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)


def measure(folder: Path, dtype: torch.dtype) -> dict[str, int]:
    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 65536)
    torch.set_num_threads(1)
    build_meta_model(folder, "folder")  # unmeasured: torch's meta machinery and transformers' modules, imported once
    released()
    with PeakProbe() as loader:
        model = load_mllama_hf(folder, dtype=dtype)
    params = dict(model.named_parameters())
    model_bytes = sum(t.nbytes for t in params.values()) + sum(b.nbytes for b in model.buffers())
    largest = max(sum(params[n].nbytes for n in block) for block in blocks(list(params)))
    del model, params
    released()
    with PeakProbe() as whole:
        tensors = {k: v.clone() for k, v in load_tensors(folder).items()}  # read into memory, not mapped
        layout = key_layout(tensors)
        converted = {live_name(k, layout): v.to(dtype) for k, v in tensors.items()}
        naive = build_meta_model(folder, "folder")
        naive.load_state_dict(converted, assign=True, strict=False)
    del naive, tensors, converted
    return {"loader": loader.peak, "whole": whole.peak, "model_bytes": model_bytes, "largest_block": largest}


def measure_int8(folder: Path, dtype: torch.dtype) -> dict[str, int]:
    ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 65536)
    torch.set_num_threads(1)
    meta = build_meta_model(folder, "folder")  # also imports what the loader needs, unmeasured
    sizes = {n: p.numel() * dtype.itemsize for n, p in meta.named_parameters()}
    float_bytes = sum(sizes.values()) + sum(b.nbytes for b in meta.buffers())  # rotary buffers: float32 either way
    largest = max(sum(sizes[n] for n in block) for block in blocks(list(sizes)))
    quantized = ("model.language_model.layers.", "lm_head.")
    matrix = max(p.numel() for n, p in meta.named_parameters() if p.dim() == 2 and n.startswith(quantized))
    del meta
    quantize = mllama_weights.quantize_loaded

    def then_released(model, first: str) -> None:
        quantize(model, first)
        ctypes.CDLL(None).malloc_trim(0)  # released() without its gc pass: the float block is freed by refcount

    mllama_weights.quantize_loaded = then_released  # this forked child's copy of the module only
    released()
    with PeakProbe() as loader:
        model = load_mllama_hf(folder, dtype=dtype, weights="int8")
    model_bytes = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    return {"loader": loader.peak, "model_bytes": model_bytes, "float_bytes": float_bytes, "largest_block": largest,
            "temporaries": 3 * 4 * matrix}


def _child(folder: Path, dtype: torch.dtype, weights: str | None, out) -> None:
    out.send(measure(folder, dtype) if weights is None else measure_int8(folder, dtype))
    out.close()


def measure_in_fork(folder: Path, dtype: torch.dtype, weights: str | None = None,
                    timeout: float = 120) -> dict[str, int]:
    """measure() (weights=None) or measure_int8() (weights="int8") in a forked child process (module docstring)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(folder, dtype, weights, send))
    child.start()
    send.close()
    if not receive.poll(timeout):
        child.kill()
        raise TimeoutError(f"the memory probe gave no result in {timeout} s")
    found = receive.recv()
    child.join(timeout)
    if child.exitcode != 0:
        raise RuntimeError(f"the memory probe's process exited with {child.exitcode}")
    return found


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), getattr(torch, sys.argv[2]))))
