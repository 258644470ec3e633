"""The loss bound of the tolerance searches: an evaluator whose outputs are fixed arrays, so every
per-sample loss is known, against numpy (and scipy's t / normal quantiles as the reference); the
warning for small eval sets only; and the bound in the quantize and prune tolerance reports."""

import math

import numpy as np
import onnx_ir as ir
import pytest

from edgecomp.measure.evaluate import Evaluator
from edgecomp.measure.metrics import MIN_EVAL_SAMPLES, loss_bound, t_quantile, wilson_upper

stats = pytest.importorskip("scipy.stats")
RNG = np.random.default_rng(7)


class _Fixed(Evaluator):
    """An Evaluator whose 'models' are keys of a table of outputs (one array per eval feed)."""

    def __init__(self, table: dict, metric: str, labels=None):
        self.table = table
        super().__init__("ref", [{}] * len(table["ref"]), metric, labels, 1)

    def _outputs(self, model):
        return self.table[model]


def _t_upper(losses):
    n = len(losses)
    return losses.mean() + stats.t.ppf(0.95, n - 1) * losses.std(ddof=1) / math.sqrt(n)


def _wilson(k, n):
    z = stats.norm.ppf(0.95)
    p = k / n
    return (p + z**2 / (2 * n) + z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))) / (1 + z**2 / n)


@pytest.mark.parametrize("df", [1, 2, 7, 15, 99, 149, 5000])
def test_t_quantile_matches_scipy(df):
    assert t_quantile(0.95, df) == pytest.approx(stats.t.ppf(0.95, df), abs=1e-10)
    assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-10)


@pytest.mark.parametrize("n", [16, 150])
def test_cosine_bound_is_the_t_bound_of_the_per_sample_losses(n):
    ref = [RNG.standard_normal((1, 10)) for _ in range(n)]
    got = [r + RNG.standard_normal((1, 10)) * RNG.uniform(0.01, 0.3) for r in ref]
    est = _Fixed({"ref": ref, "cand": got}, "cosine").estimate("cand")
    a, b = np.concatenate(ref), np.concatenate(got)
    losses = 1 - (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert est.n == n
    assert est.loss == pytest.approx(losses.mean(), abs=1e-9)
    assert est.upper == pytest.approx(_t_upper(losses), abs=1e-9)


def test_mae_bound_is_per_feed():
    ref = [RNG.standard_normal((1, 6)) for _ in range(40)]
    got = [r + RNG.standard_normal((1, 6)) * 0.05 for r in ref]
    est = _Fixed({"ref": ref, "cand": got}, "mae").estimate("cand")
    losses = np.array([np.abs(r - g).mean() for r, g in zip(ref, got)])
    assert (est.n, est.loss) == (40, pytest.approx(losses.mean(), abs=1e-12))
    assert est.upper == pytest.approx(_t_upper(losses), abs=1e-9)


def test_top1_bound_is_wilson_on_the_samples_lost():
    n, lost = 60, [3, 17, 41]
    ref = [np.eye(5)[[i % 5]] for i in range(n)]
    got = [np.eye(5)[[(i + 1) % 5]] if i in lost else r for i, r in enumerate(ref)]
    est = _Fixed({"ref": ref, "cand": got}, "top1").estimate("cand")
    assert (est.n, est.loss) == (n, pytest.approx(3 / n, abs=1e-12))
    assert est.upper == pytest.approx(_wilson(3, n), abs=1e-9)
    # with labels: only samples the float model had right and the candidate has wrong count as lost
    labels = np.array([i % 5 for i in range(n)])
    labels[17] = 4  # the float model was already wrong on sample 17
    est = _Fixed({"ref": ref, "cand": got}, "top1", labels).estimate("cand")
    assert est.loss == pytest.approx(2 / n, abs=1e-12) and est.upper == pytest.approx(_wilson(2, n), abs=1e-9)
    assert wilson_upper(0, 100) == pytest.approx(_wilson(0, 100), abs=1e-12)


def test_warning_for_small_eval_sets_only():
    small = loss_bound("cosine", np.full(16, 1e-4) + RNG.uniform(0, 1e-5, 16), 1e-4)
    large = loss_bound("cosine", np.full(400, 1e-4) + RNG.uniform(0, 1e-5, 400), 1e-4)
    assert small.upper < 0.01 and large.upper < 0.01
    assert "only 16 eval samples" in small.warning(0.01) and "exceeds" not in small.warning(0.01)
    assert large.warning(0.01) is None
    # many samples, but the bound past the tolerance: a warning too (met is still the measured value)
    losses = RNG.exponential(0.009, 400)
    spread, tol = loss_bound("cosine", losses, losses.mean()), round(losses.mean() * 1.02, 6)
    assert spread.loss < tol < spread.upper and f"exceeds the tolerance {tol:g}" in spread.warning(tol)
    assert loss_bound("top1", np.zeros(MIN_EVAL_SAMPLES), 0.0).warning(0.05) is None


def test_quantize_and_prune_tolerance_report_the_bound(tmp_path):
    from onnx import helper

    from edgecomp.data import Dataset
    from edgecomp.prune.options import PruneOptions
    from edgecomp.prune.tolerance import prune_to_tolerance
    from edgecomp.quantize import quantize_model
    from edgecomp.quantize.options import QuantizeOptions
    from tests.conftest import make_model, vinfo

    w = RNG.standard_normal((8, 16)).astype(np.float32)
    v = RNG.standard_normal((16, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"], name="fc1"), helper.make_node("Relu", ["h0"], ["h"]),
             helper.make_node("MatMul", ["h", "v"], ["y"], name="fc2")]
    proto = make_model(nodes, [vinfo("x", ["N", 8])], [vinfo("y", ["N", 4])], {"w": w, "v": v})
    np.savez(tmp_path / "calib.npz", x=RNG.standard_normal((64, 8)).astype(np.float32))
    np.savez(tmp_path / "eval.npz", x=RNG.standard_normal((12, 8)).astype(np.float32))
    calib, ev = Dataset(tmp_path / "calib.npz"), Dataset(tmp_path / "eval.npz")
    res = quantize_model(ir.from_proto(proto), calib, QuantizeOptions(families="all", tolerance=0.05), eval_data=ev)
    assert res.summary["eval samples"] == 12 and res.summary["loss 95% upper bound"] >= res.summary["loss"]
    assert sum("only 12 eval samples" in w for w in res.warnings) == 1
    pruned, _ = prune_to_tolerance(ir.from_proto(proto), PruneOptions(), None, ev, tolerance=0.05)
    assert pruned.summary["eval samples"] == 12 and pruned.summary["loss 95% upper bound"] >= pruned.summary["loss"]
    assert sum("only 12 eval samples" in w for w in pruned.warnings) == 1
