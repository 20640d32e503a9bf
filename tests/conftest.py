"""Test set-up, in pytest_configure: before any test module is imported (TRITON_INTERPRET must be set before any
@triton.jit runs, and torchvision made importable before open_clip imports it). Under pytest-xdist the
controlling process runs no test: it skips the set-up, and so never imports torch or torchvision (10 s of CPU in
the comparison environments, where torchvision imports torch._dynamo, taken from the workers on a 2-core machine)."""

import importlib.util
import os

import pytest


def running_tests(config: pytest.Config) -> bool:
    """False only in pytest-xdist's controlling process (`-n N`): its workers collect and run the tests."""
    return not getattr(config.option, "numprocesses", None) or "PYTEST_XDIST_WORKER" in os.environ


def pytest_configure(config: pytest.Config) -> None:
    if not running_tests(config):
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import interpreter_speedup  # after TRITON_INTERPRET: it imports triton

        interpreter_speedup.install()  # one patching of triton.language per launch: tests/interpreter_speedup.py
    # One torch thread (the Makefile also sets OMP_NUM_THREADS=1): with two threads on two shared cores, tiny ops
    # stall whenever another process holds a core (a small LayerNorm: 16.9 ms with 2 threads under load, 6.7 us
    # with 1; test_runtime + test_context_cache: 215 s against 18 s). A test about threads sets its own.
    torch.set_num_threads(1)
    if importlib.util.find_spec("torchvision") is not None:  # .venv-openflamingo: before open_clip imports it
        from flamingo_fast.compat import import_torchvision

        import_torchvision()


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from a fixed seed; data within a test is still fresh random draws."""
    import torch

    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    import torch

    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible to torch)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
    # Tests marked `long` first, the rest in their order (a stable sort): pytest-xdist hands tests out in this
    # order, so the real-LM test (about 20 s) starts on one worker while the other takes the rest, instead of
    # running alone at the end (under `-m comparison` its file would otherwise come last, alphabetically).
    items.sort(key=lambda item: item.get_closest_marker("long") is None)
