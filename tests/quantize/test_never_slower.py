"""Never slower on the target (issue 26): quantize times the written model, whole, against the model
as given, and acts on the 95% interval of the ratio. The clock is injected (compare_latency's
``timer``), so every verdict here is deterministic: int8 slower, equal, faster."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.data import Dataset
from edgecomp.io import to_proto
from edgecomp.measure import bench
from edgecomp.quantize import quantize_model
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.targets import host_isa
from tests.conftest import RoundRobinClock, run_ort


@pytest.fixture
def clock(monkeypatch, real_speed_check):
    """clock(family, whole): the family timing sees int8 at ``family`` x float, the whole-model
    check at ``whole`` x float; returns the list of label lists compare_latency was called with."""
    real = bench.compare_latency
    calls = []

    def install(family, whole):
        def compare(models, feed, **kw):
            labels = kw.get("labels") or []
            calls.append(list(labels))
            ratio = whole if labels[:1] == ["float as given"] else family
            kw["timer"] = RoundRobinClock([1.0] + [ratio] * (len(models) - 1))
            return real(models, feed, **kw)

        monkeypatch.setattr(bench, "compare_latency", compare)
        return calls

    return install


def _quantize(path, calib, **kw):
    opts = QuantizeOptions(**{"isa": host_isa(), **kw})
    return quantize_model(onnx_ir_load(path), Dataset(calib), opts)


def onnx_ir_load(path):
    import onnx_ir as ir

    return ir.load(str(path))


def _ops(model):
    return {n.op_type for n in to_proto(model).graph.node}


def test_auto_families_write_the_float_model_when_the_whole_int8_model_is_slower(mlp_path, mlp_data, clock):
    calib, _ = mlp_data
    calls = clock(family=0.6, whole=1.2)
    res = _quantize(mlp_path, calib, families="auto")
    assert calls[-1] == ["float as given", "written int8"]  # timed after the choice, whole
    assert "MatMulIntegerToFloat" not in _ops(res.model) and res.plan == {} and not res.forced_not_faster
    assert res.summary["layers int8"] == 0 and res.summary["latency decision"].startswith("float written")
    assert res.summary["latency vs float (this host)"].startswith("1.200 [1.200, 1.200] over 4 rounds")
    assert all(r["decision"] == "float" for r in res.rows)
    # one warning, with both measurements: the family timing and the whole model's
    assert len(res.warnings) == 1, res.warnings
    w = res.warnings[0]
    assert "1.20x" in w and "1.200 [1.200, 1.200] over 4 rounds" in w and "matmul at 0.600 [0.600, 0.600]" in w
    assert "wrote the float model as given" in w
    # the model written computes exactly what the input computes
    feed = {"x": np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)}
    np.testing.assert_array_equal(run_ort(to_proto(res.model), feed)[0], run_ort(str(mlp_path), feed)[0])


def test_equal_whole_model_timing_keeps_float(mlp_path, mlp_data, clock):
    calib, _ = mlp_data
    clock(family=0.6, whole=1.0)
    res = _quantize(mlp_path, calib, families="auto")
    assert "MatMulIntegerToFloat" not in _ops(res.model) and res.plan == {}
    assert res.summary["latency vs float (this host)"].startswith("1.000 [1.000, 1.000] over 12 rounds")
    assert "not below 1" in res.warnings[0]


def test_a_faster_whole_model_keeps_int8(mlp_path, mlp_data, clock):
    calib, _ = mlp_data
    clock(family=0.6, whole=0.7)
    res = _quantize(mlp_path, calib, families="auto")
    assert "MatMulIntegerToFloat" in _ops(res.model) and len(res.plan) == 2
    assert res.summary["latency decision"].startswith("int8 kept") and res.warnings == []
    assert not res.forced_not_faster


def test_forced_families_keep_int8_and_exit_5(mlp_path, mlp_data, clock, tmp_path):
    calib, _ = mlp_data
    clock(family=0.6, whole=1.3)
    for families in ("all", "matmul"):
        out, js = tmp_path / f"{families}.onnx", tmp_path / f"{families}.json"
        res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(out), "--calibration", str(calib),
                                       "--families", families, "--json", str(js)])
        assert res.exit_code == 5, res.output
        assert "MatMulIntegerToFloat" in {n.op_type for n in onnx.load(str(out)).graph.node}
        assert f"families {families} were forced, so the int8 model is written; exit status 5" in res.output
        summary = json.loads(js.read_text())["summary"]
        assert summary["latency vs float (this host)"].startswith("1.300 [1.300, 1.300]")
        assert "exit 5" in summary["latency decision"]
    clock(family=0.6, whole=0.8)
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "fast.onnx"), "--calibration",
                                   str(calib), "--families", "all"])
    assert res.exit_code == 0, res.output


def test_auto_families_fall_back_in_the_cli_with_exit_0(mlp_path, mlp_data, clock, tmp_path):
    calib, _ = mlp_data
    clock(family=0.6, whole=1.1)
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(out), "--calibration", str(calib)])
    assert res.exit_code == 0, res.output
    assert "MatMulIntegerToFloat" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "wrote the float model as given" in res.output


def test_another_targets_model_is_not_timed_here(mlp_path, mlp_data, clock):
    from edgecomp.targets import Isa

    calib, _ = mlp_data
    calls = clock(family=0.6, whole=1.3)
    res = _quantize(mlp_path, calib, families="all", isa=Isa("aarch64", arm_dot=True))
    assert calls == [] and not res.forced_not_faster
    assert res.summary["latency decision"].startswith("not timed: the target (")


MLP_SPEC = '''
import torch


def factory():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    return net, (torch.randn(1, 8),)
'''


def test_convert_follows_the_rule_forced_exit_5(clock, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32))
    (tmp_path / "mlpnet.py").write_text(MLP_SPEC)
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nstep = "export"\nexporter = "torchscript"\n'
                      '[[steps]]\nstep = "quantize"\nfamilies = "all"\n')
    clock(family=0.6, whole=1.3)
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", f"{tmp_path / 'mlpnet.py'}:factory", "--recipe", str(recipe), "-o",
                                   str(out), "--calibration", str(calib)])
    assert res.exit_code == 5, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["not_faster"] == ["02-quantize"]
    assert "exit 5" in report["steps"][1]["summary"]["latency decision"]
    recipe.write_text(recipe.read_text().replace('"all"', '"auto"'))
    res = CliRunner().invoke(cli, ["convert", f"{tmp_path / 'mlpnet.py'}:factory", "--recipe", str(recipe), "-o",
                                   str(out), "--calibration", str(calib), "--overwrite"])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert report["not_faster"] == [] and report["steps"][1]["summary"]["layers int8"] == 0


def test_a_family_win_must_hold_when_re_timed_on_a_second_sample(mlp_path, mlp_data, monkeypatch, real_speed_check):
    """Without a table: the first family timing shows int8 0.6x, the re-timing on the second
    calibration sample shows no difference: every family stays float and the rows say why."""
    calib, _ = mlp_data
    real = bench.compare_latency
    family_ratios, feeds = [0.6, 1.0], []

    def compare(models, feed, **kw):
        if kw.get("labels", [""])[0] == "float":
            feeds.append(feed)
            kw["timer"] = RoundRobinClock([1.0] + [family_ratios[len(feeds) - 1]] * (len(models) - 1))
        else:
            kw["timer"] = RoundRobinClock([1.0, 0.5])
        return real(models, feed, **kw)

    monkeypatch.setattr(bench, "compare_latency", compare)
    # smooth off: with SmoothQuant an all-float verdict is re-timed without it (quantize/cost_aware.py)
    res = _quantize(mlp_path, calib, families="auto", smooth="off")
    assert len(feeds) == 2 and not np.array_equal(feeds[0]["x"], feeds[1]["x"])  # two different samples
    assert res.plan == {} and res.families[0]["reason"] == "faster on sample 1, not beyond noise when re-timed: all float"
    assert res.families[0]["re-timed"].startswith("1.000 [1.000, 1.000]")
    assert res.summary["families evidence"].endswith("the winner re-timed on sample 2)")
    family_ratios[1], feeds[:] = 0.7, []
    res = _quantize(mlp_path, calib, families="auto", smooth="off")
    assert len(res.plan) == 2 and res.families[0]["decision"] == "chosen"
