"""The pass base class: onnx-ir's ``InPlacePass`` plus a structured record of what changed."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import onnx_ir as ir

from edgecomp.errors import EdgecompError, PassFailed
from edgecomp.io import first_line

__all__ = ["PassReport", "EdgecompPass", "run_pass", "one_line_failures"]


@dataclasses.dataclass
class PassReport(ir.passes.PassResult):
    """``PassResult`` plus what the pass did: ``summary`` counts and per-layer ``rows``."""

    name: str = ""
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)  # one line each, for stderr

    def to_json(self) -> dict[str, Any]:
        return {"pass": self.name, "modified": self.modified, "options": self.options,
                "summary": self.summary, "rows": self.rows}


class EdgecompPass(ir.passes.InPlacePass):
    """Base of edgecomp's passes: in place, options recorded, ``report`` builds the result."""

    def options(self) -> dict[str, Any]:
        """The constructor options, for the record (subclasses keep them as public attributes)."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def report(self, model: ir.Model, modified: bool, summary: dict[str, Any] | None = None,
               rows: list[dict[str, Any]] | None = None) -> PassReport:
        return PassReport(model, modified, type(self).__name__, self.options(), summary or {}, rows or [])


def one_line_failures(call):
    """For a pass whose ``call`` walks graph shapes it cannot all foresee (third-party files): an
    unexpected exception becomes one ``PassFailed`` line naming the pass, never a traceback."""

    @functools.wraps(call)
    def guarded(self, model: ir.Model):
        try:
            return call(self, model)
        except EdgecompError:
            raise
        except Exception as e:
            raise PassFailed(f"{type(self).__name__} failed on this model: {type(e).__name__}: {first_line(e)}") from e

    return guarded


def run_pass(pass_: ir.passes.PassBase, model: ir.Model) -> PassReport:
    """Run a pass, turning onnx-ir's invariant errors into a one-line ``PassFailed``."""
    try:
        result = pass_(model)
    except EdgecompError:
        raise
    except ir.passes.PreconditionError as e:
        cause = e.__cause__ or e
        raise PassFailed(f"{type(pass_).__name__} cannot run on this model: {cause}") from e
    except (ir.passes.PostconditionError, ir.passes.PassError) as e:
        cause = e.__cause__ or e
        raise PassFailed(f"{type(pass_).__name__} produced an invalid model: {cause}") from e
    if not isinstance(result, PassReport):
        result = PassReport(result.model, result.modified, type(pass_).__name__)
    return result

