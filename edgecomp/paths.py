"""Input files that need none of the model libraries: existence checks (the CLI refuses a missing
model at parse time, before onnx, onnx-ir or onnxruntime are imported) and the TOML of recipes and
targets files. Models and everything protobuf stay in :mod:`edgecomp.io`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from edgecomp.errors import ConfigError, InputFileError

__all__ = ["existing_file", "read_toml", "MAX_TOML_DEPTH", "nesting_exceeds"]


def existing_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a one-line error if it is not a readable file."""
    p = Path(path)
    if not p.exists():
        raise InputFileError(f"{what} not found: {p} (check the path)")
    if not p.is_file():
        raise InputFileError(f"{what} is not a file: {p}")
    return p


def read_toml(path: str | os.PathLike, what: str) -> dict:
    """The parsed TOML of ``path`` (recipes, targets); every way it cannot be read is one line."""
    import tomllib

    p = Path(path)
    if p.is_dir():
        raise InputFileError(f"{what} {p} is a directory; give a TOML file")
    if not p.exists():
        raise InputFileError(f"{what} not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not a UTF-8 text file (TOML expected); give the TOML file") from None
    except OSError as e:
        raise InputFileError(f"cannot read {what} {p}: {e.strerror or type(e).__name__}; "
                             "check that it is a readable file") from None
    deep = ConfigError(f"{p}: tables and arrays nested more than {MAX_TOML_DEPTH} levels deep; {what}s nest a few "
                       "levels (see the examples in the README)")
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    except RecursionError:  # tomllib parses nested inline arrays and tables recursively
        raise deep from None
    if nesting_exceeds(doc, MAX_TOML_DEPTH):  # [a.b.c...] headers nest without recursion; every reader walks them
        raise deep
    return doc


#: The deepest nesting a recipe or targets file may have (they use 4: steps, a step, an option's list).
MAX_TOML_DEPTH = 16


def nesting_exceeds(doc: Any, limit: int) -> bool:
    """Whether dicts and lists in ``doc`` nest deeper than ``limit`` (walked without recursion)."""
    stack = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth >= limit:
            return True
        stack.extend((c, depth + 1) for c in children)
    return False
