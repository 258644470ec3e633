"""One-ulp rounding sensitivity of int8 attention products, and the choice that follows it."""

import numpy as np
import onnx_ir as ir
import pytest

from edgecomp.quantize.attention_rounding import (
    AttentionDrift,
    _ulps,
    attention_drift,
    keep_stable_attention,
    quantizer_inputs,
)
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_static import LayerPlan
from tests.quantize.test_quantize import encoder_data  # noqa: F401  (fixture)
from tests.quantize.test_quantize_attention import SHAPE, _attention_core, _quantize

# Q on a grid of step 0.25 (a power of two: q / s is exact in float32) at half steps: every code of Q
# is a rounding tie, so one ulp up or down flips it; P's codes are generic softmax values
Q_SCALE = 0.25


def _plan():
    return {"qk": LayerPlan("qk", "attention", "q", Q_SCALE, 128, b_scale=3.0 / 127),
            "pv": LayerPlan("pv", "attention", "p", 1 / 255, 0, b_scale=2.5 / 127)}


def _feeds(n=4):
    rng = np.random.default_rng(1)
    feeds = []
    for _ in range(n):
        q = (rng.integers(-6, 6, SHAPE) + 0.5).astype(np.float32) * np.float32(Q_SCALE)
        k, v = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(2))
        feeds.append({"q": q, "k": k, "v": v})
    return feeds


def _model():
    return ir.from_proto(_attention_core())


def test_ulps_move_each_element_one_ulp_either_way():
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    y = _ulps(x, np.random.default_rng(0), 1)
    up, down = y == np.nextafter(x, np.float32(np.inf)), y == np.nextafter(x, np.float32(-np.inf))
    assert y.dtype == np.float32 and (up | down).all() and 0.4 < up.mean() < 0.6
    assert (_ulps(x, np.random.default_rng(0), 0) == x).all()


def test_quantizers_of_each_product_are_found_above_moves():
    built = build(_model(), _plan())
    qk = quantizer_inputs(built.graph, "qk")
    assert sorted(q.inputs[0].name for q in qk) == ["k", "q"]  # K's quantizer sits above its Transpose
    assert [q.inputs[0].name for q in quantizer_inputs(built.graph, "pv")] == ["p", "v"]
    assert quantizer_inputs(built.graph, "softmax") == []


def test_zero_ulps_measure_no_drift():
    built = build(_model(), _plan())
    drift = attention_drift(built, ["qk", "pv"], _feeds(), ulps=0)
    assert set(drift) == {"qk", "pv"} and max(drift.values()) < 1e-12


def test_a_product_on_rounding_ties_drifts_most_and_the_choice_follows_the_threshold():
    model, plan, feeds = _model(), _plan(), _feeds()
    drift = attention_drift(build(model, plan), ["qk", "pv"], feeds)
    assert drift["qk"] > 1e-4  # every Q code flips one step with probability 1/2
    assert drift["qk"] > 10 * drift["pv"]
    # a budget whose share lies between the two: Q·Kᵀ float, softmax·V int8
    budget = (drift["qk"] * drift["pv"]) ** 0.5 / 0.1 if drift["pv"] > 0 else drift["qk"] / 0.2
    kept, result = keep_stable_attention(model, plan, feeds, budget, share=0.1)
    assert set(kept) == {"pv"} and result.unstable() == ["qk"]
    rows = {r["product"]: r for r in result.rows()}
    assert rows["qk"]["decision"] == "float" and rows["pv"]["decision"] == "int8"
    assert rows["qk"]["1-ulp drift (1-cos)"] == pytest.approx(drift["qk"])
    # a generous budget keeps both; a budget of zero keeps only what does not move at all
    assert set(keep_stable_attention(model, plan, feeds, 1.0)[0]) == {"qk", "pv"}
    assert set(keep_stable_attention(model, plan, feeds, 0.0)[0]) == {n for n, d in drift.items() if d == 0}


def test_a_plan_without_attention_products_is_not_measured():
    plan = {"x": LayerPlan("x", "matmul", "a", 0.1, 0)}
    kept, result = keep_stable_attention(_model(), plan, _feeds(), 0.01)
    assert kept == plan and result is None


def test_describe_names_the_worst_product():
    d = AttentionDrift({"a": 1e-3, "b": 1e-6}, budget=0.001)
    assert d.unstable() == ["a"] and "largest one-ulp drift 0.001" in d.describe() and "(1-cos, a)" in d.describe()


def test_quantize_reports_the_drift_of_every_int8_attention_product(tiny_encoder_path, encoder_data):  # noqa: F811
    from edgecomp.quantize.step import step_result

    calib, _ = encoder_data
    res = _quantize(tiny_encoder_path, calib, families="attention")
    int8 = {r["layer"] for r in res.rows if r.get("family") == "attention" and r["decision"] == "int8"}
    table = res.attention_rounding
    assert {r["product"] for r in table} >= int8 and len(table) == 4
    assert all(r["1-ulp drift (1-cos)"] >= 0 for r in table)
    assert "int8 attention product(s)" in res.summary["attention rounding"]
    assert step_result(res).tables["attention rounding"] == table


def test_the_budget_is_a_cosine_loss_whatever_the_metric():
    from edgecomp.quantize.attention_rounding import drift_budget

    assert drift_budget(0.002, "cosine", 0.99) == 0.002
    assert drift_budget(0.01, "top1", 0.99) == pytest.approx(0.01)  # accuracy points are not a cosine: the floor
    assert drift_budget(5.0, "mae", 0.995) == pytest.approx(0.005)
    assert drift_budget(None, "cosine", None) is None and drift_budget(0.1, "mae", None) is None
