"""Pruning without data keeps the same fidelity floor as with data, measured on synthesized inputs:
a result below it is refused in one line (nothing written) unless --allow-degraded, which writes
it with a warning and exit status 3; a result above it exits 0 and the report names the
synthetic check. The same rule for --unstructured and for a recipe's prune step in convert.

Models are built inline: a random-weight MLP classifier that a 50% cut breaks, and the same MLP
with dead neurons (zero in and out) that the cut removes exactly."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgecomp.cli import cli
from edgecomp.data import StepData, input_specs, synthesize_feed
from edgecomp.errors import BelowFloor
from edgecomp.io import to_proto
from edgecomp.measure.validate import cosine_rows
from edgecomp.prune import run
from edgecomp.prune.options import SYNTHETIC_SAMPLES, PruneOptions
from tests.conftest import make_model, run_ort, save, vinfo

K, HIDDEN, CLASSES = 32, 64, 4


def _mlp(dead: range = range(0), tiny: float | None = None, seed: int = 0):
    """x[N,32] → fc1 (64) → Relu → fc2 → logits[N,4]; ``dead`` neurons have zero weights in and out;
    ``tiny``: every other weight scaled to that magnitude (what magnitude pruning removes harmlessly)."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((K, HIDDEN)) / np.sqrt(K)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(HIDDEN)).astype(np.float32)
    w2 = (rng.standard_normal((HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32)
    w1[:, list(dead)], b1[list(dead)], w2[list(dead)] = 0, 0, 0
    if tiny is not None:
        for w in (w1, w2):
            w.reshape(-1)[::2] *= tiny
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["logits"], name="fc2")]
    return make_model(nodes, [vinfo("x", ["N", K])], [vinfo("logits", ["N", CLASSES])], {"w1": w1, "b1": b1, "w2": w2})


def _prune(tmp_path, proto, *args, name="m"):
    src = save(proto, tmp_path / f"{name}.onnx")
    out, js = tmp_path / f"{name}.pruned.onnx", tmp_path / f"{name}.json"
    res = CliRunner().invoke(cli, ["prune", str(src), "-o", str(out), "--json", str(js), *args])
    return res, out, js


def test_a_cut_that_breaks_the_model_is_refused_without_data(tmp_path):
    res, out, js = _prune(tmp_path, _mlp(), "--sparsity", "0.5")
    assert res.exit_code == 1 and not out.exists() and not js.exists(), res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the pruned model departs from the original on "
                                                   f"{SYNTHETIC_SAMPLES} synthesized inputs (random, no data given")
    assert "< 0.95" in lines[0] and "nothing was written" in lines[0]
    assert "give --data DATA" in lines[0] and "--allow-degraded" in lines[0] and "exit status 3" in lines[0]


def test_allow_degraded_writes_it_with_a_warning_and_exit_status_3(tmp_path):
    res, out, js = _prune(tmp_path, _mlp(), "--sparsity", "0.5", "--allow-degraded")
    assert res.exit_code == 3 and out.exists(), res.output
    warn = [line for line in res.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warn) == 1 and "synthesized inputs" in warn[0] and "degraded result was allowed" in warn[0]
    report = json.loads(js.read_text())
    assert report["status"] == "degraded" and report["evidence"]["fidelity"]["inputs"] == "synthetic"
    assert report["evidence"]["fidelity"]["samples"] == SYNTHETIC_SAMPLES
    assert min(report["evidence"]["fidelity"]["cosine"], report["evidence"]["fidelity"]["top-1 agreement"]) < 0.95


def test_a_cut_that_keeps_the_model_exits_0_and_names_the_synthetic_check(tmp_path):
    dead = range(0, HIDDEN, 8)  # 8 of 64 neurons do nothing: a 12.5% L2 cut removes exactly them
    res, out, js = _prune(tmp_path, _mlp(dead=dead), "--sparsity", "0.125", "--round-to", "1")
    assert res.exit_code == 0 and out.exists(), res.output
    assert "warning" not in res.stderr
    assert (f"fidelity: mean cosine 1.0000, top-1 agreement 100.0% on {SYNTHETIC_SAMPLES} synthesized inputs "
            "(random, no data given; sizes assumed: batch 1)") in res.stdout
    report = json.loads(js.read_text())
    assert report["status"] == "ok" and report["summary"]["channels removed"] == 8


def test_synthetic_fidelity_matches_onnxruntime_on_the_synthesized_feeds():
    """The reported numbers are the mean per-sample cosine and the top-1 agreement of the two models
    on synthesize_feed's inputs with seeds 0..15 (what bench feeds), recomputed here."""
    proto = _mlp()
    result = run(ir.from_proto(proto), PruneOptions(sparsity=0.5, allow_degraded=True), StepData())
    pruned = to_proto(result.model)
    feeds = [synthesize_feed(input_specs(ir.from_proto(proto)), seed=i) for i in range(SYNTHETIC_SAMPLES)]
    ref = np.concatenate([run_ort(proto, f)[0] for f in feeds])
    got = np.concatenate([run_ort(pruned, f)[0] for f in feeds])
    assert len({f["x"].tobytes() for f in feeds}) == SYNTHETIC_SAMPLES  # different seeds, different inputs
    assert result.evidence["fidelity"]["cosine"] == pytest.approx(float(cosine_rows(ref, got).mean()), abs=1e-6)
    assert result.evidence["fidelity"]["top-1 agreement"] == pytest.approx(float(np.mean(ref.argmax(1) == got.argmax(1))), abs=1e-9)
    assert result.status == "degraded" and result.evidence["fidelity"]["top-1 agreement"] < 0.95


def test_the_library_refuses_with_neutral_words():
    with pytest.raises(BelowFloor, match=r"give calibration data .*lower sparsity.*allow_degraded") as e:
        run(ir.from_proto(_mlp()), PruneOptions(sparsity=0.5), StepData())
    assert "--" not in str(e.value)


def test_with_data_the_same_floor_on_held_out_samples(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(3).standard_normal((40, K)).astype(np.float32))
    res, out, _ = _prune(tmp_path, _mlp(), "--sparsity", "0.9", "--importance", "l2", "--no-repair",
                         "--data", str(tmp_path / "d.npz"))
    assert res.exit_code == 1 and not out.exists(), res.output
    assert "on 8 held-out samples" in res.stderr and "give --data" not in res.stderr  # data was given


def test_unstructured_zeros_that_break_the_model_are_refused(tmp_path):
    res, out, _ = _prune(tmp_path, _mlp(), "--sparsity", "0.9", "--unstructured")
    assert res.exit_code == 1 and not out.exists(), res.output
    assert f"on {SYNTHETIC_SAMPLES} synthesized inputs" in res.stderr and "--data" not in res.stderr
    res, out, _ = _prune(tmp_path, _mlp(), "--sparsity", "0.9", "--unstructured", "--allow-degraded")
    assert res.exit_code == 3 and out.exists(), res.output


def test_unstructured_zeros_of_tiny_weights_pass(tmp_path):
    res, out, _ = _prune(tmp_path, _mlp(tiny=1e-6), "--sparsity", "0.4", "--unstructured")
    assert res.exit_code == 0 and out.exists(), res.output
    assert f"fidelity: mean cosine 1.0000, top-1 agreement 100.0% on {SYNTHETIC_SAMPLES} synthesized" in res.stdout


def test_a_model_synthesized_inputs_cannot_run_is_not_passed(tmp_path):
    """An id input indexing a 10-row table: synthesized ids (0..99) are out of range for onnxruntime,
    so even a harmless cut (dead neurons) cannot be checked without data: refused, or written with
    exit status 3 when allowed, never reported as a success."""
    rng = np.random.default_rng(1)
    w1 = rng.standard_normal((K, HIDDEN)).astype(np.float32)
    w1[:, ::8] = 0
    w2 = rng.standard_normal((HIDDEN, CLASSES)).astype(np.float32)
    w2[::8] = 0
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Add", ["x", "e"], ["xe"]),
             helper.make_node("MatMul", ["xe", "w1"], ["h0"], name="fc1"), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("MatMul", ["h", "w2"], ["logits"], name="fc2")]
    proto = make_model(nodes, [vinfo("x", [1, K]), vinfo("ids", [1], TensorProto.INT64)],
                       [vinfo("logits", [1, CLASSES])], {"table": rng.standard_normal((10, K)).astype(np.float32), "w1": w1, "w2": w2})
    res, out, _ = _prune(tmp_path, proto, "--sparsity", "0.125", "--round-to", "1")
    assert res.exit_code == 1 and not out.exists(), res.output
    assert res.stderr.startswith("Error: the pruned model could not be checked: the model does not run on "
                                 "synthesized inputs") and "give --data DATA" in res.stderr
    res, out, js = _prune(tmp_path, proto, "--sparsity", "0.125", "--round-to", "1", "--allow-degraded")
    assert res.exit_code == 3 and out.exists(), res.output
    assert "fidelity: not checked: the model does not run on synthesized inputs" in res.stdout
    assert json.loads(js.read_text())["evidence"]["fidelity"]["not checked"]


def test_allow_degraded_is_refused_with_a_tolerance(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(3).standard_normal((10, K)).astype(np.float32))
    res, out, _ = _prune(tmp_path, _mlp(), "--eval", str(tmp_path / "d.npz"), "--tolerance", "0.01",
                         "--allow-degraded")
    assert res.exit_code == 1 and not out.exists()
    assert res.stderr.strip() == ("Error: --allow-degraded has no effect with a tolerance (a cut past it is written "
                                  "with exit status 3 already); drop it")


# --- convert: a recipe's prune step follows the same rule ----------------------------------------

FACTORY = '''
import torch


def mlp():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    return m.eval(), (torch.randn(1, 32),)
'''


@pytest.fixture()
def spec(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    return f"{tmp_path / 'factory.py'}:mlp"


def _recipe(tmp_path, extra: str = "") -> str:
    f = tmp_path / f"r{len(extra)}.toml"
    f.write_text('[[steps]]\nstep = "export"\nexporter = "torchscript"\n'
                 f'[[steps]]\nstep = "prune"\nsparsity = 0.5\n{extra}')
    return str(f)


def test_convert_prune_step_without_data_is_refused_like_the_command(tmp_path, spec):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", spec, "--recipe", _recipe(tmp_path), "-o", str(out)])
    assert res.exit_code == 1 and not out.exists(), res.output
    lines = res.stderr.strip().splitlines()
    line = lines[-1]  # after the progress line of step 1
    assert line.startswith("Error: ") and ": step 2 (prune): the pruned model departs from the original on " \
                                          f"{SYNTHETIC_SAMPLES} synthesized inputs" in line
    assert "pass --data DATA" in line and "set allow_degraded = true" in line


def test_convert_prune_step_allowed_degraded_exits_3(tmp_path, spec):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["convert", spec, "--recipe", _recipe(tmp_path, "allow_degraded = true\n"),
                                   "-o", str(out)])
    assert res.exit_code == 3, res.output
    assert (out / "02-prune.onnx").exists() and (out / "model.onnx").exists()
    assert any(line.startswith("warning: step 02 prune: the pruned model departs") for line in res.stderr.splitlines())
    report = json.loads((out / "report.json").read_text())
    assert report["degraded"] == ["02-prune"] and report["steps"][1]["degraded"] is True
