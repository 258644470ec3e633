"""Knowledge distillation in torch: train a smaller student to imitate a teacher, then put it
back into the ONNX pipeline (export → validate → bench).

- ``onnx_module``: an ONNX graph as a trainable module, so an ONNX file can be teacher or student
  (e.g. a model cut by ``edgecomp prune``, healed against the unpruned one);
- ``students``: students derived from the teacher (``layers=N``, ``width=W``);
- ``layer_init``: block-wise initialization of a ``layers=N`` student's layers from the teacher's groups;
- ``losses``: soft-target KL, embedding / hidden-state matching, cross-entropy;
- ``samples``: DATA or tokenized text, split and batched;
- ``config``: ``DistillConfig`` and its checks that need no model (no torch);
- ``trainer``: setup checks, the loop, early stopping, checkpoints and resume;
- ``launch``: data-parallel runs through torchrun's launcher (gloo);
- ``pipeline``: ``distill()`` end to end.
"""


from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgecomp.distill.config import DistillConfig
    from edgecomp.distill.losses import DistillLoss, LossWeights, match_loss, soft_target_kl
    from edgecomp.distill.onnx_module import OnnxModule
    from edgecomp.distill.pipeline import DistillResult, distill
    from edgecomp.distill.students import ShrinkRule, parse_shrink, shrink
    from edgecomp.distill.trainer import Setup, TrainResult, check_resume, prepare, train

# The names below are loaded on first use: importing the package (``edgecomp.distill.options``,
# which the CLI reads) must not import torch.
_EXPORTS = {
    "config": ("DistillConfig",),
    "losses": ("DistillLoss", "LossWeights", "match_loss", "soft_target_kl"),
    "onnx_module": ("OnnxModule",),
    "pipeline": ("DistillResult", "distill"),
    "step": ("run", "step_result"),
    "students": ("ShrinkRule", "parse_shrink", "shrink"),
    "trainer": ("Setup", "TrainResult", "check_resume", "prepare", "train"),
}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}


_SUBMODULES = {*_EXPORTS, "launch", "options", "samples", "layer_init"}
_LIGHT = {"config", "options", "DistillConfig"}  # no torch: the CLI checks a configuration before loading it


def __getattr__(name: str) -> Any:
    if (name in _HOME or name in _SUBMODULES) and name not in _LIGHT:  # they run torch: one line when it is missing
        from edgecomp.extras import require_torch

        require_torch("distill")
    if name in _SUBMODULES:  # ``edgecomp.distill.trainer`` without importing it first, as before
        return importlib.import_module(f"{__name__}.{name}")
    module = _HOME.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))

__all__ = ["DistillConfig", "DistillResult", "DistillLoss", "LossWeights", "OnnxModule", "Setup", "ShrinkRule",
           "TrainResult", "check_resume", "distill", "match_loss", "parse_shrink", "prepare", "shrink", "soft_target_kl", "train"]
