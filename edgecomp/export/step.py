"""The entry point shared by ``edgecomp export`` and a recipe's export step."""

from __future__ import annotations

import os
from typing import Any, Mapping

from edgecomp.errors import OptionError, SpecError
from edgecomp.export.exporters import ExportResult, export_spec
from edgecomp.export.hf import export_hf
from edgecomp.step import StepResult

__all__ = ["run", "step_result"]


def run(out: str | os.PathLike | None, values: Mapping[str, Any], *, spec: str | None = None,
        hf: str | os.PathLike | None = None) -> StepResult:
    """What ``edgecomp export`` and a recipe's export step call: export ``spec`` or the Hugging
    Face folder ``hf`` with the declared option ``values``; written to ``out`` when given (the
    CLI), else returned in memory only (``convert`` saves it with the other steps' models)."""
    return step_result(_export(out, values, spec=spec, hf=hf))


def step_result(res: ExportResult) -> StepResult:
    """An export in the shape every capability returns: the exporter, its fallback and the parity
    with torch as summary; names, time and the file written as evidence."""
    summary = {"exporter": res.exporter, "fallback": res.fallback_reason, "max abs diff vs torch": res.max_abs_diff}
    if res.task:
        summary["task"] = f"{res.task} (from {res.task_source})"
    return StepResult("export", res.model, summary, evidence={
        "inputs": res.input_names, "outputs": res.output_names, "seconds": res.seconds,
        "path": str(res.path) if res.path else None})


def _export(out: str | os.PathLike | None, values: Mapping[str, Any], *, spec: str | None = None,
            hf: str | os.PathLike | None = None) -> ExportResult:
    from edgecomp.data import parse_shape

    kw = dict(input_shapes={k: parse_shape(v) for k, v in values["input"].items()},
              dynamic={k: {int(a): str(lbl) for a, lbl in v.items()} for k, v in values["dynamic"].items()},
              opset=values["opset"], exporter=values["exporter"], atol=values["atol"])
    if hf and spec:
        raise SpecError("give either a SPEC or a Hugging Face folder, not both")
    if hf:
        task = None if values["task"] == "auto" else values["task"]
        return export_hf(hf, out, output=values["hf_output"], task=task, **kw)
    if values["task"] != "auto":
        raise OptionError("task", "applies to Hugging Face folders; a SPEC's factory builds the model itself")
    if not spec:
        raise SpecError("give a SPEC (package.module:factory or file.py:factory) or a Hugging Face folder")
    return export_spec(spec, out, **kw)
