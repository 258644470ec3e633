"""Measured target tables (issue 26): `targets measure` stores per-family ratios in the targets file
(keeping the user's comments and profiles), and quantize --families auto decides from the table: the
same families under any timing noise. Clocks are injected; nothing depends on this machine's load."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.data import Dataset
from edgecomp.errors import ConfigError
from edgecomp.measure import bench
from edgecomp.quantize import quantize_model
from edgecomp.quantize.measured import FamilyRatio, MeasuredTable, read_table, write_table
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.targets import host_isa, load_profiles

USER_FILE = '''# my devices: keep this comment
[profile.pi5]
threads = 4  # four big cores
[profile.pi5.isa]
arch = "aarch64"
'''


class _NoisyClock:
    """Every timed run of model k lasts durations[k] times a random factor in [1 - jitter, 1 + jitter]
    (runs go round-robin, as compare_latency interleaves)."""

    def __init__(self, durations, jitter, seed):
        self.durations, self.jitter, self.now, self.calls = durations, jitter, 0.0, 0
        self.rng = np.random.default_rng(seed)

    def __call__(self):
        if self.calls % 2:
            k = (self.calls // 2) % len(self.durations)
            self.now += self.durations[k] * (1 + self.jitter * self.rng.uniform(-1, 1))
        self.calls += 1
        return self.now


def _table(profile="host", **ratios):
    fams = {f: FamilyRatio(r, r - 0.02, r + 0.02, 8, [f"{f}_0: MatMul x[1, 8] w[8, 16]"]) for f, r in ratios.items()}
    return MeasuredTable(profile, "2026-12-07T00:00:00+00:00", "Test CPU", "x86_64 (AVX2)", "1.32.0", 1, "m.onnx", fams)


def test_write_table_keeps_comments_and_profiles_and_reads_back(tmp_path):
    f = tmp_path / "devices.toml"
    f.write_text(USER_FILE)
    write_table(f, _table(matmul=0.8))
    write_table(f, _table("pi5", conv=0.9))
    write_table(f, _table(matmul=0.7))  # measured again: replaces its own table only
    text = f.read_text()
    assert text.startswith(USER_FILE) and "# four big cores" in text
    assert read_table(f, "host").families["matmul"].ratio == pytest.approx(0.7)
    assert read_table(f, "pi5").families["conv"].high == pytest.approx(0.92)
    assert read_table(f, "nowhere") is None
    assert load_profiles(f)["pi5"].threads == 4  # the profile file still loads
    f.write_text(USER_FILE + '[measured.host]\ndate = "x"\n')
    with pytest.raises(ConfigError, match=r"\[measured.host\] is not a table `edgecomp targets measure` wrote"):
        read_table(f, "host")


def test_measure_stores_the_families_ratios_with_their_intervals(mlp_path, tmp_path, monkeypatch):
    real = bench.compare_latency

    def compare(models, feed, **kw):  # float, then the matmul-only int8 model at 0.8x
        kw["timer"] = _NoisyClock([1.0, 0.8], 0.0, 0)
        return real(models, feed, **kw)

    monkeypatch.setattr(bench, "compare_latency", compare)
    f = tmp_path / "devices.toml"
    f.write_text(USER_FILE)
    res = CliRunner().invoke(cli, ["targets", "measure", "host", "--model", str(mlp_path), "--targets-file", str(f)])
    assert res.exit_code == 0, res.output
    t = read_table(f, "host")
    assert list(t.families) == ["matmul"] and t.families["matmul"].ratio == pytest.approx(0.8)
    assert t.families["matmul"].rounds == 8 and t.isa == host_isa().describe()
    assert t.families["matmul"].layers == ["1 x MatMul x[N, 8] w[8, 16]", "1 x MatMul x[N, 16] w[16, 4]"]
    assert f.read_text().startswith(USER_FILE)
    res = CliRunner().invoke(cli, ["targets", "measure", "pi5", "--model", str(mlp_path), "--targets-file", str(f)])
    assert res.exit_code == 2 and "profile pi5 is not this host" in res.output


@pytest.mark.parametrize("ratio, int8", [(0.8, True), (0.99, False)])
def test_five_runs_under_noise_give_the_same_families_from_a_table(mlp_path, mlp_data, monkeypatch, ratio, int8,
                                                                   real_speed_check):
    """The family choice reads the table (no family timing at all); the never-slower check still
    times the whole model, here under +-30% noise around a clearly faster int8 model."""
    calib, _ = mlp_data
    real = bench.compare_latency
    calls = []

    def compare(models, feed, **kw):
        calls.append(kw.get("labels"))
        kw["timer"] = _NoisyClock([1.0, 0.6], 0.3, len(calls))
        return real(models, feed, **kw)

    monkeypatch.setattr(bench, "compare_latency", compare)
    chosen = []
    for _ in range(5):
        res = quantize_model(ir.load(str(mlp_path)), Dataset(calib),
                             QuantizeOptions(isa=host_isa(), table=_table(matmul=ratio)))
        chosen.append(sorted(r["families"] for r in res.families if r["decision"] == "chosen"))
        assert res.summary["families evidence"].startswith("measured table [measured.host]")
        assert (len(res.plan) == 2) is int8
    assert chosen == [["matmul"] if int8 else []] * 5
    assert all(labels[0] == "float as given" for labels in calls)  # only the whole-model check timed anything


def test_quantize_cli_reads_the_table_for_its_target(mlp_path, mlp_data, tmp_path, monkeypatch):
    calib, _ = mlp_data
    monkeypatch.setattr(bench, "compare_latency", lambda *a, **k: pytest.fail("families were timed"))
    f = tmp_path / "devices.toml"
    f.write_text(USER_FILE)
    write_table(f, _table(matmul=0.8))
    js = tmp_path / "q.json"
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "q.onnx"), "--calibration",
                                   str(calib), "--targets-file", str(f), "--json", str(js)])
    assert res.exit_code == 0, res.output
    out = json.loads(js.read_text())
    assert out["summary"]["families evidence"].startswith("measured table [measured.host] of 2026-12-07")
    assert out["tables"]["op families"][0]["decision"] == "chosen" and out["summary"]["layers int8"] == 2
    assert "measured on another CPU or onnxruntime" in res.output  # the table's CPU is "Test CPU"


def test_the_table_decides_by_combination_as_families_interact():
    """Each family alone slower, both together faster: both are chosen; a family no stored
    combination covers stays float with a row saying how to measure it."""
    from edgecomp.quantize.measured import decide_from_table

    t = _table(matmul=1.05, conv=1.10)
    t.families["matmul,conv"] = FamilyRatio(0.85, 0.83, 0.87, 8, [])
    chosen, rows = decide_from_table(t, ["matmul", "conv", "attention"])
    assert chosen == {"matmul", "conv"}
    assert [(r["families"], r["decision"]) for r in rows] == [("matmul", "-"), ("conv", "-"), ("matmul,conv", "chosen"),
                                                              ("attention", "-")]
    assert rows[-1]["reason"].startswith("not in the table: run `edgecomp targets measure host`")
    chosen, rows = decide_from_table(t, ["matmul"])  # a model without conv: only what applies to it
    assert chosen == set() and [r["families"] for r in rows] == ["matmul"]
    assert rows[0]["reason"] == "no stored combination is >= 3% faster beyond noise: all float"
    t.families["matmul,conv"] = FamilyRatio(0.98, 0.97, 0.99, 8, [])  # faster beyond noise, but < 3%
    assert decide_from_table(t, ["matmul", "conv"])[0] == set()


MLP_SPEC = '''
import torch


def factory():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    return net, (torch.randn(1, 8),)
'''


@pytest.mark.parametrize("ratio, int8", [(0.8, 2), (1.05, 0)])
def test_convert_decides_families_from_the_table_and_says_so(tmp_path, monkeypatch, ratio, int8):
    """convert's quantize step reads the measured table as `quantize --targets-file` does: no family
    timing, the table's verdict, and the step's summary names the table; a forced step ignores it."""
    monkeypatch.setattr(bench, "compare_latency", lambda *a, **k: pytest.fail("families were timed"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32))
    (tmp_path / "mlpnet.py").write_text(MLP_SPEC)
    f = tmp_path / "devices.toml"
    write_table(f, _table(matmul=ratio))
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\nstep = "export"\nexporter = "torchscript"\n[[steps]]\nstep = "quantize"\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", f"{tmp_path / 'mlpnet.py'}:factory", "--recipe", str(recipe), "-o",
                                   str(out), "--calibration", str(calib), "--targets-file", str(f)])
    assert res.exit_code == 0, res.output
    step = json.loads((out / "report.json").read_text())["steps"][1]
    assert step["summary"]["families evidence"].startswith("measured table [measured.host] of 2026-12-07")
    assert step["summary"]["layers int8"] == int8
    assert [r["decision"] for r in step["tables"]["op families"]] == ["chosen" if int8 else "-"]
    assert "measured on another CPU or onnxruntime" in res.output
    recipe.write_text(recipe.read_text() + 'families = "all"\n')
    res = CliRunner().invoke(cli, ["convert", f"{tmp_path / 'mlpnet.py'}:factory", "--recipe", str(recipe), "-o",
                                   str(out), "--calibration", str(calib), "--targets-file", str(f), "--overwrite"])
    assert res.exit_code == 0, res.output
    step = json.loads((out / "report.json").read_text())["steps"][1]
    assert "families evidence" not in step["summary"] and step["summary"]["layers int8"] == 2
