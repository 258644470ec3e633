"""The configuration of a distillation run and its checks that need no model, data or torch.

``DistillConfig`` holds plain values (worker processes rebuild it from them); ``check()`` refuses,
in one line, a run whose options contradict each other (teacher and student each given exactly once,
DATA or text, no --shrink with an ONNX teacher, no --project with an ONNX student) or are out of
range. The CLI calls it before importing torch, so such a refusal takes a fraction of a second;
``edgecomp.distill.trainer.prepare`` calls it again for API and recipe callers, then checks what
needs the models and samples.

This module imports no torch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgecomp.distill.options import LAYER_INITS, MATCH_KINDS, OPTIMIZERS
from edgecomp.errors import DataNeeded, OptionError

__all__ = ["DistillConfig", "is_onnx_file"]


def is_onnx_file(ref: str | None) -> bool:
    """Whether a teacher or student reference names an ONNX file rather than a SPEC."""
    return bool(ref) and ref.lower().endswith(".onnx")


#: Options that do not change what is computed: a checkpoint may be resumed with other values.
#: Sample files are hashed by content (``Samples.fingerprint``), not by path.
_NOT_HASHED = ("checkpoint", "checkpoint_every", "threads", "progress", "data", "text", "labels", "device")


@dataclasses.dataclass
class DistillConfig:
    """Everything that defines a distillation run (plain values, so worker processes can rebuild it)."""

    teacher: str | None = None          # SPEC, as for `edgecomp export`, or an .onnx file
    teacher_hf: str | None = None       # local Hugging Face encoder folder (sentence embeddings)
    student: str | None = None          # SPEC or an .onnx file
    shrink: str | None = None           # layers=N or width=W
    project: bool = False               # learn a linear map when the student's output width differs
    data: str | None = None             # DATA keyed by the teacher's inputs
    text: str | None = None             # one text per line (with tokenizer)
    tokenizer: str | None = None        # default: teacher_hf
    max_len: int = 128
    labels: str | None = None           # .npy class ids aligned with the samples
    held_out: float = 0.1               # fraction held out for early stopping and validation
    objective: str = "auto"             # logits | embeddings | auto (from the teacher's output)
    temperature: float = 4.0
    kd_weight: float = 1.0
    match: str = "cosine"               # mse | cosine, for embeddings and hidden states
    match_weight: float = 1.0
    hidden_weight: float = 0.0
    ce_weight: float = 1.0              # used only with labels
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"            # adamw | adam | sgd | gd (edgecomp.distill.optim)
    train_rows: str = "all"             # new: only the vocabulary rows --add-tokens appended (ONNX student)
    momentum: float = 0.9               # sgd and gd
    weight_decay: float = 0.01
    warmup: float = 0.1                 # fraction of the steps with a linear warmup
    grad_clip: float | None = 1.0
    seed: int = 0
    eval_every: int | None = None       # steps; default once per epoch
    patience: int | None = 3            # evaluations without improvement before stopping; None: never
    checkpoint: str | None = None
    checkpoint_every: int = 100
    threads: int | None = None
    progress: bool = False
    device: str = "auto"                # auto (CUDA when torch sees one) | cpu | cuda[:N]
    blockwise: bool | None = None       # heal block by block first; None: off (end to end healed better)
    block_fraction: float = 0.75        # share of the steps spent block by block (edgecomp.distill.blockwise)
    block_loss: str = "mse"             # mse (relative to the teacher value's energy) | cosine
    block_input: str = "student"        # a block's input: student (its own, detached) | teacher | mix
    layer_init: str | None = None       # copy | blockwise, for --shrink layers=N; None: blockwise
    layer_init_fraction: float = 0.3    # share of the steps spent initializing layers (edgecomp.distill.layer_init)
    layer_init_inputs: str = "teacher"  # teacher | student: the input each layer learns from

    def check(self) -> None:
        """Raise a one-line error for options that contradict each other or are out of range (no model
        or data is read: what needs them is checked by ``edgecomp.distill.trainer.prepare``)."""
        c = self
        if bool(c.teacher) == bool(c.teacher_hf):
            raise OptionError("teacher_hf", "or a teacher SPEC gives the teacher; give one of them")
        if bool(c.student) == bool(c.shrink):
            raise OptionError("shrink", "or a student SPEC gives the student; give one of them")
        if c.data and c.text:
            raise OptionError("text", "replaces the calibration data as the samples; give one of them")
        if not (c.data or c.text):
            raise DataNeeded("calibration", "distill (or text)", option="text")
        if c.shrink and is_onnx_file(c.teacher):
            raise OptionError("shrink", "derives the student from a torch teacher; with an ONNX teacher give a student "
                                        "(a SPEC, or an .onnx file such as the output of edgecomp prune)")
        if c.project and is_onnx_file(c.student):
            raise OptionError("project", "adds a layer the student's ONNX graph does not have; give an ONNX student "
                                         "with the teacher's output shape, or a torch SPEC")
        if c.text and not (c.tokenizer or c.teacher_hf):
            raise DataNeeded("tokenizer", "text")  # a local Hugging Face tokenizer folder
        if c.objective not in ("auto", "logits", "embeddings"):
            raise OptionError("objective", f"must be auto, logits or embeddings, got {c.objective!r}")
        if c.train_rows not in ("all", "new"):
            raise OptionError("train_rows", f"must be all or new, got {c.train_rows!r}")
        if c.optimizer not in OPTIMIZERS:
            raise OptionError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {c.optimizer!r}")
        if c.layer_init is not None and c.layer_init not in LAYER_INITS:
            raise OptionError("layer_init", f"must be {' or '.join(LAYER_INITS)}, got {c.layer_init!r}")
        if c.layer_init == "blockwise" and not (c.shrink or "").strip().startswith("layers"):
            raise OptionError("layer_init", "blockwise initializes a student derived with --shrink layers=N; leave "
                                            "it unset or copy for other students")
        if c.layer_init_inputs not in ("teacher", "student"):
            raise OptionError("layer_init_inputs", f"must be teacher or student, got {c.layer_init_inputs!r}")
        if c.match not in MATCH_KINDS:
            raise OptionError("match", f"must be {' or '.join(MATCH_KINDS)}, got {c.match!r}")
        checks = [("batch_size", c.batch_size >= 1, ">= 1"), ("epochs", c.epochs >= 1, ">= 1"),
                  ("lr", c.lr > 0, "> 0"), ("temperature", c.temperature > 0, "> 0"),
                  ("held_out", 0 <= c.held_out < 1, "in [0, 1)"), ("checkpoint_every", c.checkpoint_every >= 1, ">= 1"),
                  ("warmup", 0 <= c.warmup < 1, "a fraction in [0, 1)"),
                  ("layer_init_fraction", 0 < c.layer_init_fraction < 1, "a fraction in (0, 1)"), ("momentum", 0 <= c.momentum < 1, "in [0, 1)"),
                  ("max_steps", c.max_steps is None or c.max_steps >= 1, ">= 1"),
                  *((w, getattr(c, w) >= 0, ">= 0") for w in ("kd_weight", "match_weight", "hidden_weight", "ce_weight"))]
        for option, ok, allowed in checks:
            if not ok:
                raise OptionError(option, f"must be {allowed}, got {getattr(c, option)}")

    def hashed(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in _NOT_HASHED}
