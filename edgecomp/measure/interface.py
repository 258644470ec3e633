"""The interface a written model keeps: what every command that writes a model checks last.

A command may change how a model computes (int8 layers, fewer channels, a smaller table, folded
constants) but never *what* it computes. The model as loaded (a copy taken before any pass) is
the reference, and the result must have, in this order:

1. the same graph inputs: names and element types, an initializer that is also an input (an
   overridable weight, valid since IR 4) included — it stays declared (an IR < 4 model lists every
   weight as an input, which onnxruntime reads as constants: they are made plain initializers
   first, :func:`edgecomp.graph.initializer_inputs_as_constants`);
2. every input the reference reads still read: a value fed there must still reach the
   computation (an input read only through ``Shape``/``Size`` whose declared dims are all fixed is
   exempt: its shape cannot change, so folding that read is sound);
3. the same graph outputs: names in order and element types;
4. on one or two feeds (the first calibration samples when the command has them, else the
   synthesized feed ``bench`` uses, :func:`edgecomp.data.synthesize_feed`), the same **run-time**
   shape and element type of every output. Declared shapes are never compared: a model may
   declare ``[1, seqlen]`` and return ``[T, 1, C]``; what it returns is the interface.

Values are not compared here (that is each command's fidelity check, which compares shapes
first too, :func:`shape_difference`). A difference is one :class:`InterfaceChanged` line naming
the input or the output and both shapes, and nothing is written. When the reference itself
cannot run on those feeds (an input that needs a specific value, ids past a vocabulary), step 4
is skipped; steps 1–3 still hold.

A reference output whose declared shape disagrees with the one it returns is reported as a
warning (the declaration is left as the model gives it; edgecomp never enforces it on the
computation).

:func:`keeps_interface` wraps a capability's ``run(model, options, data, ...)`` with these checks:
one mechanism for optimize, quantize, prune, reduce-embeddings and the steps of ``convert``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, image_size_hint, input_specs, load_data, synthesize_feed
from edgecomp.errors import EdgecompError, InterfaceChanged
from edgecomp.graph import initializer_inputs_as_constants
from edgecomp.runtime import make_session, run_feed

__all__ = ["GUARD_FEEDS", "check_interface", "declared_shape_warnings", "guard_feeds", "keeps_interface",
           "shape_difference", "shape_text"]

#: Feeds the run-time shape check uses: two catch a shape that differs between samples of a folder.
GUARD_FEEDS = 2

_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})

Feed = dict[str, np.ndarray]


def shape_text(shape: Sequence[Any] | None) -> str:
    """``[10, 1, 12]``, ``[1, seqlen]`` (symbolic dims by name, unnamed ones as ``?``), or ``?``."""
    if shape is None:
        return "?"
    return "[" + ", ".join(str(d) if isinstance(d, (int, np.integer)) else (getattr(d, "value", None) or "?")
                           for d in shape) + "]"


def shape_difference(names: Sequence[str], ref: Sequence[Sequence[np.ndarray]], cand: Sequence[Sequence[np.ndarray]],
                     what: tuple[str, str] = ("the reference", "the candidate")) -> str | None:
    """The first output whose arrays differ in shape between ``ref`` and ``cand`` (per output, per
    sample), as one line naming the output, the sample and both shapes; None when all agree."""
    for name, r_out, c_out in zip(names, ref, cand):
        for i, (r, c) in enumerate(zip(r_out, c_out)):
            rs, cs = np.shape(r), np.shape(c)
            if rs != cs:
                return (f"output {name!r} differs in shape: {what[0]} returns {shape_text(rs)}, {what[1]} "
                        f"{shape_text(cs)} (sample {i})")
    return None


def guard_feeds(model: ir.Model, calibration: str | None = None, limit: int = GUARD_FEEDS) -> tuple[list[Feed], str]:
    """Up to ``limit`` feeds for ``model`` and where they come from: the first calibration samples
    when DATA is given and fits, else the synthesized feed ``bench`` uses (batch 1, sequence 128,
    the image size the model's metadata gives)."""
    specs = input_specs(model)
    if calibration:
        try:
            ds: Dataset = load_data(calibration, specs)
            feeds = list(ds.feeds_for(specs, limit))
            if feeds:
                return feeds, "calibration sample"
        except EdgecompError:
            pass  # the command itself reports data that does not fit; the check falls back
    return [synthesize_feed(specs, image_size=image_size_hint(model))], "synthesized feed"


def declared_shape_warnings(model: ir.Model, returned: Sequence[Sequence[int]]) -> list[str]:
    """One line per output of ``model`` whose declared shape contradicts the shape it returned
    (another rank, or a fixed dim of another size)."""
    lines = []
    for v, shape in zip(model.graph.outputs, returned):
        if v.shape is None:
            continue
        declared = list(v.shape)
        clash = len(declared) != len(shape) or any(isinstance(d, int) and d > 0 and d != s
                                                   for d, s in zip(declared, shape))
        if clash:
            lines.append(f"output {v.name!r} is declared {shape_text(declared)} but the model returns "
                         f"{shape_text(shape)}: the computation is kept as it is, the declaration as the model "
                         "gives it (fix it where the model is exported)")
    return lines


def check_interface(reference: ir.Model, candidate: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]] = (),
                    *, feed_source: str = "feed", threads: int = 1, step: str = "the result") -> list[str]:
    """Steps 1–4 of the module docstring for ``candidate`` against ``reference``; raises
    :class:`InterfaceChanged` (one line, ending "nothing was written") at the first difference.
    Returns the warnings about the reference's own declarations."""

    def refuse(problem: str) -> InterfaceChanged:
        return InterfaceChanged(f"{step} would compute something else: {problem}; nothing was written "
                                "(please report this)")

    ref_in, cand_in = sorted(_declared(reference.graph.inputs)), sorted(_declared(candidate.graph.inputs))
    if ref_in != cand_in:
        raise refuse(f"its inputs {_listing(cand_in)} differ from the model's {_listing(ref_in)}")
    unread = sorted(_read_inputs(reference) - _read_inputs(candidate))
    if unread:
        raise refuse(f"it no longer reads input {unread[0]!r} (the model does): a value fed there would be ignored")
    ref_out, cand_out = _declared(reference.graph.outputs), _declared(candidate.graph.outputs)
    if ref_out != cand_out:
        raise refuse(f"its outputs {_listing(cand_out)} differ from the model's {_listing(ref_out)}")
    ref_runs = _run(reference, feeds, threads) if feeds else None
    if ref_runs is None:
        return []  # the reference cannot run on these feeds: nothing to compare at run time
    try:
        cand_runs = _run(candidate, feeds, threads, raise_errors=True)
    except EdgecompError as e:
        raise refuse(f"it fails on a {feed_source} the model runs ({e})") from e
    names = [v.name for v in reference.graph.outputs]
    per_output = list(zip(*ref_runs)), list(zip(*cand_runs))
    diff = shape_difference(names, *per_output, what=("the model as loaded", "the result"))
    if diff:
        raise refuse(diff.replace("(sample", f"({feed_source}"))
    for name, r, c in zip(names, ref_runs[0], cand_runs[0]):
        if r.dtype != c.dtype:
            raise refuse(f"output {name!r} is {c.dtype} where the model returns {r.dtype}")
    return declared_shape_warnings(reference, [r.shape for r in ref_runs[0]])


def keeps_interface(step: str, same_ids: Callable[..., bool] | None = None) -> Callable:
    """Decorate a capability's ``run(model, options, data, ...)`` (data: a StepData or None) so its
    result's model is checked against the model as passed in (:func:`check_interface`, on
    :func:`guard_feeds` of the calibration DATA), and the warnings land in ``result.warnings``.

    ``same_ids(options, **kwargs)``, when given, says whether the run keeps the meaning of integer
    ids fed to the model; a run that prunes or extends a vocabulary does not (the ids and a tied
    output's width change on purpose), so only steps 1–3 apply to it."""

    def decorate(run: Callable) -> Callable:
        @functools.wraps(run)
        def checked(model: ir.Model, options: Any, data: Any = None, *args, **kwargs):
            initializer_inputs_as_constants(model)  # an IR < 4 export's weights are constants, as onnxruntime reads them
            reference = model.clone()  # nodes copied, tensors shared: passes replace tensors, never edit them
            result = run(model, options, data, *args, **kwargs)
            runtime = same_ids is None or same_ids(options, **kwargs)
            feeds, source = guard_feeds(reference, getattr(data, "calibration", None)) if runtime else ([], "")
            threads = getattr(options, "threads", None) or 1
            result.warnings.extend(check_interface(reference, result.model, feeds, feed_source=source,
                                                   threads=threads, step=f"the {step} result"))
            return result

        return checked

    return decorate


def _declared(values: Sequence[ir.Value]) -> list[tuple[str, str]]:
    return [(v.name, v.dtype.name if v.dtype is not None else "?") for v in values]


def _listing(pairs: Sequence[tuple[str, str]]) -> str:
    return "[" + ", ".join(f"{n} {t.lower()}" for n, t in pairs) + "]"


def _read_inputs(model: ir.Model) -> set[str]:
    """Inputs whose value reaches the computation: read by a node (subgraph reads of an outer value
    count, onnx-ir records them as uses) or passed straight to an output; an input read only by
    Shape/Size with every dim fixed is not counted (its shape is a constant)."""
    outputs = set(map(id, model.graph.outputs))
    read = set()
    for v in model.graph.inputs:
        uses = [u.node for u in v.uses()]
        fixed = v.shape is not None and all(isinstance(d, int) and d > 0 for d in v.shape)
        if id(v) in outputs or any(not (n.op_type in _SHAPE_ONLY_OPS and n.domain in ("", "ai.onnx") and fixed)
                                   for n in uses):
            read.add(v.name)
    return read


def _run(model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]], threads: int,
         raise_errors: bool = False) -> list[list[np.ndarray]] | None:
    """Every output on every feed (per feed), or None when the model cannot run on them."""
    try:
        session = make_session(model, threads=threads, optimization="disable")
        return [run_feed(session, feed) for feed in feeds]
    except EdgecompError:
        if raise_errors:
            raise
        return None
