"""OptimizeGraphPass: clean the graph up so that what is quantized or pruned is what runs.

Cases handled:
- constant folding and shape-driven simplification (onnxscript's optimizer: folds Constant
  subgraphs, Shape→Gather chains with static shapes, no-op Casts/Reshapes/Identities);
- weights reached through ``Constant`` nodes or ``Identity`` (PaddlePaddle exports): Constants are
  lifted to initializers and Identities bypassed, so a MatMul/Conv/Gemm sees its constant weight;
- a dim stored as a negative number (``dim_value: -1``) becomes an unnamed symbolic dim before
  folding (folding would otherwise take -1 for a size); the model still loads with any batch;
- folding never grows the model: a node whose folded output would hold more elements than its
  constant inputs together (Expand/Tile/ConstantOfShape/Range of a constant, a broadcast Mul of an
  initializer) is left to run, unless the output is shape-sized (at most ``GROW_LIMIT`` elements);
  onnxruntime computes it at session load anyway, so the file only gets bigger by folding it.
  a folded chain that copies a weight still read elsewhere is given up (see
  :func:`_fold_without_growth`), and a ``Reshape`` to ``[batch, features]`` that the rewriter made
  from ``Flatten`` (or that was there) is written as ``Flatten`` again, which needs no shape tensor;
- an initializer that is also a graph input (a default the caller may feed) is detached to a
  plain input while the pass runs and given its default back after: it is never folded,
  rewritten or fused into a Conv (BatchNorm folding) as if it were a constant;
- declared shapes never drive a fold: onnxscript prefers a value's stored shape over the one it
  infers, and rewrites a ``Reshape`` whose output shape is known into a constant target, so a
  graph output declared ``[1, seqlen]`` that really returns ``[T, 1, C]`` (paddle exports) would
  be flattened to the declaration. Before folding every node output's shape (graph outputs and
  ``value_info`` alike; graph inputs are the contract and stay) is detached, so shapes are
  inferred from the inputs only; afterwards each graph output gets its declaration back as it
  was (a wrong declaration is the model's, reported by :mod:`edgecomp.measure.interface`, not
  corrected here) and an intermediate value whose shape inference could not derive (a
  custom-domain op) gets its declared shape back;
- everything written stays valid at the model's declared opset: an attribute the rewriter adds
  that the opset lacks (``Reshape allowzero`` before 14) is dropped where it changes nothing,
  otherwise the pass fails with the node named;
- onnxscript's rewrite rules match their constants exactly (``Add(x, 0) -> x`` no longer takes a
  LayerNorm's epsilon 1e-12 for zero: :func:`_exact_constants`);
- BatchNormalization folded into the preceding Conv/ConvTranspose/Gemm:
  ``W' = W * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``;
- optionally onnxruntime's transformer fusions (``fusions="bert"``): LayerNorm, SkipLayerNorm,
  BiasGelu, Attention, EmbedLayerNorm — the same kernels onnxruntime would fuse at load time,
  made explicit so later passes see them;
- optionally (``layout``) :class:`~edgecomp.passes.attention_layout.SimplifyAttentionLayoutPass`:
  Transpose/Reshape chains merged or folded in the file itself (onnxruntime does it at load).
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from edgecomp.errors import ConfigError, EdgecompError, PassFailed
from edgecomp.graph import histogram
from edgecomp.passes.attention_layout import SimplifyAttentionLayoutPass
from edgecomp.passes.options import OPTIONS
from edgecomp.measure.interface import keeps_interface
from edgecomp.passes.base import EdgecompPass, PassReport, run_pass
from edgecomp.passes.upgrade_opset import drop_unsupported_defaults, new_violations, opset_violations
from edgecomp.step import StepResult

__all__ = ["GROW_LIMIT", "OPTIONS", "OptimizeGraphPass", "run"]

#: A folded output may hold more elements than its constant inputs when it is at most this big: the
#: shape arithmetic (Shape → Gather → Concat) that folding is for; 64 is past any tensor rank.
GROW_LIMIT = 64


class OptimizeGraphPass(EdgecompPass):
    """Fold constants and BatchNorms; optionally apply onnxruntime's transformer fusions.

    Args:
        fold_constants: run onnxscript's constant folding and default rewrite rules.
        fusions: ``"none"`` or ``"bert"`` (onnxruntime.transformers.optimizer, model_type bert).
        layout: merge/fold Transpose and Reshape chains (``SimplifyAttentionLayoutPass``).
        num_heads, hidden_size: for ``fusions="bert"``; 0 lets onnxruntime detect them.
    """

    def __init__(self, *, fold_constants: bool = True, fusions: str = "none", num_heads: int = 0, hidden_size: int = 0,
                 layout: bool = False):
        if fusions not in ("none", "bert"):
            raise ConfigError(f"unknown fusions {fusions!r}; use none or bert")
        self.fold_constants = fold_constants
        self.fusions = fusions
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.layout = layout

    def call(self, model: ir.Model) -> PassReport:
        overridable = _detach_overridable(model)
        try:
            return self._clean(model)
        finally:
            _reattach_overridable(model, overridable)

    def _clean(self, model: ir.Model) -> PassReport:
        before, weights_before = histogram(model), _weights(model)
        invalid_before = opset_violations(model)
        negative = _negative_dims_unknown(model)
        unfolded = 0
        if self.fold_constants:
            unfolded = _fold_without_growth(model)
        _expose_constant_weights(model)
        if self.fold_constants:
            _reshapes_to_flatten(model)
        if self.fusions == "bert":
            _apply_bert_fusions(model, self.num_heads, self.hidden_size)
        if self.layout:
            SimplifyAttentionLayoutPass()(model)
        dropped = drop_unsupported_defaults(model)
        invalid = new_violations(model, invalid_before)
        if invalid:
            raise PassFailed(f"graph cleanup wrote a node the model's opset does not allow: {invalid[0]}")
        after = histogram(model)
        changed = before != after or weights_before != _weights(model)
        rows = [{"op": op, "before": before.get(op, 0), "after": after.get(op, 0)}
                for op in sorted(set(before) | set(after)) if before.get(op, 0) != after.get(op, 0)]
        summary = {"nodes_before": sum(before.values()), "nodes_after": sum(after.values())}
        if negative:
            summary["negative dims made symbolic"] = negative
        if unfolded:
            summary["folds skipped (they would copy a weight)"] = unfolded
        if dropped:
            summary["attributes dropped"] = len(dropped)
        return self.report(model, changed or bool(dropped) or bool(negative), summary, rows)


@keeps_interface("optimize")
def run(model: ir.Model, options: Mapping[str, Any], data: Any = None, context: Any = None) -> StepResult:
    """What ``edgecomp optimize`` and a recipe's optimize step call: :class:`OptimizeGraphPass`
    with ``options`` (its constructor's keywords), the result checked against ``model`` as given
    (:func:`edgecomp.measure.interface.keeps_interface`; ``data`` is unused: synthesized feeds).
    The table ``ops changed`` counts each op type before and after; the pass's record is the evidence."""
    report = run_pass(OptimizeGraphPass(**options), model)
    return StepResult("optimize", report.model, {"graph changed": report.modified, **report.summary},
                      {"ops changed": report.rows}, report.warnings, {"pass": report.to_json()})


def _fold_without_growth(model: ir.Model, attempts: int = 3) -> int:
    """onnxscript's optimizer on ``model``, without the folds that grow it; returns how many folded
    tensors were given up.

    Node by node, :func:`_fold_unless_it_grows` refuses an output larger than its constant inputs.
    A chain can still copy a weight that stays: ``Concat(Slice(b), ...)`` folds to a tensor as big
    as its inputs while ``b`` is still read elsewhere (another If branch). So the optimizer runs
    on a copy; each folded tensor of more than ``GROW_LIMIT`` elements whose source weights are
    still in the result marks its whole chain (onnxscript's ``folded_from``) not to fold, and the
    optimizer runs again on a fresh copy, at most ``attempts`` times; the copy replaces the graph."""
    import onnxscript.optimizer

    from edgecomp.io import first_line

    sources = {name for g in _graphs(model) for name in g.initializers} | {
        n.outputs[0].name for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "Constant"}
    blocked: set[str] = set()
    given_up = 0
    for _ in range(attempts):
        work = model.clone()
        declared = _detach_declared_shapes(work)
        try:
            with _multi_output_rules_guarded():
                onnxscript.optimizer.optimize_ir(work, should_fold=functools.partial(_fold_unless_it_grows, blocked=blocked))
        except EdgecompError:
            raise
        except Exception as e:
            raise PassFailed(f"graph cleanup (onnxscript's optimizer) failed on this model: "
                             f"{type(e).__name__}: {first_line(e)}") from e
        _restore_declared_shapes(work, declared)
        copies = _copied_weights(work, sources)
        if not copies:
            break
        given_up += len(copies)
        for name, chain in copies.items():
            blocked |= chain | {name}
    model.graph = work.graph  # a model's opset_imports are its graph's: they come along
    model.functions.clear()
    model.functions.update(work.functions)
    return given_up


def _detach_overridable(model: ir.Model) -> dict[str, ir.TensorProtocol]:
    """Initializers that are also graph inputs (defaults the caller may feed, IR >= 4) become plain
    inputs, so no fold, rewrite or BatchNorm fusion takes their default for a constant (onnxscript
    treats every ``const_value`` as one); returns their tensors by name."""
    detached = {}
    for v in model.graph.inputs:
        if v.name in model.graph.initializers and v.const_value is not None:
            detached[v.name] = v.const_value
            del model.graph.initializers[v.name]
            v.const_value = None
    return detached


def _reattach_overridable(model: ir.Model, detached: Mapping[str, ir.TensorProtocol]) -> None:
    """The defaults of :func:`_detach_overridable` back on the inputs of the same names."""
    for v in model.graph.inputs:
        if v.name in detached and v.name not in model.graph.initializers:
            v.const_value = detached[v.name]
            model.graph.register_initializer(v)


def _detach_declared_shapes(model: ir.Model) -> tuple[list[ir.Shape | None], dict[str, ir.Shape]]:
    """Clear the stored shape of every node output (subgraphs included) so that folding sees only
    what it infers from the inputs; returns the main graph's output declarations by position and
    every cleared shape by value name, for :func:`_restore_declared_shapes`."""
    outputs = [v.shape for v in model.graph.outputs]
    cleared = {}
    for g in _graphs(model):
        for v in [*g.outputs, *(o for n in g for o in n.outputs)]:
            if v is not None and v.shape is not None and not v.is_graph_input() and not v.is_initializer():
                if v.name:
                    cleared[v.name] = v.shape
                v.shape = None
    return outputs, cleared


def _restore_declared_shapes(model: ir.Model, declared: tuple[list[ir.Shape | None], dict[str, ir.Shape]]) -> None:
    """The main graph's outputs get their declarations back (the model's interface, as given; an
    output declared without a shape keeps the inferred one, as onnx.checker wants a main-graph
    output's shape); other values keep what inference found, or their declaration where it found
    nothing."""
    outputs, cleared = declared
    for g in _graphs(model):
        for v in [*g.outputs, *(o for n in g for o in n.outputs)]:
            if v is not None and v.shape is None and v.name in cleared:
                v.shape = cleared[v.name]
    for v, shape in zip(model.graph.outputs, outputs):
        if shape is not None:
            v.shape = shape

class _FirstOpGuard:
    """A rewrite rule tried only at nodes whose op its pattern's first output node matches: the
    first test onnxscript's matcher (0.7) makes, made before the matcher's setup. For a pattern with
    several output nodes (SlicesSplit) the matcher indexes the whole graph by op at every node it
    is tried on before that test: one scan per node, quadratic (597 s on 18 k nodes); for the
    others the setup is ~50 us a node and rule (45 rules). The guard rejects, up front, exactly
    the nodes the matcher would reject; everything else is the rule's own."""

    def __init__(self, rule, op):
        self._rule, self._op = rule, op

    def __getattr__(self, name):
        return getattr(self._rule, name)

    def try_rewrite(self, model, graph_or_function, node, **kwargs):
        if not self._op.matches(node.op_type):
            return None
        return self._rule.try_rewrite(model, graph_or_function, node, **kwargs)


@contextlib.contextmanager
def _multi_output_rules_guarded():
    """onnxscript's default rewrite rules behind :class:`_FirstOpGuard`, for the duration of one
    ``optimize_ir`` call (which reads the module's rule tuple at call time). A rule whose pattern
    cannot be read (another onnxscript version) stays as it is."""
    from onnxscript import rewriter

    default = getattr(rewriter, "_DEFAULT_REWRITE_RULES", None)
    if not isinstance(default, tuple):
        yield
        return
    guarded = []
    for rule in default:
        outputs = getattr(getattr(rule, "_target_pattern", None), "output_nodes", None) or []
        op = getattr(outputs[0], "op", None) if outputs else None
        guarded.append(_FirstOpGuard(rule, op) if callable(getattr(op, "matches", None)) else rule)
    rewriter._DEFAULT_REWRITE_RULES = tuple(guarded)
    loose = _exact_constants(default)
    try:
        yield
    finally:
        rewriter._DEFAULT_REWRITE_RULES = default
        for const, tols in loose:
            const._rel_tol, const._abs_tol = tols


def _exact_constants(rules) -> list[tuple[Any, tuple[float, float]]]:
    """Make every constant of the rules' patterns match only its exact value; returns each with its
    tolerances, to put back. onnxscript (0.7) matches them within ``abs_tol=1e-8``, so its
    ``Add(x, 0) -> x`` rule took a decomposed LayerNorm's epsilon (BERT's 1e-12, TorchScript
    exports below opset 17) for zero and removed it: a constant row then divides by zero, and
    onnxruntime no longer fuses the chain into LayerNormalization (the zoo's tiny encoders ran
    1.2x slower in float after the cleanup, and their int8 models with them)."""
    found = []
    for rule in rules:
        patterns = [getattr(rule, "_target_pattern", None), getattr(getattr(rule, "_matcher", None), "pattern", None)]
        for pattern in patterns:
            for node in getattr(pattern, "_nodes", None) or []:
                for value in getattr(node, "inputs", None) or []:
                    if hasattr(value, "_abs_tol") and hasattr(value, "_rel_tol") and value._abs_tol + value._rel_tol:
                        found.append((value, (value._rel_tol, value._abs_tol)))
                        value._rel_tol = value._abs_tol = 0.0
    return found


def _copied_weights(model: ir.Model, sources: set[str]) -> dict[str, set[str]]:
    """Folded tensors of more than ``GROW_LIMIT`` elements whose source weights are still in
    ``model``: name → the values it was folded from."""
    import onnxscript.optimizer

    alive = {name for g in _graphs(model) for name in g.initializers}
    out = {}
    for g in _graphs(model):
        for name, v in g.initializers.items():
            chain = v.meta.get(onnxscript.optimizer.FOLDED_FROM_KEY)
            if (chain and name not in sources and v.const_value is not None and v.const_value.size > GROW_LIMIT
                    and chain & sources & alive):
                out[name] = set(chain)
    return out


def _fold_unless_it_grows(node: ir.Node, blocked: set[str] = frozenset()) -> bool | None:
    """False (do not fold) when an output of ``node`` is in ``blocked``, or when its output, as
    inferred, holds more than ``GROW_LIMIT`` elements and more than its constant inputs together;
    None leaves the decision to the folder."""
    if any(o.name in blocked for o in node.outputs):
        return False
    out = node.outputs[0] if node.outputs else None
    size = _static_size(out)
    if size is None or size <= GROW_LIMIT:
        return None
    inputs = sum(v.const_value.size for v in node.inputs if v is not None and v.const_value is not None)
    return False if size > inputs else None


def _static_size(v: ir.Value | None) -> int | None:
    if v is None or v.shape is None or not all(isinstance(d, int) for d in v.shape):
        return None
    return math.prod(v.shape)


def _graphs(model: ir.Model) -> list[ir.Graph]:
    """The main graph and every subgraph."""
    return [model.graph] + [g for node in ir.traversal.RecursiveGraphIterator(model.graph)
                            for a in node.attributes.values()
                            for g in ([a.value] if a.type == ir.AttributeType.GRAPH else
                                      list(a.value) if a.type == ir.AttributeType.GRAPHS else [])]


def _drop_unused_initializers(model: ir.Model) -> None:
    """Initializers no node reads are removed in every graph (onnx-ir's unused-node removal clears
    the main graph's only)."""
    for g in _graphs(model):
        keep = {*g.inputs, *g.outputs}
        for name, v in list(g.initializers.items()):
            if not v.uses() and v not in keep:
                del g.initializers[name]


def _reshapes_to_flatten(model: ir.Model) -> None:
    """``Reshape(x, [0 or d0, -1 or prod(x.shape[1:])])`` → ``Flatten(x, axis=1)``: the same
    result (``allowzero`` off) without a shape tensor. x's rank must be known and > 2."""
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
            continue
        x, shape = node.inputs
        if (x is None or shape is None or shape.const_value is None or x.shape is None or len(x.shape) <= 2
                or int(node.attributes.get("allowzero", ir.AttrInt64("allowzero", 0)).value)):
            continue
        s = shape.const_value.numpy().ravel()
        if s.size != 2 or not np.issubdtype(s.dtype, np.integer):
            continue
        rest = x.shape[1:]
        features = math.prod(rest) if all(isinstance(d, int) for d in rest) else None
        if s[0] != 0 and not (isinstance(x.shape[0], int) and s[0] == x.shape[0]):
            continue
        if s[1] != -1 and (features is None or s[1] != features):
            continue
        flat = ir.node("Flatten", [x], attributes={"axis": 1}, name=node.name)
        flat.outputs[0].shape, flat.outputs[0].type = node.outputs[0].shape, node.outputs[0].type
        node.graph.insert_before(node, flat)
        node.outputs[0].replace_all_uses_with(flat.outputs[0], replace_graph_outputs=True)
        flat.outputs[0].name = node.outputs[0].name
        node.graph.remove(node, safe=True)
    _drop_unused_initializers(model)


def _negative_dims_unknown(model: ir.Model) -> int:
    """Dims stored as a negative number (``dim_value: -1``, some converters' "any batch") become
    unnamed symbolic dims: constant folding would otherwise take -1 for a real size (a folded
    ``Shape`` then feeds -1 to Expand/Reshape). Returns how many dims were changed."""
    count = 0
    graphs = [model.graph] + [g for node in ir.traversal.RecursiveGraphIterator(model.graph)
                              for a in node.attributes.values()
                              for g in ([a.value] if a.type == ir.AttributeType.GRAPH else
                                        list(a.value) if a.type == ir.AttributeType.GRAPHS else [])]
    for g in graphs:
        values = [*g.inputs, *g.outputs, *(o for n in g for o in n.outputs)]
        for v in values:
            if v is None or v.shape is None or not any(isinstance(d, int) and d < 0 for d in v.shape):
                continue
            v.shape = ir.Shape([ir.SymbolicDim(None) if isinstance(d, int) and d < 0 else d for d in v.shape])
            count += 1
    return count


def _expose_constant_weights(model: ir.Model) -> None:
    """Constant nodes become initializers, and ``Identity(initializer)`` whose output is not a graph
    output is bypassed, so a weight fed either way is a constant input. (Identities of other values
    stay: in a subgraph, bypassing one would rename an outer-scope value.)"""
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None or x.const_value is None or not x.is_initializer() or y.is_graph_output():
            continue
        if x.graph is not node.graph:
            continue  # an outer graph's initializer read in a subgraph: leave the scoping alone
        y.replace_all_uses_with(x)
        node.graph.remove(node, safe=True)


def _weights(model: ir.Model) -> dict[str, tuple]:
    """Initializer names and shapes: folding can change them without changing op counts."""
    return {name: tuple(v.shape) if v.shape is not None else None for name, v in model.graph.initializers.items()}


def _apply_bert_fusions(model: ir.Model, num_heads: int, hidden_size: int) -> None:
    """Replace ``model``'s graph with onnxruntime's fused one (in place on the ir.Model)."""
    import logging

    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.onnx_model_bert import BertOnnxModel

    from edgecomp.io import from_proto, to_proto

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its shape-inference fallback prints to stdout
            bert = BertOnnxModel(to_proto(model), num_heads, hidden_size)
            opts = FusionOptions("bert")
            bert.optimize(opts, add_dynamic_axes=False)
            bert.topological_sort()
        fused = from_proto(bert.model)
    except Exception as e:
        raise PassFailed(f"onnxruntime's bert fusions failed: {type(e).__name__}: {e}") from e
    _replace_graph(model, fused)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):  # the fused ops' domain is not imported by it
        if node.domain not in ("", "ai.onnx") and node.domain not in model.opset_imports:
            model.opset_imports[node.domain] = 1


def _replace_graph(model: ir.Model, other: ir.Model) -> None:
    model.graph = other.graph  # a model's opset_imports are its graph's: they come along
