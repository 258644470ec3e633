"""Fidelity of a candidate model against a reference, on real inputs, in onnxruntime.

Per output: max/mean absolute error; cosine similarity of each sample's output (mean and worst);
for logits top-1 agreement; for embeddings (rank-2, unit-norm rows) the overlap of each sample's
k nearest neighbours among all samples, candidate vs reference. Which output is which is decided
by :func:`output_kind`. With labels, task accuracy of both models on the first output.

Shapes are compared before any value: an output whose run-time shape differs between the two
models on some sample (a candidate that flattened ``[T, 1, C]`` to ``[1, T*C]``) is one
:class:`~edgecomp.errors.InterfaceChanged` line naming the output, the sample and both shapes.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.data import Dataset, check_label_range, input_specs, load_data, load_labels
from edgecomp.errors import DataError, InterfaceChanged
from edgecomp.io import load_model
from edgecomp.measure.interface import shape_difference
from edgecomp.passes.float_precision import refuse_unrunnable_floats
from edgecomp.runtime import make_session, run_feed, with_input_floats
from edgecomp.step import StepResult

__all__ = ["OutputFidelity", "ValidationResult", "run", "validate", "validate_many", "compare_outputs", "knn_agreement", "cosine_rows",
           "output_kind", "FEATURE_NAME_PARTS", "batch_of"]

#: Output names containing one of these (case-insensitive) are features, never logits: ViT's
#: ``pooler_output``, ``last_hidden_state``, ``sentence_embedding``, ...
FEATURE_NAME_PARTS = ("embed", "pooler", "pooled", "hidden", "feature")


@dataclasses.dataclass
class OutputFidelity:
    name: str
    max_abs_err: float
    mean_abs_err: float
    cosine_mean: float
    cosine_min: float
    top1_agreement: float | None = None
    knn_agreement: float | None = None


@dataclasses.dataclass
class ValidationResult:
    samples: int
    outputs: list[OutputFidelity]
    ref_accuracy: float | None = None
    cand_accuracy: float | None = None

    @property
    def accuracy_drop(self) -> float | None:
        if self.ref_accuracy is None or self.cand_accuracy is None:
            return None
        return self.ref_accuracy - self.cand_accuracy


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (flattened samples); two zero rows count as 1."""
    a = a.reshape(a.shape[0], -1).astype(np.float64)
    b = b.reshape(b.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, np.nan_to_num(cos, nan=0.0))


def knn_agreement(ref: np.ndarray, cand: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each row's k nearest neighbours (cosine), candidate vs reference."""
    n = ref.shape[0]
    k = min(k, n - 1)
    if k < 1:
        raise DataError("k-NN agreement needs at least 2 samples")

    def neighbours(x: np.ndarray) -> np.ndarray:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    nr, nc = neighbours(ref.astype(np.float64)), neighbours(cand.astype(np.float64))
    return float(np.mean([len(set(r) & set(c)) / k for r, c in zip(nr, nc)]))


def output_kind(name: str, ref: Sequence[np.ndarray]) -> str | None:
    """How an output is scored beyond errors and cosine: "logits" (top-1 agreement),
    "embeddings" (k-NN agreement) or None (neither).

    - a float output whose name contains "logits" is logits, of any rank >= 2: top-1 is taken
      over the last axis, at every position (token-classification logits [batch, seq, labels]);
    - otherwise only 2-D float outputs of one width > 1 across samples qualify: unit-norm rows
      (within 1e-3) are embeddings; rows that are not unit-norm are logits (a classifier's
      ``output``) unless the name marks a feature (:data:`FEATURE_NAME_PARTS`: embeddings,
      pooler, hidden states), which gets neither;
    - anything else (images, hidden states, integer outputs, scalars) gets neither.
    """
    if not ref or not all(np.issubdtype(r.dtype, np.floating) for r in ref):
        return None
    lname = name.lower()
    if "logits" in lname:
        ok = all(r.ndim >= 2 and r.shape[-1] > 1 for r in ref) and len({r.shape[-1] for r in ref}) == 1
        return "logits" if ok else None
    if not (all(r.ndim == 2 and r.shape[1] > 1 for r in ref) and len({r.shape[1] for r in ref}) == 1):
        return None
    if np.allclose(np.linalg.norm(np.concatenate(ref).astype(np.float64), axis=1), 1.0, atol=1e-3):
        return "embeddings"
    return None if any(part in lname for part in FEATURE_NAME_PARTS) else "logits"


def compare_outputs(name: str, ref: Sequence[np.ndarray], cand: Sequence[np.ndarray], k: int = 10,
                    batches: Sequence[int] | None = None) -> OutputFidelity:
    """Fidelity of one output over samples (each sample's array may have its own shape).

    Cosine is per sample: per row of the leading axis when that axis is the feed's batch
    (``batches[i]``, default 1 row per leading index), else over the sample's whole array (a
    recurrent state ``[2, 1, H]`` is one sample, not two). Arrays of different shapes are an
    :class:`InterfaceChanged` line, never compared.
    """
    diff = shape_difference([name], [ref], [cand])
    if diff:
        raise InterfaceChanged(f"{diff}: the candidate computes something else")
    abs_err = [np.abs(r.astype(np.float64) - c.astype(np.float64)) for r, c in zip(ref, cand)]
    rows = [(r, c) if (batches is None or (r.ndim and r.shape[0] == b)) else (r.reshape(1, -1), c.reshape(1, -1))
            for r, c, b in zip(ref, cand, batches or [None] * len(ref))]
    cos = np.concatenate([cosine_rows(r, c) for r, c in rows])
    fid = OutputFidelity(
        name=name,
        max_abs_err=float(max(e.max() for e in abs_err)),
        mean_abs_err=float(np.mean([e.mean() for e in abs_err])),
        cosine_mean=float(cos.mean()),
        cosine_min=float(cos.min()),
    )
    kind = output_kind(name, ref)
    if kind == "embeddings":
        R, C = np.concatenate(ref), np.concatenate(cand)
        if R.shape[0] > 2:
            fid.knn_agreement = knn_agreement(R, C, k)
    elif kind == "logits":
        width = ref[0].shape[-1]
        R = np.concatenate([r.reshape(-1, width) for r in ref])
        C = np.concatenate([c.reshape(-1, width) for c in cand])
        fid.top1_agreement = float(np.mean(R.argmax(1) == C.argmax(1)))
    return fid


def validate(reference: str | os.PathLike | ir.Model, candidate: str | os.PathLike | ir.Model,
             data: str | os.PathLike | Dataset | Sequence[Mapping[str, np.ndarray]],
             labels: str | os.PathLike | np.ndarray | None = None, threads: int = 1, k: int = 10) -> ValidationResult:
    """Run both models (files or in-memory models) on every sample of ``data`` (DATA, a Dataset,
    or a list of feeds) and compare their outputs; with ``labels`` (a .npy or an array), also the
    task accuracy of both."""
    return validate_many(reference, [candidate], data, labels, threads, k)[0]


def validate_many(reference: str | os.PathLike | ir.Model, candidates: Sequence[str | os.PathLike | ir.Model],
                  data: str | os.PathLike | Dataset | Sequence[Mapping[str, np.ndarray]],
                  labels: str | os.PathLike | np.ndarray | None = None, threads: int = 1,
                  k: int = 10, outputs_of: Callable | None = None) -> list[ValidationResult]:
    """:func:`validate` of each candidate against one reference, which runs once.

    ``outputs_of(model, feeds) -> (output names, per output its value on each feed)`` computes a
    model's outputs elsewhere (on a device, :mod:`edgecomp.remote`); by default onnxruntime here."""
    outputs_of = outputs_of or (lambda model, model_feeds: _local_outputs(model, model_feeds, threads))
    ref_name = _label(reference, "the reference")
    ref_model = reference if isinstance(reference, ir.Model) else load_model(reference)
    refuse_unrunnable_floats(ref_model)
    specs = input_specs(ref_model)
    if isinstance(data, (str, os.PathLike, Dataset)):
        ds = data if isinstance(data, Dataset) else load_data(data, specs)
        ds.check_against(specs)
        feeds, n = ds.reread(specs), len(ds)  # streamed once per model, never held whole
    else:
        feeds, n = list(data), len(data)
    y = None if labels is None else (labels if isinstance(labels, np.ndarray) else load_labels(labels, n))
    out_names, ref_out = outputs_of(reference if not isinstance(reference, ir.Model) else ref_model, feeds)
    batches = [batch_of(feed, specs) for feed in feeds]
    results = []
    for candidate in candidates:
        cand_name = _label(candidate, "the candidate")
        cand_model = candidate if isinstance(candidate, ir.Model) else load_model(candidate)
        refuse_unrunnable_floats(cand_model)
        cand_names = {s.name for s in input_specs(cand_model)}
        if cand_names != {s.name for s in specs}:
            raise DataError(f"{cand_name} has inputs {sorted(cand_names)} but {ref_name} has "
                            f"{sorted(s.name for s in specs)}; compare models with the same inputs")
        names, cand_out = outputs_of(candidate if not isinstance(candidate, ir.Model) else cand_model, feeds)
        if names != out_names:
            raise DataError(f"{cand_name} outputs {names} differ from {ref_name}'s {out_names}")
        diff = shape_difference(out_names, ref_out, cand_out, what=(ref_name, cand_name))
        if diff:
            raise InterfaceChanged(f"{diff}: {cand_name} computes something else than {ref_name}")
        result = ValidationResult(n, [compare_outputs(name, r, c, k, batches)
                                      for name, r, c in zip(out_names, ref_out, cand_out)])
        if y is not None:
            result.ref_accuracy, result.cand_accuracy = _accuracy(ref_out[0], y), _accuracy(cand_out[0], y)
        results.append(result)
    return results


def _local_outputs(model, feeds, threads: int) -> tuple[list[str], list[list[np.ndarray]]]:
    """``model``'s outputs in onnxruntime here, each feed's floats cast to the model's input types."""
    session = make_session(model, threads)
    return _outputs(session, [with_input_floats(session, f) for f in feeds])


def _outputs(session, feeds) -> tuple[list[str], list[list[np.ndarray]]]:
    """The session's output names and, per output, its value on each feed."""
    names = [o.name for o in session.get_outputs()]
    out: list[list[np.ndarray]] = [[] for _ in names]
    for feed in feeds:
        for j, arr in enumerate(run_feed(session, feed)):
            out[j].append(arr)
    return names, out


def _label(model: str | os.PathLike | ir.Model, default: str) -> str:
    return default if isinstance(model, ir.Model) else str(model)


def batch_of(feed, specs) -> int:
    """The feed's batch: the leading size of the model's first input that has axes."""
    return next((feed[s.name].shape[0] for s in specs if feed[s.name].ndim), 1)


def _accuracy(logits: list[np.ndarray], y: np.ndarray) -> float:
    check_label_range(y, int(np.prod(logits[0].shape[1:])))
    pred = np.concatenate([l.reshape(l.shape[0], -1).argmax(1) for l in logits])
    if pred.shape[0] != y.shape[0]:
        raise DataError(f"the first output gives {pred.shape[0]} predictions for {y.shape[0]} labels")
    return float(np.mean(pred == y))


def run(models: Sequence[str | os.PathLike | ir.Model], options: Mapping[str, object], data,
        context=None) -> StepResult:
    """validate as a step, in the shape every capability returns: ``models[0]`` is the reference
    and every model (itself included, a check of the data) is compared with it on ``data.eval``
    (with ``data.labels``, task accuracy too). Models are files or in-memory ``ir.Model``; the
    table ``fidelity`` has one row per model and output; nothing is written (``model`` is None)."""
    from edgecomp.measure.options import VALIDATE_DATA_NEEDED, VALIDATE_OPTIONS
    from edgecomp.options import need_data

    need_data(VALIDATE_OPTIONS, options, data.available(), VALIDATE_DATA_NEEDED)
    threads = getattr(context, "threads", None) or 1
    results = validate_many(models[0], list(models), data.eval, data.labels, threads=threads, k=options["k"])
    rows = [{"model": _label(m, f"model {i}"), "output": o.name, "cosine mean": o.cosine_mean,
             "cosine min": o.cosine_min, "max abs err": o.max_abs_err, "top-1 agreement": o.top1_agreement,
             "kNN agreement": o.knn_agreement, "accuracy": r.cand_accuracy}
            for i, (m, r) in enumerate(zip(models, results)) for o in r.outputs]
    summary = {"samples": results[0].samples, "models": len(models), "reference accuracy": results[0].ref_accuracy}
    return StepResult("validate", None, summary, {"fidelity": rows},
                      evidence={"results": [dataclasses.asdict(r) for r in results]})
