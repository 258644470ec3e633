"""Shared fixtures: small graphs built inline, reference models exported once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `models` is a top-level folder of the repo, not installed

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _never_slower_check_is_deterministic(request, monkeypatch):
    """quantize times its written model against the input (edgecomp.quantize.speed) and exits 5, or
    writes float, when int8 is not faster: on this shared machine that verdict follows the load, so
    every test sees a fixed "faster" measurement, except those that ask for the fixture
    ``real_speed_check`` (tests/quantize/test_never_slower.py injects its own clocks)."""
    if "real_speed_check" in request.fixturenames:
        return
    from edgecomp.measure.bench import RatioEstimate
    from edgecomp.quantize import speed

    monkeypatch.setattr(speed, "time_against_input", lambda *a, **k: RatioEstimate("written int8", 0.9, 0.85, 0.95, 4))


@pytest.fixture
def real_speed_check():
    """Ask for it to run quantize's whole-model timing for real (with the test's own clock)."""


class RoundRobinClock:
    """Every timed run of model k lasts durations[k] (runs go round-robin, as compare_latency interleaves)."""

    def __init__(self, durations):
        self.durations, self.now, self.calls = durations, 0.0, 0

    def __call__(self):
        if self.calls % 2:
            self.now += self.durations[(self.calls // 2) % len(self.durations)]
        self.calls += 1
        return self.now


def write_token_files(folder: Path, count: int, rng: np.random.Generator, lengths: tuple[int, int] = (4, 20)) -> Path:
    """``count`` token samples of random lengths in ``lengths`` (ids 1..999, mask all ones) as ``NNN.npz``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        n = int(rng.integers(*lengths))
        np.savez(folder / f"{i:03d}.npz", input_ids=rng.integers(1, 1000, (1, n)), attention_mask=np.ones((1, n), np.int64))
    return folder


def make_model(nodes, inputs, outputs, initializers=(), opset=17, extra_opsets=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in dict(initializers).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets])
    model.ir_version = 9
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def run_ort(model, feed, disable_opt: bool = True):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    if disable_opt:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(None, feed)


def vinfo(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.fixture(scope="session")
def mlp_path(tmp_path_factory) -> Path:
    """x[N,8] -> MatMul(8x16) + b -> Relu -> MatMul(16x4) + b -> logits[N,4]."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 16)).astype(np.float32), "b1": rng.standard_normal(16).astype(np.float32),
             "w2": rng.standard_normal((16, 4)).astype(np.float32), "b2": rng.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["logits"])]
    m = make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("logits", ["N", 4])], inits)
    return save(m, tmp_path_factory.mktemp("mlp") / "mlp.onnx")


@pytest.fixture(scope="session")
def mlp_data(tmp_path_factory) -> tuple[Path, Path]:
    rng = np.random.default_rng(1)
    d = tmp_path_factory.mktemp("mlpdata")
    np.savez(d / "x.npz", x=rng.standard_normal((32, 8)).astype(np.float32))
    np.save(d / "labels.npy", rng.integers(0, 4, 32))
    return d / "x.npz", d / "labels.npy"


@pytest.fixture(scope="session")
def tiny_encoder_path(tmp_path_factory) -> Path:
    from edgecomp.export import export_spec

    out = tmp_path_factory.mktemp("enc") / "enc.onnx"
    export_spec("models.text_encoder:tiny_encoder", out, exporter="torchscript",
                dynamic={"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}})
    return out


@pytest.fixture(scope="session")
def trained_digits():
    """Weights of the digits MobileNetV2 (width 0.5); trained once (~30 s) if missing."""
    from models import digits

    path = digits.weights_path("mobilenet_v2", 0.5)
    if not path.is_file():
        digits.main(["--arch", "mobilenet_v2", "--width", "0.5", "--epochs", "6"])
    return path


@pytest.fixture(scope="session")
def digits_onnx(tmp_path_factory, trained_digits) -> tuple[Path, Path, Path]:
    """(model.onnx, test DATA .npz, labels .npy) for the trained digits classifier."""
    from edgecomp.export import export_spec
    from models.digits import load_digits_32

    d = tmp_path_factory.mktemp("digits")
    export_spec("models.mobilenet_v2:digits_classifier", d / "digits.onnx", exporter="torchscript",
                dynamic={"x": {0: "batch"}})
    x, y = load_digits_32("test")
    np.savez(d / "test.npz", x=x)
    np.save(d / "labels.npy", y)
    return d / "digits.onnx", d / "test.npz", d / "labels.npy"


def resume_after_kill(train, cfg, checkpoint: Path, step: int, **kw):
    """Train ``cfg`` into ``checkpoint``, killed (an exception from the callback) at ``step``, then
    resume it from the checkpoint; the resumed result."""
    import dataclasses

    class Killed(Exception):
        pass

    def kill(at, _rec):
        if at == step:
            raise Killed

    cut = dataclasses.replace(cfg, checkpoint=str(checkpoint))
    with pytest.raises(Killed):
        train(cut, callback=kill, **kw)
    return train(cut, resume=True, **kw)
