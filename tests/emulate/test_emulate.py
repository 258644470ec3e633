"""The emulated ARM targets: parity, platform gap, caching and every failure as one line."""

import json
import uuid

import numpy as np
import pytest
from click.testing import CliRunner
from onnx import helper

from edgecomp.cli import cli
from edgecomp.emulate import Emulation, EmulatedRunner, load_runtime
from edgecomp.emulate.cpus import cpuinfo_text, has_sme, parse_cpu
from edgecomp.errors import ConfigError, EmulationError, ModelLoadError
from edgecomp.measure.validate import cosine_rows
from edgecomp.targets import BUILTIN_PROFILES, load_profiles
from tests.conftest import make_model, run_ort, save, vinfo


def _mlp(path, hidden=32, out=8):
    """x[N,8] -> MatMul + b -> Relu -> MatMul + b -> logits; a fresh graph name so no cached result is reused."""
    rng = np.random.default_rng(0)
    inits = {"w1": rng.standard_normal((8, hidden)).astype(np.float32),
             "b1": rng.standard_normal(hidden).astype(np.float32),
             "w2": rng.standard_normal((hidden, out)).astype(np.float32),
             "b2": rng.standard_normal(out).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y0"]),
             helper.make_node("Add", ["y0", "b2"], ["logits"])]
    m = make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("logits", ["N", out])], inits)
    m.graph.name = f"mlp_{uuid.uuid4().hex}"
    return save(m, path)


def _feeds(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(n)]


def _lines(res):
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    return [l for l in res.output.strip().splitlines() if l.strip()]


def test_fp32_matches_the_host_and_reruns_come_from_the_cache(arm64_runtime, tmp_path):
    model = _mlp(tmp_path / "m.onnx")
    feeds = _feeds(4)
    runner = EmulatedRunner(Emulation("arm64-neon", "cortex-a53"), arm64_runtime, workers=2, progress=False)
    first = runner.run(model, feeds)
    assert first.names == ["logits"] and first.cached == 0
    for feed, outs in zip(feeds, first.outputs):
        np.testing.assert_allclose(outs[0], run_ort(model, feed, disable_opt=False)[0], rtol=0, atol=1e-5)
    again = runner.run(model, feeds)
    assert again.cached == 4
    for a, b in zip(first.outputs, again.outputs):
        np.testing.assert_array_equal(a[0], b[0])
    assert not any((arm64_runtime.cache / "tmp").iterdir())  # the temporary folder is gone


def test_int8_platform_gap_is_measured_and_reported(arm64_runtime, tmp_path):
    model = _mlp(tmp_path / "m.onnx", hidden=64, out=16)
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "x.npz", x=rng.standard_normal((48, 8)).astype(np.float32))
    q = tmp_path / "q.onnx"
    runner = CliRunner()
    res = runner.invoke(cli, ["quantize", str(model), "-o", str(q), "--calibration", str(tmp_path / "x.npz"),
                              "--families", "all"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(cli, ["validate", str(model), str(q), "--data", str(tmp_path / "x.npz"), "--target",
                              "arm64-dotprod", "--max-samples", "6", "--json", str(tmp_path / "v.json")])
    assert res.exit_code == 0, res.output
    assert "arm64-dotprod" in res.output and "platform gap" in res.output and "says nothing about the target" in res.output
    (t,) = json.loads((tmp_path / "v.json").read_text())["targets"]
    assert t["target"] == "arm64-dotprod" and t["samples"] == 6
    # the reported gap is the candidate's target outputs against its host outputs, recomputed here
    x = np.load(tmp_path / "x.npz")["x"]
    feeds = [{"x": x[i][None]} for i in (j * len(x) // 6 for j in range(6))]  # DATA's bounded read: evenly spaced
    target = EmulatedRunner(Emulation("arm64-dotprod", "cortex-a76"), arm64_runtime, progress=False).run(q, feeds)
    assert target.cached == 6
    host = np.concatenate([run_ort(q, f, disable_opt=False)[0] for f in feeds])
    arm = np.concatenate([o[0] for o in target.outputs])
    assert t["platform_gap"][0]["cosine_mean"] == pytest.approx(cosine_rows(host, arm).mean(), abs=1e-12)
    assert t["platform_gap"][0]["max_abs_err"] == pytest.approx(np.abs(host - arm).max(), abs=1e-9)
    ref = np.concatenate([run_ort(model, f, disable_opt=False)[0] for f in feeds])
    assert t["fidelity"][0]["cosine_mean"] == pytest.approx(cosine_rows(ref, arm).mean(), abs=1e-9)
    assert t["fidelity"][0]["cosine_mean"] > 0.99


def test_a_target_without_emulate_and_bad_emulate_entries_are_refused(tmp_path):
    res = CliRunner().invoke(cli, ["validate", "a.onnx", "b.onnx", "--data", "d.npz", "--target", "x86-avx2-2core"])
    assert len(_lines(res)) == 1 and "has no emulate entry" in res.output
    f = tmp_path / "t.toml"
    f.write_text('[profile.graviton]\nemulate = "neoverse-n1"\nkleidiai = false\n[profile.graviton.isa]\n'
                 'arch = "aarch64"\narm_dot = true\n')
    p = load_profiles(f)["graviton"]
    assert (p.emulate, p.kleidiai) == ("neoverse-n1", False)
    assert Emulation.of(p).config == {"mlas.disable_kleidiai": "1"}
    f.write_text('[profile.b]\nemulate = "cortex-z9"\n[profile.b.isa]\narch = "aarch64"\n')
    with pytest.raises(ConfigError, match="unknown qemu CPU 'cortex-z9'"):
        load_profiles(f)
    f.write_text('[profile.b]\nemulate = "cortex-a53"\n')
    with pytest.raises(ConfigError, match="isa.arch is x86_64"):
        load_profiles(f)


def test_profiles_and_cpuinfo():
    assert BUILTIN_PROFILES["arm-phone-4core"].emulate == "cortex-a76"
    assert BUILTIN_PROFILES["arm-board-4core"].emulate == "cortex-a53"
    assert Emulation.of(BUILTIN_PROFILES["arm64-sme"]).note.startswith("emulation not trusted for SME")
    assert Emulation.of(BUILTIN_PROFILES["arm64-sme-nokleidiai"]).note is None
    assert Emulation.of(BUILTIN_PROFILES["arm64-dotprod"]).config == {}
    assert has_sme("max") and not has_sme("max,sme=off") and not has_sme("max,sve=off") and not has_sme("a64fx")
    assert parse_cpu("max,sve=off") == ("max", {"sve": False})
    info = cpuinfo_text("max,sve=off", 2)
    assert info.count("processor\t:") == 2 and "CPU part\t: 0x051" in info
    assert " sve" not in info and "sme" not in info and "i8mm" in info
    assert "CPU part\t: 0xd0b" in cpuinfo_text("cortex-a76", 1) and "asimddp" in cpuinfo_text("cortex-a76", 1)


def test_runtime_failures_are_one_line(arm64_runtime, tmp_path, monkeypatch):
    model = _mlp(tmp_path / "m.onnx")
    np.savez(tmp_path / "x.npz", x=np.ones((2, 8), np.float32))
    args = ["validate", str(model), str(model), "--data", str(tmp_path / "x.npz"), "--target", "arm64-neon"]
    runner = CliRunner()
    # an empty cache folder, then a broken one (manifest unreadable, then the wheel gone)
    empty = tmp_path / "empty"
    res = runner.invoke(cli, [*args, "--cache-dir", str(empty)])
    assert len(_lines(res)) == 1 and "no arm64 runtime in" in res.output and "edgecomp targets setup arm64" in res.output
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    monkeypatch.setenv("EDGECOMP_ARM64_CACHE", str(broken))
    with pytest.raises(EmulationError, match="broken .manifest.json unreadable"):
        load_runtime()
    (broken / "manifest.json").write_text(json.dumps({"onnxruntime": arm64_runtime.onnxruntime, "numpy": "2",
                                                      "python": arm64_runtime.python}))
    with pytest.raises(EmulationError, match=r"broken \(sysroot/usr/bin/python3.\d+ is missing\)"):
        load_runtime()
    monkeypatch.delenv("EDGECOMP_ARM64_CACHE")
    # no qemu: a path that names nothing, and none on PATH
    monkeypatch.setenv("EDGECOMP_QEMU", str(tmp_path / "nothing"))
    res = runner.invoke(cli, args)
    assert len(_lines(res)) == 1 and "$EDGECOMP_QEMU names" in res.output and "qemu-aarch64" in res.output
    monkeypatch.delenv("EDGECOMP_QEMU")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmulationError, match="install Debian's qemu-user"):
        load_runtime()


def _fake_qemu(tmp_path, body):
    q = tmp_path / "qemu"
    q.write_text(f"#!/bin/sh\n{body}\n")
    q.chmod(0o755)
    return str(q)


@pytest.mark.parametrize("body, message", [
    ("kill -9 $$", "was killed by SIGKILL (out of memory?)"),
    ("echo 'qemu: uncaught target signal 11' >&2; exit 1", "(exit 1: qemu: uncaught target signal 11); check the runtime"),
    ("sleep 30", "passed the 1.5 s timeout with 0/2 samples done"),
])
def test_killed_crashed_or_slow_emulators_are_one_line_and_leave_nothing(arm64_runtime, tmp_path, monkeypatch, body,
                                                                          message):
    import dataclasses

    model = _mlp(tmp_path / "m.onnx")
    rt = dataclasses.replace(arm64_runtime, qemu=_fake_qemu(tmp_path, body))
    runner = EmulatedRunner(Emulation("arm64-neon", "cortex-a53"), rt, workers=2, timeout_s=1.5, progress=False)
    with pytest.raises(EmulationError) as e:
        runner.run(model, _feeds(2))
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not any((rt.cache / "tmp").iterdir())


def test_a_model_the_target_cannot_load_is_one_line(arm64_runtime, tmp_path):
    m = make_model([helper.make_node("NoSuchOp", ["x"], ["y"], domain="com.example")], [vinfo("x", [1, 8])],
                   [vinfo("y", [1, 8])], extra_opsets=[helper.make_opsetid("com.example", 1)])
    m.graph.name = f"bad_{uuid.uuid4().hex}"
    runner = EmulatedRunner(Emulation("arm64-neon", "cortex-a53"), arm64_runtime, progress=False)
    with pytest.raises(ModelLoadError, match=r"for aarch64 \(arm64-neon\) cannot load the model: .*NoSuchOp"):
        runner.run(m.SerializeToString(), _feeds(1))
    assert not any((arm64_runtime.cache / "tmp").iterdir())


def test_setup_without_network_is_one_line_and_leaves_no_runtime(arm64_runtime, tmp_path, monkeypatch):
    from edgecomp.emulate import prepare

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'E: Failed to fetch http://deb.debian.org/ Temporary failure "
                                     "resolving deb.debian.org'\nexit 100\n")
    (bin_dir / "apt-get").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("EDGECOMP_QEMU", arm64_runtime.qemu)
    cache = tmp_path / "cache"
    with pytest.raises(EmulationError, match=r"cannot download the arm64 packages \(E: Failed to fetch .*\); run "
                                             r"`edgecomp targets setup arm64` where Debian's mirror is reachable"):
        prepare(cache)
    assert not (cache / "manifest.json").exists() and not (cache / "sysroot").exists()
    with pytest.raises(EmulationError, match="no arm64 runtime in"):
        load_runtime(cache)


def test_setup_is_idempotent_and_offline_once_prepared(arm64_runtime, monkeypatch):
    from edgecomp.emulate import prepare

    monkeypatch.setenv("PATH", "/nonexistent")  # no apt-get, no pip network: everything must come from the cache
    monkeypatch.setenv("EDGECOMP_QEMU", arm64_runtime.qemu)
    assert prepare(arm64_runtime.cache) == arm64_runtime


def test_quantize_without_a_prepared_runtime_judges_on_the_host_and_says_so(tmp_path, monkeypatch):
    """Quantizing for a profile that emulates (arm-phone-4core) must not need the emulation: without
    a runtime the floor is judged on this host's numerics and one warning line says so; validate
    --target, which asks for target numerics alone, refuses instead (test above)."""
    model = _mlp(tmp_path / "m.onnx", hidden=64, out=16)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((24, 8)).astype(np.float32))
    monkeypatch.setenv("EDGECOMP_ARM64_CACHE", str(tmp_path / "none"))
    res = CliRunner().invoke(cli, ["quantize", str(model), "-o", str(tmp_path / "q.onnx"), "--calibration",
                                   str(tmp_path / "x.npz"), "--families", "all", "--target", "arm-phone-4core"])
    assert res.exit_code == 0, res.output
    warned = [line for line in res.stderr.splitlines() if "numerics judged on this host" in line]
    assert len(warned) == 1 and "edgecomp targets setup arm64" in warned[0] and "arm-phone-4core" in warned[0]
    assert (tmp_path / "q.onnx").exists() and "numerics judged on" not in res.stdout
