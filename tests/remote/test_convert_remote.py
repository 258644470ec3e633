"""convert with a target profile that names a device: its bench step (and the latency gates) run there."""

from __future__ import annotations

import json
import sys

import numpy as np
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
