"""Find and replace the final classifier of an ONNX model (transfer learning to a new task).

The head is the linear layer that computes the model's first output directly:

- ``Gemm(x, B, C)`` with a constant B (``transB`` either way) and an optional constant C;
- ``MatMul(x, W)`` with a constant 2-D W, alone or followed by the ``Add`` of a constant bias.

Anything else producing the first output (a Softmax after the logits, a Conv head, a weight
computed at run time) is refused with one line naming the node, since training through it with
cross-entropy would be wrong or there is no linear layer to resize.

The new head keeps the old one's input width K and op (so its graph, names of the other nodes and
dynamic axes stay), with N outputs: W ~ U(-1/√K, 1/√K) (seeded; torch's ``nn.Linear`` bound) and a
zero bias, as new initializers; the old head's weights are dropped when nothing else reads them.
The first output's last dimension becomes N.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir

from edgecomp.errors import FinetuneError
from edgecomp.graph import add_initializer, attribute, bias_add, const_array, unique_name

__all__ = ["Head", "find_head", "replace_head"]


@dataclasses.dataclass
class Head:
    node: ir.Node                 # the Gemm or MatMul
    add: ir.Node | None           # the bias Add after a MatMul
    inputs: int                   # K
    classes: int                  # N before the replacement
    new: tuple[str, ...] = ()     # the new head's initializers, once replaced
    new_classes: int = 0          # its N

    def describe(self) -> str:
        what = f"{self.node.op_type}{' + Add' if self.add is not None else ''}"
        return f"{what} node {self.node.name or '(unnamed)'!r} ({self.inputs} -> {self.classes})"


def find_head(model: ir.Model) -> Head:
    """The linear layer that computes the first output, or :class:`FinetuneError` saying why there is none."""
    graph = model.graph
    if not graph.outputs:
        raise FinetuneError("the model has no outputs; there is no classifier to replace")
    out = graph.outputs[0]
    node = out.producer()
    if node is None:
        raise FinetuneError(f"the output {out.name!r} is not computed by a node; there is no classifier to replace")
    add = None
    if node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        matmul = next((v.producer() for v in node.inputs if v is not None and v.producer() is not None
                       and v.producer().op_type == "MatMul"), None)
        if matmul is not None and bias_add(matmul) is node:
            node, add = matmul, node
    if node.op_type not in ("Gemm", "MatMul") or node.domain not in ("", "ai.onnx"):
        raise FinetuneError(f"no classifier to replace: the output {out.name!r} comes from {node.op_type} node "
                            f"{node.name!r}, not from a Gemm or MatMul(+Add) layer; fine-tune without new_head "
                            "or give the model whose logits a linear layer computes")
    w = const_array(node.inputs[1])
    if w is None or w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise FinetuneError(f"no classifier to replace: {node.op_type} node {node.name!r} computing {out.name!r} "
                            "has no constant 2-D float weight; fine-tune without new_head")
    if node.op_type == "Gemm" and int(attribute(node, "transA", 0)):
        raise FinetuneError(f"Gemm node {node.name!r} (the head) transposes its input (transA); "
                            "fine-tune without new_head")
    transposed = node.op_type == "Gemm" and int(attribute(node, "transB", 0))
    k, n = (w.shape[1], w.shape[0]) if transposed else w.shape
    return Head(node, add, int(k), int(n))


def replace_head(model: ir.Model, classes: int, seed: int = 0) -> Head:
    """Give ``model`` (changed in place) a new head with ``classes`` outputs; the head that was replaced."""
    head = find_head(model)
    graph, node = model.graph, head.node
    old_w = node.inputs[1]
    dtype = old_w.const_value.numpy().dtype
    bound = 1.0 / np.sqrt(head.inputs)
    w = np.random.default_rng(seed).uniform(-bound, bound, (head.inputs, classes))
    transposed = node.op_type == "Gemm" and int(attribute(node, "transB", 0))
    new_w = add_initializer(graph, unique_name(graph, "new_head_weight"), (w.T if transposed else w).astype(dtype))
    new_b = add_initializer(graph, unique_name(graph, "new_head_bias"), np.zeros(classes, dtype))
    old = [old_w]
    node.replace_input_with(1, new_w)
    if head.add is not None:
        slot = 0 if head.add.inputs[1] is node.outputs[0] else 1
        old.append(head.add.inputs[slot])
        head.add.replace_input_with(slot, new_b)
    elif node.op_type == "Gemm":
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            old.append(node.inputs[2])
            node.replace_input_with(2, new_b)
        else:
            _append_input(node, new_b)
    else:  # a MatMul without bias stays without one: its new weight is all it has
        graph.initializers.pop(new_b.name)
    for v in old:
        if v is not None and v.name in graph.initializers and not v.uses() and not v.is_graph_output():
            graph.initializers.pop(v.name)
    for n in (node, head.add):  # stale shape annotations of the old width
        if n is not None and not n.outputs[0].is_graph_output():
            n.outputs[0].shape = None
    out = graph.outputs[0]
    if out.shape is not None and len(out.shape):
        out.shape = ir.Shape([*list(out.shape)[:-1], classes])
    head.new_classes = classes
    head.new = tuple(v.name for v in (new_w, new_b) if v.name in graph.initializers)
    return head


def _append_input(node: ir.Node, value: ir.Value) -> None:
    """Gemm's optional C, when the old head had none."""
    node.resize_inputs(3)
    node.replace_input_with(2, value)
