"""torch is an extra: with ``import torch`` failing, every ONNX command works and export/distill
refuse in one line naming ``pip install 'edgecomp[torch]'``.

One fresh interpreter runs every command (the CLI through click's runner, so one start-up pays
for all): a folder on ``PYTHONPATH`` ahead of the venv holds a ``torch`` package whose import
raises ``ModuleNotFoundError`` as a missing torch does, and notes each attempt in a file, so the
test also sees which commands tried to import torch at all. (``scripts/check_install_without_torch.sh``
checks the same with a real install into a venv that has no torch.)
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from onnx import TensorProto, helper

from tests.conftest import make_model, save, vinfo

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCKER = '''
import os
with open(os.environ["EDGECOMP_TORCH_ATTEMPTS"], "a") as f:
    f.write("torch\\n")
raise ModuleNotFoundError("No module named 'torch'", name="torch")
'''

RUNNER = textwrap.dedent('''
    import json, os, sys
    from click.testing import CliRunner
    from edgecomp.cli import cli

    attempts = os.environ["EDGECOMP_TORCH_ATTEMPTS"]
    results = {}
    for name, args in json.loads(sys.argv[1]):
        before = os.path.getsize(attempts) if os.path.exists(attempts) else 0
        r = CliRunner().invoke(cli, args)
        after = os.path.getsize(attempts) if os.path.exists(attempts) else 0
        results[name] = {"exit": r.exit_code, "stdout": r.stdout, "stderr": r.stderr,
                         "tried torch": after > before,
                         "exception": None if r.exception is None or isinstance(r.exception, SystemExit)
                         else repr(r.exception)}
    print(json.dumps(results))
''')


def _mlp(path: pathlib.Path) -> pathlib.Path:
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, 16)).astype(np.float32), "b1": rng.standard_normal(16).astype(np.float32),
             "w2": rng.standard_normal((16, 4)).astype(np.float32), "b2": rng.standard_normal(4).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="up"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"], name="down"),
             helper.make_node("Add", ["y0", "b2"], ["logits"])]
    return save(make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("logits", ["N", 4])], inits), path)


def _embedding(path: pathlib.Path) -> pathlib.Path:
    table = np.random.default_rng(1).standard_normal((64, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed")]
    return save(make_model(nodes, [vinfo("ids", ["N", 5], TensorProto.INT64)], [vinfo("emb", ["N", 5, 16])],
                           {"table": table}), path)


@pytest.fixture(scope="module")
def without_torch(tmp_path_factory):
    """Every command's (exit status, stdout, stderr, whether it tried to import torch)."""
    d = tmp_path_factory.mktemp("notorch")
    (d / "block" / "torch").mkdir(parents=True)
    (d / "block" / "torch" / "__init__.py").write_text(BLOCKER, encoding="utf-8")
    mlp, emb = _mlp(d / "mlp.onnx"), _embedding(d / "emb.onnx")
    np.savez(d / "x.npz", x=np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32))
    spec = d / "net.py"
    spec.write_text("import torch\n\ndef make():\n    return torch.nn.Linear(4, 3), (torch.randn(1, 4),)\n")
    recipe = d / "r.toml"
    recipe.write_text('[[steps]]\nstep = "export"\n\n[[steps]]\nstep = "optimize"\n')
    commands = [
        ("optimize", ["optimize", str(mlp), "-o", str(d / "opt.onnx")]),
        ("quantize", ["quantize", str(mlp), "-o", str(d / "q.onnx"), "--calibration", str(d / "x.npz")]),
        ("prune", ["prune", str(mlp), "-o", str(d / "p.onnx"), "--sparsity", "0.25", "--data", str(d / "x.npz")]),
        ("reduce-embeddings", ["reduce-embeddings", str(emb), "-o", str(d / "e.onnx"), "--bits", "8"]),
        ("validate", ["validate", str(mlp), str(d / "q.onnx"), "--data", str(d / "x.npz")]),
        ("bench", ["bench", str(d / "q.onnx"), "--runs", "3", "--warmup", "1"]),
        ("inspect", ["inspect", str(mlp)]),
        ("export", ["export", f"{spec}:make", "-o", str(d / "exported.onnx")]),
        ("distill", ["distill", str(mlp), "--student", str(mlp), "--data", str(d / "x.npz"), "-o",
                     str(d / "student.onnx")]),
        ("convert", ["convert", f"{spec}:make", "--recipe", str(recipe), "-o", str(d / "conv")]),
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(d / "block"), str(ROOT)]),
           "EDGECOMP_TORCH_ATTEMPTS": str(d / "attempts.txt"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(commands)], capture_output=True, text=True,
                         env=env, cwd=d, check=False, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    results["files"] = {p.name for p in d.iterdir()}
    return results


@pytest.mark.parametrize("command", ["optimize", "quantize", "prune", "reduce-embeddings", "validate", "bench",
                                     "inspect"])
def test_onnx_commands_work_without_torch(without_torch, command):
    r = without_torch[command]
    assert r["exit"] == 0 and r["exception"] is None, r
    assert not r["tried torch"], f"{command} imported torch"


def test_the_blocker_really_blocks(without_torch):
    """The export refusal proves ``import torch`` failed in that interpreter, and each ONNX
    command's model was written."""
    assert without_torch["export"]["tried torch"]
    assert {"opt.onnx", "q.onnx", "p.onnx", "e.onnx"} <= without_torch["files"]


@pytest.mark.parametrize("command", ["export", "distill", "convert"])
def test_torch_commands_refuse_in_one_line_naming_the_extra(without_torch, command):
    r = without_torch[command]
    lines = r["stderr"].strip().splitlines()
    assert r["exit"] == 1 and r["exception"] is None, r
    assert len(lines) == 1 and "needs torch" in lines[0] and "pip install 'edgecomp[torch]'" in lines[0], r
    assert "Traceback" not in r["stdout"] + r["stderr"]
    assert not {"exported.onnx", "student.onnx", "conv"} & without_torch["files"]


def test_require_names_the_extra_and_keeps_real_import_errors(tmp_path, monkeypatch):
    from edgecomp.errors import MissingExtra
    from edgecomp.extras import require

    assert require("json", "none", "reading").dumps([1]) == "[1]"
    with pytest.raises(MissingExtra, match=r"^frobnicating needs edgecomp_no_such_mod, which is not installed: "
                                           r"pip install 'edgecomp\[frob\]'$"):
        require("edgecomp_no_such_mod", "frob", "frobnicating")
    (tmp_path / "edgecomp_broken_mod.py").write_text("import edgecomp_no_such_dependency\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="edgecomp_no_such_dependency"):  # installed but broken: as it is
        require("edgecomp_broken_mod", "frob", "frobnicating")


def test_export_options_load_without_numpy_onnxruntime_or_torch():
    """The CLI and the recipe schema read export's options through the package: that must not
    load the exporters (numpy, onnxruntime) or torch."""
    code = ("import sys\nfrom edgecomp.export import OPTIONS, DEFAULT_OPSET\n"
            "print(sorted(m for m in ('torch', 'numpy', 'onnxruntime', 'edgecomp.export.exporters') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
