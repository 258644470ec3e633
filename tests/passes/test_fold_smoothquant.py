"""FoldSmoothQuantPass: SmoothQuant's Mul(x, 1/s) before QuantizeLinear folded into a pre-LN
LayerNorm's γ/β and into the value projection of an attention context; the folded graph computes
the same float tensor as the unfolded one (within 1e-6 relative), and the cases that cannot fold
(a LayerNorm output also read by the residual Add, a Mul after GELU, an int8 attention product,
Transposes that move the head axis) are left alone with the reason."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.passes.fold_smoothquant import FoldSmoothQuantPass
from tests.conftest import make_model, run_ort, vinfo

N, H, D, S = 8, 2, 4, 5
RNG = np.random.default_rng(0)
C = (RNG.uniform(0.3, 3.0, N)).astype(np.float32)  # the smoothing Mul's constant (1/s)


def _quantized_tail(src: str) -> list:
    """src -> Mul(C) -> QuantizeLinear -> DequantizeLinear -> y (what the quantizer emits)."""
    return [helper.make_node("Mul", [src, "c"], ["smoothed"], name="smooth"),
            helper.make_node("QuantizeLinear", ["smoothed", "qs", "qz"], ["q"], name="quant"),
            helper.make_node("DequantizeLinear", ["q", "qs", "qz"], ["y"], name="dequant")]


def _tail_inits() -> dict:
    return {"c": C, "qs": np.float32(0.02), "qz": np.uint8(128)}


def _layernorm_model(residual: bool) -> onnx.ModelProto:
    """x -> LayerNorm -> smoothing tail (and, with ``residual``, LN + x as a second output)."""
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln", axis=-1),
             helper.make_node("Shape", ["ln"], ["ln_shape"], name="shape")] + _quantized_tail("ln")
    outputs = [vinfo("y", [1, S, N]), vinfo("ln_shape", [3], TensorProto.INT64)]
    if residual:
        nodes.append(helper.make_node("Add", ["ln", "x"], ["res"], name="residual"))
        outputs.append(vinfo("res", [1, S, N]))
    inits = {"gamma": RNG.standard_normal(N).astype(np.float32), "beta": RNG.standard_normal(N).astype(np.float32),
             **_tail_inits()}
    return make_model(nodes, [vinfo("x", [1, S, N])], outputs, inits)


def _attention_model(*, int8_value: bool = False, perm=(0, 2, 1, 3), int8_product: bool = False) -> onnx.ModelProto:
    """x[1,S,N] -> value projection -> Reshape [b, s, -1, D] (from Shape) -> Transpose -> MatMul(P, ·)
    -> Transpose -> Reshape [b, s, -1] -> smoothing tail; P[1,H,S,S] is a graph input."""
    wv = RNG.standard_normal((N, N)).astype(np.float32)
    bv = RNG.standard_normal(N).astype(np.float32)
    inits = {"bv": bv, "d": np.array([D], np.int64), "m1": np.array([-1], np.int64), "i0": np.array([0], np.int64),
             "i1": np.array([1], np.int64), **_tail_inits()}
    if int8_value:
        wq = RNG.integers(-127, 128, (N, N)).astype(np.int8)
        inits.update(wq=wq, ws=RNG.uniform(0.01, 0.02, N).astype(np.float32), wz=np.zeros(N, np.int8),
                     xs=np.float32(0.03), xz=np.uint8(128))
        proj = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
                helper.make_node("MatMulIntegerToFloat", ["xq", "wq", "xs", "ws", "xz", "wz", "bv"], ["v"],
                                 domain="com.microsoft", name="value")]
    else:
        inits["wv"] = wv
        proj = [helper.make_node("MatMul", ["x", "wv"], ["v0"], name="value"),
                helper.make_node("Add", ["v0", "bv"], ["v"], name="value_bias")]
    shape = [helper.make_node("Shape", ["x"], ["xshape"]),
             helper.make_node("Gather", ["xshape", "i0"], ["b"], axis=0),
             helper.make_node("Gather", ["xshape", "i1"], ["s"], axis=0),
             helper.make_node("Concat", ["b", "s", "m1", "d"], ["split"], axis=0),
             helper.make_node("Concat", ["b", "s", "m1"], ["merge"], axis=0)]
    if int8_product:
        inits.update(ps=np.float32(1 / 255), pz=np.uint8(0), vs=np.float32(0.05), vz=np.int8(0))
        product = [helper.make_node("QuantizeLinear", ["p", "ps", "pz"], ["pq"]),
                   helper.make_node("QuantizeLinear", ["vt", "vs", "vz"], ["vq"]),
                   helper.make_node("MatMulIntegerToFloat", ["pq", "vq", "ps", "vs", "pz", "vz"], ["ctx"],
                                    domain="com.microsoft")]
    else:
        product = [helper.make_node("MatMul", ["p", "vt"], ["ctx"], name="product")]
    nodes = proj + shape + [helper.make_node("Reshape", ["v", "split"], ["v4"]),
                            helper.make_node("Transpose", ["v4"], ["vt"], perm=list(perm))] + product + [
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=list(np.argsort(perm))),
        helper.make_node("Reshape", ["ctx_t", "merge"], ["ctx3"])] + _quantized_tail("ctx3")
    return make_model(nodes, [vinfo("x", [1, S, N]), vinfo("p", [1, H, S, S])], [vinfo("y", [1, S, N])], inits,
                      extra_opsets=[helper.make_opsetid("com.microsoft", 1)])


def _quantized_input(proto: onnx.ModelProto, feed: dict) -> np.ndarray:
    """The float tensor the QuantizeLinear reads (the value the fold must keep)."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    q = next(n for n in m.graph.node if n.name == "quant")
    m.graph.output.append(helper.make_tensor_value_info(q.input[0], TensorProto.FLOAT, None))
    return run_ort(m, feed)[-1]


def _fold(proto: onnx.ModelProto):
    model = ir.from_proto(proto)
    report = run_pass(FoldSmoothQuantPass(), model)
    return report, to_proto(model)


def _feed(attention: bool) -> dict:
    feed = {"x": RNG.standard_normal((1, S, N)).astype(np.float32)}
    if attention:
        logits = RNG.standard_normal((1, H, S, S)).astype(np.float32)
        feed["p"] = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    return feed


def _assert_same(before: onnx.ModelProto, after: onnx.ModelProto, feed: dict) -> None:
    ref, got = _quantized_input(before, feed), _quantized_input(after, feed)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_layernorm_fold_is_exact_and_removes_the_mul():
    proto = _layernorm_model(residual=False)
    report, folded = _fold(proto)
    assert report.modified and report.summary == {"folded": 1, "kept": 0}
    assert "Mul" not in {n.op_type for n in folded.graph.node}
    onnx.checker.check_model(folded)
    feed = _feed(attention=False)
    _assert_same(proto, folded, feed)
    # the quantized output too: the same codes (the float input agrees to rounding)
    np.testing.assert_allclose(run_ort(folded, feed)[0], run_ort(proto, feed)[0], atol=0.02 + 1e-6)


def test_layernorm_read_by_a_residual_add_is_left_alone():
    proto = _layernorm_model(residual=True)
    report, folded = _fold(proto)
    assert not report.modified
    assert "Add 'residual'" in report.rows[0]["reason"]
    assert sum(n.op_type == "Mul" for n in folded.graph.node) == 1


@pytest.mark.parametrize("int8_value", [False, True], ids=["float-value", "int8-value"])
def test_value_projection_fold_is_exact(int8_value):
    proto = _attention_model(int8_value=int8_value)
    report, folded = _fold(proto)
    assert report.summary == {"folded": 1, "kept": 0}, report.rows
    assert report.rows[0]["into"] == "value projection"
    assert "Mul" not in {n.op_type for n in folded.graph.node}
    _assert_same(proto, folded, _feed(attention=True))


@pytest.mark.parametrize("kwargs, reason", [
    ({"int8_product": True}, "int8 attention product"),
    # the product contracts over the head_dim axis: channels mix (the graph is not run, only matched)
    ({"perm": (0, 2, 3, 1)}, "do not keep the head channels in place"),
])
def test_value_projection_left_alone(kwargs, reason):
    proto = _attention_model(**kwargs)
    report, folded = _fold(proto)
    assert not report.modified and reason in report.rows[0]["reason"]
    assert sum(n.op_type == "Mul" for n in folded.graph.node) == 1


def test_mul_after_gelu_stays():
    nodes = [helper.make_node("Gelu", ["x"], ["g"], name="gelu")] + _quantized_tail("g")
    proto = make_model(nodes, [vinfo("x", [1, S, N])], [vinfo("y", [1, S, N])], _tail_inits(), opset=20)
    report, _ = _fold(proto)
    assert not report.modified and "Gelu" in report.rows[0]["reason"]
