"""Graph helpers shared by every capability: constants, attributes, subgraphs, uses, name patterns.

One copy of each: a second one is a bug waiting to diverge.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.errors import ConfigError

__all__ = ["const_array", "compile_patterns"]


def const_array(value: ir.Value | None) -> np.ndarray | None:
    """A value's constant array: an initializer or a Constant node's output (not an initializer
    that is also a graph input: the caller may feed another value)."""
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    p = value.producer()
    if p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx") and "value" in p.attributes:
        return p.attributes["value"].as_tensor().numpy()
    return None



def subgraphs(node: ir.Node) -> list[ir.Graph]:
    graphs: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            graphs.append(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            graphs.extend(attr.value)
    return graphs



def attribute(node: ir.Node, name: str, default: Any) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value



def single_use(value: ir.Value) -> ir.Node | None:
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and value not in value.graph.outputs else None



def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    """``patterns`` compiled, or one line naming the first that is not a valid regular expression."""
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"{what} {p!r} is not a string; give regular expressions as text")
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{what} {p!r} is not a valid regular expression ({e})") from None
    return compiled
