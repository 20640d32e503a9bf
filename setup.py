"""flamingo_fast: a kernel-accelerated runtime for Flamingo-style vision-language models.

The Triton kernels live in the top-level ``kernels/`` folder but install as ``flamingo_fast.kernels``:
PyPI already has an unrelated package named ``kernels``, which we must neither shadow nor be shadowed by.
"""

from setuptools import setup

setup(
    name="flamingo_fast",
    version="0.1.0",
    description="Custom-kernel accelerated Flamingo / OpenFlamingo inference runtime",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The package's rooms by role (each a folder with an __init__.py), listed so a regular install has them all.
    packages=["flamingo_fast", "flamingo_fast.reference", "flamingo_fast.runtime", "flamingo_fast.generation",
              "flamingo_fast.dropins", "flamingo_fast.profiling", "flamingo_fast.kernels"],
    package_dir={"flamingo_fast": "flamingo_fast", "flamingo_fast.kernels": "kernels"},
    # A bare `torch` requirement would pull a multi-GB CUDA build on a CPU machine: the Makefile installs
    # the right build first, and any 2.x satisfies this. CUDA builds of torch pin their own triton 3.x;
    # the range admits every 3.x so it never fights that pin.
    # safetensors (no torch dependency) reads the LM's and open_clip's weight files (load_openflamingo).
    install_requires=["torch>=2.1", "triton>=3.0,<4", "numpy", "safetensors"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "pytest-xdist", "hypothesis", "ruff", "matplotlib"],
        "gpu": ["flash-attn"],
        "plot": ["matplotlib"],
        # Only what does not touch torch: open-flamingo's own pins (torch 2.0.1, an unpinned transformers that
        # resolves to 5.x) would replace this environment's torch with an untested one. The OpenFlamingo
        # comparison environment is `make setup-openflamingo` (requirements-openflamingo.txt, tested versions).
        "openflamingo": ["safetensors"],
    },
    entry_points={"console_scripts": ["flamingo-fast=flamingo_fast.cli:main"]},
)
