"""Knowledge distillation in torch: train a smaller student to imitate a teacher, then put it
back into the ONNX pipeline (export → validate → bench).

- ``onnx_module``: an ONNX graph as a trainable module, so an ONNX file can be teacher or student
  (e.g. a model cut by ``edgecomp prune``, healed against the unpruned one);
- ``students``: students derived from the teacher (``layers=N``, ``width=W``);
- ``losses``: soft-target KL, embedding / hidden-state matching, cross-entropy;
- ``samples``: DATA or tokenized text, split and batched;
- ``trainer``: setup checks, the loop, early stopping, checkpoints and resume;
- ``launch``: data-parallel runs through torchrun's launcher (gloo);
- ``pipeline``: ``distill()`` end to end.
"""

from edgecomp.distill.losses import DistillLoss, LossWeights, match_loss, soft_target_kl
from edgecomp.distill.onnx_module import OnnxModule
from edgecomp.distill.pipeline import DistillResult, distill
from edgecomp.distill.students import ShrinkRule, parse_shrink, shrink
from edgecomp.distill.trainer import DistillConfig, Setup, TrainResult, check_resume, prepare, train

__all__ = ["DistillConfig", "DistillResult", "DistillLoss", "LossWeights", "OnnxModule", "Setup", "ShrinkRule",
           "TrainResult", "check_resume", "distill", "match_loss", "parse_shrink", "prepare", "shrink", "soft_target_kl", "train"]
