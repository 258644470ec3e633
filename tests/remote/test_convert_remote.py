"""convert with a target profile that names a device: its bench step (and the latency gates) run there."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli

MODEL_PY = '''
import torch


def tiny():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    return net, (torch.randn(1, 16),)
'''


def test_convert_bench_step_runs_on_the_profiles_device(sshd, tmp_path):
    (tmp_path / "tiny.py").write_text(MODEL_PY)
    np.savez(tmp_path / "eval.npz", input=np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32))
    (tmp_path / "recipe.toml").write_text('[gates]\nmin_speedup = 0.01\n[[steps]]\nstep = "export"\nexporter = "torchscript"\n'
                                          '[[steps]]\nstep = "bench"\nruns = 5\nwarmup = 1\n')
    (tmp_path / "devices.toml").write_text(f'[profile.dev]\nremote = "{sshd.address}"\nthreads = 1\n'
                                           f'python = "{sys.executable}"\nssh_config = "{sshd.config}"\n')
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", f"{tmp_path / 'tiny.py'}:tiny", "--recipe", str(tmp_path / "recipe.toml"),
                                   "-o", str(out), "--target", "dev", "--targets-file", str(tmp_path / "devices.toml")])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    bench = next(s for s in report["steps"] if s["step"] == "bench")
    assert bench["summary"]["device"].startswith(f"device: {sshd.address}")
    assert report["steps"][0]["p50_ms"] > 0 and report["steps"][0]["latency_ratio"] == 1.0
    assert sshd.wait_clean() == []


def test_convert_quantize_step_decides_from_the_device_table_and_times_on_the_device(sshd, tmp_path, monkeypatch,
                                                                                     real_speed_check):
    """A remote profile's measured table decides the quantize step's families; the written model is
    timed against its input on the device (its times replaced after the real run: int8 slower there),
    so families auto writes float, and the report names the table and the device."""
    from edgecomp.measure import bench as bench_module
    from edgecomp.quantize.measured import FamilyRatio, MeasuredTable, write_table
    from edgecomp.remote.device import Device

    real = Device.rounds
    calls = []

    def rounds(self, *a, **k):
        got = real(self, *a, **k)
        calls.append(len(got))
        return [[[1e-3 * (1.0, 1.25)[i]] * len(t) for i, t in enumerate(r)] for r in got]

    monkeypatch.setattr(Device, "rounds", rounds)
    monkeypatch.setattr(bench_module, "compare_latency", lambda *a, **k: pytest.fail("timed on the host"))
    (tmp_path / "tiny.py").write_text(MODEL_PY)
    np.savez(tmp_path / "calib.npz", input=np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32))
    (tmp_path / "recipe.toml").write_text('[[steps]]\nstep = "export"\nexporter = "torchscript"\n'
                                          '[[steps]]\nstep = "quantize"\n')
    f = tmp_path / "devices.toml"
    f.write_text(f'[profile.dev]\nremote = "{sshd.address}"\nthreads = 1\npython = "{sys.executable}"\n'
                 f'ssh_config = "{sshd.config}"\n')
    write_table(f, MeasuredTable("dev", "2026-12-07T00:00:00+00:00", "Device CPU", "x86_64", "1.32.0", 1, "m.onnx",
                                 {"matmul": FamilyRatio(0.8, 0.78, 0.82, 8, [])}))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", f"{tmp_path / 'tiny.py'}:tiny", "--recipe", str(tmp_path / "recipe.toml"),
                                   "-o", str(out), "--calibration", str(tmp_path / "calib.npz"), "--target", "dev",
                                   "--targets-file", str(f)])
    assert res.exit_code == 0, res.output
    assert calls == [12]  # the device ran every round in one trip
    summary = json.loads((out / "report.json").read_text())["steps"][1]["summary"]
    assert summary["families evidence"].startswith("measured table [measured.dev]")
    assert summary[f"latency vs float ({sshd.address})"].startswith("1.250 [1.250, 1.250]")
    assert summary["layers int8"] == 0 and summary["latency decision"].startswith("float written")
    assert sshd.wait_clean() == []
    page = (out / "report.html").read_text()
    assert "<h2>Latency decisions</h2>" in page and f"latency vs float ({sshd.address}): 1.250" in page
    assert "families evidence: measured table [measured.dev]" in page
