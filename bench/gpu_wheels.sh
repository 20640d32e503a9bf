#!/usr/bin/env bash
# Wheels the GPU machine lacks for OpenFlamingo's own generate, downloaded here into .whl/
# (git-ignored) for the device call to carry. The GPU image (KINDS.md) has Python 3.12, torch, timm, torchvision,
# einops, regex, safetensors and transformers 5.x; OpenFlamingo 2.0.1 runs with transformers 4.57.6, which needs
# huggingface_hub < 1.0 and tokenizers <= 0.23.0. bench/gpu_check.sh installs them with --target into a
# temporary folder that only its `openflamingo` step puts on PYTHONPATH. About 18 MB.
#
#     bash bench/gpu_wheels.sh            # then carry .whl in the device call
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==4.57.6 huggingface_hub==0.36.0 tokenizers==0.22.1 open_clip_torch==3.3.0 open-flamingo==2.0.1 \
    einops-exts==0.0.4 ftfy==6.3.1 wcwidth==0.9.4
ls -la .whl
