"""Distillation losses: soft targets for logits, matching for embeddings and hidden states.

- soft-target KL (Hinton et al. 2015): ``T² · KL(softmax(t/T) ‖ softmax(s/T))``, the T² keeping
  the gradient scale independent of the temperature;
- matching (embeddings, hidden states): ``mse = mean((s - t)²)`` or ``cosine = mean(1 - cos(s, t))``
  over the last axis; hidden states are averaged over real tokens only (attention mask);
- cross-entropy against labels, when given.

``DistillLoss`` sums them with their weights and returns the parts for the progress bar.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional as F

from edgecomp.distill.options import MATCH_KINDS

__all__ = ["soft_target_kl", "match_loss", "LossWeights", "DistillLoss", "OBJECTIVES"]

OBJECTIVES = ("logits", "embeddings")


def soft_target_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(p_teacher ‖ p_student)`` at temperature T, averaged over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(student.flatten(1) / t, dim=1)
    log_p_t = F.log_softmax(teacher.flatten(1) / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def match_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str = "mse",
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """MSE or (1 - cosine) over the last axis; ``mask`` [B, S] keeps real tokens of [B, S, D] states."""
    if kind == "mse":
        per = (student - teacher).pow(2).mean(-1)
    elif kind == "cosine":
        per = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown match kind {kind!r}; use one of {MATCH_KINDS}")
    if mask is not None and per.dim() == 2:
        m = mask.to(per.dtype)
        return (per * m).sum() / m.sum().clamp(min=1.0)
    return per.mean()


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights of the loss terms; a zero weight switches a term off."""

    kd: float = 1.0
    match: float = 1.0
    hidden: float = 0.0
    ce: float = 0.0


class DistillLoss:
    """The total loss for one objective.

    ``objective="logits"``: soft-target KL on the outputs (weight ``kd``), plus cross-entropy with
    labels (weight ``ce``). ``objective="embeddings"``: ``match`` on the outputs (weight ``match``).
    Either way, hidden-state matching between mapped layers (weight ``hidden``).
    """

    def __init__(self, objective: str, weights: LossWeights, temperature: float = 4.0, match: str = "cosine"):
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; use one of {OBJECTIVES}")
        self.objective, self.weights, self.temperature, self.match = objective, weights, temperature, match

    def __call__(self, student_out: torch.Tensor, teacher_out: torch.Tensor, labels: torch.Tensor | None = None,
                 student_hidden: list[torch.Tensor] = (), teacher_hidden: list[torch.Tensor] = (),
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        w = self.weights
        parts: dict[str, torch.Tensor] = {}
        if self.objective == "logits":
            if w.kd:
                parts["kd"] = w.kd * soft_target_kl(student_out, teacher_out, self.temperature)
            if w.ce and labels is not None:
                parts["ce"] = w.ce * F.cross_entropy(student_out.flatten(1), labels)
        elif w.match:
            parts["match"] = w.match * match_loss(student_out, teacher_out, self.match)
        if w.hidden and student_hidden:
            terms = [match_loss(s, t, self.match, mask) for s, t in zip(student_hidden, teacher_hidden)]
            parts["hidden"] = w.hidden * torch.stack(terms).mean()
        if not parts:
            raise ValueError("every loss term has weight 0")
        total = torch.stack(list(parts.values())).sum()
        return total, {k: float(v.detach()) for k, v in parts.items()}
