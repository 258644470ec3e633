"""torch → ONNX export, with a parity check in onnxruntime.

One of the two torch-side capabilities (with ``distill``); torch is imported only when an export
runs (``pip install 'edgecomp[torch]'``). The modules:

- :mod:`~edgecomp.export.spec` — a SPEC (``package.module:factory`` or ``path/to/file.py:factory``)
  loaded and its factory called;
- :mod:`~edgecomp.export.exporters` — the dynamo and TorchScript exporters and the parity check
  (:func:`export_model`, :func:`export_spec`);
- :mod:`~edgecomp.export.hf` — local Hugging Face folders exported by their task (text, vision,
  audio; :func:`export_hf`);
- :mod:`~edgecomp.export.options` — the declared options and the constants they name;
- :mod:`~edgecomp.export.step` — :func:`run`, what ``edgecomp export`` and a recipe's export step call.

The names below are loaded from their module on first use, so reading
:mod:`edgecomp.export.options` (the CLI's flags) imports no numpy, onnxruntime or torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names __getattr__ gives
    from edgecomp.export.exporters import ExportResult, check_parity, export_model, export_spec
    from edgecomp.export.hf import HFModel, export_hf, hf_encoder, hf_model, infer_hf_task
    from edgecomp.export.options import DEFAULT_OPSET, HF_AUTO_ORDER, HF_OUTPUTS, HF_TASKS, OPTIONS, opset_ranges
    from edgecomp.export.spec import call_factory, forward_names, load_spec
    from edgecomp.export.step import run

_HOME = {
    "exporters": ("ExportResult", "check_parity", "export_model", "export_spec"),
    "hf": ("HFModel", "export_hf", "hf_encoder", "hf_model", "infer_hf_task"),
    "options": ("DEFAULT_OPSET", "HF_AUTO_ORDER", "HF_OUTPUTS", "HF_TASKS", "OPTIONS", "opset_ranges"),
    "spec": ("call_factory", "forward_names", "load_spec"),
    "step": ("run", "step_result"),
}
_MODULE = {name: module for module, names in _HOME.items() for name in names}

__all__ = ["DEFAULT_OPSET", "ExportResult", "HFModel", "HF_AUTO_ORDER", "HF_OUTPUTS", "HF_TASKS", "OPTIONS", "call_factory",
           "check_parity", "export_hf", "export_model", "export_spec", "forward_names", "hf_encoder", "hf_model",
           "infer_hf_task", "load_spec", "opset_ranges", "run", "step_result"]


def __getattr__(name: str) -> Any:
    module = _MODULE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later reads skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE))
