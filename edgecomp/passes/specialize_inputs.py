"""SpecializeInputsPass: treat inputs the deployment fixes (``--value sr=16000``) as constants,
inline every ``If`` they decide, and guard the input so that no other value is silently ignored.

Why: a model with a mode input (silero-vad's sample rate ``sr``) keeps its layers inside an ``If``
on that input, where calibration and pruning cannot see them. A deployment feeds one value, so
the taken branch can live in the main graph and be quantized or pruned like any other layer.

Cases handled:
- a fixed input is a graph input (not an initializer) of static shape: one value fills it, or
  exactly as many values as it holds; the value must fit its dtype (an integer input gets an
  integer, a bool input 0 or 1, values inside the integer range) — else one ``ConfigError`` line;
- every use of the input (also as an outer-scope value inside If/Loop/Scan bodies) reads a
  constant initializer instead;
- an ``If`` whose condition depends on a fixed input and folds to a constant (onnxscript's
  constant folder, on a copy of the model, with every ``If`` held back from the folder so that
  this pass does the inlining and records it) is replaced by its taken branch's nodes. Recursively:
  an ``If`` in the taken branch is decided the same way on the next round, until no round decides
  one; Ifs and Loops whose condition stays unknown are left as they are;
- inlining keeps the graph valid: branch initializers move to the enclosing graph; a moved value
  or node whose name is in use elsewhere in the model gets a fresh name; the If's output names
  stay (a branch output computed by the branch takes the If output's name); a branch output that
  is an outer-scope value or a constant becomes an ``Identity`` where the If output is a graph
  output; outer-scope references need no rewiring (values are shared objects in onnx-ir);
- an If whose condition folds only through static shapes (not through a fixed input) is left to
  the graph cleanup: deciding it from a declared shape could change what the model computes;
- the rest of what the value makes constant (a ``Reshape`` shape, a ``Range`` length) is folded
  by the graph cleanup every command runs next (:class:`~edgecomp.passes.optimize_graph.OptimizeGraphPass`);
- a value that decides no If, lets no node that reads it fold and gives none of their outputs a
  static shape is a no-op: that input is left untouched (no constant, no guard) and the record
  says so (``no effect``), so the caller can warn.

The input stays **declared** (callers keep feeding it). A fed value other than the fixed one is
an **error the model reports**, never silently ignored: each specialized input gets a guard,
``idx = Where(Equal(input, value), 0, 1)`` (``ReduceMax`` over the elements of a non-scalar
input), ``Gather([0], idx)`` added to the smallest numeric graph output (before opset 11 a float
input is compared as ``Not(Greater(Abs(input - value), 0))``; before opset 9 ``Cast(Not(equal))``
stands for ``Where``; other integer widths and float16 are cast to int64 / float32 first). For
the fixed value the output is ``y + 0 = y`` (bit-exact; four scalar ops); for any other value the ``Gather`` index is
out of range and onnxruntime fails with the guard node's name in its message, e.g.
``Name:'guard: input sr must be 16000 (...)'``. onnxruntime cannot fold or drop the guard: it
reads a graph input and feeds a graph output. Keeping the other branch float and taking it at run
time was the alternative; it was not chosen because folding also fixes shapes (a Reshape fed by
the value), which no kept branch can undo, and because the kept branch would hold the untaken
layers' weights in every deployment that never uses them.

The fixed values and the guard are recorded in the model's metadata (``edgecomp.fixed_inputs``:
``sr=16000`` in ``--value`` syntax, space-separated; ``edgecomp.guard``: what a mismatch does).
"""

from __future__ import annotations

import collections
from typing import Any, Mapping

import numpy as np
import onnx_ir as ir

from edgecomp.errors import ConfigError, PassFailed
from edgecomp.graph import NameAllocator, add_initializer, attribute, default_opset, subgraphs
from edgecomp.passes.base import EdgecompPass, PassReport, one_line_failures

__all__ = ["SpecializeInputsPass", "FIXED_INPUTS_KEY", "GUARD_KEY", "fixed_inputs", "format_values", "mode_inputs",
           "mode_hint"]

FIXED_INPUTS_KEY = "edgecomp.fixed_inputs"
GUARD_KEY = "edgecomp.guard"
_HELD = "edgecomp.held"  # the domain Ifs get on the folder's copy, so that the folder does not inline them


def format_values(values: Mapping[str, np.ndarray]) -> str:
    """``{"sr": [16000]}`` → ``sr=16000`` (the ``--value`` syntax; several inputs space-separated)."""
    return " ".join(f"{k}={','.join(_num(x) for x in np.asarray(v).ravel())}" for k, v in values.items())


def fixed_inputs(model: ir.Model) -> dict[str, np.ndarray]:
    """The values a specialized model was fixed to (from its metadata), as ``--value`` would give them."""
    text = model.metadata_props.get(FIXED_INPUTS_KEY, "")
    out = {}
    for item in text.split():
        name, _, raw = item.partition("=")
        try:
            out[name] = np.array([float(x) for x in raw.split(",")])
        except ValueError:
            continue
    return out


def mode_inputs(model: ir.Model) -> list[str]:
    """Graph inputs of static shape that the condition of an If depends on (walking producers back
    from each condition; an If in a subgraph counts too): the inputs ``--value`` could fix."""
    static = {v.name for v in model.graph.inputs if v.name not in model.graph.initializers and v.shape is not None
              and all(isinstance(d, int) for d in v.shape)}
    found: list[str] = []
    seen: set[int] = set()
    todo = [n.inputs[0] for n in ir.traversal.RecursiveGraphIterator(model.graph) if _is_if(n) and n.inputs
            and n.inputs[0] is not None]
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_graph_input() and v.name in static and v.name not in found:
            found.append(v.name)
        p = v.producer()
        if p is not None:
            todo += [x for x in p.inputs if x is not None]
    return found


def mode_hint(model: ir.Model) -> str:
    """`` (an If depends on input sr: --value sr=V fixes it and inlines the taken branch)``, or ""."""
    names = mode_inputs(model)
    if not names:
        return ""
    return (f" (an If depends on input{'s' if len(names) > 1 else ''} {', '.join(names)}: "
            f"{' '.join(f'--value {n}=V' for n in names)} fixes {'them' if len(names) > 1 else 'it'} "
            "and inlines the taken branch)")


def _num(x: Any) -> str:
    """One value as text that reads back to the same value of the input's dtype (repr: shortest
    round trip), integers without a decimal point."""
    x = x.item() if hasattr(x, "item") else x
    if isinstance(x, (bool, np.bool_)):
        return str(int(x))
    if isinstance(x, float) and x.is_integer() and abs(x) < 2**53:
        return str(int(x))
    return repr(float(x)) if isinstance(x, float) else str(x)


class SpecializeInputsPass(EdgecompPass):
    """Fix inputs to values, inline the Ifs they decide, guard the inputs (see the module docstring).

    Args:
        values: input name → the value(s) (``--value NAME=V[,V...]``; one value fills the input).
        guard: add the run-time guard (True; only tests of the inlining itself turn it off).
    """

    def __init__(self, *, values: Mapping[str, Any], guard: bool = True):
        self.values = {str(k): np.asarray(v) for k, v in values.items()}
        self.guard = guard

    def requires(self, model: ir.Model) -> None:
        if not self.values:
            raise ConfigError("no input value given to specialize on")

    @one_line_failures
    def call(self, model: ir.Model) -> PassReport:
        fixed = {name: _fixed_array(model, name, raw) for name, raw in self.values.items()}
        already = _already_fixed(model, fixed)
        fixed = {k: v for k, v in fixed.items() if k not in already}
        inputs = {v.name: v for v in model.graph.inputs}
        read = {name for g in _graphs_of(model) for name, v in g.initializers.items() if v.uses()}
        consts = {}
        for name, arr in fixed.items():
            consts[name] = _substitute(model, inputs[name], arr)
        ifs_before = _count_ifs(model)
        rows: list[dict[str, Any]] = []
        folded: set[str] = set()
        for _ in range(ifs_before + 1 if consts else 0):
            decided, folds = _decide(model, consts)
            folded |= folds
            if not decided:
                break
            rows += _inline_all(model, decided)
        _drop_orphans(model, read)  # weights only the dropped branches read
        used = {name for name in fixed
                if name in folded or any(name in r["decided by"].split(", ") for r in rows)}
        unused = [name for name in fixed if name not in used]
        for name in unused:  # a no-op: the input is read as before
            consts[name].replace_all_uses_with(inputs[name])
            del model.graph.initializers[consts[name].name]
        guards = []
        if used and self.guard:
            guards = _add_guards(model, {n: (inputs[n], fixed[n]) for n in fixed if n in used})
        summary: dict[str, Any] = {}
        if used:
            given = {n: fixed[n] for n in fixed if n in used}
            summary["inputs fixed"] = format_values(given)
            summary["Ifs inlined"] = len(rows)
            left = _count_ifs(model)
            if left:
                summary["Ifs left (condition not constant)"] = left
            if guards:
                summary["guard"] = ("a different value fails in onnxruntime with the node named "
                                    + "; ".join(repr(g) for g in guards))
            model.metadata_props[FIXED_INPUTS_KEY] = " ".join(
                x for x in [model.metadata_props.get(FIXED_INPUTS_KEY, ""), format_values(given)] if x)
            if guards:
                model.metadata_props[GUARD_KEY] = "; ".join(x for x in [
                    model.metadata_props.get(GUARD_KEY, ""),
                    "a value other than the fixed one fails in the Gather node named " + "; ".join(repr(g) for g in guards),
                ] if x)
        if already:
            summary["already fixed"] = format_values(already)
        if unused:
            summary["no effect"] = [f"{n}: decides no If, folds nothing and fixes no shape; the input is left as it was"
                                    for n in unused]
        return self.report(model, bool(used), summary, rows)

    def ensures(self, model: ir.Model) -> None:
        from edgecomp.io import check_model

        try:
            check_model(model)
        except Exception as e:
            raise PassFailed(f"specializing the inputs wrote an invalid graph ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); please report this") from e


# --- the fixed values ---------------------------------------------------------------------------

def _fixed_array(model: ir.Model, name: str, raw: np.ndarray) -> np.ndarray:
    """``raw`` as the input's dtype and shape, or one ConfigError line saying what is wrong."""
    inputs = {v.name: v for v in model.graph.inputs}
    v = inputs.get(name)
    if v is None or name in model.graph.initializers:
        real = [x.name for x in model.graph.inputs if x.name not in model.graph.initializers]
        what = "a weight with a default (an initializer), not an input a value fixes" if v is not None else \
            "not an input of the model"
        raise ConfigError(f"value {name}: {what}; the model's inputs are {', '.join(real)}")
    if v.dtype is None or v.shape is None:
        raise ConfigError(f"value {name}: the input declares no dtype or shape, so no constant can stand for it")
    dims = list(v.shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise ConfigError(f"value {name}: the input's shape {_shape_text(dims)} is not static; a fixed value "
                          "needs a fixed shape")
    dtype = v.dtype.numpy()
    raw = np.asarray(raw, dtype=np.float64).ravel()
    if np.issubdtype(dtype, np.bool_):
        if not np.isin(raw, (0, 1)).all():
            raise ConfigError(f"value {name}: the input is bool; give 0 or 1, got {_list(raw)}")
    elif np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        if not (np.all(raw == np.round(raw)) and raw.min() >= info.min and raw.max() <= info.max):
            raise ConfigError(f"value {name}: the input is {np.dtype(dtype).name}; give integers in "
                              f"[{info.min}, {info.max}], got {_list(raw)}")
    elif not np.issubdtype(dtype, np.floating):
        raise ConfigError(f"value {name}: the input is {np.dtype(dtype).name}; only number and bool inputs can be fixed")
    size = int(np.prod(dims, dtype=np.int64))
    if raw.size == 1:
        return np.full(dims, raw[0]).astype(dtype)
    if raw.size != size:
        raise ConfigError(f"value {name}: the input has shape {_shape_text(dims)} ({size} values); give one value "
                          f"or {size}, got {raw.size}")
    return raw.reshape(dims).astype(dtype)


def _already_fixed(model: ir.Model, fixed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inputs an earlier specialization fixed to the same values (nothing to do again); a
    different value for one of them is refused: the model's guard accepts only the first."""
    before = fixed_inputs(model)
    same = {}
    for name, arr in fixed.items():
        if name not in before:
            continue
        if before[name].size not in (1, arr.size) or not np.all(np.asarray(arr, np.float64).ravel() == before[name]):
            raise ConfigError(f"value {name}: this model was already specialized with "
                              f"{format_values({name: before[name]})}; specialize the original model instead")
        same[name] = arr
    return same


def _graphs_of(model: ir.Model) -> list[ir.Graph]:
    return [model.graph] + [g for n in ir.traversal.RecursiveGraphIterator(model.graph) for g in subgraphs(n)]


def _drop_orphans(model: ir.Model, read: set[str]) -> None:
    """Initializers that were read before and are read by nothing now (an untaken branch's
    weights) are removed; the graph's inputs and outputs are never touched."""
    for g in _graphs_of(model):
        keep = {v.name for v in [*g.inputs, *g.outputs]}
        for name, v in list(g.initializers.items()):
            if name in read and name not in keep and not v.uses():
                del g.initializers[name]


def _shape_text(dims) -> str:
    return "[" + ", ".join(str(d) for d in dims) + "]"


def _list(raw: np.ndarray) -> str:
    return ",".join(_num(x) for x in raw[:8]) + ("..." if raw.size > 8 else "")


def _substitute(model: ir.Model, value: ir.Value, array: np.ndarray) -> ir.Value:
    """Every use of ``value`` (in any graph) reads a new initializer holding ``array``."""
    names = NameAllocator(model.graph)
    const = add_initializer(model.graph, names.unique(f"{value.name}_fixed"), array)
    const.type, const.shape = value.type, value.shape
    value.replace_all_uses_with(const)
    return const


# --- deciding Ifs -------------------------------------------------------------------------------

def _count_ifs(model: ir.Model) -> int:
    return sum(_is_if(n) for n in ir.traversal.RecursiveGraphIterator(model.graph))


def _is_if(node: ir.Node) -> bool:
    return node.op_type == "If" and node.domain in ("", "ai.onnx")


def _dependents(model: ir.Model, sources: Mapping[str, ir.Value]) -> dict[int, set[str]]:
    """id(value) → the fixed inputs it depends on: forward from each constant through the nodes
    that read it; a node inside a subgraph makes the outputs of the node that owns the subgraph
    (and of that node's owners) depend on it too."""
    owner: dict[int, ir.Node] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for g in subgraphs(node):
            owner[id(g)] = node
    deps: dict[int, set[str]] = collections.defaultdict(set)
    for name, const in sources.items():
        todo, seen = [const], {id(const)}
        deps[id(const)].add(name)
        while todo:
            v = todo.pop()
            for use in v.uses():
                node = use.node
                chain = [node]
                while node.graph is not None and id(node.graph) in owner:
                    node = owner[id(node.graph)]
                    chain.append(node)
                for n in chain:
                    for o in n.outputs:
                        deps[id(o)].add(name)
                        if id(o) not in seen:
                            seen.add(id(o))
                            todo.append(o)
    return deps


def _decide(model: ir.Model, consts: Mapping[str, ir.Value]) -> tuple[list[tuple[ir.Node, bool, str]], set[str]]:
    """Fold a copy of ``model`` with every If held back; returns the Ifs of ``model`` whose
    condition depends on a fixed input and became constant (node, branch taken, deciding inputs),
    and the fixed inputs that let some node fold."""
    import onnxscript.optimizer

    deps = _dependents(model, consts)
    work = model.clone()
    ours = list(ir.traversal.RecursiveGraphIterator(model.graph))
    theirs = list(ir.traversal.RecursiveGraphIterator(work.graph))
    if len(ours) != len(theirs) or any(a.op_type != b.op_type for a, b in zip(ours, theirs)):
        raise PassFailed("the model's copy differs from the model (onnx-ir clone); please report this")
    for node in theirs:
        if _is_if(node):
            node.domain = _HELD
    work_consts = {name: work.graph.initializers[c.name] for name, c in consts.items()}
    uses_before = {name: len(c.uses()) for name, c in work_consts.items()}
    vague = {name: {id(o) for u in c.uses() for o in u.node.outputs if not _static(o)}
             for name, c in work_consts.items()}
    onnxscript.optimizer.fold_constants_ir(work, onnx_shape_inference=True)
    folded = {name for name, c in work_consts.items()
              if len(c.uses()) < uses_before[name]  # a reader folded away
              or any(id(o) in vague[name] and _static(o) for u in c.uses() for o in u.node.outputs)}  # or got a static shape
    decided = []
    for a, b in zip(ours, theirs):
        if not _is_if(a) or not a.inputs or a.inputs[0] is None:
            continue
        cond = b.inputs[0]
        by = deps.get(id(a.inputs[0]))
        if not by or cond is None or cond.const_value is None:
            continue
        arr = cond.const_value.numpy()
        if arr.size != 1:
            continue
        decided.append((a, bool(arr.ravel()[0]), ", ".join(sorted(by))))
    return decided, folded


def _static(v: ir.Value) -> bool:
    return v.shape is not None and all(isinstance(d, int) for d in v.shape)


# --- inlining -----------------------------------------------------------------------------------

def _inline_all(model: ir.Model, decided: list[tuple[ir.Node, bool, str]]) -> list[dict[str, Any]]:
    """Inline ``decided`` Ifs outermost first; an If inside a discarded branch is skipped."""
    counts = _name_counts(model)
    names = NameAllocator(model.graph)
    dead: set[int] = set()
    rows = []
    for node, take_then, by in decided:
        if id(node) in dead or node.graph is None:
            continue
        taken, dropped = (("then_branch", "else_branch") if take_then else ("else_branch", "then_branch"))
        gone = attribute(node, dropped)
        for n in (gone.all_nodes() if gone is not None else []):
            dead.add(id(n))
        for name in (_graph_names(gone) if gone is not None else []):
            counts[name] -= 1
        where = node.graph.name or "main graph"
        parent_owner = "main graph" if node.graph is model.graph else f"a subgraph ({where})"
        moved = _inline_if(node, attribute(node, taken), counts, names)
        dropped_nodes = list(gone.all_nodes()) if gone is not None else []
        for n in dropped_nodes:  # the dropped branch no longer reads outer values (or weights)
            for i in range(len(n.inputs)):
                n.replace_input_with(i, None)
        rows.append({"node": node.name, "in": parent_owner, "branch": taken.removesuffix("_branch"),
                     "decided by": by, "nodes inlined": moved,
                     "nodes dropped": len(dropped_nodes)})
    return rows


def _name_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(_graph_names(model.graph))


def _graph_names(graph: ir.Graph) -> list[str]:
    """Value and node names defined in ``graph`` and its subgraphs (with repeats)."""
    out = [v.name for v in graph.inputs if v.name] + list(graph.initializers)
    for node in graph.all_nodes():
        if node.name:
            out.append(node.name)
        out += [o.name for o in node.outputs if o.name]
        for g in subgraphs(node):
            out += [v.name for v in g.inputs if v.name] + list(g.initializers)
    return out


def _inline_if(node: ir.Node, branch: ir.Graph, counts: collections.Counter, names: NameAllocator) -> int:
    """Replace ``node`` by ``branch``'s nodes in ``node``'s graph; returns how many nodes moved."""
    parent = node.graph
    formal = list(branch.outputs)
    branch.outputs.clear()
    moved = list(branch)
    branch.remove(moved)
    for init_name in list(branch.initializers):
        v = branch.initializers.pop(init_name)
        v.name = _fresh(v.name, counts, names)
        parent.register_initializer(v)
    for n in moved:
        if n.name:
            n.name = _fresh(n.name, counts, names)
        for o in n.outputs:
            if o.name:
                o.name = _fresh(o.name, counts, names)
    parent.insert_before(node, moved)
    own = {id(o) for n in moved for o in n.outputs}
    claimed: set[int] = set()
    for actual, f in zip(node.outputs, formal):
        if not actual.uses() and not actual.is_graph_output():
            continue
        if f.type is None:
            f.type = actual.type
        if f.shape is None:
            f.shape = actual.shape
        name = actual.name
        if id(f) in own and id(f) not in claimed:
            claimed.add(id(f))
            actual.replace_all_uses_with(f, replace_graph_outputs=True)
            actual.name = None
            f.name = name  # the If output's name stays: it was unique, and it is now free
            continue
        if not actual.is_graph_output():
            actual.replace_all_uses_with(f)
            continue
        ident = ir.node("Identity", [f], name=names.unique(f"{name}_identity"))
        out = ident.outputs[0]
        out.type, out.shape = actual.type, actual.shape
        parent.insert_before(node, ident)
        actual.replace_all_uses_with(out, replace_graph_outputs=True)
        actual.name = None
        out.name = name
    parent.remove(node, safe=True)
    return len(moved) + sum(1 for n in moved for g in subgraphs(n) for _ in g.all_nodes())


def _fresh(name: str, counts: collections.Counter, names: NameAllocator) -> str:
    """``name`` if no other graph of the model defines it, else a fresh one."""
    if counts[name] <= 1:
        return name
    counts[name] -= 1
    new = names.unique(name)
    counts[new] += 1
    return new


# --- the guard ----------------------------------------------------------------------------------

def _add_guards(model: ir.Model, fixed: Mapping[str, tuple[ir.Value, np.ndarray]]) -> list[str]:
    """Per input: ``Gather([0], Where(Equal(x, value), 0, 1))`` added to the smallest numeric graph
    output (see the module docstring). Returns the guard nodes' names."""
    g = model.graph
    names = NameAllocator(g)
    target = _guard_output(g)
    zero_dtype = target.dtype.numpy()
    out_name = target.name
    current = target
    guard_names = []
    opset = default_opset(model) or 1
    for name, (x, arr) in fixed.items():
        xv, ref = x, arr
        if arr.dtype.kind in "biu" and arr.dtype not in (np.int32, np.int64):
            xv = _node(g, "Cast", [x], {"to": ir.DataType.INT64}, names, f"{name}_guard_cast")
            ref = arr.astype(np.int64)
        elif arr.dtype.kind == "f" and arr.dtype not in (np.float32, np.float64):
            xv = _node(g, "Cast", [x], {"to": ir.DataType.FLOAT}, names, f"{name}_guard_cast")
            ref = arr.astype(np.float32)
        const = add_initializer(g, names.unique(f"{name}_guard_value"), ref)
        if ref.dtype.kind == "f" and opset < 11:  # Equal takes no floats before opset 11
            diff = _node(g, "Abs", [_node(g, "Sub", [xv, const], {}, names, f"{name}_guard_sub")], {}, names,
                         f"{name}_guard_abs")
            zero_f = add_initializer(g, names.unique(f"{name}_guard_zero"), np.zeros((), ref.dtype))
            eq = _node(g, "Not", [_node(g, "Greater", [diff, zero_f], {}, names, f"{name}_guard_greater")], {},
                       names, f"{name}_guard_equal")
        else:
            eq = _node(g, "Equal", [xv, const], {}, names, f"{name}_guard_equal")
        if opset >= 9:
            zero = add_initializer(g, names.unique(f"{name}_guard_ok"), np.array(0, np.int64))
            one = add_initializer(g, names.unique(f"{name}_guard_bad"), np.array(1, np.int64))
            idx = _node(g, "Where", [eq, zero, one], {}, names, f"{name}_guard_index")
        else:  # no Where before opset 9
            ne = _node(g, "Not", [eq], {}, names, f"{name}_guard_differs")
            idx = _node(g, "Cast", [ne], {"to": ir.DataType.INT64}, names, f"{name}_guard_index")
        if arr.ndim:
            idx = _node(g, "ReduceMax", [idx], {"keepdims": 0}, names, f"{name}_guard_any")
        table = add_initializer(g, names.unique(f"{name}_guard_table"), np.zeros(1, zero_dtype))
        text = names.unique(f"guard: input {name} must be {format_values({name: arr}).partition('=')[2]} "
                            f"(the model was specialized with --value {format_values({name: arr})})")
        gather = ir.node("Gather", [table, idx], name=text)
        g.append(gather)
        add = ir.node("Add", [current, gather.outputs[0]], name=names.unique(f"{name}_guard_add"))
        g.append(add)
        add.outputs[0].type, add.outputs[0].shape = target.type, target.shape
        current = add.outputs[0]
        guard_names.append(text)
    i = list(g.outputs).index(target)
    target.name = names.unique(f"{out_name}_unguarded")
    g.outputs[i] = current
    current.name = out_name
    return guard_names


def _node(g: ir.Graph, op: str, inputs, attrs, names: NameAllocator, base: str) -> ir.Value:
    n = ir.node(op, inputs, attributes=attrs, name=names.unique(base))
    n.outputs[0].name = names.unique(f"{base}_out")
    g.append(n)
    return n.outputs[0]


def _guard_output(g: ir.Graph) -> ir.Value:
    """The graph output the guard adds its zero to: numeric, fewest known elements; never a graph
    input passed through (its name is the input's)."""
    best, best_size = None, None
    for v in g.outputs:
        if v.dtype is None or v.is_graph_input() or v.is_initializer():
            continue
        if not (v.dtype.is_floating_point() or v.dtype.is_integer()):
            continue
        # symbolic dims count as 1 (a batch of one): silero's [batch, 1] probability, not its [2, batch, 128] state
        size = int(np.prod([d if isinstance(d, int) else 1 for d in v.shape])) if v.shape is not None else 2**62
        if best is None or size < best_size:
            best, best_size = v, size
    if best is None:
        raise PassFailed("no numeric graph output to attach the input guard to; the model cannot be specialized")
    return best
