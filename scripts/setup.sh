#!/usr/bin/env bash
# Create (or reuse) .venv in the repo and install edgecomp with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# torch is pinned in pyproject to the local CPU wheel; installing it first keeps pip from
# resolving any other build.
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[hf,data,dev,sweep]"
# Real third-party models for the zoo tests and scripts/bench_zoo.py: silero-vad ships ONNX files
# (If subgraphs, LSTM, 1-D convs), facenet-pytorch the MTCNN P/R/O-Net weights. --no-deps: their
# pins (torchaudio, torchvision, old numpy) would replace the CPU torch.
python -m pip install -q --disable-pip-version-check --no-deps silero-vad==6.2.3 facenet-pytorch==2.6.0
# The emulated ARM runtime (qemu-user + onnxruntime's own aarch64 build, cached in
# ~/.cache/edgecomp/arm64) that tests/emulate and `validate --target arm64-*` run on. Needs
# Debian's mirror and PyPI once; a failure here leaves the rest of the install usable.
python -m edgecomp.cli targets setup arm64 || echo "edgecomp: the emulated ARM runtime is not ready (see the line above); tests/emulate will be skipped"
