"""Checks on input paths that need none of the model libraries (the CLI refuses a missing model
at parse time, before onnx, onnx-ir or onnxruntime are imported)."""

from __future__ import annotations

import os
from pathlib import Path

from edgecomp.errors import InputFileError

__all__ = ["existing_file"]


def existing_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a one-line error if it is not a readable file."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} not found: {p} (check the path)")
    if not p.is_file():
        raise InputFileError(f"{what} is not a file: {p}")
    return p
