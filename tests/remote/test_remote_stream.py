"""validate --remote streams DATA to the device in chunks (one work folder, outputs back per chunk),
and models saved with external data go to the device with their data files."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from edgecomp.measure.validate import validate
from edgecomp.remote import connect
from edgecomp.remote import measure as remote_measure
from edgecomp.remote.device import Workspace
from edgecomp.remote.measure import bench_on_device, validate_on_device
from tests.remote.conftest import mlp_model


def _mlp(seed: int, noise: float = 0.0) -> onnx.ModelProto:
    return mlp_model(64, seed, noise)


def _device(sshd):
    return connect(sshd.address, python=sys.executable, config_file=str(sshd.config))


@pytest.fixture
def chunks(monkeypatch):
    """The feeds of each trip to the device."""
    real = Workspace.outputs
    sizes = []

    def outputs(self, feeds, threads=1):
        sizes.append(len(feeds))
        return real(self, feeds, threads)

    monkeypatch.setattr(Workspace, "outputs", outputs)
    return sizes


def test_validate_streams_data_in_chunks_and_equals_local(sshd, tmp_path, monkeypatch, chunks):
    onnx.save(_mlp(0), tmp_path / "ref.onnx")
    onnx.save(_mlp(0, noise=0.05), tmp_path / "cand.onnx")
    x = np.random.default_rng(5).standard_normal((11, 16)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    monkeypatch.setattr(remote_measure, "CHUNK_BYTES", 4 * 16 * 4)  # 4 samples of 16 floats a trip
    remote = validate_on_device(_device(sshd), tmp_path / "ref.onnx", tmp_path / "cand.onnx", tmp_path / "data.npz")
    assert chunks == [4, 4, 3]  # both models ran on each chunk; every sample once
    assert remote == validate(tmp_path / "ref.onnx", tmp_path / "cand.onnx", tmp_path / "data.npz")
    assert remote.samples == 11 and remote.outputs[0].max_abs_err > 0
    assert sshd.wait_clean() == []


def test_models_with_external_data_go_with_their_data_files(sshd, tmp_path, chunks):
    """Two models whose data files have the same name in different folders: each keeps its own."""
    paths = []
    for name, noise in (("a", 0.0), ("b", 0.05)):
        (tmp_path / name).mkdir()
        path = tmp_path / name / "model.onnx"
        onnx.save_model(_mlp(0, noise), path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="weights.data", size_threshold=0)
        assert (tmp_path / name / "weights.data").stat().st_size > 4 * 16 * 64
        paths.append(path)
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(6).standard_normal((5, 16)).astype(np.float32))
    remote = validate_on_device(_device(sshd), *paths, tmp_path / "data.npz")
    local = validate(*paths, tmp_path / "data.npz")
    assert remote == local and local.outputs[0].max_abs_err > 1e-3  # the candidate's own weights were used
    res = bench_on_device(_device(sshd), paths, runs=3, warmup=1)
    assert [s.size_bytes for s in res.models] == [p.stat().st_size + (p.parent / "weights.data").stat().st_size
                                                  for p in paths]
    assert sshd.wait_clean() == []
