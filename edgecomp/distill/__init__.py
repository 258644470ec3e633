"""Knowledge distillation in torch: train a smaller student to imitate a teacher, then put it
back into the ONNX pipeline (export → validate → bench).

- ``students``: students derived from the teacher (``layers=N``, ``width=W``);
- ``losses``: soft-target KL, embedding / hidden-state matching, cross-entropy;
- ``samples``: DATA or tokenized text, split and batched;
- ``trainer``: setup checks, the loop, early stopping, checkpoints and resume;
- ``launch``: data-parallel runs through torchrun's launcher (gloo);
- ``pipeline``: ``distill()`` end to end.
"""

from edgecomp.distill.losses import DistillLoss, LossWeights, match_loss, soft_target_kl
from edgecomp.distill.pipeline import DistillResult, distill
from edgecomp.distill.students import ShrinkRule, parse_shrink, shrink
from edgecomp.distill.trainer import DistillConfig, Setup, TrainResult, check_resume, prepare, train

__all__ = ["DistillConfig", "DistillResult", "DistillLoss", "LossWeights", "Setup", "ShrinkRule", "TrainResult",
           "check_resume", "distill", "match_loss", "parse_shrink", "prepare", "shrink", "soft_target_kl", "train"]
