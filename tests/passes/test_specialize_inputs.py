"""SpecializeInputsPass on small graphs built inline: an If on a mode input inlined into its taken
branch (recursively, names kept unique, branch outputs that are outer values or graph outputs),
the guard that makes onnxruntime fail on another value, float16 graphs, a fixed value feeding a
Reshape, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgecomp.data import input_specs, synthesize_feed
from edgecomp.errors import ConfigError
from edgecomp.io import to_proto
from edgecomp.passes.base import run_pass
from edgecomp.passes.optimize_graph import OptimizeGraphPass
from edgecomp.passes.specialize_inputs import FIXED_INPUTS_KEY, GUARD_KEY, SpecializeInputsPass, fixed_inputs
from tests.conftest import make_model, run_ort, vinfo

ATOL = 1e-6  # the taken branch computes the same float ops in the same order: equal up to kernel choice


def _branch(name, nodes, outputs, inits=()):
    return helper.make_graph(nodes, name, [], outputs, [numpy_helper.from_array(v, k) for k, v in inits])


def mode_model(dtype=np.float32, nested=True) -> onnx.ModelProto:
    """y = Relu(x @ W1) @ W3 (mode == 1) or x @ W2 + b (else); z = K if mode == 1 else 2x (a branch
    output that is the branch's own constant, and a graph output). The then-branch holds an If on the same
    mode (decided next round) and an If on the data (left alone); both branches define a value
    named ``t``, and so do the branches of an If on the data in the main graph, g = |x| or -x:
    once inlined, the main graph's ``t`` needs a fresh name."""
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((4, 6)).astype(dtype), rng.standard_normal((4, 3)).astype(dtype)
    w3, b = rng.standard_normal((6, 3)).astype(dtype), rng.standard_normal(3).astype(dtype)
    inner_then = _branch("inner_then", [helper.make_node("Relu", ["t"], ["r"])], [vinfo("r", None, t)])
    inner_else = _branch("inner_else", [helper.make_node("Neg", ["t"], ["n"])], [vinfo("n", None, t)])
    data_then = _branch("data_then", [helper.make_node("Identity", ["u"], ["u1"])], [vinfo("u1", None, t)])
    data_else = _branch("data_else", [helper.make_node("Sigmoid", ["u"], ["u2"])], [vinfo("u2", None, t)])
    then_nodes = [helper.make_node("MatMul", ["x", "w1"], ["t"], name="then_mm")]
    if nested:
        then_nodes += [helper.make_node("Equal", ["mode", "one"], ["again"]),
                       helper.make_node("If", ["again"], ["u"], then_branch=inner_then, else_branch=inner_else,
                                        name="inner_if"),
                       helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
                       helper.make_node("Greater", ["s", "zero_f"], ["pos"]),
                       helper.make_node("If", ["pos"], ["h"], then_branch=data_then, else_branch=data_else,
                                        name="data_if")]
    else:
        then_nodes += [helper.make_node("Relu", ["t"], ["h"])]
    then_nodes += [helper.make_node("MatMul", ["h", "w3"], ["ty"], name="then_mm2")]
    then = _branch("then", then_nodes, [vinfo("ty", None, t), vinfo("k", None, t)],
                   [("w3", w3), ("k", np.full((2, 4), 0.5, dtype))])
    els = _branch("else", [helper.make_node("MatMul", ["x", "w2"], ["t"], name="else_mm"),
                           helper.make_node("Add", ["t", "b"], ["ey"]),
                           helper.make_node("Add", ["x", "x"], ["ez"])],
                  [vinfo("ey", None, t), vinfo("ez", None, t)])
    nodes = [helper.make_node("Equal", ["mode", "one"], ["c"]),
             helper.make_node("If", ["c"], ["y", "z"], then_branch=then, else_branch=els, name="mode_if"),
             helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Greater", ["m", "zero_f"], ["big"]),
             helper.make_node("If", ["big"], ["g"], name="main_data_if",
                              then_branch=_branch("g_then", [helper.make_node("Abs", ["x"], ["t"])], [vinfo("t", None, t)]),
                              else_branch=_branch("g_else", [helper.make_node("Neg", ["x"], ["t"])], [vinfo("t", None, t)]))]
    inits = {"one": np.array(1, np.int64), "w1": w1, "w2": w2, "b": b, "zero_f": np.array(0, dtype)}
    return make_model(nodes, [vinfo("x", [2, 4], t), vinfo("mode", [], TensorProto.INT64)],
                      [vinfo("y", [2, 3], t), vinfo("z", [2, 4], t), vinfo("g", [2, 4], t)], inits)


def _specialize(proto, **values):
    return run_pass(SpecializeInputsPass(values=values), ir.from_proto(proto))


def _feed(mode, dtype=np.float32, seed=1):
    x = np.random.default_rng(seed).standard_normal((2, 4)).astype(dtype)
    return {"x": x, "mode": np.array(mode, np.int64)}


def _ops(proto) -> list[str]:
    return [n.op_type for n in proto.graph.node]


@pytest.mark.parametrize("mode", [1, 0])
def test_inlined_if_equals_the_original_for_the_fixed_value(mode):
    src = mode_model()
    res = _specialize(src, mode=mode)
    out = to_proto(res.model)
    onnx.checker.check_model(out, full_check=True)
    assert res.modified and "If" in _ops(src)
    if mode == 1:  # the outer If and the inner If on mode are gone; the If on the data stays
        assert [r["node"] for r in res.rows] == ["mode_if", "inner_if"] and res.rows[0]["branch"] == "then"
        assert _ops(out).count("If") == 2 and res.summary["Ifs left (condition not constant)"] == 2
    else:
        assert [r["node"] for r in res.rows] == ["mode_if"] and res.rows[0]["branch"] == "else"
        assert _ops(out).count("If") == 1
    assert [i.name for i in out.graph.input] == ["x", "mode"] and [o.name for o in out.graph.output] == ["y", "z", "g"]
    for seed in range(3):
        feed = _feed(mode, seed=seed)
        for want, got in zip(run_ort(src, feed), run_ort(out, feed)):
            np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    names = [o for n in out.graph.node for o in n.output] + [i.name for i in out.graph.initializer]
    assert len(names) == len(set(names)) and "t" not in names  # the inlined `t` got a fresh name


def test_a_different_value_is_an_error_the_model_reports():
    out = to_proto(_specialize(mode_model(), mode=1).model)
    with pytest.raises(Exception, match=r"guard: input mode must be 1 \(the model was specialized with --value mode=1\)"):
        run_ort(out, _feed(0))
    with pytest.raises(Exception, match="guard: input mode must be 1"):  # onnxruntime's own optimizations keep it
        run_ort(out, _feed(7), disable_opt=False)
    meta = {p.key: p.value for p in out.metadata_props}
    assert meta[FIXED_INPUTS_KEY] == "mode=1" and "guard: input mode must be 1" in meta[GUARD_KEY]
    assert {k: v.tolist() for k, v in fixed_inputs(ir.from_proto(out)).items()} == {"mode": [1.0]}
    feed = synthesize_feed(input_specs(ir.from_proto(out)))  # what bench/inspect feed without --value
    assert feed["mode"] == 1 and feed["mode"].dtype == np.int64
    run_ort(out, feed)


def test_without_the_guard_only_the_inlining_changes():
    res = run_pass(SpecializeInputsPass(values={"mode": 1}, guard=False), ir.from_proto(mode_model(nested=False)))
    out = to_proto(res.model)
    assert "Gather" not in _ops(out) and GUARD_KEY not in {p.key for p in out.metadata_props}
    np.testing.assert_allclose(run_ort(out, _feed(0))[0], run_ort(mode_model(nested=False), _feed(1))[0], atol=ATOL)


def test_float16_graph():
    src = mode_model(np.float16)
    out = to_proto(_specialize(src, mode=0).model)
    onnx.checker.check_model(out, full_check=True)
    assert out.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    feed = _feed(0, np.float16)
    for want, got in zip(run_ort(src, feed), run_ort(out, feed)):
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=1e-3, rtol=0)
    with pytest.raises(Exception, match="guard: input mode must be 0"):
        run_ort(out, _feed(1, np.float16))


def reshape_model() -> onnx.ModelProto:
    """y = Reshape(x, shape) @ W: the fixed value is a shape, not an If condition."""
    w = np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("MatMul", ["r", "w"], ["y"])]
    return make_model(nodes, [vinfo("x", [3, 2, 2]), vinfo("shape", [2], TensorProto.INT64)], [vinfo("y", [2, 5])],
                      {"w": w})


def test_a_fixed_shape_input_is_folded_by_the_cleanup():
    src = reshape_model()
    m = ir.from_proto(src)
    res = run_pass(SpecializeInputsPass(values={"shape": [2, 6]}), m)
    assert res.modified and res.summary["Ifs inlined"] == 0 and res.summary["inputs fixed"] == "shape=2,6"
    run_pass(OptimizeGraphPass(), m)
    out = to_proto(m)
    reshape = next(n for n in out.graph.node if n.op_type == "Reshape")
    assert reshape.input[1] != "shape" and reshape.input[1] in {i.name for i in out.graph.initializer}
    feed = {"x": np.random.default_rng(3).standard_normal((3, 2, 2)).astype(np.float32),
            "shape": np.array([2, 6], np.int64)}
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(src, feed)[0], atol=ATOL, rtol=0)
    with pytest.raises(Exception, match="guard: input shape must be 2,6"):  # a non-scalar guard (ReduceMax)
        run_ort(out, {**feed, "shape": np.array([6, 2], np.int64)})


def test_a_value_that_decides_nothing_is_a_no_op():
    nodes = [helper.make_node("Mul", ["x", "gain"], ["y"])]
    src = make_model(nodes, [vinfo("x", [2]), vinfo("gain", [])], [vinfo("y", [2])])
    res = _specialize(src, gain=2.0)
    assert not res.modified and res.summary["no effect"][0].startswith("gain: decides no If, folds nothing and fixes no shape")
    out = to_proto(res.model)
    assert out.graph.node[0].input[1] == "gain" and not out.metadata_props and len(out.graph.initializer) == 0


@pytest.mark.parametrize("values, message", [
    ({"rate": 1}, "value rate: not an input of the model; the model's inputs are x, mode"),
    ({"mode": 1.5}, "value mode: the input is int64; give integers in"),
    ({"mode": [1, 1]}, "value mode: the input has shape [] (1 values); give one value or 1, got 2"),
])
def test_bad_values_are_one_line(values, message):
    with pytest.raises(ConfigError) as e:
        _specialize(mode_model(), **values)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_symbolic_shape_and_respecialization_are_refused():
    src = mode_model()
    src.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    with pytest.raises(ConfigError, match="value x: the input's shape \\[batch, 4\\] is not static"):
        _specialize(src, x=0.0)
    once = _specialize(mode_model(), mode=1).model
    again = run_pass(SpecializeInputsPass(values={"mode": 1}), once)
    assert not again.modified and again.summary == {"already fixed": "mode=1"}
    with pytest.raises(ConfigError, match="already specialized with mode=1; specialize the original model"):
        run_pass(SpecializeInputsPass(values={"mode": 0}), once)


def test_a_loop_reading_the_value_is_left_alone():
    """A Loop body that reads the fixed input now reads the constant; the Loop itself stays."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Cast", ["mode"], ["mf"], to=TensorProto.FLOAT),
         helper.make_node("Add", ["acc_in", "mf"], ["acc_out"])], "body",
        [vinfo("i", [], TensorProto.INT64), vinfo("cond_in", [], TensorProto.BOOL), vinfo("acc_in", [2])],
        [vinfo("cond_out", [], TensorProto.BOOL), vinfo("acc_out", [2])])
    nodes = [helper.make_node("Loop", ["trips", "", "x"], ["y"], body=body, name="loop"),
             helper.make_node("Equal", ["mode", "one"], ["c"]),
             helper.make_node("Cast", ["c"], ["cf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["y", "cf"], ["z"])]
    src = make_model(nodes, [vinfo("x", [2]), vinfo("mode", [], TensorProto.INT64)], [vinfo("z", [2])],
                     {"trips": np.array(3, np.int64), "one": np.array(1, np.int64)})
    res = _specialize(src, mode=1)
    out = to_proto(res.model)
    onnx.checker.check_model(out, full_check=True)
    assert res.modified and "Loop" in _ops(out) and res.summary["Ifs inlined"] == 0
    feed = {"x": np.array([0.5, -1.0], np.float32), "mode": np.array(1, np.int64)}
    np.testing.assert_allclose(run_ort(out, feed)[0], run_ort(src, feed)[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(run_ort(out, feed)[0], [3.5, 2.0], atol=ATOL, rtol=0)


@pytest.mark.parametrize("opset", [8, 10, 17])
def test_a_float_mode_at_old_opsets_is_guarded_with_ops_the_opset_has(opset):
    """y = x * 2 if gain > 0.5 else x * 3; the guard is valid at the model's opset."""
    then = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["a"])], "t", [], [vinfo("a", [2])])
    els = helper.make_graph([helper.make_node("Mul", ["x", "three"], ["b"])], "e", [], [vinfo("b", [2])])
    nodes = [helper.make_node("Greater", ["gain", "half"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=els)]
    src = make_model(nodes, [vinfo("x", [2]), vinfo("gain", [])], [vinfo("y", [2])],
                     {"two": np.float32(2), "three": np.float32(3), "half": np.float32(0.5)}, opset=opset)
    out = to_proto(_specialize(src, gain=0.75).model)
    onnx.checker.check_model(out, full_check=True)
    assert "If" not in _ops(out)
    feed = {"x": np.array([1.0, -2.0], np.float32), "gain": np.array(0.75, np.float32)}
    np.testing.assert_allclose(run_ort(out, feed)[0], [2.0, -4.0], atol=ATOL, rtol=0)
    with pytest.raises(Exception, match="guard: input gain must be 0.75"):
        run_ort(out, {**feed, "gain": np.array(0.7500001, np.float32)})
