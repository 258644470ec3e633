"""Distill end to end: check the setup, train (one process or data-parallel), then export the
student through the same path as ``edgecomp export`` and measure it against the teacher.

With ``blockwise`` on, a student that is a pruned copy of an ONNX teacher is first healed block
by block (:mod:`edgecomp.distill.blockwise`), then end to end; off by default (end to end healed
the real models measured better). A ``--shrink layers=N`` student first has each layer initialized
block-wise to reproduce the group of teacher layers it replaces (:mod:`edgecomp.distill.layer_init`;
``layer_init``), then end to end.

An ONNX student (an ``OnnxModule``) is not exported again: its trained weights are written into
its own graph, which keeps the file's structure, names and dynamic axes (tracing the interpreter
would freeze every shape it computes), and the written file is checked against the trained module
in onnxruntime as an export is.

A torch teacher is exported too (in memory; an ONNX teacher is read from its file once) so both
run in onnxruntime: fidelity from
``edgecomp.validate`` on the held-out samples, latency from ``edgecomp.bench`` (interleaved),
parameters and MACs from ``edgecomp.inspection``. The student file is written atomically after
training, so an interrupted run never leaves a half-written one; its checkpoint stays for
``resume=True`` until the student is written, and is then removed (``keep_checkpoint=True``
keeps it, e.g. to continue later with more steps).

Without an output path the student is returned in memory only (``DistillResult.model``; the
caller saves it, as ``convert`` does) and nothing of it is written or read back; its checkpoint then
lives in a temporary folder unless ``checkpoint`` names one.

A heal never writes a student worse than the one it was given: when no held-out evaluation
beats the student as given (step 0), the output is the student unchanged (an ONNX student's
weights bit for bit) and ``DistillResult.warnings`` says why.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

if TYPE_CHECKING:
    import onnx_ir as ir

from edgecomp.distill.blockwise import block_phase, blocks_checkpoint
from edgecomp.distill.config import DistillConfig, is_onnx_file
from edgecomp.distill.layer_init import layer_init_phase
from edgecomp.distill.trainer import Setup, check_resume, prepare, resolve_device, train
from edgecomp.errors import DistillError

__all__ = ["DistillResult", "distill"]


@dataclasses.dataclass
class DistillResult:
    output: Path | None           # the student's file, or None when returned in memory only
    checkpoint: str
    objective: str
    training: dict[str, Any]
    exporter: str                 # the torch exporter, or "student graph" for an ONNX student
    validation: Any               # edgecomp.validate.ValidationResult, student vs teacher
    bench: Any                    # edgecomp.bench.BenchResult (teacher first) or None
    rows: list[dict[str, Any]]    # teacher vs student, for the report
    warnings: list[str] = dataclasses.field(default_factory=list)
    model: ir.Model | None = None  # the student, as written to ``output`` (or in memory only)


def _dynamic_axes(example: dict[str, Any]) -> dict[str, dict[int, str]]:
    axes = {}
    for name, t in example.items():
        token_like = not t.dtype.is_floating_point and t.dim() == 2
        axes[name] = {0: "batch", 1: "sequence"} if token_like else {0: "batch"}
    return axes


def _example(setup: Setup) -> dict[str, Any]:
    """Example inputs for export, keyed by the teacher's input names (the student gets the same)."""
    import torch

    ex = setup.example
    if isinstance(ex, torch.Tensor):
        ex = (ex,)
    if isinstance(ex, dict):
        return {n: ex[n] for n in setup.input_names}
    if ex is not None:
        return dict(zip(setup.input_names, ex))
    src = setup.held if len(setup.held) else setup.train
    b = src.batch(range(min(2, len(src))))
    return {n: b[n] for n in setup.input_names}


def _held_samples(setup: Setup) -> tuple[list[dict[str, np.ndarray]], np.ndarray | None]:
    """The held-out feeds the student is compared on, and their labels."""
    src = setup.held if len(setup.held) else setup.train.subset(range(min(200, len(setup.train))))
    return src.feeds, src.labels


def _onnx_student(setup: Setup, example: dict[str, Any]) -> ir.Model:
    """The student's ONNX graph with the trained weights, checked in onnxruntime against the trained module."""
    import torch

    from edgecomp.export import check_parity
    from edgecomp.io import load_model

    model = setup.student.write_weights(load_model(setup.config.student))
    args = [example[n] for n in setup.input_names]
    with torch.no_grad():
        got = setup.student(*args)
    ref = [t.numpy() for t in ((got,) if isinstance(got, torch.Tensor) else got)]
    check_parity(model, setup.input_names, args, ref, atol=1e-4, rtol=1e-3)
    return model


def distill(config: DistillConfig, output: str | os.PathLike | None = None, *, resume: bool = False, nproc: int = 1,
            nnodes: int = 1, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
            exporter: str = "auto", bench_runs: int = 50, bench_threads: int = 1,
            callback: Callable[[int, dict[str, float]], None] | None = None,
            keep_checkpoint: bool = False) -> DistillResult | None:
    """Train a student to imitate the teacher, export it (to ``output`` when given, else in memory
    only: ``DistillResult.model``) and compare the two.

    Returns None on the machines of a multi-machine run that do not hold global rank 0.
    ``callback(step, record)`` runs after every step of the block phase (records with a ``block
    loss``; see :mod:`edgecomp.distill.blockwise`) and of the end-to-end pass.
    """
    from edgecomp.export import HF_AUTO_ORDER, export_model
    from edgecomp.io import check_output_path, load_model, model_bytes, model_size_bytes, save_model, saved_size_bytes
    from edgecomp.measure.bench import benchmark
    from edgecomp.measure.inspect import summarize
    from edgecomp.measure.validate import validate

    onnx_files = [p for p in (config.teacher, config.student) if is_onnx_file(p)]
    inputs = [p for p in (config.data, config.text, config.labels, config.teacher_hf, *onnx_files) if p]
    out = check_output_path(output, inputs) if output is not None else None
    device = resolve_device(config.device)  # refuse a missing GPU before loading anything
    if device.type == "cuda" and (nproc > 1 or nnodes > 1):
        raise DistillError("data-parallel training runs on CPU processes (gloo); use one process with device cuda")
    if not config.checkpoint and out is None:
        if resume:
            raise DistillError("resume needs the checkpoint of the run to continue: give a checkpoint path or an output")
        with tempfile.TemporaryDirectory(prefix="edgecomp-distill-ckpt-") as tmp:
            config = dataclasses.replace(config, checkpoint=str(Path(tmp) / "student.ckpt"))
            return distill(config, None, nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                           exporter=exporter, bench_runs=bench_runs, bench_threads=bench_threads, callback=callback)
    if not config.checkpoint:
        config = dataclasses.replace(config, checkpoint=str(out) + ".ckpt")
    setup = prepare(config)
    blocks_ckpt = blocks_checkpoint(config.checkpoint)
    in_blocks = resume and not Path(config.checkpoint).is_file() and blocks_ckpt.is_file()
    if resume and not in_blocks:
        check_resume(config.checkpoint, setup)  # refuse before any process starts
    if nproc == 1 and nnodes == 1:
        blocks, e2e = block_phase(setup, resume=resume, processes=nproc * nnodes, device=device, callback=callback)
        init, e2e = layer_init_phase(setup, e2e, resume=resume, callback=callback)
        res = train(e2e, setup=setup, resume=resume and not in_blocks, callback=callback)
        training = {f.name: getattr(res, f.name) for f in dataclasses.fields(res) if f.name != "student"}
        if init is not None:
            training["layer_init"] = init if isinstance(init, str) else init.report()
        if not isinstance(blocks, str):
            blocks.keep_if_better(setup)
        training["blockwise"] = blocks if isinstance(blocks, str) else blocks.report()
    else:
        block_phase(setup, processes=nproc * nnodes)  # refuses blockwise on; unset means off here
        layer_init_phase(setup, config, processes=nproc * nnodes)  # refuses layer_init blockwise likewise
        from edgecomp.distill.launch import launch

        got = launch(config, nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, resume=resume)
        if got is None:
            return None
        setup.student.load_state_dict(got.pop("state"))
        training = got
    student = setup.student.eval()

    example = _example(setup)
    axes = _dynamic_axes(example)
    order = HF_AUTO_ORDER if config.teacher_hf else ("dynamo", "torchscript")
    if is_onnx_file(config.teacher):  # its file, read once for validate, bench and its row
        teacher, t_size = load_model(config.teacher), model_size_bytes(config.teacher)
    else:  # exported in memory, as the student
        teacher = export_model(setup.teacher, example, None, dynamic=axes, exporter=exporter, auto_order=order).model
        t_size = len(model_bytes(teacher))
    warnings = [_kept_input_warning(training)] if training.get("kept_input") else []
    if is_onnx_file(config.student) and training.get("kept_input"):
        model = load_model(config.student)  # its own weights, as read
        exporter_used = "student graph (unchanged)"
    elif is_onnx_file(config.student):
        model = _onnx_student(setup, example)
        exporter_used = "student graph"
    else:
        exported = export_model(student, example, None, dynamic=axes, exporter=exporter, auto_order=order)
        model, exporter_used = exported.model, exported.exporter
    if out is not None:
        save_model(model, out, inputs=inputs)  # verified as written; measured below in memory
    feeds, held_labels = _held_samples(setup)
    val = validate(teacher, model, feeds, held_labels)
    feed = {k: np.ascontiguousarray(v) for k, v in feeds[0].items()}
    lat = (benchmark([teacher, model], threads=bench_threads, runs=bench_runs, feed=feed, labels=["teacher", "student"])
           if bench_runs else None)
    shapes = {k: list(v.shape) for k, v in feed.items()}
    rows = []
    sizes = (t_size, saved_size_bytes(out) if out is not None else len(model_bytes(model)))
    for i, (name, m) in enumerate((("teacher", teacher), ("student", model))):
        s = summarize(m, shapes)
        row = {"model": name, "parameters": s.params, "MACs": s.macs, "size bytes": sizes[i]}
        if lat is not None:
            row.update({"p50 ms": lat.models[i].p50_ms, "latency ratio": lat.models[i].ratio_to_first})
        fid = val.outputs[0]
        row["cos to teacher"] = 1.0 if i == 0 else fid.cosine_mean
        if fid.top1_agreement is not None:
            row["top-1 agreement"] = 1.0 if i == 0 else fid.top1_agreement
        if fid.knn_agreement is not None:
            row["kNN@10 agreement"] = 1.0 if i == 0 else fid.knn_agreement
        if val.ref_accuracy is not None:
            row["accuracy"] = val.ref_accuracy if i == 0 else val.cand_accuracy
        rows.append(row)
    if not keep_checkpoint:
        Path(config.checkpoint).unlink(missing_ok=True)
        blocks_ckpt.unlink(missing_ok=True)  # the block phase's own checkpoint
    return DistillResult(out, config.checkpoint, setup.objective, training, exporter_used, val, lat, rows, warnings,
                         model)


def _kept_input_warning(training: dict[str, Any]) -> str:
    """Why the student was written unchanged: its held-out fidelity at step 0 against the best after it."""
    hist = training.get("history") or []
    key = "top-1 agreement" if hist and "top-1 agreement" in hist[0] else "held-out cos"
    start = hist[0].get(key) if hist else None
    later = [h[key] for h in hist[1:] if key in h]
    best = f", best after training {max(later):.4f}" if later else ""
    return (f"training never beat the student as given on the held-out split ({key} {start:.4f} at step 0{best}); "
            "wrote the student unchanged (try a lower lr, more data, or fewer epochs)")
