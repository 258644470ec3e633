"""SimplifyAttentionLayoutPass: each rewrite is exact against the unrewritten graph (onnxruntime with
its own optimizations off), and what it cannot rewrite is left with the reason."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from edgecomp.io import to_proto
from edgecomp.passes.attention_layout import SimplifyAttentionLayoutPass
from edgecomp.passes.base import run_pass
from tests.conftest import make_model, run_ort, vinfo

RNG = np.random.default_rng(0)


def _rewrite(proto, **options):
    report = run_pass(SimplifyAttentionLayoutPass(**options), ir.from_proto(proto))
    out = to_proto(report.model)
    onnx.checker.check_model(out)
    return report, out


def _same(before, after, feed, atol=1e-6):
    for a, b in zip(run_ort(before, feed), run_ort(after, feed)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=0, atol=atol)


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def test_a_transpose_round_trip_is_removed():
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1, 3], name="split"),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1, 3], name="back"),
             helper.make_node("Relu", ["t2"], ["y"])]
    proto = make_model(nodes, [vinfo("x", [2, 3, 4, 5])], [vinfo("y", [2, 3, 4, 5])])
    report, out = _rewrite(proto)
    assert _ops(out) == ["Relu"] and report.summary["transpose round trips removed"] == 1
    _same(proto, out, {"x": RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)})


def test_a_head_split_then_key_transpose_becomes_one_transpose():
    """K as some exporters write it: the head Transpose, then a swap of the last two axes."""
    nodes = [helper.make_node("Reshape", ["k", "heads"], ["k4"], name="split_heads"),
             helper.make_node("Transpose", ["k4"], ["kh"], perm=[0, 2, 1, 3], name="heads_first"),
             helper.make_node("Transpose", ["kh"], ["kt"], perm=[0, 1, 3, 2], name="k_t"),
             helper.make_node("MatMul", ["q", "kt"], ["s"], name="qk")]
    proto = make_model(nodes, [vinfo("q", [1, 2, 6, 4]), vinfo("k", [1, 6, 8])], [vinfo("s", [1, 2, 6, 6])],
                       {"heads": np.array([1, 6, 2, 4], np.int64)})
    report, out = _rewrite(proto)
    transposes = [n for n in out.graph.node if n.op_type == "Transpose"]
    assert len(transposes) == 1 and list(transposes[0].attribute[0].ints) == [0, 2, 3, 1]
    assert report.summary["transposes merged"] == 1
    _same(proto, out, {"q": RNG.standard_normal((1, 2, 6, 4)).astype(np.float32),
                       "k": RNG.standard_normal((1, 6, 8)).astype(np.float32)})


def test_reshapes_merge_unless_the_second_copies_a_dim():
    def model(target):
        nodes = [helper.make_node("Reshape", ["x", "s1"], ["r1"], name="r1"),
                 helper.make_node("Reshape", ["r1", "s2"], ["y"], name="r2")]
        return make_model(nodes, [vinfo("x", [2, 12, 5])], [vinfo("y", [2, 60] if target[0] else [2, 3, 20])],
                          {"s1": np.array([2, 3, 4, 5], np.int64), "s2": np.array(target, np.int64)})

    feed = {"x": RNG.standard_normal((2, 12, 5)).astype(np.float32)}
    proto = model([2, -1])
    report, out = _rewrite(proto)
    assert _ops(out) == ["Reshape"] and report.summary["reshapes merged"] == 1
    _same(proto, out, feed)
    kept = model([0, 3, -1])  # 0 copies dim 0 of the intermediate [2,3,4,5]: not merged
    report, out = _rewrite(kept)
    assert _ops(out) == ["Reshape", "Reshape"] and not report.modified
    assert report.rows[0]["detail"] == "the second Reshape's target copies a dim (0)"


def test_a_transposed_weight_is_folded_into_the_initializer():
    w = RNG.standard_normal((16, 8)).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="w_t"),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    proto = make_model(nodes, [vinfo("x", [3, 8])], [vinfo("y", [3, 16])], {"w": w})
    report, out = _rewrite(proto)
    assert _ops(out) == ["MatMul"] and report.summary["constant transposes folded"] == 1
    _same(proto, out, {"x": RNG.standard_normal((3, 8)).astype(np.float32)}, atol=0)


def _context_merge(mul: bool, per_axis: bool = False):
    """A float P·V's context merged back to [B, S, H·d] and quantized for the output projection."""
    scale = np.full(8, 0.02, np.float32) if per_axis else np.float32(0.02)
    zp = np.zeros(8, np.uint8) if per_axis else np.uint8(128)
    nodes = [helper.make_node("MatMul", ["p", "v"], ["ctx"], name="pv"),
             helper.make_node("Transpose", ["ctx"], ["ct"], perm=[0, 2, 1, 3], name="merge_t"),
             helper.make_node("Reshape", ["ct", "merged"], ["c"], name="merge_r")]
    src = "c"
    if mul:
        nodes.append(helper.make_node("Mul", ["c", "inv"], ["cs"], name="smooth"))
        src = "cs"
    nodes += [helper.make_node("QuantizeLinear", [src, "s", "z"], ["cq"], name="quant", axis=-1),
              helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"], name="dq", axis=-1)]
    inits = {"merged": np.array([1, 6, 8], np.int64), "s": scale, "z": zp,
             "inv": RNG.uniform(0.5, 2, 8).astype(np.float32)}
    return make_model(nodes, [vinfo("p", [1, 2, 6, 6]), vinfo("v", [1, 2, 6, 4])], [vinfo("y", [1, 6, 8])], inits,
                      opset=13)


def _pv_feed():
    return {"p": RNG.uniform(0, 1, (1, 2, 6, 6)).astype(np.float32), "v": RNG.standard_normal((1, 2, 6, 4)).astype(np.float32)}


def test_the_context_merge_moves_uint8_after_the_quantizer_moves_above_it():
    proto = _context_merge(mul=False)
    report, out = _rewrite(proto)
    assert report.summary["quantized before moves"] == 1
    order = _ops(out)
    assert order.index("QuantizeLinear") < order.index("Transpose") < order.index("Reshape")
    moved = {o.name: o for o in onnx.shape_inference.infer_shapes(out).graph.value_info}
    assert moved["ct"].type.tensor_type.elem_type == TensorProto.UINT8
    _same(proto, out, _pv_feed(), atol=0)  # quantization is element-wise: bit-identical


@pytest.mark.parametrize("mul, per_axis, why", [
    (True, False, "a Mul (a per-channel scaling) sits between the moves and the quantizer"),
    (False, True, "not a per-tensor QuantizeLinear with constant scale and zero point")])
def test_a_scaling_mul_or_a_per_axis_quantizer_stays_with_the_reason(mul, per_axis, why):
    proto = _context_merge(mul=mul, per_axis=per_axis)
    report, out = _rewrite(proto)
    assert not report.modified and _ops(out) == _ops(proto)
    assert [r["detail"] for r in report.rows if r["rule"] == "quantized before moves"] == [why]


def test_each_rewrite_can_be_turned_off():
    proto = _context_merge(mul=False)
    report, out = _rewrite(proto, quantize_before_moves=False)
    assert not report.modified and _ops(out) == _ops(proto)
    assert report.options == {"merge_transposes": True, "merge_reshapes": True, "fold_constant_transposes": True,
                              "quantize_before_moves": False}


def test_optimize_layout_applies_the_pass_and_keeps_the_outputs(tmp_path):
    from click.testing import CliRunner

    from edgecomp.cli import cli

    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 1, 3], name="split"),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 2, 1, 3], name="back"),
             helper.make_node("Relu", ["t2"], ["y"])]
    proto = make_model(nodes, [vinfo("x", [2, 3, 4, 5])], [vinfo("y", [2, 3, 4, 5])])
    src, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(proto, src)
    for flag, ops in (("--no-layout", ["Transpose", "Transpose", "Relu"]), ("--layout", ["Relu"])):
        res = CliRunner().invoke(cli, ["optimize", str(src), "--no-fold", flag, "-o", str(out)])
        assert res.exit_code == 0, res.output
        written = onnx.load(str(out))
        assert _ops(written) == ops
        _same(proto, written, {"x": RNG.standard_normal((2, 3, 4, 5)).astype(np.float32)})
