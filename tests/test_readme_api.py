"""The README's "Python API" examples run as written, in order, in one folder (they build on each
other like a notebook), and what they print is checked against the models they wrote."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _api_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_readme_shows_one_example_per_capability():
    code = "\n".join(_api_blocks())
    for fn in ("export", "optimize", "quantize", "prune", "reduce_embeddings", "distill", "validate", "bench",
               "convert"):
        assert f"edgecomp.{fn}(" in code, fn


@pytest.mark.slow
def test_the_readme_api_examples_run(tmp_path, monkeypatch, trained_digits, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    namespace: dict = {}
    for block in _api_blocks():
        exec(compile(block, "README.md (Python API)", "exec"), namespace)  # noqa: S102 - the README's own code
    import onnxruntime as ort

    x, y = namespace["x_test"], namespace["y_test"]
    for name in ("digits.onnx", "digits.opt.onnx", "digits.int8.onnx", "encoder.pruned.onnx", "student.onnx",
                 "encoder.emb8.onnx"):
        assert (tmp_path / name).is_file(), name
    acc = {}
    for name in ("digits.onnx", "digits.int8.onnx"):
        sess = ort.InferenceSession(str(tmp_path / name), providers=["CPUExecutionProvider"])
        acc[name] = float((sess.run(None, {"x": x})[0].argmax(1) == y).mean())
    report = namespace["report"]
    assert report.ref_accuracy == pytest.approx(acc["digits.onnx"]) and acc["digits.onnx"] > 0.8
    assert report.cand_accuracy == pytest.approx(acc["digits.int8.onnx"])
    assert acc["digits.onnx"] - acc["digits.int8.onnx"] <= 0.01 + 1e-9  # tolerance=0.01 on top-1
    assert (tmp_path / "digits-out" / "report.json").is_file()
    assert np.isfinite([m.p50_ms for m in namespace["timing"].models]).all()
    out = capsys.readouterr().out
    assert "layers int8" in out and "gates passed" in out
