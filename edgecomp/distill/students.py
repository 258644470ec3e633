"""Students derived from the teacher: fewer layers, or a narrower width.

- ``layers=N`` (transformer encoders): the student is a copy of the teacher keeping N evenly
  spaced layers of its layer stack, first and last included, ``kept[i] = round(i (L-1) / (N-1))``
  (6 → 3 keeps 0, 3, 5), so it starts from the teacher's embeddings and those layers' weights.
  Keeping the last layer matters: on all-MiniLM-L6-v2 the untrained 3-layer student's mean
  cosine to the teacher was 0.65 with layers 0, 3, 5 and 0.36 with 0, 2, 4. For hidden-state matching, student
  layer ``j`` imitates teacher layer ``(j + 1) * L // N - 1`` (the last imitates the last); the same
  boundaries define the group of teacher layers each student layer stands for when
  :mod:`edgecomp.distill.layer_init` initializes it block-wise before distillation (``layer_init``).
- ``width=W`` (CNNs with a width multiplier): a fresh model of the teacher's class with
  ``width=W`` and the teacher's other constructor arguments (read from same-named attributes),
  or else the teacher's factory called with ``width=W``.

The layer stack is the ``nn.ModuleList`` of same-class blocks holding the most parameters
(``encoder.layer`` in Hugging Face BERT, ``layers`` in ``models.text_encoder``).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import re
from typing import Any, Callable

from torch import nn

from edgecomp.errors import DistillError, OptionError

__all__ = ["ShrinkRule", "parse_shrink", "find_layer_stack", "kept_layers", "layer_map", "shrink_layers",
           "shrink_width", "shrink"]


@dataclasses.dataclass(frozen=True)
class ShrinkRule:
    kind: str  # "layers" or "width"
    value: float

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"


def parse_shrink(text: str) -> ShrinkRule:
    """``layers=3`` or ``width=0.5``."""
    m = re.fullmatch(r"\s*(layers|width)\s*=\s*([0-9.]+)\s*", text or "")
    if not m:
        raise OptionError("shrink", f"{text!r} is not a rule; write layers=N (transformer encoders) or width=W "
                                    "(CNNs), e.g. layers=3 or width=0.5")
    kind, value = m.group(1), float(m.group(2))
    if kind == "layers" and (value < 1 or value != int(value)):
        raise OptionError("shrink", f"layers={m.group(2)}: the number of layers must be a whole number >= 1")
    if kind == "width" and not 0 < value < 1:
        raise OptionError("shrink", f"width={m.group(2)}: the width must be between 0 and 1 (a fraction of the "
                                    "teacher's width)")
    return ShrinkRule(kind, value)


def find_layer_stack(model: nn.Module, min_len: int = 2) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the model's main stack of same-class blocks, if any.

    ``min_len=1`` also finds the stack of a student shrunk to a single layer.
    """
    best, best_params = None, 0
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= min_len and len({type(m) for m in mod}) == 1:
            n = sum(p.numel() for p in mod.parameters())
            if n > best_params:
                best, best_params = (name, mod), n
    return best


def kept_layers(n_teacher: int, n_student: int) -> list[int]:
    if n_student == 1:
        return [n_teacher - 1]
    return [int(i * (n_teacher - 1) / (n_student - 1) + 0.5) for i in range(n_student)]


def layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer whose output student layer j imitates."""
    return [(j + 1) * n_teacher // n_student - 1 for j in range(n_student)]


def shrink_layers(teacher: nn.Module, n: int) -> nn.Module:
    """A copy of ``teacher`` keeping ``n`` evenly spaced layers of its layer stack."""
    found = find_layer_stack(teacher)
    if found is None:
        raise OptionError("shrink", "layers=N needs a model with a stack of repeated layers (an nn.ModuleList), "
                                    "like a transformer encoder; give a student SPEC instead")
    name, stack = found
    if not 1 <= n < len(stack):
        raise OptionError("shrink", f"layers={n}: the teacher has {len(stack)} layers in {name}; "
                                    f"choose 1 to {len(stack) - 1}")
    student = copy.deepcopy(teacher)
    parent_name, _, attr = name.rpartition(".")
    parent = student.get_submodule(parent_name) if parent_name else student
    old = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList(old[i] for i in kept_layers(len(stack), n)))
    for mod in student.modules():  # Hugging Face models also record the depth in their config
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "num_hidden_layers", None) == len(stack):
            cfg.num_hidden_layers = n
    return student


def _init_kwargs(module: nn.Module) -> dict[str, Any] | None:
    """The module's constructor arguments, if each is stored as a same-named attribute."""
    params = [p for p in inspect.signature(type(module).__init__).parameters.values()
              if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if "width" not in {p.name for p in params}:
        return None
    kwargs = {}
    for p in params:
        if p.name == "width":
            continue
        if hasattr(module, p.name):
            kwargs[p.name] = getattr(module, p.name)
        elif p.default is inspect.Parameter.empty:
            return None
    return kwargs


def shrink_width(teacher: nn.Module, width: float, factory: Callable | None = None) -> nn.Module:
    """A fresh (randomly initialized) model like ``teacher`` with width multiplier ``width``."""
    kwargs = _init_kwargs(teacher)
    if kwargs is not None:
        base = float(getattr(teacher, "width", 1.0))
        return type(teacher)(width=width * base, **kwargs)
    if factory is not None and "width" in inspect.signature(factory).parameters:
        try:
            made = factory(width=width)
        except Exception as e:
            raise DistillError(f"calling the teacher's factory with width={width:g} failed: {type(e).__name__}: {e}") from e
        return made[0] if isinstance(made, tuple) else made
    raise OptionError("shrink", f"width=W needs a model whose class or factory takes a width multiplier; "
                                f"{type(teacher).__name__} does not, so give a student SPEC")


def shrink(teacher: nn.Module, rule: ShrinkRule, factory: Callable | None = None) -> nn.Module:
    if rule.kind == "layers":
        return shrink_layers(teacher, int(rule.value))
    return shrink_width(teacher, rule.value, factory)
