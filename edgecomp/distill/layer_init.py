"""Block-wise initialization of a layer-dropped student (``--shrink layers=N``), before end-to-end
distillation.

Why: a student that keeps N of the teacher's L layers (:func:`edgecomp.distill.students.shrink_layers`)
starts far from the teacher (all-MiniLM-L6-v2 6 → 3: held-out cosine ≈ 0.65 untrained, ≈ 0.4 after
the first end-to-end step): each kept layer receives a hidden state a different depth produced and
is expected to do the work of the layers dropped around it. Each layer is first taught to do that
work on its own, a small regression problem that converges in a few hundred steps.

Groups. Student layer ``j`` stands for the teacher layers ``a_j .. b_j`` with
``b_j = layer_map(L, N)[j] = (j + 1) L // N - 1`` and ``a_j = b_{j-1} + 1`` (``a_0 = 0``): equal
groups, the same boundaries hidden-state matching (``hidden_weight``) pairs. 6 → 3: L0 ← T0..T1,
L1 ← T2..T3, L2 ← T4..T5. Each student layer starts from the teacher layer ``shrink_layers`` copied
(``kept_layers``: 0, 3, 5 for 6 → 3, each inside its group).

Inputs (``inputs``):

- ``teacher`` (default): student layer ``j`` gets the teacher's hidden state entering layer ``a_j``
  (captured with a forward pre-hook on the teacher's layer stack, together with the other
  arguments the stack passes, e.g. the attention mask in whatever form the model builds it) and
  learns the teacher's hidden state leaving layer ``b_j`` (a forward hook). The N problems are
  independent: all layers train together, one teacher pass (no gradient) and one pass of each
  student layer per step.
- ``student``: student layer ``j > 0`` gets the student's own layer ``j-1`` output on the same
  batch, detached (what it will see at inference), so errors of the earlier layers are learned
  around; layer 0 gets the teacher's (= the student's) embeddings.

Loss: the mean over groups of ``block_loss`` (the option of :mod:`edgecomp.distill.blockwise`):
``mse`` relative to the target's energy, ``sum(m (s - t)²) / sum(m t²)``, so groups of different
scales weigh alike, or ``cosine``, ``mean(1 - cos(s, t))`` over the hidden axis; ``m`` is the
attention mask (padding tokens do not count). AdamW at the run's learning rate, linear warm-up and
cosine decay, gradient clipping at the run's ``grad_clip``, the run's seeded sample order; only the
stack's layers train (embeddings stay the teacher's, so the teacher's group-0 input is the
student's too), without dropout.

The held-out fidelity of the whole student (mean cosine of its output to the teacher's) is measured
before the first step (the copied layers) and every ``eval_every`` steps; the best state is handed
to the end-to-end pass, so the phase never hands on a student worse than the copy. The steps of
the run are split: ``layer_init_fraction`` here, the rest end to end at the run's learning rate.
Resuming a run whose end-to-end checkpoint exists skips the phase (the checkpoint holds the
student); an interrupted phase reruns from its start (seeded: the same result). The phase runs
on the CPU in one process (``layer_init blockwise`` with several processes is refused; unset, it is
skipped there).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgecomp.distill.losses import match_loss
from edgecomp.distill.optim import schedule
from edgecomp.distill.options import LAYER_INITS
from edgecomp.distill.samples import Samples, epoch_order
from edgecomp.distill.students import find_layer_stack, kept_layers, layer_map, parse_shrink
from edgecomp.errors import OptionError

__all__ = ["LAYER_INITS", "LayerInitResult", "group_errors", "init_layers", "init_steps", "layer_groups",
           "layer_init_phase"]

INPUTS = ("teacher", "student")


def layer_groups(n_teacher: int, n_student: int) -> list[tuple[int, int]]:
    """``(first, last)`` teacher layer of the group each student layer stands for."""
    ends = layer_map(n_teacher, n_student)
    return [(0 if j == 0 else ends[j - 1] + 1, b) for j, b in enumerate(ends)]


def init_steps(total: int, fraction: float) -> int:
    """Steps of the initialization out of ``total``; at least one is left for the end-to-end pass."""
    return max(0, min(total - 1, round(total * fraction)))


class _GroupTaps:
    """Hooks on the teacher's stack: the call entering each group's first layer and the output of its last."""

    def __init__(self, stack: nn.ModuleList, groups: Sequence[tuple[int, int]]):
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.outs: dict[int, torch.Tensor] = {}
        self._handles = []
        for g, (a, b) in enumerate(groups):
            self._handles.append(stack[a].register_forward_pre_hook(self._enter(g), with_kwargs=True))
            self._handles.append(stack[b].register_forward_hook(self._leave(g)))

    def _enter(self, g: int):
        def keep(_mod, args, kwargs):
            self.calls[g] = (args, dict(kwargs))
        return keep

    def _leave(self, g: int):
        def keep(_mod, _inp, out):
            self.outs[g] = _hidden(out)
        return keep

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _hidden(out: Any) -> torch.Tensor:
    """A layer's hidden state, or a model's first output (a tensor, or the first of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _with_input(call: tuple[tuple, dict], x: torch.Tensor) -> tuple[tuple, dict]:
    """The captured layer call with its hidden-state input replaced by ``x``."""
    args, kwargs = call
    if args:
        return (x, *args[1:]), kwargs
    return (), {**kwargs, "hidden_states": x}


def _group_loss(s: torch.Tensor, t: torch.Tensor, kind: str, mask: torch.Tensor | None) -> torch.Tensor:
    m = mask if mask is not None and s.dim() == 3 and tuple(mask.shape) == tuple(s.shape[:2]) else None
    if kind == "cosine":
        return match_loss(s, t, "cosine", m)
    return match_loss(s, t, "mse", m) / match_loss(torch.zeros_like(t), t, "mse", m).clamp(min=1e-12)


def _teacher_groups(teacher: nn.Module, args: list[torch.Tensor]) -> None:
    """Run the teacher (no gradient) so its hooks capture every group's input call and output."""
    with torch.no_grad():
        teacher(*args)


def _student_outputs(stack: nn.ModuleList, taps: _GroupTaps, inputs: str) -> list[torch.Tensor]:
    """Each student layer's output on its group's input (teacher's or its predecessor's, detached)."""
    outs: list[torch.Tensor] = []
    for j, layer in enumerate(stack):
        call = taps.calls[j]
        if inputs == "student" and j > 0:
            call = _with_input(taps.calls[j], outs[-1].detach())
        args, kwargs = call
        outs.append(_hidden(layer(*args, **kwargs)))
    return outs


def group_errors(student: nn.Module, teacher: nn.Module, samples: Samples, names: Sequence[str], *,
                 kind: str = "mse", inputs: str = "teacher", batch: int = 32) -> list[float]:
    """Per student layer, the loss of its output against its teacher group's output on ``samples``
    (each layer fed the teacher's group input, or with ``inputs="student"`` its predecessor's output)."""
    (_, t_stack), (_, s_stack) = find_layer_stack(teacher), find_layer_stack(student, min_len=1)
    taps = _GroupTaps(t_stack, layer_groups(len(t_stack), len(s_stack)))
    sums, count = np.zeros(len(s_stack)), 0
    was = student.training
    student.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(samples), batch):
                idx = list(range(i, min(len(samples), i + batch)))
                b = samples.batch(idx)
                _teacher_groups(teacher, [b[n] for n in names])
                outs = _student_outputs(s_stack, taps, inputs)
                mask = b.get("attention_mask")
                for j, o in enumerate(outs):
                    sums[j] += float(_group_loss(o, taps.outs[j], kind, mask)) * len(idx)
                count += len(idx)
    finally:
        taps.remove()
        student.train(was)
    return [float(v) for v in sums / max(1, count)]


def _outputs(model: nn.Module, samples: Samples, names: Sequence[str]) -> list[torch.Tensor]:
    """``model``'s first output on ``samples`` in batches of 64, flattened per sample (no gradient)."""
    outs = []
    with torch.no_grad():
        for i in range(0, len(samples), 64):
            b = samples.batch(range(i, min(len(samples), i + 64)))
            outs.append(_hidden(model(*[b[n] for n in names])).float().flatten(1))
    return outs


def _held_cos(student: nn.Module, samples: Samples, names: Sequence[str], targets: list[torch.Tensor]) -> float:
    got, ref = torch.cat(_outputs(student, samples, names)), torch.cat(targets)
    return float(torch.nn.functional.cosine_similarity(got, ref, dim=1).mean())


@dataclasses.dataclass
class LayerInitResult:
    groups: list[tuple[int, int]]     # teacher layers (first, last) each student layer stands for
    copied: list[int]                 # the teacher layer each student layer started from
    inputs: str
    steps: int
    best_step: int
    seconds: float
    errors_before: list[float]        # per group, on the held-out split (or the first training samples)
    errors_after: list[float]
    history: list[dict[str, float]]   # step, seconds, loss, held-out cos (at evaluations)

    def report(self) -> dict[str, Any]:
        rows = [{"student layer": j, "teacher layers": f"{a}..{b}", "copied from": c,
                 "group error before": e0, "group error after": e1}
                for j, ((a, b), c, e0, e1) in enumerate(zip(self.groups, self.copied, self.errors_before,
                                                             self.errors_after))]
        return {"inputs": self.inputs, "steps": self.steps, "best step": self.best_step, "seconds": self.seconds,
                "groups": rows, "history": self.history}


def init_layers(student: nn.Module, teacher: nn.Module, train: Samples, held: Samples, names: Sequence[str],
                steps: int, *, lr: float, batch_size: int, seed: int = 0, kind: str = "mse", inputs: str = "teacher",
                weight_decay: float = 0.01, warmup: float = 0.1, grad_clip: float | None = 1.0,
                eval_every: int | None = None, copied: Sequence[int] = (),
                callback: Callable[[int, dict[str, float]], None] | None = None) -> LayerInitResult:
    """Train each layer of ``student``'s stack to reproduce its teacher group (see the module
    docstring); the student keeps the state of the best held-out evaluation (step 0 included)."""
    if inputs not in INPUTS:
        raise OptionError("inputs", f"must be {' or '.join(INPUTS)}, got {inputs!r}")
    t0 = time.perf_counter()
    (_, t_stack), (_, s_stack) = find_layer_stack(teacher), find_layer_stack(student, min_len=1)
    groups = layer_groups(len(t_stack), len(s_stack))
    probe = held if len(held) else train.subset(range(min(64, len(train))))
    errors_before = group_errors(student, teacher, probe, names, kind=kind, inputs=inputs)
    targets = _outputs(teacher, probe, names)
    was = student.training
    student.eval()  # no dropout: a regression onto the teacher's values
    params = [p for p in s_stack.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule(steps, warmup))
    per_epoch = max(1, len(train) // batch_size)
    eval_every = eval_every or per_epoch
    sizes = train.sizes()
    history = [{"step": 0, "seconds": time.perf_counter() - t0, "held-out cos": _held_cos(student, probe, names, targets)}]
    best = (history[0]["held-out cos"], 0, {k: v.detach().clone() for k, v in s_stack.state_dict().items()})
    taps = _GroupTaps(t_stack, groups)
    try:
        for step in range(1, steps + 1):
            epoch, pos = divmod(step - 1, per_epoch)
            idx = epoch_order(len(train), seed, epoch, sizes, batch_size)[pos * batch_size:(pos + 1) * batch_size]
            b = train.batch(idx)
            _teacher_groups(teacher, [b[n] for n in names])
            outs = _student_outputs(s_stack, taps, inputs)
            mask = b.get("attention_mask")
            loss = torch.stack([_group_loss(o.float(), taps.outs[j].float(), kind, mask)
                                for j, o in enumerate(outs)]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            rec = {"step": step, "layer loss": float(loss.detach())}
            if step % eval_every == 0 or step == steps:
                rec["held-out cos"] = _held_cos(student, probe, names, targets)
                rec["seconds"] = time.perf_counter() - t0
                history.append(rec)
                if rec["held-out cos"] > best[0]:
                    best = (rec["held-out cos"], step, {k: v.detach().clone() for k, v in s_stack.state_dict().items()})
            if callback is not None:
                callback(step, rec)
    finally:
        taps.remove()
    s_stack.load_state_dict(best[2])
    errors_after = group_errors(student, teacher, probe, names, kind=kind, inputs=inputs)
    student.train(was)
    return LayerInitResult(groups, list(copied), inputs, steps, best[1], time.perf_counter() - t0, errors_before,
                           errors_after, history)


def layer_init_phase(setup, config, *, resume: bool = False, processes: int = 1,
                     callback: Callable[[int, dict[str, float]], None] | None = None) -> tuple[LayerInitResult | str | None, Any]:
    """Initialize a ``--shrink layers=N`` student block-wise when ``layer_init`` asks for it (unset:
    blockwise for such a student). Returns the result (or why the phase did not run; None for a
    student not derived with ``layers=N``) and the
    configuration of the end-to-end pass that follows (``config`` with the remaining steps)."""
    c = setup.config
    mode = c.layer_init
    layered = bool(c.shrink) and parse_shrink(c.shrink).kind == "layers"
    c.check()  # layer_init, its fraction and inputs: one line each
    if not layered:
        return None, config  # nothing to say: another kind of student
    if mode == "copy":
        return "off (layer_init copy: the kept layers as copied)", config
    if processes > 1:
        if mode == "blockwise":
            raise OptionError("layer_init", "blockwise runs in one process; set it to copy for data-parallel runs")
        return "off (data-parallel run)", config
    from edgecomp.distill.optim import steps_per_epoch

    total = config.max_steps or config.epochs * steps_per_epoch(config.optimizer, len(setup.train), config.batch_size)
    n = init_steps(total, c.layer_init_fraction)
    if n == 0:
        return f"off ({total} step is too few to split)", config
    rest = dataclasses.replace(config, max_steps=total - n)
    if resume:
        return "skipped (resumed: the end-to-end checkpoint holds the initialized student)", rest
    n_teacher, n_student = len(find_layer_stack(setup.teacher)[1]), len(find_layer_stack(setup.student, min_len=1)[1])
    threads = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        res = init_layers(setup.student, setup.teacher, setup.train, setup.held, setup.input_names, n, lr=c.lr,
                          batch_size=c.batch_size, seed=c.seed, kind=c.block_loss, inputs=c.layer_init_inputs,
                          weight_decay=c.weight_decay, warmup=c.warmup, grad_clip=c.grad_clip,
                          eval_every=c.eval_every, copied=kept_layers(n_teacher, n_student),
                          callback=callback)
    finally:
        torch.set_num_threads(threads)
    return res, rest

