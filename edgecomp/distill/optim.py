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

__all__ = ["RowsHeld", "make_optimizer", "schedule", "steps_per_epoch", "train_new_rows"]


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


class RowsHeld:
    """Train only the last rows of a parameter (the vocabulary rows ``reduce-embeddings --add-tokens``
    appended): the first ``n`` rows get a zero gradient, so clipping and the optimizer's moments see
    the trained rows only, and are put back after every step, since decoupled weight decay would
    shrink them even without a gradient. ``restore()`` after each ``optimizer.step()``."""

    def __init__(self, param: torch.nn.Parameter, n: int):
        self.param, self.n = param, n
        self.saved = param.detach()[:n].clone()
        self._handle = param.register_hook(self._mask)

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[:self.n] = 0
        return grad

    def restore(self) -> None:
        with torch.no_grad():
            self.param[:self.n].copy_(self.saved)

    def remove(self) -> None:
        self._handle.remove()


def train_new_rows(module: torch.nn.Module, model) -> list[RowsHeld]:
    """``train_rows = new``: only the rows ``reduce-embeddings --add-tokens`` appended to a vocabulary
    table (recorded on the table, :data:`edgecomp.embeddings.tables.ADDED_ROWS_KEY`) train; every
    other weight of the :class:`~edgecomp.distill.onnx_module.OnnxModule` built from ``model`` is fixed."""
    from edgecomp.embeddings.tables import ADDED_ROWS_KEY
    from edgecomp.errors import OptionError

    keys = {name: key for key, name in module.trained.items()}
    tables = []
    for name, value in model.graph.initializers.items():
        t = value.const_value
        added = int(t.metadata_props.get(ADDED_ROWS_KEY, 0)) if t is not None else 0
        if added and name in keys:
            tables.append((keys[name], int(t.shape[0]) - added))
    if not tables:
        raise OptionError("train_rows", "new trains the vocabulary rows reduce-embeddings add_tokens appended, and "
                                        "this model records none; add tokens first or train all rows")
    for key, p in module.weights.named_parameters():
        p.requires_grad_(key in dict(tables))
    return [RowsHeld(module.weights.get_parameter(key), n) for key, n in tables]
