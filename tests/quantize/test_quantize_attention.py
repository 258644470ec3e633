"""int8 activation × activation MatMuls (attention's Q·Kᵀ and softmax·V): numerics against numpy,
the family choice, the fallback, and the QDQ form."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from edgecomp.data import Dataset
from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.quantize import quantize_model
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.quantize_static import LayerPlan, QuantizeStaticPass
from edgecomp.targets import host_isa
from tests.conftest import RoundRobinClock, make_model, run_ort, vinfo
from tests.quantize.test_quantize import _cosine_vs_float, encoder_data  # noqa: F401  (fixture)

SHAPE = [1, 2, 6, 4]  # batch, heads, sequence, head size


def _attention_core():
    """softmax(Q·Kᵀ / 2)·V with Kᵀ from a Transpose, as an exporter writes it."""
    nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2], name="k_t"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk"),
             helper.make_node("Div", ["s", "two"], ["s2"], name="scale"),
             helper.make_node("Softmax", ["s2"], ["p"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["p", "v"], ["y"], name="pv")]
    return make_model(nodes, [vinfo(n, SHAPE) for n in "qkv"], [vinfo("y", SHAPE)], {"two": np.float32(2.0)}, opset=13)


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_attention_numerics_against_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(SHAPE).astype(np.float32) for _ in range(3))
    sq, zq = 4.0 / 255, 128
    sk, sv = 3.0 / 127, 2.5 / 127
    plan = {"qk": LayerPlan("qk", "attention", "q", sq, zq, b_scale=sk),
            "pv": LayerPlan("pv", "attention", "p", 1 / 255, 0, b_scale=sv)}
    out = to_proto(run_pass(QuantizeStaticPass(plan=plan), ir.from_proto(_attention_core())).model)
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops and "Div" not in ops  # 1/2 folded
    transpose = next(n for n in out.graph.node if n.op_type == "Transpose")
    assert next(n for n in out.graph.node if transpose.input[0] in n.output).op_type == "QuantizeLinear"  # int8 moves
    got = run_ort(out, {"q": q, "k": k, "v": v})[0]

    qq = np.clip(np.round(q / np.float32(sq)) + zq, 0, 255) - zq
    kq = np.clip(np.round(k / np.float32(sk)), -128, 127)
    p = _softmax((qq @ kq.transpose(0, 1, 3, 2)) * (np.float32(sq) * np.float32(sk / 2)))
    pq = np.clip(np.round(p / np.float32(1 / 255)), 0, 255)
    vq = np.clip(np.round(v / np.float32(sv)), -128, 127)
    want = (pq @ vq) * (np.float32(1 / 255) * np.float32(sv))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    ref = _softmax(q @ k.transpose(0, 1, 3, 2) / 2) @ v
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.99


def test_a_scale_that_is_not_a_constant_scalar_stays_a_node():
    m = _attention_core()
    m.graph.node[2].input[1] = "q"  # Div by an activation: nothing to fold
    plan = {"qk": LayerPlan("qk", "attention", "q", 4.0 / 255, 128, b_scale=3.0 / 127)}
    out = to_proto(run_pass(QuantizeStaticPass(plan=plan), ir.from_proto(m)).model)
    ops = [n.op_type for n in out.graph.node]
    assert "Div" in ops and ops.count("MatMulIntegerToFloat") == 1
    onnx.checker.check_model(out)


def _quantize(path, calib, **kw):
    extra = {k: kw.pop(k) for k in ("eval_data",) if k in kw}
    return quantize_model(ir.load(str(path)), Dataset(calib),
                          QuantizeOptions(**{"families": "all", "isa": host_isa(), "embeddings": False, **kw}), **extra)


def _attention_rows(res):
    return [r for r in res.rows if r.get("family") == "attention"]


def test_tiny_encoder_end_to_end(tiny_encoder_path, encoder_data):  # noqa: F811
    calib, ev = encoder_data
    res = _quantize(tiny_encoder_path, calib, families="attention")
    proto = to_proto(res.model)
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMulIntegerToFloat") == 4 and ops.count("MatMul") == 12  # 2 layers x (Q·Kᵀ, P·V)
    assert _cosine_vs_float(tiny_encoder_path, res.model, ev) > 0.99
    rows = _attention_rows(res)
    assert len(rows) == 4 and all(r["decision"] == "int8" for r in rows)
    pv = [p for p in res.plan.values() if "softmax" in next(r["act range"] for r in rows if r["layer"] == p.node)]
    assert len(pv) == 2 and all(p.act_zp == 0 and p.act_scale == pytest.approx(1 / 255) for p in pv)
    assert res.families == [{"families": "attention", "decision": "int8", "reason": "--families"}]
    both = _quantize(tiny_encoder_path, calib)
    assert [n.op_type for n in to_proto(both.model).graph.node].count("MatMulIntegerToFloat") == 16
    assert _cosine_vs_float(tiny_encoder_path, both.model, ev) > 0.99


def test_qdq_form_keeps_float_matmuls_between_qdq_pairs(tiny_encoder_path, encoder_data):  # noqa: F811
    calib, ev = encoder_data
    res = _quantize(tiny_encoder_path, calib, families="attention", format="qdq")
    proto = to_proto(res.model)
    onnx.checker.check_model(proto)
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}
    producer = {o: n for n in proto.graph.node for o in n.output}
    attention = [n for n in proto.graph.node if n.name in {r["layer"] for r in _attention_rows(res)}]
    assert len(attention) == 4 and all(n.op_type == "MatMul" for n in attention)
    assert all(producer[i].op_type == "DequantizeLinear" for n in attention for i in n.input)
    assert _cosine_vs_float(tiny_encoder_path, res.model, ev) > 0.99


def test_equal_timings_keep_attention_float_and_a_gain_is_taken(tiny_encoder_path, encoder_data, monkeypatch):  # noqa: F811
    from edgecomp.measure import bench

    calib, _ = encoder_data
    real = bench.compare_latency

    def clocked(durations):  # per variant: float, matmul, attention, matmul+attention
        def compare(models, feed, **kw):
            assert len(models) == 4
            kw["timer"] = RoundRobinClock(durations)
            return real(models, feed, **kw)
        return compare

    monkeypatch.setattr(bench, "compare_latency", clocked([1.0, 1.0, 1.0, 1.0]))
    res = _quantize(tiny_encoder_path, calib, families="auto")
    assert not res.plan and all(r["decision"] == "float" for r in _attention_rows(res))
    assert [r["families"] for r in res.families] == ["matmul", "attention", "matmul,attention"]
    monkeypatch.setattr(bench, "compare_latency", clocked([1.0, 1.0, 0.6, 1.0]))
    res = _quantize(tiny_encoder_path, calib, families="auto")
    assert {p.kind for p in res.plan.values()} <= {"attention"}
    assert next(r for r in res.families if r["decision"] == "chosen")["families"] == "attention"
    # auto also keeps float each product whose simulated error exceeds the worst weight layer's
    worst = max(r["sim error"] for r in res.rows if r.get("family") == "matmul")
    for r in _attention_rows(res):
        assert (r["decision"] == "int8") == (r["sim error"] <= worst)
        if r["decision"] == "float":
            assert r["reason"].startswith("simulated int8 error")


def test_fidelity_fallback_can_keep_an_attention_matmul_float(tiny_encoder_path, encoder_data):  # noqa: F811
    calib, _ = encoder_data
    res = _quantize(tiny_encoder_path, calib, families="attention", min_cosine=0.9999999)
    kept = [r for r in _attention_rows(res) if r["reason"].startswith("among the most sensitive")]
    assert kept and all(r["decision"] == "float" and r["layer"] not in res.plan for r in kept)
    assert all(r.get("sensitivity") is not None for r in _attention_rows(res))


def test_simulated_error_matches_numpy():
    from edgecomp.quantize.attention import simulate_attention
    from edgecomp.quantize.layers import find_layers

    rng = np.random.default_rng(2)
    feed = {n: rng.standard_normal(SHAPE).astype(np.float32) for n in "qkv"}
    model = ir.from_proto(_attention_core())
    layers, _ = find_layers(model)
    assert [(l.node, l.family, l.act, l.act_b) for l in layers] == [("qk", "attention", "q", "kt"),
                                                                     ("pv", "attention", "p", "v")]
    plan = {"qk": LayerPlan("qk", "attention", "q", 4.0 / 255, 128, b_scale=3.0 / 127),
            "pv": LayerPlan("pv", "attention", "p", 1 / 255, 0, b_scale=2.5 / 127)}
    got = simulate_attention(model, layers, plan, [feed])
    q, kt, v = feed["q"], feed["k"].transpose(0, 1, 3, 2), feed["v"]
    p = _softmax(q @ kt / 2)

    def rel(a, sa, za, b, sb):
        aq = (np.clip(np.round(a / sa) + za, 0, 255) - za) * sa
        bq = np.clip(np.round(b / sb), -127, 127) * sb
        return float(((aq @ bq - a @ b) ** 2).sum() / ((a @ b) ** 2).sum())

    assert got["qk"] == pytest.approx(rel(q, 4.0 / 255, 128, kt, 3.0 / 127), rel=1e-3)
    assert got["pv"] == pytest.approx(rel(p, 1 / 255, 0, v, 2.5 / 127), rel=1e-3)
    assert 0 < got["qk"] < 0.01 and 0 < got["pv"] < 0.05
