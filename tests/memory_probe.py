"""The CPU memory probe for tests/test_loading.py: run as its own process, so that nothing else allocates.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/memory_probe.py FOLDER {load,convert} OPTIONS_JSON

Prints one JSON line: the process's peak anonymous memory above its level just before the call (bytes), and what
the built runtime holds (weight_bytes). Anonymous memory (RssAnon) is the process's own allocations; pages of
memory-mapped weight files are the page cache's (RssFile) and are not counted. The peak is sampled every 0.5 ms by
a thread (torch releases the GIL in its kernels); with glibc's mmap threshold at 64 KiB every tensor is its own
mapping, returned on free, so RssAnon follows the live tensors instead of the heap's high-water mark. What is
allocated once per process whatever the model (torch's meta-device machinery, imported by the first model built
on the meta device) is allocated before the probe starts.

load     flamingo_fast.load_openflamingo(FOLDER/checkpoint.pt, FOLDER/lm, FOLDER/clip/..., **OPTIONS)
convert  the same files loaded as float first (not measured), then FastFlamingo.from_reference(that model,
         **OPTIONS) measured: a live CPU model converted to the runtime's own copy
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import torch

import flamingo_fast
from flamingo_fast.config import from_name
from flamingo_fast.reference.model import Flamingo
from flamingo_fast.runtime.runtime import FastFlamingo


def rss_anon() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no RssAnon")


class PeakProbe:
    """Samples RssAnon in a thread while the `with` block runs -> .peak (bytes above .before)."""

    def __enter__(self):
        self.before = self.highest = rss_anon()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done.is_set():
            self.highest = max(self.highest, rss_anon())
            time.sleep(0.0005)

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.highest = max(self.highest, rss_anon())
        self.peak = self.highest - self.before


def main(folder: Path, mode: str, options: dict) -> None:
    torch.set_num_threads(1)
    with torch.device("meta"):  # the first meta-device build imports torch's meta machinery (~77 MB, once)
        Flamingo(from_name("tiny"))
    dtype = getattr(torch, options.pop("dtype")) if "dtype" in options else None
    files = (folder / "checkpoint.pt", folder / "lm", folder / "clip" / "open_clip_model.safetensors")
    ids = dict(eoc_token_id=options.pop("eoc_token_id"), media_token_id=options.pop("media_token_id"))
    if mode == "load":
        with PeakProbe() as probe:
            runtime = flamingo_fast.load_openflamingo(*files, dtype=dtype, **ids, **options)
        engine = runtime.fast
    else:
        model = flamingo_fast.load_openflamingo(*files, **ids, backend="torch", max_batch_size=1,
                                                max_seq_len=16).reference
        with PeakProbe() as probe:
            engine = FastFlamingo.from_reference(model, dtype=dtype, **options)
    print(json.dumps({"peak": probe.peak, "weight_bytes": engine.weight_bytes()}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]))
