"""``run(model, options, data, context)``: distillation in the shape every capability returns.

``model`` is the teacher: an ``ir.Model``, an ONNX file, or None when ``options`` names it
(``teacher``: a SPEC or an .onnx file; ``teacher_hf``: a Hugging Face folder). ``options`` are
the declared distill option values (:data:`edgecomp.distill.options.OPTIONS`, ``student`` among
them), ``data`` a :class:`~edgecomp.data.StepData` (its calibration DATA, or its text corpus with
the tokenizer). The student comes back in memory (:attr:`StepResult.model`); with ``output`` it is
also written there. The training runs on files: an in-memory teacher is written to a temporary
file for it (:class:`~edgecomp.distill.trainer.DistillConfig` names teacher and student by path).

The result: the training summary (scalars of the run), the tables ``teacher vs student``,
``held-out history`` and, for a block-wise heal, ``block-wise boundaries``; the warnings (a heal
that kept its input); the validation and latency behind the rows as evidence.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from edgecomp.step import StepContext, StepResult

__all__ = ["run", "step_result"]


def run(model: Any, options: Mapping[str, Any], data: Any, context: StepContext | None = None, *,
        output: str | os.PathLike | None = None, checkpoint: str | None = None, bench_runs: int = 0,
        **edges: Any) -> StepResult:
    """Distill a student from the teacher ``model`` (or the teacher ``options`` name) on ``data``.

    ``edges`` go to :func:`edgecomp.distill.pipeline.distill` (``resume``, ``nproc``,
    ``exporter``, ``bench_threads``, ``callback``, ``keep_checkpoint`` ...)."""
    import onnx_ir as ir

    from edgecomp.distill.pipeline import distill
    from edgecomp.distill.trainer import DistillConfig

    context = context or StepContext()
    text = data.text
    fields = dict(options, text=text, tokenizer=data.tokenizer or options.get("tokenizer"),
                  data=None if text else data.need("calibration", "distill"), checkpoint=checkpoint,
                  threads=context.threads, progress=context.progress)
    with tempfile.TemporaryDirectory(prefix="edgecomp-distill-teacher-") as tmp:
        if isinstance(model, ir.Model):  # the trainer reads teachers from files
            from edgecomp.io import save_model

            fields["teacher"] = str(save_model(model, Path(tmp) / "teacher.onnx"))
        elif model is not None:
            fields["teacher"] = os.fspath(model)
        res = distill(DistillConfig(**fields), output, bench_runs=bench_runs, **edges)
    if res is None:  # a machine of a multi-machine run other than global rank 0: rank 0 reports
        return StepResult("distill", summary={"rank": "not global rank 0; rank 0 holds the student"})
    return step_result(res)


def step_result(res: Any) -> StepResult:
    """A :class:`~edgecomp.distill.pipeline.DistillResult` as a StepResult."""
    training = res.training
    summary = {k: v for k, v in training.items() if isinstance(v, (int, float, str))}
    tables = {"teacher vs student": res.rows}
    if training.get("history"):
        tables["held-out history"] = list(training["history"])
    blocks = training.get("blockwise")
    if isinstance(blocks, dict):  # healed block by block: the matched boundaries
        tables["block-wise boundaries"] = blocks["boundaries"]
        summary["block steps"] = blocks["steps"]  # before the end-to-end pass that "steps" counts
    init = training.get("layer_init")
    if isinstance(init, dict):  # a --shrink layers=N student, its layers initialized block-wise
        tables["layer initialization"] = init["groups"]
        summary["layer init steps"] = init["steps"]  # before the end-to-end pass that "steps" counts
    evidence = {"objective": res.objective, "exporter": res.exporter,
                "validation": dataclasses.asdict(res.validation),
                "bench": [dataclasses.asdict(m) for m in res.bench.models] if res.bench is not None else None,
                "path": str(res.output) if res.output else None}
    return StepResult("distill", res.model, summary, tables, list(res.warnings), evidence)
