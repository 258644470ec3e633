"""Fine-tune any ONNX model on labeled data (transfer learning, batch updates of a deployed model).

- ``options``: the options, declared once (no torch);
- ``head``: find and replace the final classifier (``new_head``);
- ``train``: the loop, checkpoints, resume and batch updates;
- ``pipeline``: ``run(model, options, data)`` end to end, the weights written back into the same graph.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FinetuneOptions", "run"]

# Loaded on first use: the CLI reads edgecomp.finetune.options at startup, which must not import torch.
_HOME = {"FinetuneOptions": "options", "run": "pipeline"}


def __getattr__(name: str) -> Any:
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
