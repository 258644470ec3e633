"""Every error edgecomp raises on purpose.

Each message is one line that says what is wrong and what to do about it; the CLI prints it
without a traceback (unless ``--debug``).
"""

from __future__ import annotations

__all__ = [
    "EdgecompError",
    "InputFileError",
    "ModelLoadError",
    "DataError",
    "SpecError",
    "ExportError",
    "ParityError",
    "PassFailed",
    "OutputError",
    "ConfigError",
    "OptionError",
    "DataNeeded",
    "DistillError",
    "FinetuneError",
    "InvalidModelError",
    "NothingToPrune",
    "EmulationError",
    "InterfaceChanged",
    "BelowFloor",
    "RemoteError",
    "MissingExtra",
]


class EdgecompError(Exception):
    """Base class: a user-facing failure with a one-line, actionable message."""


class InputFileError(EdgecompError):
    """A path given by the user does not exist or cannot be read."""


class ModelLoadError(EdgecompError):
    """A file is not a valid ONNX model (or onnxruntime cannot load it)."""


class DataError(EdgecompError):
    """Calibration/evaluation data does not exist or does not match the model's inputs."""


class SpecError(EdgecompError):
    """A ``module:factory`` / ``file.py:factory`` model spec cannot be imported or called."""


class ExportError(EdgecompError):
    """The torch → ONNX export failed with every exporter tried."""


class ParityError(EdgecompError):
    """The exported ONNX model disagrees with torch beyond tolerance."""


class PassFailed(EdgecompError):
    """A graph pass could not run on this model (precondition failed or the result is invalid)."""


class OutputError(EdgecompError):
    """An output path is unusable (it names an input, or its folder cannot be written)."""


class ConfigError(EdgecompError):
    """A target profile, recipe or option value is invalid."""


class OptionError(ConfigError):
    """An option's value is not allowed. The message names the option neutrally ("sparsity must be
    in (0, 1), got 7.5"); the CLI says --sparsity, a recipe names its step."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(f"{option} {problem}")


class DataNeeded(ConfigError):
    """A step needs data that was not given: ``key`` is calibration, eval, labels, text or tokenizer."""

    def __init__(self, key: str, what: str, option: str | None = None):
        self.key, self.what, self.option = key, what, option  # option: the option named in ``what``
        super().__init__(f"{what} needs {key} data")


class DistillError(EdgecompError):
    """A distillation setup is inconsistent (teacher/student shapes, data, resume checkpoint)."""


class FinetuneError(EdgecompError):
    """Fine-tuning cannot go on: no head to replace, labels that do not fit the model, a diverged loss."""


class InvalidModelError(EdgecompError):
    """A model edgecomp was about to write fails onnx.checker or does not load in onnxruntime."""


class NothingToPrune(PassFailed):
    """No channel group (structured) or no weight (unstructured) can be pruned: nothing is written."""


class EmulationError(EdgecompError):
    """The emulated target runtime (qemu-user + onnxruntime's aarch64 build) is missing, broken,
    timed out or was killed; the message names what to do."""


class InterfaceChanged(EdgecompError):
    """A model computes something else than its reference: other inputs or outputs, an input it no
    longer reads, or an output of another shape at run time (see :mod:`edgecomp.measure.interface`)."""


class BelowFloor(EdgecompError):
    """A result falls below its fidelity floor and a degraded result was not allowed: nothing is
    written. ``finding`` says what was measured on which inputs; ``remedies`` are what to do, each
    a key (an option or data name) that the caller words its own way (:meth:`render`: a CLI flag,
    a recipe key) or, by default, the neutral words of ``words``."""

    def __init__(self, finding: str, remedies: dict[str, str]):
        self.finding, self.remedies = finding, dict(remedies)
        super().__init__(self.render({}))

    def render(self, words: dict[str, str]) -> str:
        steps = [words.get(k, text) for k, text in self.remedies.items()]
        advice = steps[-1] if len(steps) == 1 else f"{', '.join(steps[:-1])}, or {steps[-1]}"
        return f"{self.finding}; nothing was written: {advice}"


class RemoteError(EdgecompError):
    """A device reached with ``--remote`` (ssh) cannot be used: unreachable, login or host key
    refused, python3/numpy/onnxruntime missing or old, its disk full, the connection lost."""


class MissingExtra(EdgecompError):
    """A capability needs an optional dependency that is not installed (torch for export and
    distill); the message names the pip extra that installs it (:mod:`edgecomp.extras`)."""
