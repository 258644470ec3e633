"""bench and validate over ssh against a real sshd (see conftest.py): the device's numbers agree with
the local ones, and every failure is one line that leaves no work folder on the device."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.errors import RemoteError
from edgecomp.measure.bench import benchmark
from edgecomp.measure.validate import validate
from edgecomp.remote import connect
from edgecomp.remote.measure import bench_on_device, validate_on_device
from tests.remote.conftest import mlp_model

ROOT = Path(__file__).resolve().parents[2]


def _mlp(path: Path, width: int, seed: int, noise: float = 0.0) -> Path:
    onnx.save(mlp_model(width, seed, noise), path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    ref = _mlp(d / "ref.onnx", 64, 0)
    cand = _mlp(d / "cand.onnx", 64, 0, noise=0.05)
    big = _mlp(d / "big.onnx", 1024, 2)
    x = np.random.default_rng(5).standard_normal((12, 16)).astype(np.float32)
    np.savez(d / "data.npz", x=x)
    return {"ref": ref, "cand": cand, "big": big, "data": d / "data.npz", "dir": d}


def _device(sshd, **options):
    return connect(sshd.address, python=sys.executable, config_file=str(sshd.config), **options)


def _cli_remote(sshd) -> list[str]:
    return ["--remote", sshd.address, "--remote-python", sys.executable, "--ssh-config", str(sshd.config)]


def test_validate_on_device_equals_local(sshd, models):
    local = validate(models["ref"], models["cand"], models["data"])
    remote = validate_on_device(_device(sshd), models["ref"], models["cand"], models["data"])
    assert remote == local  # same onnxruntime, same feeds: every fidelity number exactly equal
    assert remote.samples == 12 and remote.outputs[0].top1_agreement is not None
    assert 0 < remote.outputs[0].max_abs_err
    assert sshd.wait_clean() == []


def test_bench_on_device_agrees_with_local(sshd, models):
    paths = [models["ref"], models["big"]]
    shapes = {"x": [256, 16]}  # 256 rows: the 1024-wide model does ~16x the MACs, well above call overhead
    local = benchmark(paths, runs=40, warmup=3, shapes=shapes)
    remote = bench_on_device(_device(sshd), paths, runs=40, warmup=3, shapes=shapes)
    assert remote.feed_shapes == local.feed_shapes == {"x": [256, 16]}
    assert remote.feed_defaults == local.feed_defaults
    assert [s.runs for s in remote.models] == [40, 40]
    assert [s.size_bytes for s in remote.models] == [s.size_bytes for s in local.models]
    assert remote.models[0].ratio_to_first == 1.0
    # slower on both sides; the ratios agree within a shared machine's noise (never a tight timing bound)
    assert remote.models[1].ratio_to_first > 1.5 and local.models[1].ratio_to_first > 1.5
    assert 0.33 < remote.models[1].ratio_to_first / local.models[1].ratio_to_first < 3
    assert sshd.wait_clean() == []


def test_cli_bench_and_validate_remote(sshd, models, tmp_path):
    out = CliRunner().invoke(cli, ["bench", str(models["ref"]), str(models["cand"]), "--runs", "5", "--warmup", "1",
                                   "--json", str(tmp_path / "b.json"), *_cli_remote(sshd)])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"device: {sshd.address} — ") and "onnxruntime " in out.output
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["device"]["onnxruntime"] and len(report["models"]) == 2
    out = CliRunner().invoke(cli, ["validate", str(models["ref"]), str(models["cand"]), "--data", str(models["data"]),
                                   *_cli_remote(sshd)])
    assert out.exit_code == 0, out.output
    assert "12 samples" in out.output and "device: ssh://" in out.output
    assert sshd.wait_clean() == []


def test_profile_remote_measures_on_device(sshd, models, tmp_path):
    toml = tmp_path / "devices.toml"
    toml.write_text(f'[profile.dev]\nremote = "{sshd.address}"\nisa = "x86-avx2-2core"\nthreads = 1\n'
                    f'python = "{sys.executable}"\nssh_config = "{sshd.config}"\n')
    out = CliRunner().invoke(cli, ["bench", str(models["ref"]), "--runs", "3", "--target", "dev",
                                   "--targets-file", str(toml)])
    assert out.exit_code == 0, out.output
    assert out.output.startswith(f"device: {sshd.address}")
    out = CliRunner().invoke(cli, ["validate", str(models["ref"]), str(models["cand"]), "--data", str(models["data"]),
                                   "--target", "dev", "--targets-file", str(toml)])
    assert out.exit_code == 0, out.output
    assert "device: ssh://" in out.output
    assert sshd.wait_clean() == []


def _refused(device, models) -> str:
    with pytest.raises(RemoteError) as e:
        bench_on_device(device, [models["ref"]], runs=2, warmup=0)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unreachable_host(sshd, models):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    device = connect(f"ssh://{sshd.user}@127.0.0.1:{port}", python=sys.executable, config_file=str(sshd.config),
                     connect_timeout=3)
    assert "unreachable" in _refused(device, models)


def test_refused_login(sshd, models, tmp_path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    cfg = tmp_path / "cfg"
    cfg.write_text(sshd.config.read_text().replace(str(sshd.root / "client_key"), str(tmp_path / "other")))
    device = connect(sshd.address, python=sys.executable, config_file=str(cfg))
    assert "refused the login" in _refused(device, models)
    assert sshd.leftovers() == []


def test_unknown_host_key_is_refused_never_accepted(sshd, models, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text(sshd.config.read_text().replace(str(sshd.root / "known_hosts"), str(tmp_path / "known_hosts")))
    device = connect(sshd.address, python=sys.executable, config_file=str(cfg))
    assert "host key is not known" in _refused(device, models)
    assert not (tmp_path / "known_hosts").exists() or (tmp_path / "known_hosts").read_text() == ""
    assert sshd.leftovers() == []


@pytest.mark.parametrize("python", ["/usr/bin/python3 -I", "no-such-python"])
def test_device_without_onnxruntime(sshd, models, python):
    if python.startswith("/usr/bin/python3") and not os.path.exists("/usr/bin/python3"):
        pytest.skip("no system python3")
    device = connect(sshd.address, python=python, config_file=str(sshd.config))
    msg = _refused(device, models)
    if python == "no-such-python":
        assert "does not run there" in msg
    else:
        assert "install `" in msg and "onnxruntime>=" in msg, msg
    assert sshd.leftovers() == []


def test_cli_error_is_one_line(sshd, models, tmp_path):
    cfg = tmp_path / "cfg"
    cfg.write_text(sshd.config.read_text().replace(str(sshd.root / "known_hosts"), str(tmp_path / "known_hosts")))
    out = CliRunner().invoke(cli, ["bench", str(models["ref"]), "--remote", sshd.address, "--ssh-config", str(cfg)])
    assert out.exit_code != 0
    assert len(out.output.strip().splitlines()) == 1 and "host key" in out.output


def _start_bench(sshd, models, runs: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "edgecomp.cli", "bench", str(models["big"]), str(models["ref"]),
                             "--runs", str(runs), "--warmup", "0", *_cli_remote(sshd)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_runner(sshd, timeout: float = 20.0) -> None:
    """Until a work folder holds the staged files and the runner has started."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        folders = [sshd.tmp / f for f in sshd.leftovers()]
        if folders and any(folders[0].glob("j*.json")) and len(sshd.all_pids()) >= 4:
            time.sleep(0.3)
            return
        time.sleep(0.05)
    pytest.fail("the runner did not start")


@pytest.mark.slow  # a bench left running, then cut: ~3-6 s on a loaded machine
def test_connection_killed_mid_run(sshd, models):
    proc = _start_bench(sshd, models, runs=200000)
    try:
        _wait_for_runner(sshd)
        for pid in sshd.session_pids():  # the device's side of every connection dies: a cut link
            os.kill(pid, 9)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode not in (0, None)
    lines = (out + err).strip().splitlines()
    assert len(lines) == 1 and "connection" in lines[0], lines
    assert sshd.wait_clean() == []
    assert _runner_gone(sshd)


@pytest.mark.slow  # a bench left running, then cut: ~3-6 s on a loaded machine
def test_host_terminated_mid_run_cleans_device(sshd, models):
    import signal

    proc = _start_bench(sshd, models, runs=200000)
    try:
        _wait_for_runner(sshd)
        proc.send_signal(signal.SIGTERM)  # like Ctrl-C: the host unwinds and closes the work folder
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode != 0
    lines = (out + err).strip().splitlines()
    assert len(lines) <= 1 and "Traceback" not in out + err, lines
    assert sshd.wait_clean() == []
    assert _runner_gone(sshd)


def _runner_gone(sshd, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not any(b"runner.py" in _cmdline(p) for p in sshd.all_pids()):
            return True
        time.sleep(0.1)
    return False


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_full_remote_disk(sshd, models, tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, check=False).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        device = _device(sshd, tmp_parent=str(mnt))
        msg = _refused_big(device, models)
        assert "disk is full" in msg, msg
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def _refused_big(device, models) -> str:
    with pytest.raises(RemoteError) as e:
        bench_on_device(device, [models["big"]], runs=2, warmup=0)  # 100 kB of weights into a 64 kB disk
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.slow  # a bench left running, then cut: ~3-6 s on a loaded machine
def test_command_timeout_stops_the_run_and_cleans(sshd, models):
    device = _device(sshd, command_timeout=2)
    with pytest.raises(RemoteError) as e:
        bench_on_device(device, [models["big"], models["ref"]], runs=10**6, warmup=0)
    assert "longer than 2 s" in str(e.value) and "\n" not in str(e.value)
    assert sshd.wait_clean() == []
    assert _runner_gone(sshd)


@pytest.mark.slow  # a second sshd and a failed SFTP try per copy
def test_device_without_sftp_uses_legacy_scp(sshd_without_sftp, models):
    local = validate(models["ref"], models["cand"], models["data"])
    assert validate_on_device(_device(sshd_without_sftp), models["ref"], models["cand"], models["data"]) == local
    assert sshd_without_sftp.wait_clean() == []


def test_unusable_work_folder_parent(sshd, models, tmp_path):
    device = _device(sshd, tmp_parent=str(tmp_path / "no-such-folder"))
    msg = _refused(device, models)
    assert "could not create a work folder" in msg and "no-such-folder" in msg, msg


def test_device_with_older_onnxruntime_names_the_install(sshd, models, tmp_path):
    fake = tmp_path / "old-python"  # a device python whose numpy and onnxruntime are older than the host's
    fake.write_text('#!/bin/sh\necho \'{"runner": 1, "python": "3.9.2", "machine": "aarch64", "cpu": null, '
                    '"cpus": 4, "numpy": "1.19.5", "onnxruntime": "1.10.0"}\'\n')
    fake.chmod(0o755)
    msg = _refused(connect(sshd.address, python=str(fake), config_file=str(sshd.config)), models)
    import onnxruntime

    major, minor = onnxruntime.__version__.split(".")[:2]
    assert f"onnxruntime>={major}.{minor}" in msg and "onnxruntime 1.10.0" in msg and "-m pip install" in msg, msg
    assert ("numpy>=2" in msg) == (int(np.__version__.split(".")[0]) >= 2)
    assert sshd.leftovers() == []
