"""quantize judged on a target's numerics: the fallback keeps float what breaks only there."""

import numpy as np
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.data import load_data
from edgecomp.io import load_model
from edgecomp.quantize import quantize_model
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.runtime import make_session, run_feed
from tests.emulate.test_emulate import _mlp


class _TargetBreaksSecondLayer:
    """A stand-in target whose int8 kernel for the second MatMul (fed by ``h``) is wrong: the host's
    outputs, with their sign flipped whenever that layer runs int8."""

    max_samples = 8

    def __init__(self):
        self.calls = 0

    def describe(self):
        return "a target that breaks the second layer"

    def __call__(self, model, feeds):
        self.calls += 1
        broken = any(n.op_type == "MatMulIntegerToFloat" and n.inputs[0].name.startswith("h_") for n in model.graph)
        s = make_session(model)
        return [[-o if broken else o for o in run_feed(s, f)] for f in feeds]


def _data(tmp_path):
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(3).standard_normal((32, 8)).astype(np.float32))
    return load_data(tmp_path / "x.npz")


def test_the_fallback_keeps_float_a_layer_that_fails_only_on_the_target(tmp_path):
    path = _mlp(tmp_path / "m.onnx", hidden=64, out=16)
    data = _data(tmp_path)
    host = quantize_model(load_model(path), data, QuantizeOptions(families="all", tolerance=1e-3), eval_data=data)
    assert {r["decision"] for r in host.rows} == {"int8"} and host.met_tolerance
    target = _TargetBreaksSecondLayer()
    res = quantize_model(load_model(path), data, QuantizeOptions(families="all", tolerance=1e-3, target_runner=target),
                         eval_data=data)
    decisions = {r["layer"]: r["decision"] for r in res.rows}
    assert sorted(decisions.values()) == ["float", "int8"], decisions
    kept = next(r for r in res.rows if r["decision"] == "float")
    assert "kept float" in kept["reason"] and res.met_tolerance
    assert res.summary["numerics judged on"] == target.describe() and res.summary["eval samples"] == 8
    assert target.calls >= 3  # the whole model, each layer's sensitivity, the final check
    # the written model keeps the second layer float: its h-fed MatMul is a float MatMul
    assert not any(n.op_type == "MatMulIntegerToFloat" and n.inputs[0].name.startswith("h_") for n in res.model.graph)


def test_the_fidelity_floor_judges_on_the_target_too(tmp_path):
    path = _mlp(tmp_path / "m.onnx", hidden=64, out=16)
    data = _data(tmp_path)
    res = quantize_model(load_model(path), data, QuantizeOptions(families="all", target_runner=_TargetBreaksSecondLayer()))
    assert sorted(r["decision"] for r in res.rows) == ["float", "int8"]
    assert "lowest output cosine 1.0000 on 8 calibration samples" in res.summary["fidelity"]


def test_quantize_for_an_emulated_target_runs_there(arm64_runtime, tmp_path):
    path = _mlp(tmp_path / "m.onnx", hidden=64, out=16)
    _data(tmp_path)
    x = str(tmp_path / "x.npz")
    res = CliRunner().invoke(cli, ["quantize", str(path), "-o", str(tmp_path / "q.onnx"), "--calibration", x,
                                   "--eval", x, "--tolerance", "0.01", "--families", "all", "--target", "arm64-neon",
                                   "--target-samples", "4"])
    assert res.exit_code == 0, res.output
    assert "numerics judged on: arm64-neon (onnxruntime" in res.output and "cortex-a53" in res.output
    assert "eval samples: 4" in res.output
