"""Loading a SPEC: ``package.module:factory`` or ``path/to/file.py:factory``, whose factory returns an
``nn.Module`` or ``(module, example_inputs)``.

A SPEC that exits, fails to import, whose factory raises or returns something else is one line
(:class:`~edgecomp.errors.SpecError`); ``KeyboardInterrupt`` and a termination signal still stop
the run. A ``.py`` SPEC's folder is on ``sys.path`` while it is imported (its own imports resolve);
a module SPEC resolves from the working directory, as ``python -m`` does.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Any

from edgecomp.errors import SpecError
from edgecomp.io import Terminated, first_line

__all__ = ["load_spec", "call_factory", "forward_names", "exit_call"]


def exit_call(e: SystemExit) -> str:
    """How a SystemExit reads in a message: ``sys.exit(2)``."""
    return "sys.exit()" if e.code is None else f"sys.exit({e.code!r})"


def load_spec(spec: str) -> Any:
    """Import a SPEC and return its factory (a callable)."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise SpecError(f"bad SPEC {spec!r}; write package.module:factory or path/to/file.py:factory")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise SpecError(f"SPEC file not found: {path}")
        mod_name = f"_edgecomp_spec_{path.stem}"
        file_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(file_spec)
        folder = str(path.parent.resolve())
        sys.path.insert(0, folder)
        try:
            file_spec.loader.exec_module(module)
        except Terminated:
            raise
        except SystemExit as e:  # KeyboardInterrupt still propagates
            raise SpecError(f"importing {path} exited ({exit_call(e)}); a SPEC module must not exit") from None
        except Exception as e:
            raise SpecError(f"importing {path} failed: {type(e).__name__}: {first_line(e, 300)}") from e
        finally:
            if folder in sys.path:
                sys.path.remove(folder)
    else:
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # like `python -m`, resolve modules from the working dir
        try:
            module = importlib.import_module(target)
        except Terminated:
            raise
        except SystemExit as e:
            raise SpecError(f"importing {target!r} from SPEC {spec!r} exited ({exit_call(e)}); "
                            "a SPEC module must not exit") from None
        except Exception as e:
            raise SpecError(f"cannot import {target!r} from SPEC {spec!r}: {type(e).__name__}: {first_line(e, 300)}") from e
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise SpecError(f"{target} has no callable {attr!r}; SPEC names a function that returns an nn.Module")
    return factory


def call_factory(factory: Any, spec: str):
    import torch

    try:
        made = factory()
    except Terminated:
        raise
    except SystemExit as e:  # KeyboardInterrupt still propagates
        raise SpecError(f"factory {spec} exited ({exit_call(e)}) instead of returning an nn.Module") from None
    except Exception as e:
        raise SpecError(f"calling the factory of {spec!r} failed: {type(e).__name__}: {first_line(e, 300)}") from e
    module, example = (made if isinstance(made, tuple) and len(made) == 2 else (made, None))
    if not isinstance(module, torch.nn.Module):
        raise SpecError(f"the factory of {spec!r} returned {type(module).__name__}, not an nn.Module "
                        "(or a (module, example_inputs) pair)")
    return module, example


def forward_names(module: Any, n: int) -> list[str]:
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]
