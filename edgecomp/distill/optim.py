"""Optimizers and the learning-rate schedule shared by ``distill`` and ``finetune``.

- ``adamw``: Adam with decoupled weight decay (Loshchilov & Hutter), ``w -= lr · (m̂/(√v̂+ε) + wd · w)``;
- ``adam``: Adam, the weight decay added to the gradient (L2), ``g += wd · w``;
- ``sgd``: one batch per step, ``v = μ·v + g (+ wd·w)``, ``w -= lr · v`` (torch's heavy ball, no dampening);
- ``gd``: the same update from the gradient of the mean loss over *all* training samples (full-batch
  gradient descent, for small DATA): each step accumulates the gradient over the samples in chunks of
  the batch size, each chunk's mean loss weighted by its share of the samples. With μ = 0 it is
  plain gradient descent, ``w -= lr · ∇L(w)``.

Every optimizer follows the same schedule: a linear warm-up over the first ``warmup`` fraction of
the steps (from ``lr/W`` to ``lr`` over W steps), then cosine decay to 0.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import torch

from edgecomp.distill.options import OPTIMIZERS

__all__ = ["OPTIMIZERS", "make_optimizer", "schedule", "steps_per_epoch"]


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float,
                   momentum: float) -> torch.optim.Optimizer:
    """The torch optimizer for ``name`` (one of :data:`OPTIMIZERS`)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name in ("sgd", "gd"):
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use one of {', '.join(OPTIMIZERS)}")


def steps_per_epoch(optimizer: str, samples: int, batch_size: int) -> int:
    """Optimizer steps per pass over the training samples: one for full-batch ``gd``."""
    return 1 if optimizer == "gd" else max(1, samples // batch_size)


def schedule(total: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate factor of each step: linear warm-up, then cosine decay."""
    w = int(total * warmup)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / max(1, total - w))))

    return factor
