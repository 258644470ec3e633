"""The fine-tuning loop: labeled samples, an ONNX model as a torch module, checkpoints and batch updates.

Loss: cross-entropy for class ids (one integer per sample, the model's output [B, C]), mean squared
error for target vectors (a float array shaped like the model's output per sample). The optimizers
and the schedule are distillation's (:mod:`edgecomp.distill.optim`); the learning rate of step s is
``lr · factor(s)`` over ``total = max_steps`` (or this run's steps), set before each update.

Held-out evaluation (accuracy for class ids, ties broken by the lower loss; the loss for targets)
runs at step 0 and every ``eval_every`` steps; the model handed back carries the weights of the
best one (step 0 included), and ``patience`` evaluations without a better one stop the run.

A non-finite loss stops the run with one line; the last checkpoint stays as it was.

Checkpoints (``torch.load(weights_only=True)``: tensors and plain values only) hold the module and
optimizer state, the step, the RNG states and a fingerprint of the data. Resuming:

- with the same data and an unfinished run: the run goes on bit-identically (an interruption);
- with other data (or a finished run): a batch update — the model and the optimizer's moments go
  on from the checkpoint and the steps keep counting, so with ``max_steps`` fixed (the schedule's
  horizon) and ``shuffle`` off, training on A then resuming on B computes what one run over A
  followed by B computes.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgecomp.distill.optim import make_optimizer, schedule, steps_per_epoch
from edgecomp.distill.samples import Samples
from edgecomp.distill.trainer import rng_state, save_checkpoint, set_rng_state
from edgecomp.errors import FinetuneError, InputFileError
from edgecomp.finetune.options import FinetuneOptions
from edgecomp.io import first_line

__all__ = ["Fit", "fit", "evaluate", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = 1
_KEYS = ("format", "kind", "structure", "data", "run_start", "done", "step", "model", "optimizer", "rng", "history",
         "best_key", "best_step", "best_state", "bad", "stopped")


@dataclasses.dataclass
class Fit:
    steps: int
    best_step: int | None
    stopped_early: bool
    resumed_from: int | None
    batch_update: bool            # resumed on other data than the checkpoint's
    seconds: float
    history: list[dict[str, float]]


def _structure(module: nn.Module, kind: str, opts: FinetuneOptions) -> str:
    """What a checkpoint must have been written for: the module's parameters, the loss, the optimizer."""
    blob = {"params": sorted((k, list(v.shape)) for k, v in module.state_dict().items()), "kind": kind,
            "trainable": sorted(k for k, p in module.named_parameters() if p.requires_grad),
            "optimizer": [opts.optimizer, opts.momentum, opts.weight_decay]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y) if kind == "classes" else F.mse_loss(out, y)


def _labels(samples: Samples, idx, kind: str) -> torch.Tensor:
    y = samples.labels[list(idx)]
    return torch.from_numpy(y.astype(np.int64 if kind == "classes" else np.float32))


def _output(module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = module(*[batch[n] for n in module.input_names])
    return (out[0] if isinstance(out, tuple) else out).float()


def evaluate(module: nn.Module, samples: Samples, kind: str, batch: int = 64) -> dict[str, float]:
    """Held-out loss (and accuracy for class ids), without gradients."""
    was = module.training
    module.eval()
    total, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            idx = range(i, min(len(samples), i + batch))
            out, y = _output(module, samples.batch(idx)), _labels(samples, idx, kind)
            total += float(_loss(kind, out, y)) * len(idx)
            if kind == "classes":
                correct += int((out.argmax(1) == y).sum())
    module.train(was)
    rec = {"held-out loss": total / len(samples)}
    if kind == "classes":
        rec["held-out accuracy"] = correct / len(samples)
    return rec


def _key(kind: str, rec: dict[str, float]) -> tuple[float, ...]:
    return (rec["held-out accuracy"], -rec["held-out loss"]) if kind == "classes" else (-rec["held-out loss"],)


def _load(path: Path, structure: str) -> dict[str, Any]:
    if not path.is_file():
        raise InputFileError(f"no checkpoint at {path} to resume from; run without resume (or give the checkpoint)")
    try:  # tensors and plain values only: a file that would build other objects is refused unread
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise FinetuneError(f"cannot read checkpoint {path} as tensors and plain values ({type(e).__name__}); "
                            "delete it and start again") from e
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "finetune" or any(k not in ckpt for k in _KEYS):
        raise FinetuneError(f"{path} is not an edgecomp finetune checkpoint; give another checkpoint")
    if ckpt["structure"] != structure:
        raise FinetuneError(f"checkpoint {path} was written for another model, head, freeze or optimizer; resume "
                            "with the same model and options, or start again without resume")
    return ckpt


def fit(module: nn.Module, train: Samples, held: Samples, kind: str, opts: FinetuneOptions, *,
        checkpoint: Path | None = None, resume: bool = False, held_rows: list = (),
        callback: Callable[[int, dict[str, float]], None] | None = None) -> Fit:
    """Train ``module``'s trainable parameters on ``train``; see the module docstring."""
    t0 = time.perf_counter()
    structure, data = _structure(module, kind, opts), train.fingerprint()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = make_optimizer(params, opts.optimizer, opts.lr, opts.weight_decay, opts.momentum)
    step, run_start, history, best_key, best_step, best_state, bad, stopped = 0, 0, [], None, None, None, 0, False
    ckpt = _load(checkpoint, structure) if resume else None
    same_run = ckpt is not None and ckpt["data"] == data and not ckpt["done"]
    if ckpt is not None:
        try:
            module.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise FinetuneError(f"checkpoint {checkpoint} does not fit this model ({type(e).__name__}: "
                                f"{first_line(e, 200)}); delete it and start again") from e
        step, history = int(ckpt["step"]), list(ckpt["history"])
        run_start = int(ckpt["run_start"]) if same_run else step
        if same_run:
            best_key = tuple(ckpt["best_key"]) if ckpt["best_key"] is not None else None
            best_step, best_state, bad, stopped = ckpt["best_step"], ckpt["best_state"], int(ckpt["bad"]), bool(ckpt["stopped"])
    per_epoch = steps_per_epoch(opts.optimizer, len(train), opts.batch_size)
    total = opts.max_steps or run_start + opts.epochs * per_epoch
    end = min(total, run_start + opts.epochs * per_epoch)
    if step >= total:
        raise FinetuneError(f"the checkpoint is at step {step} and max_steps is {total}: nothing left to train; "
                            "raise max_steps")
    factor, eval_every = schedule(total, opts.warmup), opts.eval_every or per_epoch
    if len(held) and not same_run:  # the model as given competes with every later evaluation
        rec0 = {"step": step, **evaluate(module, held, kind)}
        history.append(rec0)
        best_key, best_step, best_state = _key(kind, rec0), step, copy.deepcopy(module.state_dict())
    resumed_from = step if ckpt is not None else None

    def save(done: bool) -> None:
        if checkpoint is not None:
            save_checkpoint(checkpoint, {
                "format": CHECKPOINT_FORMAT, "kind": "finetune", "structure": structure, "data": data,
                "run_start": run_start, "done": done, "step": step, "model": module.state_dict(),
                "optimizer": opt.state_dict(), "rng": rng_state(), "history": history, "best_key": best_key,
                "best_step": best_step, "best_state": best_state, "bad": bad, "stopped": stopped})

    module.train()
    while step < end and not stopped:
        epoch, pos = divmod(step - run_start, per_epoch)
        n = len(train)
        if opts.optimizer == "gd":  # the mean loss over every training sample, accumulated chunk by chunk
            chunks = [np.arange(i, min(n, i + opts.batch_size)) for i in range(0, n, opts.batch_size)]
        else:
            order = np.random.default_rng([opts.seed, epoch]).permutation(n) if opts.shuffle else np.arange(n)
            chunks = [order[pos * opts.batch_size:(pos + 1) * opts.batch_size]]
        for g in opt.param_groups:
            g["lr"] = opts.lr * factor(step)
        opt.zero_grad(set_to_none=True)
        loss, count = 0.0, sum(len(c) for c in chunks)
        for idx in chunks:
            part = _loss(kind, _output(module, train.batch(idx)), _labels(train, idx, kind))
            if not torch.isfinite(part):
                raise FinetuneError(f"training diverged at step {step + 1} (loss {float(part)}); nothing was "
                                    f"written; lower lr (now {opts.lr:g}) or check the labels")
            (part * (len(idx) / count)).backward()
            loss += float(part.detach()) * len(idx) / count
        if opts.grad_clip:
            nn.utils.clip_grad_norm_(params, opts.grad_clip)
        opt.step()
        for rows in held_rows:  # train_rows new: the old rows stay as they were
            rows.restore()
        step += 1
        rec = {"step": step, "loss": loss}
        if len(held) and ((step - run_start) % eval_every == 0 or step == end):
            rec.update(evaluate(module, held, kind))
            if best_key is None or _key(kind, rec) > best_key:
                best_key, best_step, best_state, bad = _key(kind, rec), step, copy.deepcopy(module.state_dict()), 0
            else:
                bad += 1
                stopped = opts.patience is not None and bad >= opts.patience
        if len(rec) > 2 or step == end:  # evaluations and the last step
            history.append(rec)
        if step % opts.checkpoint_every == 0 or step == end or stopped:
            save(done=step == end or stopped)
        if callback is not None:
            callback(step, rec)
    if best_state is not None:
        module.load_state_dict(best_state)
    module.eval()
    return Fit(step, best_step, stopped, resumed_from, ckpt is not None and not same_run,
               time.perf_counter() - t0, history)
