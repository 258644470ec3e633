"""edgecomp.graph: the shared attribute reader, name allocator and layer weight/bias accessors."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from edgecomp.graph import (
    NameAllocator,
    add_initializer,
    attribute,
    bias_add,
    bias_slot,
    initializer_inputs_as_constants,
    layer_bias,
    layer_weight,
    unique_name,
)


def _graph() -> ir.Graph:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    return ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="g")


def _matmul_add(graph: ir.Graph, bias: np.ndarray, output: bool = False) -> tuple[ir.Node, ir.Node]:
    w = add_initializer(graph, "w", np.arange(12, dtype=np.float32).reshape(3, 4))
    b = add_initializer(graph, "b", bias)
    mm = ir.node("MatMul", [graph.inputs[0], w], name="mm")
    add = ir.node("Add", [b, mm.outputs[0]], name="add")
    graph.extend([mm, add])
    graph.outputs.append(add.outputs[0])
    if output:
        graph.outputs.append(mm.outputs[0])
    return mm, add


def test_attribute_reads_every_kind_and_defaults():
    node = ir.node("Foo", [], attributes={"i": 2, "f": 0.5, "s": "NOTSET", "ints": [1, 0]})
    assert attribute(node, "i", 0) == 2
    assert attribute(node, "f", 1.0) == 0.5
    assert attribute(node, "s", "") == "NOTSET"
    assert list(attribute(node, "ints", [])) == [1, 0]
    assert attribute(node, "missing", 7) == 7
    assert attribute(node, "missing") is None


def test_names_are_fresh_across_values_nodes_and_initializers():
    g = _graph()
    mm, _ = _matmul_add(g, np.zeros(4, np.float32))
    mm.outputs[0].name = "y"
    names = NameAllocator(g)
    assert names.unique("x") == "x_1"  # a graph input
    assert names.unique("w") == "w_1"  # an initializer
    assert names.unique("mm") == "mm_1"  # a node
    assert names.unique("y") == "y_1"  # a node output
    assert names.unique("y") == "y_2"  # handed out before
    assert names.unique("fresh") == "fresh"
    assert not names.claim("fresh") and names.claim("other") and "other" in names
    assert unique_name(g, "w") == "w_1"  # nothing reserved by a one-off
    add_initializer(g, "w_1", np.zeros(1, np.float32))
    assert unique_name(g, "w") == "w_2"


def test_matmul_bias_add_and_slot():
    g = _graph()
    mm, add = _matmul_add(g, np.arange(4, dtype=np.float32))
    assert layer_weight(mm).shape == (3, 4)
    assert bias_add(mm) is add
    assert bias_slot(mm) == (add, 0)
    np.testing.assert_array_equal(layer_bias(mm, 4), np.arange(4, dtype=np.float32))


def test_a_bias_of_n_values_in_a_leading_one_shape_counts():
    g = _graph()
    mm, add = _matmul_add(g, np.arange(4, dtype=np.float32).reshape(1, 4))
    assert bias_add(mm) is add
    assert layer_bias(mm, 4).shape == (4,)


def test_no_bias_when_the_matmul_output_is_also_a_graph_output_or_the_add_is_not_a_bias():
    g = _graph()
    mm, _ = _matmul_add(g, np.zeros(4, np.float32), output=True)
    assert bias_add(mm) is None and bias_slot(mm) is None and layer_bias(mm, 4) is None
    g = _graph()
    mm, _ = _matmul_add(g, np.zeros(3, np.float32))  # not [N]
    assert bias_add(mm) is None


def test_a_fed_initializer_is_read_only_when_asked():
    g = _graph()
    mm, add = _matmul_add(g, np.zeros(4, np.float32))
    g.inputs.append(g.initializers["b"])
    assert bias_add(mm) is None
    assert bias_add(mm, graph_inputs=True) is add


def test_gemm_and_conv_weights_as_k_by_n():
    g = _graph()
    b = add_initializer(g, "B", np.arange(12, dtype=np.float32).reshape(4, 3))
    c = add_initializer(g, "C", np.float32(1.5).reshape(1))
    gemm = ir.node("Gemm", [g.inputs[0], b, c], attributes={"transB": 1}, name="gemm")
    g.append(gemm)
    assert layer_weight(gemm).shape == (3, 4)
    np.testing.assert_array_equal(layer_weight(gemm), b.const_value.numpy().T)
    assert bias_slot(gemm) == (gemm, 2)
    np.testing.assert_array_equal(layer_bias(gemm, 4), np.full(4, 1.5, np.float32))
    w = add_initializer(g, "W", np.arange(6, dtype=np.float32).reshape(2, 3, 1, 1))
    conv = ir.node("Conv", [g.inputs[0], w], name="conv")
    g.append(conv)
    np.testing.assert_array_equal(layer_weight(conv), w.const_value.numpy().reshape(2, 3).T)
    assert bias_slot(conv) == (conv, 2) and layer_bias(conv, 2) is None


def test_initializer_inputs_are_constants_before_ir4_and_defaults_after():
    def model(ir_version: int) -> ir.Model:
        x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 2]))
        w = ir.Value(name="w", const_value=ir.tensor(np.ones((2, 3), np.float32), name="w"))
        node = ir.node("MatMul", [x, w])
        g = ir.Graph([x, w], node.outputs, nodes=[node], initializers=[w], opset_imports={"": 8})
        return ir.Model(g, ir_version=ir_version)

    old, new = model(3), model(7)
    assert initializer_inputs_as_constants(old) == 1
    assert [v.name for v in old.graph.inputs] == ["x"] and old.ir_version == 4 and "w" in old.graph.initializers
    assert initializer_inputs_as_constants(new) == 0 and [v.name for v in new.graph.inputs] == ["x", "w"]


def test_default_opset_reads_either_spelling_of_the_default_domain():
    from edgecomp.graph import default_opset

    def model(opsets):
        return ir.Model(ir.Graph([], [], nodes=[], opset_imports=opsets), ir_version=8)

    assert default_opset(model({"": 17})) == 17
    assert default_opset(model({"ai.onnx": 13, "com.microsoft": 1})) == 13
    assert default_opset(model({"com.microsoft": 1})) is None


def test_static_dims_keeps_known_dims_and_marks_symbolic_ones():
    from edgecomp.graph import static_dims

    assert static_dims(ir.Value(name="a", shape=ir.Shape([2, "S", 8]))) == [2, None, 8]
    assert static_dims(ir.Value(name="b")) is None


def test_replace_value_rewires_uses_and_a_graph_output_keeps_its_name():
    from edgecomp.graph import replace_value

    x = ir.Value(name="x", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    relu = ir.node("Relu", [x], name="relu")
    neg = ir.node("Neg", [relu.outputs[0]], name="neg")
    relu.outputs[0].name, neg.outputs[0].name = "r", "y"
    g = ir.Graph([x], [neg.outputs[0]], nodes=[relu, neg], opset_imports={"": 17})
    alt = ir.node("Abs", [x], name="abs")
    g.insert_before(neg, alt)
    replace_value(g, neg.outputs[0], alt.outputs[0])
    assert g.outputs[0] is alt.outputs[0] and alt.outputs[0].name == "y"
    replace_value(g, relu.outputs[0], x)
    assert neg.inputs[0] is x


def test_sort_graph_names_a_node_on_a_cycle():
    import pytest

    from edgecomp.errors import PassFailed
    from edgecomp.graph import sort_graph

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT))
    a = ir.node("Add", [x, x], name="a")
    b = ir.node("Neg", [a.outputs[0]], name="b")
    g = ir.Graph([x], [b.outputs[0]], nodes=[b, a], opset_imports={"": 17})
    sort_graph(g, "testing")
    assert [n.name for n in g] == ["a", "b"]
    a.replace_input_with(1, b.outputs[0])  # a -> b -> a
    with pytest.raises(PassFailed, match=r"testing made the graph cyclic \(through [ab]\)"):
        sort_graph(g, "testing")
