#!/usr/bin/env bash
# Create (or reuse) .venv in the repo and install edgecomp with its extras.
set -euo pipefail
cd "$(dirname "$0")/.."
# A real sshd for tests/remote (bench/validate --remote over ssh): Debian's openssh-server, installed
# only when missing and when we are root (elsewhere the tests that need it are skipped). The fixture
# runs its own sshd on 127.0.0.1; the system service is not started here.
if ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openssh-server openssh-client) \
        || echo "edgecomp: openssh-server could not be installed; tests/remote will be skipped"
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
. .venv/bin/activate
# torch is an extra with a range (pyproject); this machine runs the exact CPU wheel, installed
# first so that pip keeps it and resolves no other build (the default wheel pulls CUDA).
python -m pip install -q --disable-pip-version-check torch==2.13.0
python -m pip install -q --disable-pip-version-check -e ".[torch,hf,data,dev,sweep]"
# Real third-party models for the zoo tests and scripts/bench_zoo.py: silero-vad ships ONNX files
# (If subgraphs, LSTM, 1-D convs), facenet-pytorch the MTCNN P/R/O-Net weights. --no-deps: their
# pins (torchaudio, torchvision, old numpy) would replace the CPU torch.
python -m pip install -q --disable-pip-version-check --no-deps silero-vad==6.2.3 facenet-pytorch==2.6.0
# The emulated ARM runtime (qemu-user + onnxruntime's own aarch64 build, cached in
# ~/.cache/edgecomp/arm64) that tests/emulate and `validate --target arm64-*` run on. Needs
# Debian's mirror and PyPI once; a failure here leaves the rest of the install usable.
python -m edgecomp.cli targets setup arm64 || echo "edgecomp: the emulated ARM runtime is not ready (see the line above); tests/emulate will be skipped"
