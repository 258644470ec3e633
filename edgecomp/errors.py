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
    "DistillError",
    "InvalidModelError",
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


class DistillError(EdgecompError):
    """A distillation setup is inconsistent (teacher/student shapes, data, resume checkpoint)."""


class InvalidModelError(EdgecompError):
    """A model edgecomp was about to write fails onnx.checker or does not load in onnxruntime."""


class NothingToPrune(PassFailed):
    """No channel group (structured) or no weight (unstructured) can be pruned: nothing is written."""
