"""Block-wise healing: each block of a pruned student learns to reproduce its teacher block's output
from the teacher block's input, before a short end-to-end pass.

Why: end-to-end output matching on a few hundred samples is a weak signal through many layers;
a block given the teacher's input is a small problem that converges fast (AIMET's SeqMSE /
AdaRound and BRECQ optimize one block at a time for the same reason).

Boundaries (``plan_blocks``). Both models run as ``OnnxModule``. A value ``b`` of the student is a
*cut* when, of everything computed by ``b``'s ancestors, only ``b`` itself (and values that depend
on no trained weight, such as an attention mask built from the graph inputs and the hidden
states' *shape*: Shape and Size read no numbers) is read by a later node or is a graph output: replacing ``b`` by the teacher's value then feeds the rest of the graph
from the teacher alone. A boundary is a cut that the teacher computes too, under the same name
(``edgecomp prune`` keeps value names), with the same shape on a probe batch (the residual stream
around a pruned FFN, a CNN stage output whose width the prune kept), or narrowed by the prune:
``edgecomp prune`` records in the model metadata which positions of each value it kept
(``prune_channels.KEPT_POSITIONS_KEY``), and the teacher's value is read at those positions. Of a
run of boundaries with no trained weight between them only the last is kept. Block k is
everything between boundary k-1 (or the graph inputs) and boundary k; it is trained when one of
its weights differs from the teacher's (a pruned or repaired layer), the others stay as they are.

When (``block_phase``): only when ``blockwise`` is on. On random-weight test models it heals far
better than end-to-end training (a pruned 19-block MobileNetV2: held-out cosine 0.999 vs 0.964 in
30 steps), but on the two real models measured (all-MiniLM-L6-v2 FFN 50%, the trained digits
MobileNetV2 50% channels) end-to-end training healed better at the same steps with every block
input below, so distill heals end to end unless asked. When a boundary is narrowed (the prune cut
a stage output too), a block reproduces the teacher's kept channels. The steps of the run are split: ``block_fraction`` block by block,
the rest end to end at a tenth of the learning rate (at the full rate the end-to-end pass undid
the blocks' work), and the block phase's student is handed on when that pass ends worse on the
held-out split.

Training (``heal_blocks``). Every step runs the teacher once (no gradient) capturing all boundary
values, then the student once with each boundary *replaced* after it is computed
(``OnnxModule.values(replace=...)``), so no gradient crosses a boundary and all blocks train
together at the cost of one end-to-end step. What block k reads at boundary k-1
(``block_input``):

- ``teacher``: the teacher's value (teacher forcing): each block solves its own small problem,
  but a block never sees the errors of the healed blocks before it, so per-block fits need not
  compose (measured: all-MiniLM-L6-v2 FFN 50% plateaus at held-out cosine 0.930 where end-to-end
  training reaches 0.95);
- ``student``: the student's own value, detached (BRECQ/AdaRound "asymmetric" reconstruction):
  block k learns to map what the healed upstream blocks really produce onto the teacher's value
  at boundary k, correcting the error it is handed instead of compounding it;
- ``mix``: per element, the teacher's value with probability ``MIX_TEACHER``, else the student's
  detached (QDrop): a draw seeded by the run's seed and the step, so a resumed run draws alike.

The target of block k is always the teacher's value at boundary k. The teacher's block inputs and
outputs are recomputed per batch (memory bounded by one batch; no cache on disk). The loss is the
mean over trained blocks of

- ``mse``: ``sum(m·(s - t)²) / sum(m·t²)``, the squared error relative to the teacher value's
  energy, so blocks of different scales weigh alike; or
- ``cosine``: ``mean(1 - cos(s, t))`` over the feature axis (the last one for token states
  ``[B, S, D]``, axis 1 for ``NCHW`` maps);

with ``m`` the attention mask when the value is laid out ``[batch, sequence, ...]`` (padding
tokens do not count). AdamW with the run's learning rate, linear warmup and cosine decay, gradient
clipping, and the run's sample order (``epoch_order``), held-out split, evaluation interval and
patience: held-out fidelity of the whole student to the teacher (mean cosine; top-1 agreement for
logits) is measured before the first step and at each evaluation, and the best state is kept,
so the block phase never hands on a student worse than the one it was given. Its checkpoint
(``CHECKPOINT.blocks``, tensors and plain values, read with ``weights_only=True``) resumes it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from edgecomp.distill.losses import soft_target_kl
from edgecomp.distill.samples import epoch_order
from edgecomp.errors import DistillError, OptionError

__all__ = ["Block", "BlockPlan", "BlockResult", "BoundaryTaps", "plan_blocks", "heal_blocks", "hidden_plan",
           "block_phase", "block_steps", "blocks_checkpoint", "BLOCK_INPUTS", "BLOCK_LOSSES"]

BLOCK_LOSSES = ("mse", "cosine")
BLOCK_INPUTS = ("teacher", "student", "mix")
#: ``block_input = mix``: the share of a boundary's elements fed from the teacher (QDrop's 0.5).
MIX_TEACHER = 0.5
SHAPE_ONLY_OPS = ("Shape", "Size")  # their outputs depend on an input's shape only
#: The end-to-end pass after the blocks trains at this fraction of the run's learning rate.
END_TO_END_LR = 0.1
_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Block:
    start: str | None          # the boundary it reads (None: the graph inputs)
    end: str                   # the boundary it computes
    params: tuple[str, ...]    # the student's parameter keys (under ``weights``) it owns
    changed: bool              # some weight differs from the teacher's (pruned or repaired)


@dataclasses.dataclass
class BlockPlan:
    boundaries: list[str]
    shapes: dict[str, list[int]]       # on the probe batch
    blocks: list[Block]
    select: dict[str, tuple[int, torch.Tensor]] = dataclasses.field(default_factory=dict)  # axis, kept positions

    def teacher_values(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The teacher's boundary values at the student's widths (the positions a prune kept)."""
        out = dict(values)
        for name, (axis, idx) in self.select.items():
            out[name] = values[name].index_select(axis, idx.to(values[name].device))
        return out

    @property
    def trained(self) -> list[Block]:
        return [b for b in self.blocks if b.changed]

    def report(self) -> dict[str, Any]:
        return {"boundaries": [{"value": b, "shape": self.shapes[b], **({"teacher": "positions the prune kept"}
                                if b in self.select else {})} for b in self.boundaries],
                "blocks": len(self.blocks), "trained blocks": [b.end for b in self.trained]}


@dataclasses.dataclass
class BlockResult:
    plan: BlockPlan
    steps: int
    best_step: int
    stopped_early: bool
    resumed_from: int | None
    seconds: float
    history: list[dict[str, float]]
    best: tuple[float, ...] | None = None          # held-out fidelity key of the state handed on
    state: dict[str, torch.Tensor] | None = None   # that state
    kept_after_end_to_end: bool = False

    def report(self) -> dict[str, Any]:
        return {**self.plan.report(), "steps": self.steps, "best step": self.best_step,
                "stopped early": self.stopped_early, "seconds": round(self.seconds, 1), "history": self.history,
                **({"kept": "the block phase's weights: the end-to-end pass did not improve held-out fidelity"}
                   if self.kept_after_end_to_end else {})}

    def keep_if_better(self, setup) -> None:
        """After the end-to-end pass: hand on the block phase's student when that pass made it worse."""
        if self.best is None or self.state is None or not len(setup.held):
            return
        now = _key(setup.objective, _held_fidelity(setup, setup.student, _teacher_held(setup, "cpu"), "cpu"))
        if now < self.best:
            setup.student.load_state_dict(self.state)
            self.kept_after_end_to_end = True


# --- the plan ---------------------------------------------------------------------------------

def _bits(mask: int):
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


def _cuts(module) -> tuple[list[str], dict[str, int], list[int]]:
    """The student's cut values in run order, the step producing each value, and each step's ancestors."""
    flow, ops = module.dataflow(), module.ops()
    trained = set(module.trained.values())
    producer: dict[str, int] = {}
    consumers: dict[str, int] = {}  # value → bit mask of the steps reading it
    anc: list[int] = []
    weighted: set[str] = set()      # values that depend on a trained weight
    for i, (ins, outs) in enumerate(flow):
        mask = 1 << i
        for n in ins:
            if n in producer:
                mask |= anc[producer[n]]
            if ops[i] not in SHAPE_ONLY_OPS:  # a read of the shape alone keeps no value alive
                consumers[n] = consumers.get(n, 0) | 1 << i
        anc.append(mask)
        # Shape and Size read a value's shape, not its numbers: an attention mask built from the
        # graph inputs and Shape(hidden states) depends on no trained weight
        if ops[i] not in SHAPE_ONLY_OPS and any(n in trained or n in weighted for n in ins if n):
            weighted.update(o for o in outs if o)
        for o in outs:
            if o:
                producer[o] = i
    graph_outputs = set(module.output_names)
    cuts = []
    for i, (_, outs) in enumerate(flow):
        if len(outs) != 1 or outs[0] not in weighted:
            continue
        v, inside = outs[0], anc[i]
        live = False
        for j in _bits(inside):
            for o in flow[j][1]:
                if o and o != v and o in weighted and (o in graph_outputs or consumers.get(o, 0) & ~inside):
                    live = True
                    break
            if live:
                break
        if not live:
            cuts.append(v)
    return cuts, producer, anc


def _block_params(module, anc: list[int], producer: Mapping[str, int], covered: int, end: str) -> set[str]:
    """Parameter keys read by the nodes ``end`` depends on, outside ``covered`` (earlier blocks' nodes)."""
    key_of = {name: key for key, name in module.trained.items()}
    inside = anc[producer[end]] & ~covered
    flow = module.dataflow()
    return {key_of[n] for j in _bits(inside) for n in flow[j][0] if n in key_of}


def _differs(student, teacher, keys: set[str]) -> bool:
    t_weights = {name: teacher.weights.get_parameter(key) for key, name in teacher.trained.items()}
    for key in keys:
        mine, theirs = student.weights.get_parameter(key), t_weights.get(student.trained[key])
        if theirs is None or mine.shape != theirs.shape or not torch.equal(mine.detach().cpu(), theirs.detach().cpu()):
            return True
    return False


def _selector(s: torch.Tensor, t: torch.Tensor, kept: list | None) -> tuple[int, torch.Tensor] | None:
    """How the teacher's value maps to the student's narrower one: (axis, kept positions), if it does."""
    if kept is None or s.dim() != t.dim():
        return None
    axis, idx = int(kept[0]), torch.tensor(kept[1], dtype=torch.int64)
    axis = axis + s.dim() if axis < 0 else axis
    if not 0 <= axis < s.dim() or idx.numel() != s.shape[axis] or (idx.numel() and int(idx.max()) >= t.shape[axis]):
        return None
    want = list(t.shape)
    want[axis] = idx.numel()
    return (axis, idx) if want == list(s.shape) else None


def plan_blocks(student: nn.Module, teacher: nn.Module, probe: list[torch.Tensor],
                positions: Mapping[str, list] | None = None, need_changed: bool = True) -> BlockPlan | str:
    """The blocks to heal, or why there are none (one line). ``positions``: the prune's record of the
    positions each narrowed value keeps (``{name: [axis, positions]}``), so a cut value narrower in
    the student is a boundary too."""
    from edgecomp.distill.onnx_module import OnnxModule

    if not (isinstance(student, OnnxModule) and isinstance(teacher, OnnxModule)):
        return "needs an ONNX teacher and an ONNX student (e.g. the output of edgecomp prune)"
    if student.output_names != teacher.output_names:
        return (f"needs a student with the teacher's outputs {teacher.output_names} (it has {student.output_names}); "
                "it is not a pruned copy of the teacher")
    cuts, producer, anc = _cuts(student)
    teacher_values = {o for _, outs in teacher.dataflow() for o in outs}
    cuts = [v for v in cuts if v in teacher_values]
    with torch.no_grad():
        s_vals = student.values(*probe, capture=cuts)
        t_vals = teacher.values(*probe, capture=cuts)
    shapes, select = {}, {}
    for v in cuts:
        if not s_vals[v].is_floating_point():
            continue
        if s_vals[v].shape == t_vals[v].shape:
            shapes[v] = list(s_vals[v].shape)
        elif (sel := _selector(s_vals[v], t_vals[v], (positions or {}).get(v))) is not None:
            shapes[v], select[v] = list(s_vals[v].shape), sel
    cuts = [v for v in cuts if v in shapes]
    kept: list[str] = []
    covered = 0
    for v in cuts:  # of boundaries with no trained weight between them, the last
        if kept and not _block_params(student, anc, producer, covered, v):
            kept[-1] = v
        else:
            kept.append(v)
        covered |= anc[producer[v]]
    blocks, start, covered = [], None, 0
    for v in kept:
        keys = _block_params(student, anc, producer, covered, v)
        if keys:
            blocks.append(Block(start, v, tuple(sorted(keys)), _differs(student, teacher, keys)))
        start, covered = v, covered | anc[producer[v]]
    if not [b for b in blocks if b.end not in student.output_names]:
        return ("found no value inside both graphs with the same name and shape to cut blocks at (it is not a "
                "pruned copy of the teacher)")
    if need_changed and not any(b.changed for b in blocks):
        return "found no block whose weights differ from the teacher's: nothing to heal block by block"
    return BlockPlan(kept, {v: shapes[v] for v in kept}, blocks, {v: select[v] for v in kept if v in select})


# --- training ---------------------------------------------------------------------------------

def block_steps(total: int, fraction: float) -> int:
    """Steps of the block phase out of ``total``; at least one step is left for the end-to-end pass."""
    return max(0, min(total - 1, int(round(total * fraction))))


def blocks_checkpoint(checkpoint: str | None) -> Path | None:
    return Path(f"{checkpoint}.blocks") if checkpoint else None


def _masked_loss(s: torch.Tensor, t: torch.Tensor, kind: str, mask: torch.Tensor | None) -> torch.Tensor:
    if kind == "cosine":
        axis = -1 if s.dim() == 3 else 1 if s.dim() >= 2 else 0
        per = 1.0 - torch.nn.functional.cosine_similarity(s, t, dim=axis, eps=1e-8)
    else:
        per = (s - t).pow(2)
    weight = torch.ones_like(per)
    if mask is not None and per.dim() >= 2 and tuple(per.shape[:2]) == tuple(mask.shape):
        weight = mask.to(per.dtype).reshape(*mask.shape, *([1] * (per.dim() - 2))).expand_as(per)
    if kind == "cosine":
        return (per * weight).sum() / weight.sum().clamp(min=1.0)
    energy = (t.pow(2) * weight).sum().clamp(min=1e-12)
    return (per * weight).sum() / energy


def _held_fidelity(setup, student: nn.Module, targets: list[torch.Tensor], device) -> dict[str, float]:
    src, names = setup.held, setup.input_names
    order = np.argsort(src.sizes(), kind="stable")
    got: list[torch.Tensor | None] = [None] * len(src)
    student.eval()
    with torch.no_grad():
        for i in range(0, len(src), 64):
            idx = order[i:i + 64]
            b = src.batch(idx)
            out = student(*[b[n].to(device) for n in names])
            out = out[0] if isinstance(out, (tuple, list)) else out
            for j, o in zip(idx, out.split(1)):
                got[j] = o.float().cpu()
    s, t = torch.cat(got).flatten(1), torch.cat(targets).flatten(1)
    rec = {"held-out cos": float(torch.nn.functional.cosine_similarity(s, t, dim=1).mean())}
    if setup.objective == "logits":
        rec["top-1 agreement"] = float((s.argmax(1) == t.argmax(1)).float().mean())
        rec["held-out loss"] = float(soft_target_kl(s, t, setup.loss.temperature))
    return rec


def _key(objective: str, rec: Mapping[str, float]) -> tuple[float, ...]:
    if objective == "logits":
        return (rec["top-1 agreement"], -rec["held-out loss"])
    return (rec["held-out cos"],)


def _teacher_held(setup, device) -> list[torch.Tensor]:
    """The teacher's held-out outputs, in sample order."""
    src, names, teacher = setup.held, setup.input_names, setup.teacher
    out: list[torch.Tensor | None] = [None] * len(src)
    with torch.no_grad():
        for i in range(0, len(src), 64):
            idx = list(range(i, min(len(src), i + 64)))
            b = src.batch(idx)
            o = teacher(*[b[n].to(device) for n in names])
            o = o[0] if isinstance(o, (tuple, list)) else o
            for j, v in zip(idx, o.split(1)):
                out[j] = v.float().cpu()
    return out


def _load_checkpoint(path: Path, setup) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise DistillError(f"cannot read block checkpoint {path} as tensors and plain values ({type(e).__name__}); "
                           "delete it and start again") from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != _FORMAT:
        raise DistillError(f"{path} is not an edgecomp block checkpoint of format {_FORMAT}; delete it")
    if ckpt.get("config_hash") != setup.config_hash:
        raise DistillError(f"block checkpoint {path} was written by another configuration or other data; "
                           "resume with the same options and data, or start again without --resume")
    return ckpt


def block_inputs(plan: BlockPlan, mode: str, teacher: Mapping[str, torch.Tensor],
                 generator: torch.Generator | None = None) -> dict[str, Any]:
    """What each boundary is replaced by in the student's run (``OnnxModule.values(replace=...)``):
    the teacher's value (``teacher``), the student's own value detached (``student``), or per element
    the teacher's with probability ``MIX_TEACHER``, else the student's detached (``mix``)."""
    if mode == "teacher":
        return dict(teacher)
    if mode == "student":
        return {b: torch.Tensor.detach for b in plan.boundaries}

    def mixed(t: torch.Tensor):
        def pick(s: torch.Tensor) -> torch.Tensor:
            take = torch.rand(s.shape, generator=generator, device="cpu").to(s.device) < MIX_TEACHER
            return torch.where(take, t.to(s.dtype), s.detach())
        return pick

    return {b: mixed(teacher[b]) for b in plan.boundaries}


def heal_blocks(setup, plan: BlockPlan, steps: int, *, kind: str = "mse", inputs: str = "student",
                resume: bool = False, device: torch.device = torch.device("cpu"), callback=None) -> BlockResult:
    """Train the changed blocks of ``setup.student`` (an OnnxModule) for ``steps`` steps, in place;
    each block fed from ``inputs`` (``BLOCK_INPUTS``, see :func:`block_inputs`).

    ``callback(step, record)`` runs after every step (the tests interrupt a run with it).
    """

    if kind not in BLOCK_LOSSES:
        raise OptionError("block_loss", f"must be {' or '.join(BLOCK_LOSSES)}, got {kind!r}")
    if inputs not in BLOCK_INPUTS:
        raise OptionError("block_input", f"must be {', '.join(BLOCK_INPUTS)}, got {inputs!r}")
    c, t0 = setup.config, time.perf_counter()
    threads = torch.get_num_threads()
    if c.threads:
        torch.set_num_threads(c.threads)
    try:
        return _heal(setup, plan, steps, kind, inputs, resume, device, t0, callback)
    finally:
        torch.set_num_threads(threads)


def _heal(setup, plan: BlockPlan, steps: int, kind: str, inputs: str, resume: bool, device, t0: float,
          callback) -> BlockResult:
    from edgecomp.io import atomic_path

    c = setup.config
    student, teacher, names = setup.student.to(device), setup.teacher.to(device), setup.input_names
    trained = plan.trained
    keys = sorted({k for b in trained for k in b.params})
    flags = [(p, p.requires_grad) for p in student.parameters()]  # restored for the end-to-end pass
    for p in student.parameters():
        p.requires_grad_(False)
    params = [student.weights.get_parameter(k) for k in keys]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
    w = int(steps * c.warmup)

    def factor(step: int) -> float:
        if step < w:
            return (step + 1) / w
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - w) / max(1, steps - w))))  # a float: the
        # scheduler's state goes into a weights_only checkpoint

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    per_epoch = len(setup.train) // c.batch_size
    eval_every = c.eval_every or per_epoch
    held_targets = _teacher_held(setup, device)
    path = blocks_checkpoint(c.checkpoint)
    ckpt = _load_checkpoint(path, setup) if (resume and path is not None) else None
    step, history, bad, stopped, resumed_from = 0, [], 0, False, None
    best_key, best_step, best_state = None, 0, None
    if ckpt is not None:
        student.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, bad, stopped, history = int(ckpt["step"]), int(ckpt["bad"]), bool(ckpt["stopped"]), list(ckpt["history"])
        best_key, best_step, best_state = tuple(ckpt["best_key"]), int(ckpt["best_step"]), ckpt["best_state"]
        resumed_from = step
    elif len(setup.held):  # the student as given is the first candidate: the phase never hands on a worse one
        rec = {"step": 0, **_held_fidelity(setup, student, held_targets, device)}
        best_key, best_state = _key(setup.objective, rec), copy.deepcopy(student.state_dict())
        history.append(rec)
    ends = [b.end for b in trained]
    sizes = setup.train.sizes()
    while step < steps and not stopped:
        epoch, pos = divmod(step, per_epoch)
        idx = epoch_order(len(setup.train), c.seed, epoch, sizes, c.batch_size)[pos * c.batch_size:(pos + 1) * c.batch_size]
        batch = {k: v.to(device) for k, v in setup.train.batch(idx).items()}
        args = [batch[n] for n in names]
        with torch.no_grad():
            t_vals = plan.teacher_values(teacher.values(*args, capture=plan.boundaries))
        student.train()
        # the mix of a step depends on the seed and the step only: a resumed run draws the same
        draw = torch.Generator().manual_seed(c.seed * 1_000_003 + step) if inputs == "mix" else None
        s_vals = student.values(*args, capture=ends, replace=block_inputs(plan, inputs, t_vals, draw))
        mask = batch.get("attention_mask")
        terms = [_masked_loss(s_vals[e].float(), t_vals[e].float(), kind, mask) for e in ends]
        loss = torch.stack(terms).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if c.grad_clip:
            nn.utils.clip_grad_norm_(params, c.grad_clip)
        opt.step()
        sched.step()
        step += 1
        rec = {"step": step, "block loss": float(loss.detach())}
        if len(setup.held) and (step % eval_every == 0 or step == steps):
            rec.update(_held_fidelity(setup, student, held_targets, device))
            key = _key(setup.objective, rec)
            if best_key is None or key > best_key:
                best_key, best_step, best_state, bad = key, step, copy.deepcopy(student.state_dict()), 0
            else:
                bad += 1
                stopped = c.patience is not None and bad >= c.patience
            history.append(rec)
        if path is not None and (step % c.checkpoint_every == 0 or step == steps or stopped):
            with atomic_path(path) as tmp:
                torch.save({"format": _FORMAT, "config_hash": setup.config_hash, "step": step,
                            "model": student.state_dict(), "optimizer": opt.state_dict(),
                            "scheduler": sched.state_dict(), "best_key": list(best_key or ()), "best_step": best_step,
                            "best_state": best_state if best_state is not None else student.state_dict(),
                            "bad": bad, "stopped": stopped, "history": history}, tmp)
        if callback is not None:
            callback(step, rec)
    if best_state is not None and len(setup.held):
        student.load_state_dict(best_state)
    else:
        best_step = step
    for p, flag in flags:
        p.requires_grad_(flag)
    student.to("cpu").eval()
    teacher.to("cpu")
    return BlockResult(plan, step, best_step, stopped, resumed_from, time.perf_counter() - t0, history, best_key,
                       copy.deepcopy(student.state_dict()))


def _kept_positions(student: str) -> dict[str, list] | None:
    """The prune's record of kept positions in the student ONNX file's metadata, if any."""
    import json

    from edgecomp.io import load_model
    from edgecomp.prune.prune_channels import KEPT_POSITIONS_KEY

    text = load_model(student).metadata_props.get(KEPT_POSITIONS_KEY)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None  # written by something else: cut values narrower than the teacher's are no boundaries


def block_phase(setup, *, resume: bool = False, processes: int = 1, device: torch.device = torch.device("cpu"),
                callback=None) -> tuple[BlockResult | str, Any]:
    """Heal block by block when ``blockwise`` is on. Returns the result (or why the phase was
    skipped) and the configuration of the end-to-end pass that follows (the remaining steps).

    Off unless asked for: on both real models measured (all-MiniLM-L6-v2 FFN 50%, the digits
    MobileNetV2 50% channels; BENCHMARKS.md, "Block inputs: teacher vs student") end-to-end
    training healed better than the block phase plus its end-to-end pass at the same steps, with
    every ``block_input``; block by block won only on random-weight models."""
    c = setup.config
    if not c.blockwise:
        return ("off (blockwise is off)" if c.blockwise is False else
                "off (end to end by default: it healed better on the real models measured; --blockwise heals "
                "block by block first)"), c
    if c.block_loss not in BLOCK_LOSSES:
        raise OptionError("block_loss", f"must be {' or '.join(BLOCK_LOSSES)}, got {c.block_loss!r}")
    if c.block_input not in BLOCK_INPUTS:
        raise OptionError("block_input", f"must be {', '.join(BLOCK_INPUTS)}, got {c.block_input!r}")
    if not 0 < c.block_fraction < 1:
        raise OptionError("block_fraction", f"must be in (0, 1), got {c.block_fraction}")
    if processes > 1:
        raise OptionError("blockwise", "trains in one process; turn it off for data-parallel runs")
    from edgecomp.distill.onnx_module import OnnxModule

    probe = setup.train.batch(range(min(2, len(setup.train))))
    positions = _kept_positions(c.student) if isinstance(setup.student, OnnxModule) else None
    plan = plan_blocks(setup.student, setup.teacher, [probe[n] for n in setup.input_names], positions)
    if isinstance(plan, str):
        raise OptionError("blockwise", f"{plan}; turn it off")
    total = c.max_steps or c.epochs * (len(setup.train) // c.batch_size)
    n = block_steps(total, c.block_fraction)
    if n == 0:
        return f"off ({total} step is too few to split)", c
    result = heal_blocks(setup, plan, n, kind=c.block_loss, inputs=c.block_input, resume=resume, device=device,
                         callback=callback)
    # the end-to-end pass refines what the blocks learned: at the run's learning rate it undid it
    # (a pruned MobileNetV2: held-out cosine 0.999 after the blocks, 0.93 after 15 steps at 3e-3)
    return result, dataclasses.replace(c, max_steps=total - n, lr=c.lr * END_TO_END_LR)


# --- hidden-state matching between ONNX models --------------------------------------------------

class BoundaryTaps:
    """Hidden states of an ONNX teacher or student at the plan's boundaries, for hidden-state
    matching (the interface of the trainer's layer-stack taps: ``take(indices)``, ``remove()``).

    The teacher's values come at the student's widths (the positions the prune kept); feature maps
    (4-D and 5-D) come channels-last, so matching runs over channels as it does over the hidden
    axis of token states."""

    def __init__(self, module, plan: BlockPlan, *, teacher: bool):
        self.module, self.plan, self.teacher = module, plan, teacher
        self.names = hidden_boundaries(plan, module.output_names)
        self.values = module.tap(self.names)

    def take(self, indices: list[int]) -> list[torch.Tensor]:
        vals = self.plan.teacher_values(self.values) if self.teacher else dict(self.values)
        out = [vals[self.names[i]] for i in indices]
        self.values.clear()
        return [v.movedim(1, -1) if v.dim() >= 4 else v for v in out]

    def remove(self) -> None:
        self.module.tap(())


def hidden_boundaries(plan: BlockPlan, outputs: list[str]) -> list[str]:
    return [b for b in plan.boundaries if b not in outputs]


def hidden_plan(student: nn.Module, teacher: nn.Module, probe: list[torch.Tensor], student_file: str | None) -> BlockPlan:
    """The boundaries hidden states are matched at, for an ONNX student of an ONNX teacher."""
    plan = plan_blocks(student, teacher, probe, _kept_positions(student_file) if student_file else None,
                       need_changed=False)
    if isinstance(plan, str) or not hidden_boundaries(plan, student.output_names):
        why = plan if isinstance(plan, str) else "found no boundary inside the graphs"
        raise OptionError("hidden_weight", f"{why}; set it to 0")
    return plan
