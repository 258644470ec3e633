"""The interface guard (edgecomp.measure.interface) and shapes-before-values in validate and the
fidelity checks: a candidate with another run-time output shape, an ignored input, other inputs
or outputs is one line naming what differs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from zoo import OVERRIDABLE_WEIGHTS, overridable_cnn_proto, paddle_crnn_proto

from edgecomp.cli import cli
from edgecomp.errors import InterfaceChanged
from edgecomp.io import from_proto
from edgecomp.measure.interface import check_interface, declared_shape_warnings, guard_feeds, shape_text
from edgecomp.measure.validate import compare_outputs, validate
from edgecomp.measure.evaluate import Evaluator, FidelityEvaluator

X = np.random.default_rng(0).standard_normal((1, 3, 32, 64)).astype(np.float32)  # T = 64 / 4 = 16


def _flattened(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with its output reshaped to ``[1, -1]``: what the broken cleanup wrote."""
    m = onnx.ModelProto()
    m.CopyFrom(proto)
    out = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [o + "_raw" if o == out else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, -1], np.int64), "flat_shape"))
    m.graph.node.append(helper.make_node("Reshape", [out + "_raw", "flat_shape"], [out], name="flatten_out"))
    return m


@pytest.fixture(scope="module")
def crnn(tmp_path_factory):
    folder = tmp_path_factory.mktemp("crnn")
    ref, cand = folder / "crnn.onnx", folder / "crnn.flat.onnx"
    onnx.save(paddle_crnn_proto(), ref)
    onnx.save(_flattened(paddle_crnn_proto()), cand)
    data = folder / "data.npz"
    np.savez(data, x=np.concatenate([X, X[:, :, ::-1]]))
    return ref, cand, data


def test_the_crnn_returns_another_shape_than_it_declares(crnn):
    declared = onnx.load(str(crnn[0])).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value or d.dim_param for d in declared] == [1, "seqlen"]
    s = ort.InferenceSession(str(crnn[0]), providers=["CPUExecutionProvider"])
    assert s.run(None, {"x": X})[0].shape == (16, 1, 40)
    assert ort.InferenceSession(str(crnn[1]), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0].shape == (1, 640)


def test_guard_refuses_a_flattened_output_in_one_line(crnn):
    ref, cand = from_proto(paddle_crnn_proto()), from_proto(_flattened(paddle_crnn_proto()))
    with pytest.raises(InterfaceChanged) as e:
        check_interface(ref, cand, [{"x": X}], feed_source="calibration sample", step="the optimize result")
    msg = str(e.value)
    assert "\n" not in msg and "'softmax_0.tmp_0'" in msg and "[16, 1, 40]" in msg and "[1, 640]" in msg
    assert "calibration sample 0" in msg and msg.endswith("nothing was written (please report this)")


def test_guard_passes_the_same_model_and_reports_the_wrong_declaration():
    ref = from_proto(paddle_crnn_proto())
    warnings = check_interface(ref, ref.clone(), [{"x": X}])
    assert len(warnings) == 1 and "declared [1, seqlen]" in warnings[0] and "returns [16, 1, 40]" in warnings[0]
    assert declared_shape_warnings(ref, [(1, 640)]) == []  # rank 2, batch 1: agrees with the declaration


def test_guard_refuses_an_ignored_overridable_input():
    """The weight is still declared as an input, but the graph reads a frozen copy."""
    proto = overridable_cnn_proto()
    frozen = onnx.ModelProto()
    frozen.CopyFrom(proto)
    w = next(t for t in frozen.graph.initializer if t.name == "fc1_w")
    copy = numpy_helper.from_array(numpy_helper.to_array(w), "fc1_w_frozen")
    frozen.graph.initializer.append(copy)
    for node in frozen.graph.node:
        node.input[:] = ["fc1_w_frozen" if i == "fc1_w" else i for i in node.input]
    x = np.zeros((1, 3, 16, 16), np.float32)
    with pytest.raises(InterfaceChanged, match=r"no longer reads input 'fc1_w'.*ignored; nothing was written"):
        check_interface(from_proto(proto), from_proto(frozen), [{"x": x}])


def test_guard_refuses_other_inputs_and_outputs():
    ref = from_proto(overridable_cnn_proto())
    dropped = overridable_cnn_proto()
    keep = [i for i in dropped.graph.input if i.name != "fc2_b"]
    del dropped.graph.input[:]
    dropped.graph.input.extend(keep)  # fc2_b is now a plain constant: the caller can no longer feed it
    with pytest.raises(InterfaceChanged, match=r"its inputs \[bn_scale float, fc1_w float, x float\] differ"):
        check_interface(ref, from_proto(dropped), [])
    renamed = overridable_cnn_proto()
    renamed.graph.node[-1].output[0] = "scores"
    renamed.graph.output[0].name = "scores"
    with pytest.raises(InterfaceChanged, match=r"its outputs \[scores float\] differ from the model's \[logits float\]"):
        check_interface(ref, from_proto(renamed), [])


def test_an_input_read_only_for_its_fixed_shape_may_be_folded_away():
    """Shape(x) of a fully static x is a constant: a result that no longer reads x is the same model."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    ref = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    folded = helper.make_model(helper.make_graph(
        [helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.array([2, 3], np.float32)))], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]), opset_imports=[helper.make_opsetid("", 13)])
    assert check_interface(from_proto(ref), from_proto(folded), [{"x": np.zeros((2, 3), np.float32)}]) == []


def test_guard_feeds_are_calibration_samples_else_synthesized(crnn):
    model = from_proto(paddle_crnn_proto())
    feeds, source = guard_feeds(model, str(crnn[2]))
    assert source == "calibration sample" and len(feeds) == 2 and np.array_equal(feeds[0]["x"], X)
    feeds, source = guard_feeds(model, None)
    assert source == "synthesized feed" and len(feeds) == 1 and feeds[0]["x"].shape == (1, 3, 32, 224)


def test_validate_names_the_output_that_differs_in_shape(crnn):
    ref, cand, data = crnn
    res = CliRunner().invoke(cli, ["validate", str(ref), str(cand), "--data", str(data)])
    assert res.exit_code == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "internal error" not in lines[0]
    assert lines[0].startswith("Error: output 'softmax_0.tmp_0' differs in shape:")
    assert "[16, 1, 40]" in lines[0] and "[1, 640]" in lines[0] and "(sample 0)" in lines[0]


def test_validate_of_the_same_model_with_a_wrong_declaration(crnn):
    """The declaration is not the interface: the model against itself scores cosine 1."""
    r = validate(crnn[0], crnn[0], crnn[2])
    assert r.outputs[0].cosine_min == pytest.approx(1.0, abs=1e-6)


def test_compare_outputs_compares_shapes_before_values():
    a = np.arange(12, dtype=np.float32).reshape(3, 1, 4)
    with pytest.raises(InterfaceChanged, match=r"output 'y' differs in shape: .* \[3, 1, 4\], .* \[1, 12\] \(sample 0\)"):
        compare_outputs("y", [a], [a.reshape(1, 12)])  # same values, same size: cosine alone would say 1.0


@pytest.mark.parametrize("kind", ["fidelity", "eval"])
def test_quantize_evaluators_compare_shapes_before_values(kind):
    ref, flat = from_proto(paddle_crnn_proto()), from_proto(_flattened(paddle_crnn_proto()))
    ev = FidelityEvaluator(ref, [{"x": X}], 1) if kind == "fidelity" else Evaluator(ref, [{"x": X}], "cosine", None, 1)
    assert ev.drop(ref.clone())[1] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(InterfaceChanged, match=r"output 'softmax_0.tmp_0' .*\[16, 1, 40\], the candidate \[1, 640\]"):
        ev.drop(flat)


def test_shape_text():
    assert shape_text((3, 1, 4)) == "[3, 1, 4]" and shape_text(None) == "?"
    assert shape_text(from_proto(paddle_crnn_proto()).graph.outputs[0].shape) == "[1, seqlen]"


def test_overridable_weights_are_graph_inputs_with_defaults():
    m = overridable_cnn_proto()
    inputs = {i.name for i in m.graph.input}
    assert set(OVERRIDABLE_WEIGHTS) <= inputs and set(OVERRIDABLE_WEIGHTS) <= {t.name for t in m.graph.initializer}
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert {i.name for i in s.get_overridable_initializers()} == set(OVERRIDABLE_WEIGHTS)
