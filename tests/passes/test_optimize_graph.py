import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.passes.optimize_graph import OptimizeGraphPass
from tests.conftest import make_model, run_ort, vinfo


def _conv_bn_model():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "g": rng.uniform(0.5, 2, 4).astype(np.float32),
             "b": rng.standard_normal(4).astype(np.float32), "m": rng.standard_normal(4).astype(np.float32),
             "v": rng.uniform(0.5, 2, 4).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], epsilon=1e-5),
             helper.make_node("Relu", ["bn"], ["y"])]
    return make_model(nodes, [vinfo("x", [1, 3, 8, 8])], [vinfo("y", [1, 4, 8, 8])], inits)


def test_batchnorm_is_folded_with_parity():
    proto = _conv_bn_model()
    result = run_pass(OptimizeGraphPass(), ir.from_proto(proto))
    assert result.modified
    ops = [n.op_type for n in result.model.graph]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 1
    assert {"op": "BatchNormalization", "before": 1, "after": 0} in result.rows
    out = to_proto(result.model)
    onnx.checker.check_model(out)
    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(proto, {"x": x})[0], atol=1e-5, rtol=1e-5)


def test_clean_graph_is_left_alone(mlp_path):
    model = ir.load(str(mlp_path))
    result = run_pass(OptimizeGraphPass(), model)
    assert not result.modified and result.rows == []


def test_bert_fusions_on_tiny_encoder(tiny_encoder_path):
    proto = onnx.load(str(tiny_encoder_path))
    result = run_pass(OptimizeGraphPass(fusions="bert", num_heads=4, hidden_size=64), ir.from_proto(proto))
    ops = [n.op_type for n in result.model.graph]
    assert "BiasGelu" in ops and "Erf" not in ops
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 1000, (1, 12)), "attention_mask": np.ones((1, 12), np.int64)}
    np.testing.assert_allclose(run_ort(to_proto(result.model), feed)[0], run_ort(proto, feed)[0], atol=1e-4)
