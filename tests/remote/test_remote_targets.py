"""Target profiles with ``remote = ssh://...`` (issue 26): `targets measure` times the op families on
the device and stores the table; quantize's never-slower check times the written model against its
input on the device, with the host's decision rules. Over the real sshd of conftest.py; where a
verdict must be deterministic, the device's per-run times are replaced after the real run came back."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.measure import bench
from edgecomp.measure.bench import compare_latency, estimates_from_rounds
from edgecomp.quantize import measured
from edgecomp.quantize.measured import FamilyRatio, MeasuredTable, cpu_name, read_table, write_table
from edgecomp.remote.device import Device
from tests.conftest import RoundRobinClock


def _profile(sshd, tmp_path, name="dev"):
    f = tmp_path / "devices.toml"
    f.write_text(f'[profile.{name}]\nremote = "{sshd.address}"\nthreads = 1\npython = "{sys.executable}"\n'
                 f'ssh_config = "{sshd.config}"\n')
    return f


@pytest.fixture
def no_host_timing(monkeypatch):
    monkeypatch.setattr(bench, "compare_latency", lambda *a, **k: pytest.fail("timed on the host"))


@pytest.fixture
def device_rounds(monkeypatch):
    """Records each Device.rounds call; ``fake(ratios)`` then replaces the device's times (after the
    real run on the device) by constant times: model i at ratios[i] ms every run."""
    real = Device.rounds
    calls, fake = [], {}

    def rounds(self, models, feed, threads, n, round_seconds, min_runs, max_runs):
        got = real(self, models, feed, threads, n, round_seconds, min_runs, max_runs)
        calls.append({"models": len(models), "rounds": len(got), "runs": len(got[0][0])})
        if "ratios" in fake:
            got = [[[1e-3 * fake["ratios"][i]] * len(t) for i, t in enumerate(r)] for r in got]
        return got

    monkeypatch.setattr(Device, "rounds", rounds)
    return calls, fake


def test_estimates_from_rounds_equal_compare_latency_on_the_same_times(mlp_path):
    """The device's rounds are read with compare_latency's own stopping rule: same estimate, same
    round count, for a clear verdict (stops at min_rounds) and a tie (runs to the end)."""
    feed = {"x": np.ones((1, 8), np.float32)}
    for durations in ([1.0, 0.7, 1.3], [1.0, 1.0, 1.0]):
        est = compare_latency([mlp_path] * 3, feed, runs_per_round=5, min_rounds=4, max_rounds=7,
                              labels=["a", "b", "c"], timer=RoundRobinClock(durations))
        rounds = [[[d] * 5 for d in durations] for _ in range(7)]
        got = estimates_from_rounds(rounds, ["a", "b", "c"], min_rounds=4)
        assert [(e.label, e.rounds) for e in got] == [(e.label, e.rounds) for e in est]
        flat = [v for e in est for v in (e.ratio, e.low, e.high)]
        assert [v for e in got for v in (e.ratio, e.low, e.high)] == pytest.approx(flat, rel=1e-9)  # clock float sums
    assert [e.rounds for e in got] == [7, 7]  # the tie ran every round
    jitter = np.random.default_rng(0).uniform(0.9, 1.1, (7, 3, 5))
    rounds = (jitter * np.array([1.0, 0.7, 1.3])[None, :, None]).tolist()
    est = estimates_from_rounds(rounds, ["a", "b", "c"], min_rounds=4)
    assert est[0].high < 1.0 and est[1].low > 1.0 and 4 <= est[0].rounds <= 7


def test_targets_measure_on_a_remote_profile_times_on_the_device(sshd, mlp_path, tmp_path, monkeypatch,
                                                                 no_host_timing, device_rounds):
    calls, _ = device_rounds
    monkeypatch.setattr(measured, "MIN_ROUNDS", 2)
    monkeypatch.setattr(measured, "MAX_ROUNDS", 3)
    monkeypatch.setattr(measured, "ROUND_SECONDS", 0.02)
    f = _profile(sshd, tmp_path)
    res = CliRunner().invoke(cli, ["targets", "measure", "dev", "--model", str(mlp_path), "--targets-file", str(f)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"device: {sshd.address} — ") and "wrote [measured.dev]" in res.output
    assert calls == [{"models": 2, "rounds": 3, "runs": calls[0]["runs"]}] and 9 <= calls[0]["runs"] <= 300
    t = read_table(f, "dev")
    assert list(t.families) == ["matmul"] and 2 <= t.families["matmul"].rounds <= 3
    r = t.families["matmul"]
    assert 0.05 < r.low <= r.ratio <= r.high < 20  # a real measurement of a tiny model: no tight bound
    assert t.cpu == cpu_name()  # the device is this machine here; the name came from its /proc/cpuinfo
    assert t.families["matmul"].layers == ["1 x MatMul x[N, 8] w[8, 16]", "1 x MatMul x[N, 16] w[16, 4]"]
    assert sshd.wait_clean() == []


def _table(profile, ratio):
    return MeasuredTable(profile, "2026-12-07T00:00:00+00:00", "Device CPU", "x86_64", "1.32.0", 1, "m.onnx",
                         {"matmul": FamilyRatio(ratio, ratio - 0.02, ratio + 0.02, 8, [])})


def test_never_slower_on_the_device_writes_float_when_int8_is_slower_there(sshd, mlp_path, mlp_data, tmp_path,
                                                                           real_speed_check, no_host_timing,
                                                                           device_rounds):
    calls, fake = device_rounds
    calib, _ = mlp_data
    f = _profile(sshd, tmp_path)
    write_table(f, _table("dev", 0.8))  # the table picks int8; the device then finds the whole model slower
    fake["ratios"] = [1.0, 1.3]
    out, js = tmp_path / "q.onnx", tmp_path / "q.json"
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(out), "--calibration", str(calib),
                                   "--target", "dev", "--targets-file", str(f), "--json", str(js)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"device: {sshd.address} — ")
    assert calls and calls[0]["models"] == 2  # the float model as given and the written int8 model, on the device
    assert "MatMulIntegerToFloat" not in {n.op_type for n in onnx.load(str(out)).graph.node}
    assert f"latency on {sshd.address} (1.300 [1.300, 1.300] over 4 rounds" in res.output
    assert "wrote the float model as given" in res.output
    summary = json.loads(js.read_text())["summary"]
    assert summary[f"latency vs float ({sshd.address})"].startswith("1.300")
    assert summary["latency decision"] == f"float written: the int8 model was not faster than float beyond noise on " \
                                          f"{sshd.address}"
    assert summary["families evidence"].startswith("measured table [measured.dev]")
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "all.onnx"), "--calibration",
                                   str(calib), "--target", "dev", "--targets-file", str(f), "--families", "all"])
    assert res.exit_code == 5, res.output  # forced families: int8 kept, the documented status
    assert "MatMulIntegerToFloat" in {n.op_type for n in onnx.load(str(tmp_path / "all.onnx")).graph.node}
    fake["ratios"] = [1.0, 0.7]
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "fast.onnx"), "--calibration",
                                   str(calib), "--target", "dev", "--targets-file", str(f), "--families", "all"])
    assert res.exit_code == 0, res.output
    assert f"int8 kept: the written model is faster than float beyond noise on {sshd.address}" in res.output
    assert sshd.wait_clean() == []


def test_an_unreachable_device_is_refused_before_quantizing(sshd, mlp_path, mlp_data, tmp_path, monkeypatch):
    import edgecomp.quantize

    monkeypatch.setattr(edgecomp.quantize, "run", lambda *a, **k: pytest.fail("quantized first"))
    calib, _ = mlp_data
    f = tmp_path / "devices.toml"
    f.write_text(_profile(sshd, tmp_path).read_text().replace(f":{sshd.port}", ":1"))
    out = tmp_path / "q.onnx"
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(out), "--calibration", str(calib),
                                   "--target", "dev", "--targets-file", str(f)])
    assert res.exit_code == 1 and not out.exists()
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: ssh://{sshd.user}@127.0.0.1:1: the device is unreachable")
