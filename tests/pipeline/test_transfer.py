"""The transfer recipe: export -> optimize -> finetune with a new head -> int8 -> validate -> bench, on a
tiny CNN and a task it was not built for (sklearn digits 0-4, even vs odd)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgecomp.errors import DataError
from edgecomp.pipeline.convert import Source, convert
from edgecomp.pipeline.recipe import load_recipe
from tests.conftest import run_ort

SPEC = '''
import torch
from torch import nn


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))
    return model.eval(), (torch.randn(2, 1, 8, 8),)
'''


@pytest.fixture
def parity_task(tmp_path):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    keep = y <= 4
    x, y = (x[keep] / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), (y[keep] % 2).astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    np.savez(tmp_path / "train.npz", input=x[:600])
    np.save(tmp_path / "train.npy", y[:600])
    np.savez(tmp_path / "test.npz", input=x[600:])
    np.save(tmp_path / "test.npy", y[600:])
    (tmp_path / "tiny.py").write_text(SPEC)
    return tmp_path, x[600:], y[600:]


@pytest.mark.slow  # about 30 s on a loaded machine: training, int8 calibration, validate, bench
def test_transfer_recipe_learns_the_new_task_and_quantizes(parity_task):
    d, x_test, y_test = parity_task
    recipe = load_recipe("transfer")
    for step in recipe.steps:
        if step["step"] == "export":
            step["exporter"] = "torchscript"
        if step["step"] == "finetune":
            step.update(epochs=15, lr=1e-2)
        if step["step"] == "quantize":
            step["families"] = "all"  # auto times the host; the recipe run must not depend on it
        if step["step"] == "bench":
            step["runs"], step["warmup"] = 10, 2
    res = convert(Source(spec=f"{d}/tiny.py:make"), recipe, d / "out", calibration=str(d / "train.npz"),
                  eval_data=str(d / "test.npz"), labels=str(d / "test.npy"), train_labels=str(d / "train.npy"))
    ft = next(s for s in res.steps if s.step == "finetune")
    assert "Gemm node" in ft.summary["new head"] and "64 -> 2 classes" in ft.summary["new head"]
    assert ft.summary["held-out accuracy after"] > 0.9 > ft.summary["held-out accuracy before"]
    final = res.final()
    assert final.step == "quantize" and final.int8_mac_share > 0.5 and final.top1_agreement > 0.9
    assert ft.accuracy > 0.9 and final.accuracy > 0.85  # validate on the test split, against its labels
    m = onnx.load(str(d / "out" / "model.onnx"))
    got = run_ort(m, {"input": x_test}, disable_opt=False)[0]
    assert got.shape == (len(y_test), 2) and np.mean(got.argmax(1) == y_test) == pytest.approx(final.accuracy)
    report = json.loads((d / "out" / "report.json").read_text())
    assert [s["step"] for s in report["steps"]] == recipe.step_names()
    assert not list((d / "out").glob("*.ckpt"))


def test_transfer_recipe_needs_train_labels(parity_task):
    d, *_ = parity_task
    with pytest.raises(DataError, match="step 3 \\(finetune\\): finetune needs train_labels data"):
        convert(Source(spec=f"{d}/tiny.py:make"), load_recipe("transfer"), d / "out",
                calibration=str(d / "train.npz"), eval_data=str(d / "test.npz"), labels=str(d / "test.npy"))
    assert not (d / "out").exists()
