"""The options of ``edgecomp finetune``, declared once (:mod:`edgecomp.options`): the CLI flags, the
recipe keys of a ``finetune`` step and the fields of :class:`FinetuneOptions` come from here. The
training options (optimizer, schedule, early stopping, seed) are distillation's own declarations.

This module imports no torch: the CLI and recipes read it at startup.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgecomp.distill.options import TRAINING_OPTIONS
from edgecomp.options import Option, check_values, regexes

__all__ = ["OPTIONS", "DATA_NEEDED", "FinetuneOptions", "check_options"]

#: The data finetune reads whatever its options (key -> what reads it).
DATA_NEEDED = {"calibration": "finetune", "train_labels": "finetune"}

def _head(v: Any) -> str | None:
    if isinstance(v, str) and v != "auto" and not v.isdigit():
        return f"must be a number of classes N >= 2, or auto (as many as the labels hold), got {v!r}"
    n = int(v) if isinstance(v, int) or v.isdigit() else 2
    return None if n >= 2 else f"must be >= 2 classes, got {n}"


OPTIONS = (
    Option("new_head", (int, str), None, "replace the final classifier (the Gemm or MatMul(+Add) computing the "
           "first output) with a new one for N classes: transfer learning to a new task; auto: as many classes "
           "as the labels hold (the largest class id + 1; the width of target vectors)", check=_head,
           metavar="N|auto"),
    Option("freeze", list, [], "regexes of weight (initializer) names kept fixed (repeatable); a new head always "
           "trains, so --freeze . trains the head only", check=regexes, metavar="REGEX"),
    Option("shuffle", bool, True, "shuffle the samples each epoch (off: file order, e.g. batches of a "
           "deployment's data in the order they arrived)", flag="--shuffle/--no-shuffle"),
    *(o for o in TRAINING_OPTIONS if o.name != "device"),
)


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """The values of :data:`OPTIONS` (same names and defaults)."""

    new_head: int | str | None = None  # N, or "auto"
    freeze: tuple[str, ...] = ()
    shuffle: bool = True
    epochs: int = 10
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"
    momentum: float = 0.9
    weight_decay: float = 0.01
    warmup: float = 0.1
    train_rows: str = "all"
    held_out: float = 0.1
    eval_every: int | None = None
    patience: int | None = 3
    seed: int = 0
    checkpoint_every: int = 100
    grad_clip: float | None = 1.0  # not a declared option: the same clipping as distill

    def __post_init__(self) -> None:
        check_options({k: v for k, v in dataclasses.asdict(self).items() if v is not None})
        if isinstance(self.new_head, str) and self.new_head.isdigit():  # from the command line
            object.__setattr__(self, "new_head", int(self.new_head))


def check_options(values: dict[str, Any]) -> None:
    check_values(OPTIONS, values)
