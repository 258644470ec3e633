"""Nothing is lost and every failure is one line: output folders, verified writes, bad DATA
and values, OS errors, interruption. Each case checks the exit status, that stderr holds one
line, that the inputs are byte-identical afterwards and that no partial or temp file remains."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper

from edgecomp.cli import cli
from tests.conftest import ROOT, make_model, save, vinfo

SPEC = """
import torch

def make():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), (torch.randn(1, 4),)

def slow():
    import time
    time.sleep(60)
    return make()
"""
EXPORT_ONLY = '[[steps]]\nstep = "export"\nexporter = "torchscript"\n'


def invoke(*args, cwd: Path | None = None):
    old = Path.cwd()
    if cwd:
        os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(old)


def one_line_error(res) -> str:
    assert res.exit_code not in (0, None), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


@pytest.fixture()
def spec(tmp_path) -> Path:
    f = tmp_path / "net.py"
    f.write_text(SPEC)
    return f


@pytest.fixture()
def mlp(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": rng.standard_normal(3).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["y"], name="fc_b")]
    return save(make_model(nodes, [vinfo("x", ["N", 4])], [vinfo("y", ["N", 3])], inits), tmp_path / "mlp.onnx")


# --- convert --overwrite -------------------------------------------------------------------

def test_overwrite_refuses_the_current_folder_and_keeps_its_files(tmp_path, spec):
    (tmp_path / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    msg = one_line_error(invoke("convert", f"{spec}:make", "--recipe", "cnn-int8", "-o", ".", "--overwrite", cwd=tmp_path))
    assert "current folder" in msg
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["parent", "home", "root"])
def test_overwrite_refuses_ancestors_home_and_root(tmp_path, spec, where, monkeypatch):
    inner = tmp_path / "a" / "b"
    inner.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(tmp_path / "a"))
    target = {"parent": "..", "home": str(tmp_path / "a"), "root": "/"}[where]
    msg = one_line_error(invoke("convert", f"{spec}:make", "--recipe", "cnn-int8", "-o", target, "--overwrite", cwd=inner))
    assert ("holds it" in msg) or ("home folder" in msg) or ("root" in msg)


@pytest.mark.parametrize("inside", ["recipe", "targets", "calibration", "spec"])
def test_overwrite_never_deletes_an_input_inside_outdir(tmp_path, spec, inside):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"edgecomp_output": "convert"}))
    recipe, targets, calib = out / "r.toml", out / "t.toml", out / "c.npz"
    recipe.write_text(EXPORT_ONLY)
    targets.write_text('[profile.box]\nthreads = 1\n')
    np.savez(calib, x=np.ones((2, 4), np.float32))
    spec_in = out / "net.py"
    spec_in.write_text(SPEC)
    args = {"recipe": ["--recipe", recipe], "targets": ["--targets-file", targets, "--target", "box"],
            "calibration": ["--calibration", calib], "spec": []}[inside]
    source = f"{spec_in}:make" if inside == "spec" else f"{spec}:make"
    recipe_args = [] if inside == "recipe" else ["--recipe", "cnn-int8"]
    before = snapshot(out)
    msg = one_line_error(invoke("convert", source, *recipe_args, *args, "-o", out, "--overwrite"))
    assert "inside the output folder" in msg
    assert snapshot(out) == before


def test_overwrite_replaces_only_a_folder_edgecomp_wrote(tmp_path, spec):
    recipe = tmp_path / "r.toml"
    recipe.write_text(EXPORT_ONLY)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    msg = one_line_error(invoke("convert", f"{spec}:make", "--recipe", recipe, "-o", out, "--overwrite"))
    assert "not written by edgecomp" in msg and (out / "mine.txt").read_text() == "user data"

    (out / "mine.txt").unlink()
    res = invoke("convert", f"{spec}:make", "--recipe", recipe, "-o", out)
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["edgecomp_output"] == "convert" and (out / "model.onnx").exists()
    first = (out / "model.onnx").stat().st_mtime_ns
    res = invoke("convert", f"{spec}:make", "--recipe", recipe, "-o", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert (out / "model.onnx").stat().st_mtime_ns != first
    assert leftovers(tmp_path) == [] and recipe.read_text() == EXPORT_ONLY


def test_output_folder_inside_an_input_folder_is_refused(tmp_path, spec):
    data = tmp_path / "calib"
    data.mkdir()
    np.savez(data / "0.npz", x=np.ones((1, 4), np.float32))
    msg = one_line_error(invoke("convert", f"{spec}:make", "--recipe", "cnn-int8", "--calibration", data,
                                "-o", data / "out"))
    assert "inside the input folder" in msg and not (data / "out").exists()


# --- interruption ---------------------------------------------------------------------------

def test_sigterm_removes_the_work_folder_and_stale_ones_are_cleaned(tmp_path, spec):
    recipe = tmp_path / "r.toml"
    recipe.write_text(EXPORT_ONLY)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "edgecomp.cli", "convert", f"{spec}:slow", "--recipe", str(recipe),
                             "-o", str(out)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.") for p in tmp_path.iterdir()):
        time.sleep(0.2)
    assert any(p.name.startswith(".out.") for p in tmp_path.iterdir()), "no work folder appeared"
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert not out.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.edgecomp-work-{dead.pid}-abcd"
    stale.mkdir()
    (stale / "01-export.onnx").write_bytes(b"x" * 1000)
    res = invoke("convert", f"{spec}:make", "--recipe", recipe, "-o", out)
    assert res.exit_code == 0, res.output
    assert not stale.exists() and leftovers(tmp_path) == []


# --- every written model is verified ---------------------------------------------------------

@pytest.mark.parametrize("bad", ["unknown-op", "opset-99"])
def test_optimize_refuses_to_write_a_model_that_does_not_verify(tmp_path, bad):
    if bad == "unknown-op":
        nodes = [helper.make_node("Relu", ["x"], ["h"]), helper.make_node("NoSuchOp", ["h"], ["y"])]
        m = make_model(nodes, [vinfo("x", [1, 4])], [vinfo("y", [1, 4])])
    else:
        m = make_model([helper.make_node("Relu", ["x"], ["y"])], [vinfo("x", [1, 4])], [vinfo("y", [1, 4])], opset=99)
    src = tmp_path / "bad.onnx"
    onnx.save(m, src)
    before = src.read_bytes()
    msg = one_line_error(invoke("optimize", src, "-o", tmp_path / "out.onnx"))
    assert "nothing was written" in msg or "cannot load" in msg
    assert not (tmp_path / "out.onnx").exists() and src.read_bytes() == before and leftovers(tmp_path) == []


def test_written_files_keep_the_umask(tmp_path, mlp):
    old = os.umask(0o022)
    try:
        res = invoke("optimize", mlp, "-o", tmp_path / "o.onnx", "--json", tmp_path / "o.json")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o.onnx").stat().st_mode & 0o777 == 0o644


# --- DATA and values ------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("command", ["prune", "quantize"])
def test_non_finite_data_is_refused_naming_the_sample(tmp_path, mlp_path, bad, command):
    # a model with channels to prune: DATA is checked sample by sample as it is read
    mlp = mlp_path
    x = np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)
    x[5, 2] = bad
    data = tmp_path / "d.npz"
    np.savez(data, x=x)
    opt = {"prune": ["--sparsity", "0.5", "--data", data], "quantize": ["--calibration", data]}[command]
    msg = one_line_error(invoke(command, mlp, "-o", tmp_path / "o.onnx", *opt))
    assert "sample 5" in msg and "NaN or Inf" in msg and "'x'" in msg
    assert not (tmp_path / "o.onnx").exists()


def test_non_finite_feed_in_a_data_folder_names_the_file(tmp_path, mlp):
    d = tmp_path / "calib"
    d.mkdir()
    for i in range(3):
        x = np.ones((1, 4), np.float32)
        if i == 2:
            x[0, 0] = np.nan
        np.savez(d / f"{i}.npz", x=x)
    msg = one_line_error(invoke("quantize", mlp, "-o", tmp_path / "o.onnx", "--calibration", d))
    assert "2.npz" in msg and "NaN or Inf" in msg


@pytest.mark.parametrize("bad", ["bool", "corrupt", "other-keys", "other-rank"])
def test_bad_data_gets_one_line(tmp_path, mlp, bad):
    d = tmp_path / "calib"
    d.mkdir()
    np.savez(d / "0.npz", x=np.ones((1, 4), np.float32))
    if bad == "bool":
        np.savez(d / "1.npz", x=np.ones((1, 4), bool))
    elif bad == "corrupt":
        (d / "1.npz").write_bytes(b"PK\x03\x04 not really a zip")
    elif bad == "other-keys":
        np.savez(d / "1.npz", y=np.ones((1, 4), np.float32))
    else:
        np.savez(d / "1.npz", x=np.ones((1, 4, 2), np.float32))
    before = snapshot(d)
    one_line_error(invoke("quantize", mlp, "-o", tmp_path / "o.onnx", "--calibration", d))
    assert snapshot(d) == before and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("label", [99, -1])
def test_labels_outside_the_models_classes_are_refused(tmp_path, mlp, label):
    data, labels = tmp_path / "d.npz", tmp_path / "y.npy"
    np.savez(data, x=np.ones((4, 4), np.float32))
    np.save(labels, np.array([0, 1, 2, label]))
    msg = one_line_error(invoke("validate", mlp, mlp, "--data", data, "--labels", labels))
    assert str(label) in msg


@pytest.mark.parametrize("args", [
    ["quantize", "{m}", "-o", "{o}", "--calibration", "{d}", "--eval", "{d}", "--tolerance", "nan"],
    ["quantize", "{m}", "-o", "{o}", "--calibration", "{d}", "--labels", "{y}"],
    ["prune", "{m}", "-o", "{o}", "--sparsity", "1.5"],
    ["prune", "{m}", "-o", "{o}", "--sparsity", "inf"],
    ["export", "x.py:make", "-o", "{o}", "--atol", "-1"],
    ["bench", "{m}", "--shape", "x=99999999999x16"],
    ["optimize", "{m}", "-o", "{o}", "--json", "{m}"],
    ["optimize", "{m}", "-o", "{o}", "--json", "{missing}/r.json"],
])
def test_bad_values_get_one_line_before_any_work(tmp_path, mlp, args):
    data, labels = tmp_path / "d.npz", tmp_path / "y.npy"
    np.savez(data, x=np.ones((4, 4), np.float32))
    np.save(labels, np.zeros(4, np.int64))
    before = mlp.read_bytes()
    fill = dict(m=mlp, o=tmp_path / "o.onnx", d=data, y=labels, missing=tmp_path / "missing")
    one_line_error(invoke(*[a.format(**fill) for a in args]))
    assert not (tmp_path / "o.onnx").exists() and mlp.read_bytes() == before and leftovers(tmp_path) == []


# --- OS errors and unexpected ones -----------------------------------------------------------

@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_os_errors_while_writing_are_one_line_and_leave_no_temp_file(tmp_path, mlp, monkeypatch, code):
    def failing_write(path, data):  # save_model writes the verified bytes with Path.write_bytes
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(Path, "write_bytes", failing_write)
    msg = one_line_error(invoke("optimize", mlp, "-o", tmp_path / "o.onnx"))
    assert os.strerror(code) in msg
    assert not (tmp_path / "o.onnx").exists() and leftovers(tmp_path) == []


def test_a_file_name_too_long_is_one_line(tmp_path, mlp):
    msg = one_line_error(invoke("optimize", mlp, "-o", tmp_path / ("n" * 300 + ".onnx")))
    assert "too long" in msg


def test_unexpected_errors_are_one_line_and_debug_after_the_command_shows_them(tmp_path, mlp, monkeypatch):
    import edgecomp.passes.optimize_graph as og

    def boom(self, model):
        raise ZeroDivisionError("deliberate")

    monkeypatch.setattr(og.OptimizeGraphPass, "call", boom)
    msg = one_line_error(invoke("optimize", mlp, "-o", tmp_path / "o.onnx"))
    assert "internal error" in msg and "--debug" in msg
    res = invoke("optimize", mlp, "-o", tmp_path / "o.onnx", "--debug")
    assert isinstance(res.exception, ZeroDivisionError)


def test_onnxruntime_log_lines_stay_off_stderr(tmp_path):
    """A real process: onnxruntime logs a coloured "[E:onnxruntime:...]" line to file descriptor 2
    (which click's runner cannot see) when a node fails; --debug keeps it, otherwise the error is
    the only line."""
    from onnx import numpy_helper

    graph = helper.make_graph([helper.make_node("Reshape", ["x", "s"], ["y"])], "t", [vinfo("x", ["N", 4])],
                              [vinfo("y", [3, 5])], [numpy_helper.from_array(np.array([3, 5], np.int64), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    bad = tmp_path / "rs.onnx"
    onnx.save(model, bad)
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "edgecomp.cli", *extra, "validate", str(bad), str(bad), "--data",
                               str(tmp_path / "d.npz")], capture_output=True, text=True, env=env, timeout=120)

    assert "[E:onnxruntime:" in run("--debug").stderr  # the line exists, so the next assertion can fail
    res = run()
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: onnxruntime rejected the input"), res.stderr


def test_a_graph_onnx_ir_cannot_read_is_one_line(tmp_path, mlp, monkeypatch):
    import onnx_ir as ir

    def refuse(proto):
        raise ir.serde.SerdeError("deliberate: cannot deserialize")

    monkeypatch.setattr(ir, "from_proto", refuse)
    msg = one_line_error(invoke("prune", mlp, "-o", tmp_path / "o.onnx", "--sparsity", "0.5"))
    assert "cannot be read as an ONNX graph" in msg


def test_a_recipe_export_task_with_a_spec_is_refused_before_any_step(tmp_path, spec):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nstep = "export"\ntask = "text-classification"\n')
    msg = one_line_error(invoke("convert", f"{spec}:make", "--recipe", recipe, "-o", tmp_path / "out"))
    assert "Hugging Face folders" in msg and not (tmp_path / "out").exists()
