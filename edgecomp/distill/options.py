"""The options of distillation, declared once (:mod:`edgecomp.options`); the fields of
:class:`~edgecomp.distill.config.DistillConfig` carry the same names and defaults.

This module imports no torch: the CLI and recipes read it at startup.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from edgecomp.options import Option, check_values, in_range

# Declared here, without torch, for the CLI, recipes and DistillConfig.check; edgecomp.distill.optim and
# edgecomp.distill.losses (torch) import them.
OPTIMIZERS = ("adamw", "adam", "sgd", "gd")
MATCH_KINDS = ("mse", "cosine")
LAYER_INITS = ("copy", "blockwise")  # edgecomp.distill.layer_init

__all__ = ["LAYER_INITS", "MATCH_KINDS", "OPTIMIZERS", "OPTIONS", "TRAINING_OPTIONS", "check_config"]

_SHRINK = re.compile(r"\s*(layers|width)\s*=\s*([0-9.]+)\s*")


def _shrink(v: str) -> str | None:
    # The grammar of edgecomp.distill.students.parse_shrink, which imports torch.
    m = _SHRINK.fullmatch(v)
    if m:
        try:
            value = float(m.group(2))
        except ValueError:
            value = float("nan")
        if (m.group(1) == "layers" and value >= 1 and value == int(value)) or (m.group(1) == "width" and 0 < value < 1):
            return None
    return f"must be layers=N (N >= 1, transformer encoders) or width=W (0 < W < 1, CNNs), got {v!r}"


def _model(v: str) -> str | None:
    """A SPEC (package.module:factory or path/to/file.py:factory) or an existing .onnx file."""
    if v.endswith(".onnx"):
        return None if Path(v).is_file() else f"names the ONNX file {v}, which does not exist"
    target, sep, attr = v.rpartition(":")
    if not sep or not target or not attr:
        return f"must be a SPEC like package.module:factory or path/to/file.py:factory, or an .onnx file; got {v!r}"
    if target.endswith(".py") and not Path(target).is_file():
        return f"names the file {target}, which does not exist (relative to the working directory)"
    return None


def _device(v: str) -> str | None:
    # Availability is checked when training starts (edgecomp.distill.trainer.resolve_device imports torch).
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else f"must be auto, cpu or cuda[:N], got {v!r}"


_WEIGHT = in_range(0)

#: The options of a training loop, shared by ``distill`` and ``finetune`` (one declaration).
TRAINING_OPTIONS = (
    Option("epochs", int, 10, "passes over the training data", check=in_range(1)),
    Option("max_steps", int, None, "stop after this many steps (overrides epochs)", check=in_range(1)),
    Option("batch_size", int, 32, "global batch size", check=in_range(1)),
    Option("lr", float, 1e-3, "peak learning rate (linear warm-up, then cosine decay)", check=in_range(0, open_lo=True)),
    Option("optimizer", str, "adamw", "how to step: sgd takes one batch a step (with momentum), gd every "
           "training sample (full-batch gradient descent, for small DATA)", choices=OPTIMIZERS),
    Option("momentum", float, 0.9, "momentum of sgd and gd (0: plain gradient descent)", check=in_range(0, 1, open_hi=True)),
    Option("weight_decay", float, 0.01, "weight decay (decoupled for adamw, L2 for the others)", check=in_range(0)),
    Option("warmup", float, 0.1, "fraction of the steps with a linear learning-rate warm-up (gentle: a trained "
           "model is not pushed away from what it computes by the first full-size steps)",
           check=in_range(0, 1, open_hi=True)),
    Option("train_rows", str, "all", "new: train only the vocabulary rows reduce-embeddings --add-tokens appended "
           "(an ONNX model records them), every other weight fixed", choices=("all", "new")),
    Option("held_out", float, 0.1, "fraction held out for early stopping and validation",
           check=in_range(0, 1, open_hi=True)),
    Option("eval_every", int, None, "steps between held-out evaluations (default: each epoch)", check=in_range(1)),
    Option("patience", int, 3, "evaluations without better fidelity before stopping", check=in_range(1)),
    Option("seed", int, 0, "fixes initialization, split and data order", check=in_range(0, 2**32 - 1)),
    Option("checkpoint_every", int, 100, "steps between checkpoints", check=in_range(1)),
    Option("device", str, "auto", "where to train: auto takes a CUDA GPU when torch sees one (bf16 mixed precision), "
           "else the CPU; cpu; cuda[:N]", check=_device, metavar="auto|cpu|cuda[:N]"),
)

OPTIONS = (
    Option("student", str, None, "student: a SPEC, or an .onnx file (e.g. from edgecomp prune: its weights are "
           "trained in place and written back into its graph)", check=_model),
    Option("shrink", str, None, "derive the student from a torch teacher: layers=N (encoders, evenly spaced "
           "teacher layers) or width=W (CNNs)", check=_shrink),
    Option("project", bool, False, "learn a linear map when the student's output width differs",
           flag="--project/--no-project"),
    Option("max_len", int, 128, "token limit for text samples", check=in_range(2)),
    Option("objective", str, "auto", "auto: soft targets for logits, matching for unit-norm embeddings",
           choices=("auto", "logits", "embeddings")),
    Option("temperature", float, 4.0, "soft-target temperature", check=in_range(0, open_lo=True)),
    Option("kd_weight", float, 1.0, "weight of the soft-target KL (logits)", check=_WEIGHT),
    Option("match", str, "cosine", "embedding / hidden-state matching loss", choices=("cosine", "mse")),
    Option("match_weight", float, 1.0, "weight of output matching (embeddings)", check=_WEIGHT),
    Option("hidden_weight", float, 0.0, "weight of hidden-state matching", check=_WEIGHT),
    Option("ce_weight", float, 1.0, "weight of cross-entropy (with labels)", check=_WEIGHT),
    *TRAINING_OPTIONS,
    Option("blockwise", bool, None, "heal block by block (each pruned block of an ONNX student learns its teacher "
           "block's output) before a short end-to-end pass; default off: end to end healed better on the real models "
           "measured (BENCHMARKS.md)", flag="--blockwise/--no-blockwise"),
    Option("block_fraction", float, 0.75, "share of the training steps spent block by block",
           check=in_range(0, 1, open_lo=True, open_hi=True)),
    Option("block_loss", str, "mse", "block output matching: mse relative to the teacher value's energy, or cosine",
           choices=("mse", "cosine")),
    Option("block_input", str, "student", "what each block reads at its input boundary: student, its own (healed "
           "upstream) value, detached, as BRECQ/AdaRound (the only one whose block phase raised a real CNN's fidelity); "
           "teacher, the teacher's value; or mix, per element the teacher's with probability 0.5, as QDrop",
           choices=("student", "teacher", "mix")),
    Option("layer_init", str, None, "a --shrink layers=N student: blockwise first trains each kept layer to "
           "reproduce the group of teacher layers it replaces (edgecomp.distill.layer_init), copy starts end to end "
           "from the copied layers; default: blockwise", choices=LAYER_INITS),
    Option("layer_init_fraction", float, 0.3, "share of the training steps spent on the block-wise layer "
           "initialization", check=in_range(0, 1, open_lo=True, open_hi=True)),
    Option("layer_init_inputs", str, "teacher", "what each student layer learns from during the layer "
           "initialization: the teacher's hidden state entering its group, or the student's own previous layer's output",
           choices=("teacher", "student")),
)


def check_config(values: dict[str, Any]) -> None:
    """The declared values of a DistillConfig (or a recipe step), checked."""
    check_values(OPTIONS, values)
