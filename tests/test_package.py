"""ORT Mobile artifacts: model.ort round trip, the reduced-build operator config and the EP verdict."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
from click.testing import CliRunner
from onnx import helper

from edgecomp.cli import cli
from tests.conftest import make_model, run_ort, save, vinfo


def _mlp(tmp_path):
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["y"])]
    return save(make_model(nodes, [vinfo("x", [2, 4])], [vinfo("y", [2, 3])], inits), tmp_path / "mlp.onnx")


def test_package_writes_an_ort_model_that_matches_the_onnx_one(tmp_path):
    src = _mlp(tmp_path)
    out = tmp_path / "mobile"
    res = CliRunner().invoke(cli, ["package", str(src), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in out.iterdir()} == {"model.ort", "required_operators_and_types.config", "package.json"}
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    got = ort.InferenceSession(str(out / "model.ort"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, run_ort(src, {"x": x})[0], rtol=1e-5, atol=1e-6)
    config = (out / "required_operators_and_types.config").read_text()
    assert "# - model.ort" in config and str(tmp_path) not in config
    assert any(";" in line for line in config.splitlines() if not line.startswith("#"))
    report = json.loads((out / "package.json").read_text())
    assert report["edgecomp_output"] == "package" and report["max_abs_diff"] <= 1e-4
    assert {r["EP"] for r in report["usability"]} == {"NNAPI", "CoreML NeuralNetwork", "CoreML MLProgram"}
    nnapi = next(r for r in report["usability"] if r["EP"] == "NNAPI")
    assert nnapi["nodes supported"].endswith("/3") and nnapi["suitable as is"] in ("YES", "MAYBE", "NO")
    assert "NNAPI" in res.output and "nodes supported" in res.output

    again = CliRunner().invoke(cli, ["package", str(src), "-o", str(out)])
    assert again.exit_code == 1 and "--overwrite" in again.stderr
    assert CliRunner().invoke(cli, ["package", str(src), "-o", str(out), "--overwrite"]).exit_code == 0


def test_convert_ort_format_adds_the_mobile_artifacts(tmp_path):
    spec = tmp_path / "net.py"
    spec.write_text("import torch\n\ndef make():\n    torch.manual_seed(0)\n"
                    "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), (torch.randn(1, 4),)\n")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nstep = "export"\nexporter = "torchscript"\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", f"{spec}:make", "--recipe", str(recipe), "-o", str(out), "--ort-format"])
    assert res.exit_code == 0, res.output
    assert (out / "model.ort").is_file() and (out / "required_operators_and_types.config").is_file()
    assert json.loads((out / "report.json").read_text())["package"]["max_abs_diff"] <= 1e-4
    assert "ORT Mobile" in (out / "report.html").read_text()
