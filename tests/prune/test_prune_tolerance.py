"""Accuracy-aware pruning on small graphs built inline: the sensitive group is spared, the loss
reported is the loss measured independently (onnxruntime + numpy), an unreachable tolerance
returns the least harmful cut, top-1 with labels, and bad options."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from edgecomp.data import Dataset
from edgecomp.errors import DataNeeded, NothingToPrune, OptionError
from edgecomp.io import to_proto
from edgecomp.prune.options import PruneOptions
from edgecomp.prune.tolerance import prune_to_tolerance
from tests.conftest import make_model, run_ort, vinfo

RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _two_branches(scale_a=100.0):
    """y = relu(x·Wa)·(scale_a·Va) + relu(x·Wb)·Vb: branch a's hidden neurons carry ~100x the
    output of branch b's. The Add ties the two output layers into a group that reaches the graph
    output (kept whole); the hidden layers ha and hb are the two prunable groups."""
    inits = {"wa": _w(8, 16), "va": _w(16, 4) * scale_a, "wb": _w(8, 16), "vb": _w(16, 4)}
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["ha0"], name="a1"), helper.make_node("Relu", ["ha0"], ["ha"]),
             helper.make_node("MatMul", ["ha", "va"], ["ya"], name="a2"),
             helper.make_node("MatMul", ["x", "wb"], ["hb0"], name="b1"), helper.make_node("Relu", ["hb0"], ["hb"]),
             helper.make_node("MatMul", ["hb", "vb"], ["yb"], name="b2"),
             helper.make_node("Add", ["ya", "yb"], ["y"], name="sum")]
    return make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 4])], inits)


def _classifier():
    """8 → 32 hidden neurons → 5 logits; half the neurons barely reach the logits."""
    inits = {"w1": _w(8, 32), "b1": _w(32) * 0.1, "w2": _w(32, 5) * np.repeat([1.0, 0.02], 16)[:, None].astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["logits"], name="fc2")]
    return make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("logits", ["N", 5])], inits)


def _data(tmp_path, name, n, seed):
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    np.savez(tmp_path / f"{name}.npz", x=x)
    return x, Dataset(tmp_path / f"{name}.npz")


def _params(proto):
    return sum(int(np.prod(t.dims)) for t in proto.graph.initializer)


def _checked(proto, result):
    """The result as a proto, after onnx.checker, an onnxruntime load and the parameter count."""
    out = to_proto(result.model)
    onnx.checker.check_model(out)
    run_ort(out, {"x": np.zeros((1, 8), np.float32)})
    assert _params(out) <= _params(proto)
    return out


def _cosine_loss(proto, pruned, x):
    ref = run_ort(proto, {"x": x}, disable_opt=False)[0].astype(np.float64)
    got = run_ort(pruned, {"x": x}, disable_opt=False)[0].astype(np.float64)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    return 1.0 - cos.mean()


def _row(result, layer):
    return next(r for r in result.groups if layer in r["group"])


def test_sensitive_group_is_kept_whole_and_the_loss_is_the_measured_one(tmp_path):
    proto = _two_branches()
    x, ev = _data(tmp_path, "eval", 40, 1)
    result, met = prune_to_tolerance(ir.from_proto(proto), PruneOptions(), None, ev, tolerance=1e-3)
    pruned = _checked(proto, result)
    a, b = _row(result, "a1"), _row(result, "a1".replace("a", "b"))
    assert met and result.summary["met tolerance"] is True
    assert (a["before"], a["after"]) == (16, 16) and a["status"].startswith("kept whole")
    assert a["loss at 25%"] > 1e-3  # cut alone, a quarter of branch a already costs more than allowed
    assert (b["before"], b["after"]) == (16, 4) and b["status"] == "pruned"  # branch b: its deepest level
    assert b["loss at 75%"] <= 1e-3
    loss = _cosine_loss(proto, pruned, x)
    assert loss <= 1e-3
    assert abs(loss - result.summary["loss"]) < 1e-6
    assert 0 < result.summary["evaluations"] <= 2 * 3 + 2 * 3 + 1


def test_repair_with_calibration_data_and_the_loss_is_remeasured(tmp_path):
    proto = _two_branches(scale_a=3.0)
    _, calib = _data(tmp_path, "calib", 200, 2)
    x, ev = _data(tmp_path, "eval", 40, 3)
    tol = 0.02
    result, met = prune_to_tolerance(ir.from_proto(proto), PruneOptions(), calib, ev, tolerance=tol)
    pruned = _checked(proto, result)
    assert met and result.summary["importance"] == "activation"
    assert sum(r["status"] == "pruned" for r in result.groups) >= 1
    loss = _cosine_loss(proto, pruned, x)
    assert loss <= tol and abs(loss - result.summary["loss"]) < 1e-6
    repairs = {r["layer"]: r["repair"] for r in result.layers}
    assert result.summary["repair"] or result.summary["layers repaired"] >= 1, repairs
    assert result.fidelity is not None


def test_unreachable_tolerance_returns_the_least_harmful_cut(tmp_path):
    proto = _two_branches()
    x, ev = _data(tmp_path, "eval", 20, 4)
    result, met = prune_to_tolerance(ir.from_proto(proto), PruneOptions(), None, ev, tolerance=0.0)
    pruned = _checked(proto, result)
    assert not met and result.summary["met tolerance"] is False
    assert _params(pruned) < _params(proto)
    pruned_rows = [r for r in result.groups if r["status"] == "pruned"]
    assert len(pruned_rows) == 1 and "b1" in pruned_rows[0]["group"] and pruned_rows[0]["after"] == 12
    loss = _cosine_loss(proto, pruned, x)
    assert loss > 0 and abs(loss - result.summary["loss"]) < 1e-6
    singles = [v for r in result.groups for k, v in r.items() if k.startswith("loss at") and v is not None]
    assert result.summary["loss"] == pytest.approx(min(singles), abs=1e-9)
    assert any("no cut keeps" in w for w in result.warnings)


def test_top1_with_labels(tmp_path):
    proto = _classifier()
    x, ev = _data(tmp_path, "eval", 60, 5)
    ref = run_ort(proto, {"x": x})[0].argmax(1)
    labels = ref.copy()
    labels[:6] = (labels[:6] + 1) % 5  # the unpruned model scores 90%
    tol = 0.1
    result, met = prune_to_tolerance(ir.from_proto(proto), PruneOptions(), None, ev, metric="top1", tolerance=tol,
                                     labels=labels)
    pruned = _checked(proto, result)
    got = run_ort(pruned, {"x": x})[0].argmax(1)
    drop = np.mean(ref == labels) - np.mean(got == labels)
    assert met and drop <= tol and abs(drop - result.summary["loss"]) < 1e-6
    row = _row(result, "fc1")
    assert row["status"] == "pruned" and row["after"] in (8, 16, 24)  # 32 neurons: counts rounded to 8
    assert result.summary["metric"] == "top1"


def test_nothing_to_prune(tmp_path):
    proto = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], [vinfo("x", ["N", 8])],
                       [vinfo("y", ["N", 4])], {"w": _w(8, 4)})
    _, ev = _data(tmp_path, "eval", 5, 6)
    with pytest.raises(NothingToPrune):
        prune_to_tolerance(ir.from_proto(proto), PruneOptions(), None, ev, tolerance=0.1)


@pytest.mark.parametrize("kwargs, option", [({"tolerance": -0.1}, "tolerance"), ({"tolerance": float("nan")}, "tolerance"),
                                            ({"tolerance": 0.1, "metric": "f1"}, "metric"),
                                            ({"tolerance": 0.1, "levels": (0.5, 1.0)}, "levels"),
                                            ({"tolerance": 0.1, "max_evaluations": 0}, "max_evaluations")])
def test_bad_options(tmp_path, kwargs, option):
    _, ev = _data(tmp_path, "eval", 5, 7)
    with pytest.raises(OptionError) as e:
        prune_to_tolerance(ir.from_proto(_two_branches()), PruneOptions(), None, ev, **kwargs)
    assert e.value.option == option


def test_eval_data_is_needed():
    with pytest.raises(DataNeeded) as e:
        prune_to_tolerance(ir.from_proto(_two_branches()), PruneOptions(), None, None, tolerance=0.1)
    assert e.value.key == "eval"


def test_evaluation_budget_is_respected(tmp_path):
    proto = _two_branches()
    _, ev = _data(tmp_path, "eval", 10, 8)
    result, met = prune_to_tolerance(ir.from_proto(proto), PruneOptions(), None, ev, tolerance=1e-3, max_evaluations=2)
    _checked(proto, result)
    assert result.summary["evaluations"] == 2 and any("2 evaluations" in w for w in result.warnings)
    b = _row(result, "b1")  # a1 (sensitive) and b1 at 25% measured: b1's deeper levels were never tried
    assert met and b["after"] == 12 and b["loss at 50%"] is None


# --- from the CLI and a recipe ---------------------------------------------------------------------

def test_cli_prune_tolerance_writes_the_best_model_and_exits_3_when_unmet(tmp_path):
    import json

    from click.testing import CliRunner

    from edgecomp.cli import cli
    from tests.conftest import save

    src = save(_two_branches(), tmp_path / "m.onnx")
    _data(tmp_path, "calib", 40, 1)
    _data(tmp_path, "ev", 30, 2)
    common = ["prune", str(src), "--data", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "ev.npz")]
    ok = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "ok.onnx"), "--tolerance", "0.001",
                                  "--json", str(tmp_path / "ok.json")])
    assert ok.exit_code == 0, ok.output
    summary = json.loads((tmp_path / "ok.json").read_text())["summary"]
    assert summary["met tolerance"] is True and summary["loss"] <= 0.001
    unmet = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "no.onnx"), "--tolerance", "0"])
    assert unmet.exit_code == 3, unmet.output
    assert (tmp_path / "no.onnx").exists() and "warning:" in unmet.output
    used = CliRunner().invoke(cli, ["prune", str(src), "-o", str(tmp_path / "x.onnx"), "--eval", str(tmp_path / "ev.npz")])
    assert used.exit_code == 2 and "--eval is read by --tolerance" in used.output


def test_recipe_prune_tolerance_needs_eval_before_anything_runs(tmp_path):
    from edgecomp.errors import DataError
    from edgecomp.pipeline.convert import Source, convert
    from edgecomp.pipeline.recipe import parse_recipe

    recipe = parse_recipe({"steps": [{"step": "export"}, {"step": "prune", "tolerance": 0.01, "metric": "top1"}]})
    with pytest.raises(DataError, match=r"step 2 \(prune\): tolerance 0.01 needs eval data"):
        convert(Source(spec="models.text_encoder:tiny_encoder"), recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- levels, the evaluation budget and MAC-ranked steps (#24 item 2) --------------------------------

def test_cli_levels_and_evaluation_budget_reach_the_search(tmp_path):
    import json

    from click.testing import CliRunner

    from edgecomp.cli import cli
    from tests.conftest import save

    src = save(_two_branches(), tmp_path / "m.onnx")
    _data(tmp_path, "ev", 30, 2)
    common = ["prune", str(src), "--eval", str(tmp_path / "ev.npz"), "--tolerance", "0.001"]
    res = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "a.onnx"), "--levels", "0.5,0.9",
                                   "--json", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["summary"]["search"].endswith("(50%, 90%)")
    assert {k for r in report["tables"]["groups"] for k in r if k.startswith("loss at")} == {"loss at 50%", "loss at 90%"}
    b = next(r for r in report["tables"]["groups"] if "b1" in r["group"])
    assert (b["before"], b["after"]) == (16, 2)  # branch b reaches the new 90% level
    capped = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "b.onnx"), "--max-evaluations", "1",
                                      "--json", str(tmp_path / "b.json")])
    summary = json.loads((tmp_path / "b.json").read_text())["summary"]
    assert summary["evaluations"] <= 2 and "stopped at its 1 evaluations" in capped.output  # 1 + the repair check
    for flag, value in (("--levels", "0.5"), ("--max-evaluations", "3")):
        alone = CliRunner().invoke(cli, ["prune", str(src), "-o", str(tmp_path / "c.onnx"), flag, value])
        assert alone.exit_code == 1 and alone.output.strip() == (f"Error: {flag} applies to the tolerance search only; "
                                                                 "give a tolerance (with eval data) or drop it")
    bad = CliRunner().invoke(cli, [*common, "-o", str(tmp_path / "d.onnx"), "--levels", "0.5,1.5"])
    assert bad.exit_code == 2 and "must be sparsities in (0, 1)" in bad.output


def test_steps_are_ranked_by_loss_per_mac_removed():
    from edgecomp.prune.tolerance import _Group, _step_order

    # the same loss per step; group 1 (a classifier: many parameters, few MACs) and group 2 (an
    # early conv: few parameters, many MACs)
    fc = _Group(1, [1], [(0.5, 8)], losses=[0.01], params=[9_000], macs=[990_000])
    conv = _Group(2, [2], [(0.5, 8)], losses=[0.01], params=[9_900], macs=[500_000])
    assert _step_order({1: fc, 2: conv}, 10_000, 0.1, macs0=1_000_000)[0] == (2, 1)  # 500k MACs beat 10k
    assert _step_order({1: fc, 2: conv}, 10_000, 0.1)[0] == (1, 1)  # by parameters (MACs unknown): 1k beat 100
