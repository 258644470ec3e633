"""The default QDQ form is the contrib form's computation in ai.onnx ops: no output grids, a MatMul's
bias stored with the output's rank so onnxruntime's MatMulAddFusion leaves the MatMul to its int8
fusion (MatMulIntegerToFloat, as many as the contrib form has), the outputs those of the contrib
form, and one layer against a numpy quantize/dequantize chain."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from edgecomp.data import Dataset
from edgecomp.errors import OptionError
from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.quantize import quantize_model
from edgecomp.quantize.options import QuantizeOptions
from edgecomp.quantize.quantize_static import LayerPlan, QuantizeStaticPass, quantize_weight
from edgecomp.targets import host_isa
from tests.conftest import make_model, run_ort, vinfo, write_token_files


def _ort_optimized_ops(proto: onnx.ModelProto, tmp_path) -> list[str]:
    """The op types onnxruntime runs after its default (all) optimizations."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def _big_floats(proto: onnx.ModelProto) -> list[tuple[int, ...]]:
    return sorted(tuple(t.dims) for t in proto.graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 64 * 64)


@pytest.fixture(scope="module")
def encoder_forms(tmp_path_factory, tiny_encoder_path):
    rng = np.random.default_rng(3)
    tokens = write_token_files(tmp_path_factory.mktemp("qdq_form"), 12, rng)
    forms = {}
    for fmt in ("qdq", "contrib"):
        # int8 tables asked for (--embeddings): the table decision (timing, fidelity) is not what is compared here
        opts = QuantizeOptions(families="all", isa=host_isa(), format=fmt, embeddings=True)
        forms[fmt] = to_proto(quantize_model(ir.load(str(tiny_encoder_path)), Dataset(tokens), opts).model)
    return forms, list(Dataset(tokens))[:4]


def test_default_qdq_form_fuses_like_the_contrib_form(encoder_forms, tmp_path):
    (forms, feeds) = encoder_forms
    qdq, contrib = forms["qdq"], forms["contrib"]
    onnx.checker.check_model(qdq)
    assert {n.domain for n in qdq.graph.node} <= {"", "ai.onnx"}
    assert "QuantizeLinear" in {n.op_type for n in qdq.graph.node}
    int8 = [_ort_optimized_ops(m, tmp_path).count("MatMulIntegerToFloat") for m in (qdq, contrib)]
    assert int8[0] == int8[1] > 0
    assert "Gemm" not in _ort_optimized_ops(qdq, tmp_path)  # a MatMul+bias fused to float Gemm is the bug
    # no float weight beside its int8 copy: the same large float tensors as the contrib form (small tables)
    assert _big_floats(qdq) == _big_floats(contrib)
    assert sum(t.data_type == onnx.TensorProto.INT8 for t in qdq.graph.initializer) >= int8[0]
    for feed in feeds:
        q, c = run_ort(qdq, feed, disable_opt=False)[0], run_ort(contrib, feed, disable_opt=False)[0]
        np.testing.assert_allclose(q, c, atol=1e-4 * np.abs(c).max())  # the same codes; float rounding only


def test_qdq_matmul_with_bias_against_numpy_chain(tmp_path):
    """x[1,S,K] → Q/DQ → MatMul(DQ(W_q)) + bias (stored [1,1,N]) against numpy."""
    rng = np.random.default_rng(0)
    k, n = 8, 16
    w = (rng.standard_normal((k, n)) * np.geomspace(0.01, 3, n)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["y"])]
    proto = make_model(nodes, [vinfo("x", [1, "S", k])], [vinfo("y", [1, "S", n])], {"w": w, "b": b})
    scale, zp = 6.0 / 255, 128
    plan = {"fc": LayerPlan("fc", "matmul", "x", scale, zp)}
    out = to_proto(run_pass(QuantizeStaticPass(plan=plan, format="qdq"), ir.from_proto(proto)).model)
    onnx.checker.check_model(out)
    bias = next(t for t in out.graph.initializer if t.name.endswith("_bias"))
    assert list(bias.dims) == [1, 1, n]
    assert "Gemm" not in _ort_optimized_ops(out, tmp_path)
    x = rng.standard_normal((1, 5, k)).astype(np.float32)
    xq = (np.clip(np.round(x / np.float32(scale)) + zp, 0, 255) - zp) * np.float32(scale)
    wq, ws = quantize_weight(w, 8, axis=1)
    ref = xq @ (wq.astype(np.float32) * ws) + b
    got = run_ort(out, {"x": x}, disable_opt=False)[0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5 * np.abs(ref).max())


def test_node_units_need_the_qdq_form():
    with pytest.raises(OptionError, match="node_units"):
        QuantizeOptions(node_units=True).validate()
    QuantizeOptions(node_units=True, format="qdq").validate()
