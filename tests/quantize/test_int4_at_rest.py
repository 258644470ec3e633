"""int4 at rest, int8 compute: the int4 codes stored packed, the int8 weight computed by a constant
chain that onnxruntime folds at session creation; the session then runs the int8 model's kernels on
the int8 model's weight (the same outputs), and the file is smaller."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import helper

from edgecomp.io import to_proto
from edgecomp.quantize.int4 import rtn_codes
from edgecomp.quantize.int4_at_rest import apply_int4_at_rest, int4_weights, pack_codes, unpacked_codes
from edgecomp.quantize.plan import build
from edgecomp.quantize.quantize_static import LayerPlan
from tests.conftest import make_model, run_ort, vinfo

K, N, S = 200, 128, 6  # K not a multiple of the block: the padded rows are sliced off


def _layer(rng):
    w = (rng.standard_normal((K, N)) * np.geomspace(0.02, 2, N)).astype(np.float32)
    b = rng.standard_normal(N).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["y"])]
    return ir.from_proto(make_model(nodes, [vinfo("x", [1, "S", K])], [vinfo("y", [1, "S", N])], {"w": w, "b": b})), w


def _optimized(proto: onnx.ModelProto, path) -> onnx.ModelProto:
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(path)
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


def test_pack_roundtrip():
    q = np.random.default_rng(0).integers(0, 16, (8, 5)).astype(np.uint8)
    np.testing.assert_array_equal(unpacked_codes(pack_codes(q)), q)


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothquant"])
def test_int4_at_rest_folds_to_the_int8_model(tmp_path, smooth):
    rng = np.random.default_rng(0)
    model, w = _layer(rng)
    codes = {"fc": rtn_codes(w, 32)}
    plan = {"fc": LayerPlan("fc", "matmul", "x", 6.0 / 255, 128,
                            smooth=rng.uniform(0.5, 2.0, K).astype(np.float32) if smooth else None)}
    int8 = build(int4_weights(model, codes), plan)
    at_rest = apply_int4_at_rest(build(int4_weights(model, codes), plan), codes, plan)
    proto8, proto4 = to_proto(int8), to_proto(at_rest)
    onnx.checker.check_model(proto4)
    assert not any(t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) == K * N for t in proto4.graph.initializer)
    size8, size4 = len(proto8.SerializeToString()), len(proto4.SerializeToString())
    assert size4 < 0.85 * size8  # 0.59 of the weight bytes at block 32 (K padded to 224 rows here)
    # the session folds the chain: its optimized graph has the int8 op reading one int8 initializer
    opt, opt8 = _optimized(proto4, tmp_path / "opt4.onnx"), _optimized(proto8, tmp_path / "opt8.onnx")
    assert sorted(n.op_type for n in opt.graph.node) == sorted(n.op_type for n in opt8.graph.node)
    mm = next(n for n in opt.graph.node if n.op_type == "MatMulIntegerToFloat")
    folded = next(t for t in opt.graph.initializer if t.name == mm.input[1])
    stored = next(t for t in proto8.graph.initializer if t.name == next(
        n for n in proto8.graph.node if n.op_type == "MatMulIntegerToFloat").input[1])
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(folded), onnx.numpy_helper.to_array(stored))
    x = rng.standard_normal((1, S, K)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(proto4, {"x": x}, disable_opt=False)[0],
                                  run_ort(proto8, {"x": x}, disable_opt=False)[0])
    # and unoptimized (the chain evaluated as nodes) within one output step of the int8 computation
    step = 6.0 / 255 * float(np.abs(w).max()) / 127
    np.testing.assert_allclose(run_ort(proto4, {"x": x})[0], run_ort(proto8, {"x": x})[0], atol=step)


def test_a_rescaled_weight_scale_is_kept(tmp_path):
    """A fold that rescaled the int8 op's weight scale (the value projection's channels times c) before the
    int4 weight is put at rest: the chain still makes the stored codes, the rescale still applies."""
    rng = np.random.default_rng(4)
    model, w = _layer(rng)
    codes = {"fc": rtn_codes(w, 32)}
    plan = {"fc": LayerPlan("fc", "matmul", "x", 6.0 / 255, 128)}
    int8 = build(int4_weights(model, codes), plan)
    c = rng.uniform(0.5, 2.0, N).astype(np.float32)
    mm = next(n for n in int8.graph if n.op_type == "MatMulIntegerToFloat")
    mm.replace_input_with(3, ir.val("rescaled", const_value=ir.tensor(mm.inputs[3].const_value.numpy() * c)))
    int8.graph.initializers["rescaled"] = mm.inputs[3]
    proto8 = to_proto(int8)
    proto4 = to_proto(apply_int4_at_rest(ir.from_proto(proto8), codes, plan))
    x = rng.standard_normal((1, S, K)).astype(np.float32)
    np.testing.assert_array_equal(run_ort(proto4, {"x": x}, disable_opt=False)[0],
                                  run_ort(proto8, {"x": x}, disable_opt=False)[0])


def test_quantize_int4_compute_int8_writes_int4_at_rest(tmp_path):
    """The pipeline with int4 layers and int4_compute int8: no MatMulNBits, the int4 layers' int8
    weights computed from stored codes, and the session runs it as the int8 model it folds to."""
    from edgecomp.data import Dataset
    from edgecomp.quantize import quantize_model
    from edgecomp.quantize.options import QuantizeOptions
    from edgecomp.targets import host_isa
    from tests.quantize.test_quantize_int4 import _mlp

    rng = np.random.default_rng(1)
    for i in range(12):
        np.savez(tmp_path / f"{i:02d}.npz", x=rng.standard_normal((16, 64)).astype(np.float32))
    opts = QuantizeOptions(families="all", isa=host_isa(), smooth="off", int4="fc1,fc3$", int4_compute="int8")
    proto = _mlp()
    res = quantize_model(ir.from_proto(proto), Dataset(tmp_path), opts)
    out = to_proto(res.model)
    onnx.checker.check_model(out)
    ops = [n.op_type for n in out.graph.node]
    assert "MatMulNBits" not in ops and ops.count("MatMulIntegerToFloat") == 3
    assert res.summary["int4 form"].startswith("int4 at rest")
    assert sum(t.data_type == onnx.TensorProto.INT8 and np.prod(t.dims) == 64 * 64 for t in out.graph.initializer) == 1
    opt = _optimized(out, tmp_path / "opt.onnx")
    assert sorted(n.op_type for n in opt.graph.node).count("MatMulIntegerToFloat") == 3
    assert not {n.op_type for n in opt.graph.node} & {"Floor", "Round", "Clip", "Concat"}
    x = rng.standard_normal((4, 64)).astype(np.float32)
    ref = run_ort(proto, {"x": x})[0]
    got = run_ort(out, {"x": x}, disable_opt=False)[0]
    cos = float((ref * got).sum() / np.linalg.norm(ref) / np.linalg.norm(got))
    assert cos > 0.98
