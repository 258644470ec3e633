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
    onnx.checker.check_model(to_proto(result.model))  # the fused ops' domain is imported (save verifies this too)
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 1000, (1, 12)), "attention_mask": np.ones((1, 12), np.int64)}
    np.testing.assert_allclose(run_ort(to_proto(result.model), feed)[0], run_ort(proto, feed)[0], atol=1e-4)


def _params(proto: onnx.ModelProto) -> int:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from zoo import param_count

    return param_count(proto)


def test_expand_of_a_constant_is_not_materialized():
    """Expand(c [1, 256] → [64, 256]) folded would write 64x the constant; it is left to run."""
    c = np.random.default_rng(2).standard_normal((1, 256)).astype(np.float32)
    nodes = [helper.make_node("Expand", ["c", "shape"], ["big"]), helper.make_node("Add", ["x", "big"], ["y"])]
    proto = make_model(nodes, [vinfo("x", [64, 256])], [vinfo("y", [64, 256])],
                       {"c": c, "shape": np.array([64, 256], np.int64)})
    out = to_proto(run_pass(OptimizeGraphPass(), ir.from_proto(proto)).model)
    onnx.checker.check_model(out)
    assert _params(out) <= _params(proto) and max(int(np.prod(t.dims)) for t in out.graph.initializer) == 256
    x = np.random.default_rng(3).standard_normal((64, 256)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(proto, {"x": x})[0], atol=1e-6)


def test_a_fold_that_copies_a_weight_still_read_elsewhere_is_given_up():
    """Concat(Slice(w), Slice(w)) folds to a tensor as big as w, but w stays (the Mul reads it):
    folding would write w twice."""
    w = np.random.default_rng(4).standard_normal(512).astype(np.float32)
    i64 = lambda *v: np.array(v, np.int64)
    nodes = [helper.make_node("Slice", ["w", "s0", "e0"], ["a"]), helper.make_node("Slice", ["w", "s1", "e1"], ["b"]),
             helper.make_node("Concat", ["b", "a"], ["ba"], axis=0), helper.make_node("Add", ["x", "ba"], ["p"]),
             helper.make_node("Mul", ["p", "w"], ["y"])]
    proto = make_model(nodes, [vinfo("x", [2, 512])], [vinfo("y", [2, 512])],
                       {"w": w, "s0": i64(0), "e0": i64(256), "s1": i64(256), "e1": i64(512)})
    result = run_pass(OptimizeGraphPass(), ir.from_proto(proto))
    out = to_proto(result.model)
    onnx.checker.check_model(out)
    assert _params(out) <= _params(proto)
    assert result.summary["folds skipped (they would copy a weight)"] == 1
    x = np.random.default_rng(5).standard_normal((2, 512)).astype(np.float32)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(proto, {"x": x})[0], atol=1e-6)


def test_optimize_never_adds_parameters_on_zoo_models(tmp_path):
    """resnet-ts11 (Flatten, which the rewriter turns into Reshape with a shape tensor) and
    silero_vad (an LSTM bias folded in one If branch while the other still reads it)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from zoo import Zoo, feeds

    zoo = Zoo(tmp_path)
    for name in ("resnet-ts11", "silero_vad"):
        path, data = zoo.get(name)
        proto = onnx.load(str(path))
        out = to_proto(run_pass(OptimizeGraphPass(), ir.from_proto(proto)).model)
        assert _params(out) <= _params(proto), name
        feed = feeds(data, 1)[0]
        feed = {i.name: feed[i.name] for i in proto.graph.input if i.name in feed}
        for a, b in zip(run_ort(out, feed), run_ort(proto, feed)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def _overridable(proto: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    """``proto`` with the initializers ``names`` also declared as graph inputs (defaults the caller may feed)."""
    for t in proto.graph.initializer:
        if t.name in names:
            proto.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return proto


def test_overridable_weights_are_never_folded():
    """A Conv weight and a BatchNorm scale the caller may feed, and a MatMul weight reached through
    a Transpose: none is folded (the BatchNorm stays, the Transpose runs), and a fed value is used."""
    rng = np.random.default_rng(0)
    proto = _conv_bn_model()
    proto.graph.node.extend([helper.make_node("Flatten", ["y"], ["f"], axis=1),
                             helper.make_node("Transpose", ["wt"], ["wt_t"], perm=[1, 0]),
                             helper.make_node("MatMul", ["f", "wt_t"], ["z"])])
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.standard_normal((5, 256)).astype(np.float32), "wt"))
    del proto.graph.output[:]
    proto.graph.output.append(vinfo("z", [1, 5]))
    proto = _overridable(proto, "w", "g", "wt")
    result = run_pass(OptimizeGraphPass(), ir.from_proto(proto))
    out = to_proto(result.model)
    onnx.checker.check_model(out)
    assert [i.name for i in out.graph.input] == ["x", "w", "g", "wt"]
    assert {"BatchNormalization", "Transpose"} <= {n.op_type for n in out.graph.node}
    x = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    fed = {"x": x, "w": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
           "g": rng.uniform(0.5, 2, 4).astype(np.float32), "wt": rng.standard_normal((5, 256)).astype(np.float32)}
    np.testing.assert_allclose(run_ort(out, fed)[0], run_ort(proto, fed)[0], atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(run_ort(out, {"x": x})[0], run_ort(proto, {"x": x})[0], atol=1e-4, rtol=1e-5)


def test_a_wrong_output_declaration_never_drives_a_fold():
    """Reshape(t, Concat(Slice(Shape(t)) x3)) with t [T, 1, C] and the output declared [1, seqlen]:
    onnxscript would materialize the declared shape ([1, -1]); the pass keeps [T, 1, C] and the
    declaration as given."""
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]), helper.make_node("Shape", ["t"], ["s"])]
    for i in range(3):
        nodes.append(helper.make_node("Slice", ["s", f"at{i}", f"at{i + 1}"], [f"d{i}"]))
    inits = [onnx.numpy_helper.from_array(np.array([i], np.int64), f"at{i}") for i in range(4)]
    nodes += [helper.make_node("Concat", ["d0", "d1", "d2"], ["target"], axis=0),
              helper.make_node("Reshape", ["t", "target"], ["y"])]
    g = helper.make_graph(nodes, "g", [vinfo("x", [1, "T", 6])], [vinfo("y", [1, "seqlen"])], inits)
    proto = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    result = run_pass(OptimizeGraphPass(), ir.from_proto(proto))
    out = to_proto(result.model)
    assert [d.dim_value or d.dim_param for d in out.graph.output[0].type.tensor_type.shape.dim] == [1, "seqlen"]
    x = np.random.default_rng(0).standard_normal((1, 7, 6)).astype(np.float32)
    got = run_ort(out, {"x": x})[0]
    assert got.shape == (7, 1, 6)
    np.testing.assert_array_equal(got, x.transpose(1, 0, 2))


def _layernorm_model(eps: float):
    """A LayerNorm decomposed as TorchScript writes it below opset 17 (epsilon added to the variance)."""
    inits = {"two": np.array(2.0, np.float32), "eps": np.array(eps, np.float32)}
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[-1]),
             helper.make_node("Sub", ["x", "mean"], ["d"]),
             helper.make_node("Pow", ["d", "two"], ["sq"]),
             helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["ve"]),
             helper.make_node("Sqrt", ["ve"], ["sd"]),
             helper.make_node("Div", ["d", "sd"], ["y"])]
    return make_model(nodes, [vinfo("x", [2, 8])], [vinfo("y", [2, 8])], inits, opset=13)


def test_a_layernorm_epsilon_is_not_taken_for_zero():
    """onnxscript's Add(x, 0) rule matches constants within 1e-8: BERT's epsilon 1e-12 must stay
    (a constant row would divide by zero, and onnxruntime would not fuse LayerNormalization); an
    exact zero is still removed."""
    x = np.random.default_rng(2).standard_normal((2, 8)).astype(np.float32)
    x[1] = 0.5  # a constant row: its variance is 0, only the epsilon keeps the output finite
    kept = run_pass(OptimizeGraphPass(), ir.from_proto(_layernorm_model(1e-12))).model
    assert "Add" in [n.op_type for n in kept.graph]
    got = run_ort(to_proto(kept), {"x": x})[0]
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + np.float32(1e-12))
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert np.isfinite(got).all()
    zero = run_pass(OptimizeGraphPass(), ir.from_proto(_layernorm_model(0.0))).model
    assert "Add" not in [n.op_type for n in zero.graph]
