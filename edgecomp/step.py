"""The one shape every capability's ``run(model, options, data, context)`` returns.

A :class:`StepResult` holds the model the step made (``None`` for steps that only measure), a
``summary`` (one line of key: value), named ``tables`` of row dicts (per layer, per group, per
op family ...), ``warnings`` (one line each), the ``evidence`` behind its decisions (the plan, the
fidelity measured, whether a tolerance was met), and a ``status``: ``ok``, ``degraded`` (the model
misses its floor or tolerance and was written because the caller allows it: exit status 3) or
``not faster`` (forced int8 not faster than its input here: exit status 5), with the ``reason``.

The CLI renders any result with :func:`edgecomp.render.text.render_step` and exits with
:attr:`StepResult.exit_status`; ``convert`` records the same fields per step. A capability keeps
its own details as tables and evidence, never as extra attributes, so neither caller has code per
capability.

:class:`StepContext` is what the caller knows beyond options and data: threads, progress output,
the target profile, and which passes already ran on the model in memory (``convert`` marks the
optimize step's output so quantize does not clean the same graph up twice).

This module is a leaf (standard library only): importing it costs nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["EXIT_STATUS", "STATUSES", "StepContext", "StepResult"]

#: A result's status -> the CLI's exit status (``convert`` orders them: gates 4, then 3, then 5).
EXIT_STATUS = {"ok": 0, "degraded": 3, "not faster": 5}
STATUSES = tuple(EXIT_STATUS)


@dataclasses.dataclass
class StepResult:
    step: str
    model: Any = None  # ir.Model, or None for a step that measures only
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)  # in display order
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)
    status: str = "ok"  # ok | degraded | not faster (EXIT_STATUS)
    reason: str | None = None  # why the status is not ok, one line
    # what a terminal shows of a table (every column when absent; JSON always gets every key)
    columns: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # text files written beside the model (a tokenizer folder's files), name -> text
    files: dict[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in EXIT_STATUS:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {self.status!r}")

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.status]

    def mark(self, status: str, reason: str) -> None:
        """Set a non-ok status; a degraded model stays degraded when it is also not faster."""
        if status not in EXIT_STATUS:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        if self.status == "ok" or EXIT_STATUS[status] < EXIT_STATUS[self.status]:
            self.status, self.reason = status, reason

    def to_json(self) -> dict[str, Any]:
        """Everything but the model and the display hints (``--json``, report.json)."""
        return {"step": self.step, "status": self.status, "reason": self.reason, "summary": self.summary,
                "tables": self.tables, "evidence": self.evidence, "warnings": self.warnings}


@dataclasses.dataclass
class StepContext:
    threads: int = 1
    progress: bool = False
    target: Any = None  # edgecomp.targets.TargetProfile, or None: this host
    # passes that already ran on the model passed in, with the options that matter to a later step
    # (e.g. {"optimize": {"fold_constants": True}} from a recipe's optimize step)
    done: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
