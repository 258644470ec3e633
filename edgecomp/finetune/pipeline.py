"""``edgecomp finetune``: train any ONNX model on labeled DATA and write the weights back into its graph.

1. ``new_head``: the final classifier is replaced for a new task (:mod:`edgecomp.finetune.head`);
2. the graph runs as a torch module (:class:`~edgecomp.distill.onnx_module.OnnxModule`); weights
   whose initializer names match ``freeze`` stay fixed (a new head always trains);
3. the labels are class ids (cross-entropy) or target vectors (MSE), checked against the model's
   output before training; a seeded ``held_out`` split scores the model before and after;
4. :func:`edgecomp.finetune.train.fit` trains (checkpoints, resume, batch updates);
5. the trained weights go into the same graph (names, structure and dynamic axes kept), checked in
   onnxruntime against the torch module, and the held-out accuracy after is onnxruntime's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from edgecomp.data import StepData
from edgecomp.errors import DataError, InputFileError, OptionError, ParityError
from edgecomp.finetune.options import FinetuneOptions
from edgecomp.step import StepContext, StepResult

__all__ = ["run", "load_targets"]


def load_targets(path: str | os.PathLike, n: int) -> tuple[np.ndarray, str]:
    """Labels from a ``.npy``: (class ids, "classes") for one integer per sample, or (float array,
    "targets") with one target per sample."""
    p = Path(path)
    if not p.is_file():
        raise InputFileError(f"labels not found: {p} (a .npy of class ids or target vectors, one per sample)")
    try:
        y = np.load(p, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read labels {p} ({type(e).__name__}); save them with numpy.save") from e
    if not isinstance(y, np.ndarray) or y.ndim == 0 or y.shape[0] != n:
        count = y.shape[0] if isinstance(y, np.ndarray) and y.ndim else "no"
        raise DataError(f"labels {p} hold {count} entries but DATA has {n} samples; give one label per sample")
    if np.issubdtype(y.dtype, np.integer) and (y.ndim == 1 or y.shape[1:] == (1,)):
        y = y.reshape(-1).astype(np.int64)
        if y.min() < 0:
            raise DataError(f"labels {p} hold negative class id {int(y.min())}; class ids start at 0")
        return y, "classes"
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)):
            raise DataError(f"labels {p} hold NaN or infinite targets; give finite target vectors")
        return y.astype(np.float32), "targets"
    raise DataError(f"labels {p} are {y.dtype} of shape {list(y.shape)}; give class ids (integers, one per sample) "
                    "or float target vectors")


def _check_fit(kind: str, y: np.ndarray, out_shape: tuple[int, ...], where: str) -> None:
    """Labels that the model's output cannot be trained against, in one line."""
    from edgecomp.data import check_label_range

    if kind == "classes":
        if len(out_shape) != 2:
            raise DataError(f"{where} are class ids but the model's output per sample has shape {list(out_shape[1:])}, "
                            "not a vector of class scores; give target vectors shaped like it")
        check_label_range(y, out_shape[1], where)
    elif tuple(y.shape[1:]) != tuple(out_shape[1:]):
        raise DataError(f"{where} are targets of shape {list(y.shape[1:])} but the model's output per sample has "
                        f"shape {list(out_shape[1:])}; give targets shaped like the output, or class ids")


def _classes(new_head: int | str, y: np.ndarray, kind: str) -> int:
    """The new head's width: N, or for auto the classes the labels hold."""
    if new_head != "auto":
        return int(new_head)
    n = int(y.max()) + 1 if kind == "classes" else (y.shape[1] if y.ndim == 2 else 0)
    if n < 2:
        what = f"{n} class" if kind == "classes" else f"targets of shape {list(y.shape[1:])}"
        raise OptionError("new_head", f"auto found {what} in the labels; a new head needs 2 or more outputs")
    return n


def _freeze(module, patterns: tuple[str, ...], keep: set[str]) -> int:
    """Fix the parameters whose initializer names match; the number of trainable ones left."""
    from edgecomp.options import compile_patterns

    regs = compile_patterns(patterns, "freeze pattern")
    for key, name in module.trained.items():
        if name not in keep and any(r.search(name) for r in regs):
            module.weights.get_parameter(key).requires_grad_(False)
    return sum(p.requires_grad for p in module.parameters())


def _verify(model: ir.Model, module, held, train) -> tuple[float, list[np.ndarray]]:
    """The written graph against the trained module in onnxruntime; onnxruntime's held-out outputs."""
    import torch

    from edgecomp.runtime import make_session, run_feed, with_input_floats

    session = make_session(model, threads=1)
    src = held if len(held) else train.subset(range(min(64, len(train))))
    worst, outs = 0.0, []
    for i in range(0, len(src), 64):
        batch = src.batch(range(i, min(len(src), i + 64)))
        with torch.no_grad():
            ref = module(*[batch[n] for n in module.input_names])
        ref = (ref[0] if isinstance(ref, tuple) else ref).numpy()
        got = run_feed(session, with_input_floats(session, {n: t.numpy() for n, t in batch.items()}))[0]
        d = np.abs(ref.astype(np.float64) - got)
        worst = max(worst, float(d.max(initial=0.0)))
        if got.shape != ref.shape or not np.all(d <= 1e-4 + 1e-3 * np.abs(ref)):
            raise ParityError(f"the written model and the trained module disagree in onnxruntime (max abs diff "
                              f"{worst:.3g}); report the model")
        outs.append(got)
    return worst, outs


def run(model: ir.Model, opts: FinetuneOptions, data: StepData, context: StepContext | None = None, *,
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False, threads: int | None = None,
        callback: Callable[[int, dict[str, float]], None] | None = None) -> StepResult:
    """Fine-tune ``model`` (changed in place) on ``data.calibration`` with ``data.train_labels``."""
    import torch

    from edgecomp.distill.onnx_module import OnnxModule
    from edgecomp.distill.optim import train_new_rows
    from edgecomp.distill.samples import from_data
    from edgecomp.distill.trainer import seed_all
    from edgecomp.finetune.head import replace_head
    from edgecomp.finetune.train import evaluate, fit

    samples = from_data(data.need("calibration", "finetune"))
    y, kind = load_targets(data.need("train_labels", "finetune"), len(samples))
    samples.labels = y
    head = replace_head(model, _classes(opts.new_head, y, kind), opts.seed) if opts.new_head else None
    seed_all(opts.seed)
    module = OnnxModule(model, source="the model")
    if sorted(samples.names) != sorted(module.input_names):
        raise DataError(f"DATA is keyed {sorted(samples.names)} but the model's inputs are {module.input_names}; "
                        "rename the arrays")
    probe = samples.batch(range(min(2, len(samples))))
    with torch.no_grad():
        out = module(*[probe[n] for n in module.input_names])
    _check_fit(kind, y, tuple((out[0] if isinstance(out, tuple) else out).shape), "the labels")
    held_rows = train_new_rows(module, model) if opts.train_rows == "new" else []
    if head is not None:  # a new head always trains
        for key, name in module.trained.items():
            if name in head.new:
                module.weights.get_parameter(key).requires_grad_(True)
    if not _freeze(module, opts.freeze, set(head.new) if head else set()):
        raise OptionError("freeze", "matches every trainable weight; nothing would train")
    train, held = samples.split(opts.held_out, opts.seed)
    if len(train) < opts.batch_size and opts.optimizer != "gd":
        raise OptionError("batch_size", f"{opts.batch_size} is more than the {len(train)} training samples; "
                                        "give more data or a smaller batch")
    before = evaluate(module, held, kind) if len(held) else {}
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        result = fit(module, train, held, kind, opts, checkpoint=Path(checkpoint) if checkpoint else None,
                     resume=resume, held_rows=held_rows, callback=callback)
    finally:
        torch.set_num_threads(old)
    module.write_weights(model)
    worst, outs = _verify(model, module, held, train)
    after = _ort_scores(outs, held, kind) if len(held) else {}
    return _result(model, head, opts, kind, result, before, after, worst, checkpoint)


def _ort_scores(outs: list[np.ndarray], held, kind: str) -> dict[str, float]:
    got = np.concatenate(outs)
    y = held.labels
    if kind == "classes":
        return {"held-out accuracy": float(np.mean(got.argmax(1) == y))}
    return {"held-out mse": float(np.mean((got.astype(np.float64) - y) ** 2))}


def _result(model, head, opts, kind, fit, before, after, worst, checkpoint) -> StepResult:
    """The run's record: what was replaced, trained and measured (the one place results are built)."""
    summary: dict[str, Any] = {"labels": "class ids (cross-entropy)" if kind == "classes" else "targets (MSE)",
                               "optimizer": opts.optimizer, "steps": fit.steps, "best step": fit.best_step,
                               "stopped early": fit.stopped_early, "seconds": round(fit.seconds, 2),
                               "onnxruntime vs torch max abs diff": worst}
    if fit.resumed_from is not None:
        summary["resumed from step"] = fit.resumed_from
        summary["batch update"] = fit.batch_update
    if head is not None:
        summary["new head"] = f"{head.describe()} replaced by {head.inputs} -> {head.new_classes} classes"
    if after:  # before: torch on the model as given; after: onnxruntime on the written model
        key = "held-out accuracy" if kind == "classes" else "held-out mse"
        summary[f"{key} before"] = before["held-out accuracy" if kind == "classes" else "held-out loss"]
        summary[f"{key} after"] = after[key]
    warnings = []
    if fit.best_step is not None and fit.best_step == (fit.resumed_from or 0) and fit.steps > (fit.resumed_from or 0):
        warnings.append("training never beat the model as given on the held-out split; its weights are unchanged "
                        "(try a lower lr or more data)")
    return StepResult("finetune", model, summary, tables={"held-out evaluations": fit.history}, warnings=warnings,
                      evidence={"head": head.describe() if head else None,
                                "checkpoint": str(checkpoint) if checkpoint else None})
