"""Configuration and paths at sizes nobody types by hand: TOML nested thousands deep, a targets file
given without a target, `-o folder/`, onnxruntime's dynamic quantizer, an invalid graph to inspect.
Each refusal is one line on stderr with exit status 1 and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from edgecomp.cli import cli
from edgecomp.errors import ConfigError
from edgecomp.paths import MAX_TOML_DEPTH, nesting_exceeds, read_toml
from edgecomp.pipeline.recipe import parse_recipe
from tests.conftest import make_model, save, vinfo

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line(res, code: int = 1) -> str:
    assert res.exit_code == code, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    return lines[0]


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture()
def mlp(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((8, 16)).astype(np.float32), "w2": rng.standard_normal((16, 4)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    return save(make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 4])], inits), tmp_path / "mlp.onnx")


# --- TOML nested thousands of levels deep ------------------------------------------------------

DEEP = {
    "inline arrays": lambda n: "[profile.a]\nx = " + "[" * n + "]" * n + "\n",
    "inline tables": lambda n: "a = " + "{b = " * n + "1" + "}" * n + "\n",
    "table headers": lambda n: "[" + ".".join(["a"] * n) + "]\nx = 1\n",
}


@pytest.mark.parametrize("kind", DEEP)
def test_deep_toml_is_one_line_naming_the_file(tmp_path, kind):
    f = tmp_path / "deep.toml"
    f.write_text(DEEP[kind](5000))
    with pytest.raises(ConfigError, match=rf"{f}: tables and arrays nested more than {MAX_TOML_DEPTH} levels deep"):
        read_toml(f, "recipe")
    f.write_text(DEEP[kind](MAX_TOML_DEPTH - 4))  # shallow enough: parsed (and refused later for its content)
    read_toml(f, "recipe")


@pytest.mark.parametrize("args", [["targets", "--targets-file", "{f}"],
                                  ["bench", "{mlp}", "--runs", "1", "--targets-file", "{f}"],
                                  ["quantize", "{mlp}", "-o", "{out}", "--targets-file", "{f}"],
                                  ["convert", "{mlp}", "--recipe", "{f}", "-o", "{outdir}"]])
def test_deep_targets_file_or_recipe_on_the_command_line(tmp_path, mlp, args):
    f = tmp_path / "deep.toml"
    f.write_text(DEEP["inline arrays"](5000))
    before = files(tmp_path)
    line = one_line(invoke(*(a.format(f=f, mlp=mlp, out=tmp_path / "o.onnx", outdir=tmp_path / "out")
                             for a in args)))
    assert str(f) in line and "nested more than" in line and "RecursionError" not in line, line
    assert files(tmp_path) == before


def test_a_recipe_built_in_python_is_checked_for_depth_too():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ConfigError, match="r.toml: tables and arrays nested more than"):
        parse_recipe({"steps": [{"step": "quantize", "exclude": deep}]}, source="r.toml")
    assert not nesting_exceeds({"steps": [{"step": "quantize", "exclude": ["a"]}]}, 4)
    assert nesting_exceeds({"a": {"b": {"c": {"d": {"e": 1}}}}}, 4)


@pytest.mark.parametrize("command", [["bench", "{mlp}", "--runs", "1"], ["quantize", "{mlp}", "-o", "{out}"],
                                     ["quantize", "{mlp}", "-o", "{out}", "--mode", "dynamic"]])
def test_a_bad_targets_file_is_refused_even_without_a_target(tmp_path, mlp, command):
    f = tmp_path / "t.toml"
    f.write_text("[profile.board]\nthreads = 0\n")
    line = one_line(invoke(*(a.format(mlp=mlp, out=tmp_path / "o.onnx") for a in command), "--targets-file", f))
    assert "profile 'board': threads must be an integer >= 1, got 0" in line
    assert not (tmp_path / "o.onnx").exists()


# --- -o naming a folder -------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["optimize"], ["quantize", "--mode", "dynamic"], ["prune", "--sparsity", "0.5"],
                                     ["quantize", "--calibration", "{data}"]])
def test_output_ending_in_a_slash_is_refused_not_written_as_a_file(tmp_path, mlp, command):
    np.savez(tmp_path / "d.npz", x=np.ones((4, 8), np.float32))
    before = files(tmp_path)
    args = [a.format(data=tmp_path / "d.npz") for a in command]
    line = one_line(invoke(args[0], mlp, "-o", f"{tmp_path / 'newdir'}/", *args[1:]))
    assert "names a folder; give a file name" in line
    assert files(tmp_path) == before  # no file named newdir, no folder either
    (tmp_path / "existing").mkdir()
    res = invoke(args[0], mlp, "-o", tmp_path / "existing", *args[1:])
    assert res.exit_code in (1, 2) and ("is a directory" in res.stderr or "is a folder" in res.stderr), res.output
    assert len(res.stderr.strip().splitlines()) == 1
    assert not any((tmp_path / "existing").iterdir())


def test_json_path_ending_in_a_slash_is_refused(tmp_path, mlp):
    line = one_line(invoke("inspect", mlp, "--json", f"{tmp_path / 'reports'}/"))
    assert "names a folder" in line and not (tmp_path / "reports").exists()


# --- quantize --mode dynamic ----------------------------------------------------------------------

def test_dynamic_mode_writes_a_verified_model_and_prints_no_warning(tmp_path, mlp):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*extra, out):
        return subprocess.run([sys.executable, "-m", "edgecomp.cli", *extra, "quantize", str(mlp), "-o", str(out),
                               "--mode", "dynamic"], capture_output=True, text=True, env=env, timeout=120)

    assert "WARNING:root:" in run("--debug", out=tmp_path / "d0.onnx").stderr  # the line exists without the fix
    res = run(out=tmp_path / "d.onnx")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    onnx.checker.check_model(str(tmp_path / "d.onnx"))
    assert any(n.op_type == "DynamicQuantizeLinear" for n in onnx.load(str(tmp_path / "d.onnx")).graph.node)


def test_dynamic_mode_refuses_a_model_that_does_not_verify(tmp_path, mlp, monkeypatch):
    import onnxruntime.quantization as q

    def broken(src, dst, **kw):  # stands in for a quantizer bug: an invalid graph
        m = onnx.load(src)
        m.graph.node[0].input[0] = "nowhere"
        onnx.save(m, dst)

    monkeypatch.setattr(q, "quantize_dynamic", broken)
    line = one_line(invoke("quantize", mlp, "-o", tmp_path / "d.onnx", "--mode", "dynamic"))
    assert "onnxruntime's dynamic model" in line and "nothing was written" in line
    assert files(tmp_path) == {"mlp.onnx"}  # no output, no staged temporary file


# --- inspect on a model onnxruntime cannot load -----------------------------------------------------

def test_inspect_says_the_graph_is_invalid_instead_of_asking_for_shapes(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["nope"], ["y"])], "g", [vinfo("x", [1, 4])], [vinfo("y", [1, 4])])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, tmp_path / "bad.onnx")
    res = invoke("inspect", tmp_path / "bad.onnx")
    assert res.exit_code == 0, res.output
    macs = next(line for line in res.output.splitlines() if line.startswith("MACs"))
    assert "the model is invalid whatever the feed" in macs and "--shape" not in macs, macs


def test_inspect_still_asks_for_shapes_when_the_feed_is_the_problem(tmp_path, mlp):
    res = invoke("inspect", mlp, "--shape", "x=1x9")
    macs = next(line for line in res.output.splitlines() if line.startswith("MACs"))
    assert "give --shape/--value" in macs, macs


# --- huge --shape values ------------------------------------------------------------------------

@pytest.mark.parametrize("command", [["bench", "--runs", "1"], ["inspect"]])
@pytest.mark.parametrize("shape", ["99999999999x8", "1x" * 40 + "8", "123456789012345678901234567890x8"])
def test_huge_shapes_are_one_line(tmp_path, mlp, command, shape):
    res = invoke(command[0], mlp, *command[1:], "--shape", f"x={shape}")
    text = res.stderr + res.output
    assert "Traceback" not in text and "internal error" not in text, text
    if command[0] == "bench":
        one_line(res)
