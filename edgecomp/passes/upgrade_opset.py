"""UpgradeOpsetPass: raise the model's default-domain opset to what later passes emit.

Static quantization writes per-channel ``DequantizeLinear(..., axis=0)``, which exists from
opset 13; a model declaring opset 11 or 12 (PaddlePaddle OCR exports, older converters) is
converted with ``onnx.version_converter`` first, or refused with one line when the converter
cannot convert it. A model already at ``min_opset`` or above is left alone.

Also here, what every pass that emits nodes relies on:

- :func:`edgecomp.graph.default_opset` — the model's ``ai.onnx`` version (shared, in graph.py);
- :func:`opset_violations` — nodes (subgraphs included) whose op or attributes do not exist at
  the model's declared opset (the one-line proof that an output loads);
- :func:`drop_unsupported_defaults` — removes attributes a rewriter added that do not exist at
  the declared opset where the node means the same without them (``Reshape allowzero`` before
  opset 14, when the target shape holds no 0).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

import onnx
import onnx_ir as ir

from edgecomp.errors import PassFailed
from edgecomp.graph import attribute, default_opset
from edgecomp.passes.base import EdgecompPass, PassReport

__all__ = ["UpgradeOpsetPass", "opset_violations", "new_violations", "drop_unsupported_defaults"]

#: the lowest IR version each opset needs (onnx.helper.VERSION_TABLE, only the ones we write)
_MIN_IR = {13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9, 20: 9, 21: 10}


class UpgradeOpsetPass(EdgecompPass):
    """Convert the default-domain opset up to ``min_opset`` (a no-op when already there).

    Args:
        min_opset: the opset the model must declare afterwards.
        reason: why (for the summary and the error), e.g. "per-channel DequantizeLinear needs 13".
    """

    def __init__(self, *, min_opset: int = 13, reason: str = ""):
        self.min_opset = int(min_opset)
        self.reason = reason

    def call(self, model: ir.Model) -> PassReport:
        from edgecomp.io import first_line, from_proto, to_proto

        current = default_opset(model)
        if current is None or current >= self.min_opset:
            return self.report(model, False, {"opset": current})
        why = f" ({self.reason})" if self.reason else ""
        try:
            proto = to_proto(model)
            converted = onnx.version_converter.convert_version(proto, self.min_opset)
            converted.ir_version = max(converted.ir_version, _MIN_IR.get(self.min_opset, 7))
            new = from_proto(converted)
        except Exception as e:  # the converter raises RuntimeError/ValidationError/... per adapter
            raise PassFailed(f"the model declares opset {current} and onnx.version_converter cannot upgrade it to "
                             f"{self.min_opset}{why}: {type(e).__name__}: {first_line(e)}; export it again at opset "
                             f">= {self.min_opset}") from e
        if default_opset(new) != self.min_opset:
            raise PassFailed(f"onnx.version_converter left the model at opset {default_opset(new)}, not "
                             f"{self.min_opset}{why}; export it again at opset >= {self.min_opset}")
        model.graph = new.graph  # a model's opset_imports are its graph's: they come along
        model.ir_version = new.ir_version
        bad = opset_violations(model)
        if bad:
            raise PassFailed(f"onnx.version_converter produced nodes invalid at opset {self.min_opset}: {bad[0]}")
        return self.report(model, True, {"opset": f"upgraded {current} → {self.min_opset}{why}"})


def _schema(node: ir.Node, version: int):
    try:
        return onnx.defs.get_schema(node.op_type, version, "")
    except onnx.defs.SchemaError:
        return None


def _default_nodes(model: ir.Model):
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.domain in ("", "ai.onnx"):
            yield node


def opset_violations(model: ir.Model) -> list[str]:
    """One line per default-domain node whose op or attribute is unknown at the declared opset."""
    version = default_opset(model)
    if version is None:
        return []
    out = []
    for node in _default_nodes(model):
        schema = _schema(node, version)
        if schema is None:
            out.append(f"{node.op_type} ({node.name}) does not exist at opset {version}")
            continue
        if schema.deprecated:
            out.append(f"{node.op_type} ({node.name}) is deprecated at opset {version}")
            continue
        extra = sorted(set(node.attributes) - set(schema.attributes))
        if extra:
            out.append(f"{node.op_type} ({node.name}) has attribute {', '.join(extra)}, unknown at opset {version}")
    return out


def new_violations(model: ir.Model, before: Iterable[str]) -> list[str]:
    """:func:`opset_violations` not already in ``before`` (compared without node names, which
    cleanup passes may change)."""
    seen = {_kind(v) for v in before}
    return [v for v in opset_violations(model) if _kind(v) not in seen]


def _kind(line: str) -> str:
    return re.sub(r" \(.*?\)", "", line, count=1)


def _reshape_allowzero_droppable(node: ir.Node) -> bool:
    a = attribute(node, "allowzero", 0)
    if a == 0:
        return True
    shape = node.inputs[1] if len(node.inputs) > 1 else None
    if shape is None or shape.const_value is None:
        return False
    return not bool((shape.const_value.numpy() == 0).any())  # allowzero only changes what a 0 means


_DROPPABLE: dict[tuple[str, str], Any] = {("Reshape", "allowzero"): _reshape_allowzero_droppable}


def drop_unsupported_defaults(model: ir.Model) -> list[str]:
    """Drop attributes unknown at the declared opset where that does not change the node's meaning;
    returns one line per attribute dropped."""
    version = default_opset(model)
    if version is None:
        return []
    dropped = []
    for node in _default_nodes(model):
        schema = _schema(node, version)
        if schema is None:
            continue
        for name in sorted(set(node.attributes) - set(schema.attributes)):
            check = _DROPPABLE.get((node.op_type, name))
            if check is not None and check(node):
                del node.attributes[name]
                dropped.append(f"{node.op_type}.{name} (not in opset {version}, same meaning without it)")
    return dropped

