"""A recipe's ``[values]`` table: checked when the recipe is read, and applied by convert to every
model after the export (a scripted torch model whose layers sit in an If on a mode input)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from edgecomp.errors import ConfigError
from edgecomp.passes.specialize_inputs import FIXED_INPUTS_KEY
from edgecomp.pipeline.convert import Source, convert
from edgecomp.pipeline.recipe import parse_recipe
from tests.conftest import run_ort

MODE_NET = '''
import torch


class ModeNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(8, 6)
        self.b = torch.nn.Linear(8, 6)

    def forward(self, x, mode):
        if bool(mode == 1):
            return torch.relu(self.a(x))
        return self.b(x)


def factory():
    return torch.jit.script(ModeNet().eval()), (torch.randn(2, 8), torch.tensor(1))
'''

STEPS = '[[steps]]\nstep = "export"\nexporter = "torchscript"\n[[steps]]\nstep = "quantize"\nfamilies = "all"\n' \
        '[[steps]]\nstep = "validate"\n'


def _recipe(values: str):
    import tomllib

    return parse_recipe(tomllib.loads(f"[values]\n{values}\n{STEPS}"))


def test_values_table_is_checked_when_read():
    assert _recipe("mode = 1\nmask = [0.5, 1]").values == {"mode": [1.0], "mask": [0.5, 1.0]}
    for bad in ('mode = "one"', "mode = []", "mode = nan", "mode = { a = 1 }"):
        with pytest.raises(ConfigError, match="values\\] mode must be a finite number or a list of numbers"):
            _recipe(bad)


def test_convert_specializes_every_model_after_the_export(tmp_path):
    (tmp_path / "modenet.py").write_text(MODE_NET)
    rng = np.random.default_rng(0)
    for split, n in (("calib", 16), ("eval", 8)):  # DATA folders: one feed per file, the scalar mode as is
        (tmp_path / split).mkdir()
        for i in range(n):
            np.savez(tmp_path / split / f"{i:02d}.npz", x=rng.standard_normal((2, 8)).astype(np.float32),
                     mode=np.array(1, np.int64))
    out = tmp_path / "out"
    res = convert(Source(spec=f"{tmp_path / 'modenet.py'}:factory"), _recipe("mode = 1"), out,
                  calibration=str(tmp_path / "calib"), eval_data=str(tmp_path / "eval"))
    export, quant = res.steps[0], res.steps[1]
    assert export.summary["specialized"]["Ifs inlined"] == 1
    base, final = onnx.load(str(out / "01-export.onnx")), onnx.load(str(out / "model.onnx"))
    assert "If" in [n.op_type for n in base.graph.node] and "If" not in [n.op_type for n in final.graph.node]
    assert {p.key: p.value for p in final.metadata_props}[FIXED_INPUTS_KEY] == "mode=1"
    # the Linear that was inside the If is int8 now (6 ReLU outputs a row: cosine is coarse)
    assert quant.summary["layers int8"] == 1 and quant.cos_mean > 0.9
    feed = {"x": rng.standard_normal((2, 8)).astype(np.float32), "mode": np.array(1, np.int64)}
    assert run_ort(final, feed)[0].shape == run_ort(base, feed)[0].shape == (2, 6)
    with pytest.raises(Exception, match="guard: input mode must be 1"):
        run_ort(final, {**feed, "mode": np.array(0, np.int64)})
    assert json.loads((out / "report.json").read_text())["steps"][0]["summary"]["specialized"]["inputs fixed"] == "mode=1"
