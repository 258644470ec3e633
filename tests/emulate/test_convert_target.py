"""convert with an emulated target: quantize judged there, validate reports host and target side by side."""

import json

import numpy as np
import pytest

from edgecomp.pipeline.convert import Source, convert
from edgecomp.pipeline.recipe import load_recipe
from edgecomp.targets import BUILTIN_PROFILES

RECIPE = ('[[steps]]\nstep = "export"\nexporter = "torchscript"\n'
          'dynamic = { input_ids = { 0 = "batch", 1 = "seq" }, attention_mask = { 0 = "batch", 1 = "seq" } }\n'
          '[[steps]]\nstep = "quantize"\nfamilies = "all"\n[[steps]]\nstep = "validate"\n')


@pytest.mark.slow  # ~40 s on a loaded 2-core machine: export, the floor and validate under emulation
def test_convert_for_an_emulated_target(arm64_runtime, tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("calib", 6), ("eval", 4)):
        (tmp_path / split).mkdir()
        for i in range(n):
            L = int(rng.integers(4, 12))
            np.savez(tmp_path / split / f"{i}.npz", input_ids=rng.integers(1, 1000, (1, L)),
                     attention_mask=np.ones((1, L), np.int64))
    (tmp_path / "arm.toml").write_text(RECIPE)
    recipe = load_recipe(str(tmp_path / "arm.toml"))
    out = tmp_path / "out"
    res = convert(Source(spec="models.text_encoder:tiny_encoder"), recipe, out, calibration=str(tmp_path / "calib"),
                  eval_data=str(tmp_path / "eval"), target=BUILTIN_PROFILES["arm64-dotprod"])
    quant, val = res.steps[1], res.steps[2]
    assert quant.summary["numerics judged on"].startswith("arm64-dotprod (onnxruntime")
    (rows,) = [t for name, t in val.tables.items() if name == "numerics on arm64-dotprod (emulated)"]
    assert rows and rows[0]["samples"] == 4 and 0.9 < rows[0]["cos vs host fp32"] <= 1.0 + 1e-9
    assert val.summary["target cos mean"] == rows[0]["cos vs host fp32"]
    assert "says nothing about the target" in val.summary["target latency"]
    report = json.loads((out / "report.json").read_text())
    assert "numerics on arm64-dotprod (emulated)" in json.dumps(report)
    assert "numerics on arm64-dotprod" in (out / "report.html").read_text()
