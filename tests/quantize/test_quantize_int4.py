"""int4 weights chosen per layer inside quantize (edgecomp.quantize.int4): the codes against numpy,
the choice against the fidelity bound, the written model against onnxruntime and the checker."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper

from edgecomp.data import Dataset
from edgecomp.errors import OptionError
from edgecomp.io import to_proto
from edgecomp.quantize import quantize_model
from edgecomp.quantize.int4 import clip_codes, gptq_codes, output_error, rtn_codes
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.quantize_matmul_nbits import dequantize_blocks_4bit, quantize_blocks_4bit
from edgecomp.targets import host_isa
from tests.conftest import make_model, run_ort, vinfo

D = 64
AMP = 4.0  # fc2 alone in int4: cosine 0.970; int8 0.997; fc1 or fc3 alone in int4: 0.994, 0.991 (measured)


def _mlp(sensitive: bool = False, seed: int = 0):
    """x[N,64] -> fc1 -> Relu -> fc2 -> [Relu] -> fc3 -> y. ``sensitive``: fc2 is rank 4 and fc3
    amplifies (AMP times) what lies outside fc2's output space, so weight noise in fc2 — small in int8
    (255 levels a column), large in int4 (16 levels a block) — reaches the output magnified,
    whatever codes are chosen for fc2 alone; fc1's and fc3's noise is not magnified."""
    rng = np.random.default_rng(seed)
    inits = {f"w{i}": (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32) for i in (1, 2, 3)}
    if sensitive:
        inits["w2"] = (rng.standard_normal((D, 4)) @ rng.standard_normal((4, D)) / D).astype(np.float32)
        q = np.linalg.svd(inits["w2"])[2][:4].T  # an orthonormal basis of fc2's output space
        sub = q @ q.T
        inits["w3"] = (sub + AMP * (np.eye(D) - sub)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a1"], name="fc1"), helper.make_node("Relu", ["a1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "w2"], ["a2"], name="fc2"),
             helper.make_node("Identity" if sensitive else "Relu", ["a2"], ["h2"]),
             helper.make_node("MatMul", ["h2", "w3"], ["y"], name="fc3")]
    return make_model(nodes, [vinfo("x", ["N", D])], [vinfo("y", ["N", D])], inits, opset=17)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    d = tmp_path_factory.mktemp("int4calib")
    rng = np.random.default_rng(1)
    for i in range(12):
        np.savez(d / f"{i:02d}.npz", x=rng.standard_normal((16, D)).astype(np.float32))
    return d


def _quantize(proto, calib, eval_data=None, **kw):
    opts = QuantizeOptions(**{"families": "all", "isa": host_isa(), "smooth": "off", "int4_compute": "nbits", **kw})
    return quantize_model(ir.from_proto(proto), Dataset(calib), opts, eval_data=eval_data)


def _lowest_cosine(proto_ref, proto, calib):
    """Mean cosine over the odd calibration samples (those the int4 codes were not fitted to)."""
    cos = []
    for feed in list(Dataset(calib))[1::2]:
        a, b = (run_ort(p, feed)[0].astype(np.float64).ravel() for p in (proto_ref, proto))
        cos.append(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
    return float(np.mean(cos))


def test_codes_match_the_stored_layout_and_gptq_beats_rtn_on_correlated_inputs():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((96, 20)).astype(np.float32)
    c = rtn_codes(w, 32)
    for got, want in zip(c.packed(), quantize_blocks_4bit(w, 32)):  # the existing RTN pass, bit for bit
        np.testing.assert_array_equal(got, want)
    x = rng.standard_normal((400, 12)) @ rng.standard_normal((12, 96)) + 0.1 * rng.standard_normal((400, 96))
    h_fit, h_check = x[::2].T @ x[::2], x[1::2].T @ x[1::2]
    for codes in (clip_codes(w, 32, h_fit), gptq_codes(w, 32, h_fit)):
        np.testing.assert_allclose(dequantize_blocks_4bit(*codes.packed(), 96), codes.dequantize(), atol=1e-6)
        assert codes.q.max() <= 15
    # the error is ‖X(W - Ŵ)‖² / ‖XW‖² on the held-out rows
    w_hat = gptq_codes(w, 32, h_fit).dequantize()
    direct = np.linalg.norm(x[1::2] @ (w - w_hat)) ** 2 / np.linalg.norm(x[1::2] @ w) ** 2
    assert output_error(w, w_hat, h_check) == pytest.approx(direct, rel=1e-6)
    errs = {m: output_error(w, c.dequantize(), h_check)
            for m, c in (("rtn", rtn_codes(w, 32)), ("gptq", gptq_codes(w, 32, h_fit)))}
    assert errs["gptq"] < 0.5 * errs["rtn"]  # measured: about 0.1x on this low-rank input


def test_int4_auto_converts_within_the_bound_and_keeps_the_sensitive_layer_int8(calib):
    proto = _mlp(sensitive=True)
    int8 = _quantize(proto, calib, min_cosine=0.985)
    res = _quantize(proto, calib, min_cosine=0.985, int4="auto")
    decisions = {r["layer"]: r["decision"] for r in res.rows}
    assert decisions["fc2"] == "int8", res.rows  # its int4 noise, magnified by fc3, breaks the bound
    assert "int4" in decisions.values()
    assert set(res.summary["int4 layers"].split(", ")) == {n for n, d in decisions.items() if d == "int4"}
    out = to_proto(res.model)
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("MatMulNBits") == list(decisions.values()).count("int4")
    assert out.ByteSize() < to_proto(int8.model).ByteSize()
    lowest = _lowest_cosine(proto, out, calib)
    assert lowest >= 0.985
    assert f"lowest output cosine {lowest:.4f}" in res.summary["int4"]  # the report states what was measured
    # fc2 in int4, measured directly, does break it
    forced = _quantize(proto, calib, min_cosine=0.985, int4="fc2")
    assert _lowest_cosine(proto, to_proto(forced.model), calib) < 0.985
    assert "not met" in forced.summary["int4"]


def test_regex_selection_is_honoured_and_off_writes_no_int4(calib):
    proto = _mlp()
    res = _quantize(proto, calib, int4="fc1,fc3$")
    assert {r["layer"]: r["decision"] for r in res.rows} == {"fc1": "int4", "fc2": "int8", "fc3": "int4"}
    out = to_proto(res.model)
    nbits = [n for n in out.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 2
    # the stored codes are the fitted ones: their output error on the calibration rows (fc1 reads x),
    # in numpy, is no worse than round-to-nearest's
    inits = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    fc1 = next(n for n in nbits if n.name.startswith("fc1"))
    w1_hat = dequantize_blocks_4bit(*(inits[n] for n in fc1.input[1:4]), D)
    w1 = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w1"))
    x = np.concatenate([f["x"] for f in Dataset(calib)])
    rel = np.linalg.norm(x @ (w1 - w1_hat)) ** 2 / np.linalg.norm(x @ w1) ** 2
    rtn = np.linalg.norm(x @ (w1 - rtn_codes(w1, 32).dequantize())) ** 2 / np.linalg.norm(x @ w1) ** 2
    assert rel <= 1.05 * rtn and rel < 0.02
    assert "MatMulNBits" not in [n.op_type for n in to_proto(_quantize(proto, calib).model).graph.node]


def test_int4_options_are_checked():
    with pytest.raises(OptionError, match="int4.*format contrib"):
        QuantizeOptions(int4="auto", format="qdq").validate()
    with pytest.raises(OptionError, match="int4_block.*power of two"):
        QuantizeOptions(int4="auto", int4_block=24).validate()
    with pytest.raises(OptionError, match="int4"):
        QuantizeOptions(int4="fc[").validate()


def test_with_a_tolerance_the_bound_is_the_eval_loss(calib, tmp_path):
    proto = _mlp(sensitive=True)
    rng = np.random.default_rng(5)
    for i in range(8):
        np.savez(tmp_path / f"{i:02d}.npz", x=rng.standard_normal((16, D)).astype(np.float32))
    res = _quantize(proto, calib, int4="auto", tolerance=0.015, eval_data=Dataset(tmp_path))
    decisions = {r["layer"]: r["decision"] for r in res.rows}
    assert decisions["fc2"] == "int8" and "int4" in decisions.values()
    # the loss quantize states is 1 - mean cosine of the first output on the eval samples, recomputed here
    out = to_proto(res.model)
    cos = []
    for feed in Dataset(tmp_path):
        a, b = run_ort(proto, feed)[0].astype(np.float64), run_ort(out, feed)[0].astype(np.float64)
        cos += list((a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1))
    loss = 1.0 - float(np.mean(cos))
    assert loss <= 0.015
    assert f"loss {loss:.4g}" in res.summary["int4"] and "on eval data" in res.summary["int4"]
