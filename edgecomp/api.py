"""The Python API: every capability as one call, with the command line's own option declarations.

``import edgecomp`` gives :func:`export`, :func:`optimize`, :func:`quantize`, :func:`prune`,
:func:`reduce_embeddings`, :func:`distill`, :func:`validate`, :func:`bench` and :func:`convert`
(loaded on first use, so ``import edgecomp`` stays light).

- A model is a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (an ``ir.Model`` is cloned
  first: the caller's object is never edited).
- Data is a DATA path, a dict of numpy arrays keyed by input name with a leading sample axis, or
  an iterable of feed dicts (:class:`edgecomp.data.Feeds`: the same checks and messages as DATA on
  disk). Labels are a ``.npy`` path or an array of class ids. ``distill`` and ``convert`` record
  DATA paths (checkpoints, reports, other processes), so feeds given to them are written to a
  temporary DATA first, removed when the call returns.
- Options are keyword arguments with the CLI's names (``max_samples``, not ``--max-samples``),
  defaults, checks and messages: each is checked by the same :class:`~edgecomp.options.Option`
  that generates the click flag and the recipe key (:func:`edgecomp.options.coerce`); an unknown
  name is refused in one line listing the valid ones.
- Each call returns what the capability's ``run`` returns (the result with its ``model``, summary
  and tables); ``output=PATH`` also writes the model (atomically, verified, never over an input).
  Errors are :class:`~edgecomp.errors.EdgecompError`s with the library's one-line message.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from edgecomp.errors import ConfigError
from edgecomp.options import Option, coerce, defaults

if TYPE_CHECKING:
    import onnx
    import onnx_ir as ir

    ModelLike = str | os.PathLike | onnx.ModelProto | ir.Model

__all__ = ["export", "optimize", "quantize", "prune", "reduce_embeddings", "distill", "validate", "bench", "convert",
           "option_values"]


def option_values(declared: Sequence[Option], given: Mapping[str, Any], command: str) -> dict[str, Any]:
    """The declared options' values: defaults, overridden by ``given`` (each checked by its
    declaration, as a recipe value is); an unknown name is refused naming the valid ones."""
    names = {o.name: o for o in declared}
    unknown = [k for k in given if k not in names]
    if unknown:
        raise ConfigError(f"{command} has no option {unknown[0]!r}; its options are {', '.join(names)}")
    values = defaults(declared)
    for name, value in given.items():
        opt = names[name]
        if value is None and opt.default is None:
            values[name] = None
            continue
        values[name] = coerce(opt, list(value) if isinstance(value, tuple) and opt.type is list else value)
    return values


def _model(model: ModelLike) -> ir.Model:
    import onnx
    import onnx_ir as ir

    from edgecomp.io import from_proto, load_model

    if isinstance(model, ir.Model):
        return model.clone()
    if isinstance(model, onnx.ModelProto):
        return from_proto(model)
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise ConfigError(f"a model is a path, an onnx.ModelProto or an onnx_ir.Model, not a {type(model).__name__}")


def _inputs(*things: Any) -> list[str]:
    """The paths among the arguments (an output must not replace one of them)."""
    return [str(t) for t in things if isinstance(t, (str, os.PathLike))]


def _save(result: Any, output: str | os.PathLike | None, inputs: list[str]) -> Any:
    if output is not None:
        from edgecomp.io import check_output_path, save_model

        check_output_path(output, inputs)
        save_model(result.model, output, inputs=inputs)
    return result


def _labels(labels: Any):
    import numpy as np

    from edgecomp.data import Labels

    if labels is None or isinstance(labels, (str, os.PathLike)):
        return labels
    return Labels(np.asarray(labels))


def _fixed(values: Mapping[str, Any] | None) -> dict:
    """``values={"sr": 16000}`` as ``--value sr=16000`` gives them."""
    import numpy as np

    return {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in (values or {}).items()}


def _specialize(m: ir.Model, values: Mapping[str, Any] | None):
    if not values:
        return None
    from edgecomp.passes.base import run_pass
    from edgecomp.passes.specialize_inputs import SpecializeInputsPass

    return run_pass(SpecializeInputsPass(values=_fixed(values)), m)


@contextlib.contextmanager
def _on_disk(**data: Any) -> Iterator[dict[str, str | None]]:
    """DATA and labels as paths for the steps that record them: in-memory ones are written to a
    temporary folder, removed on return."""
    import numpy as np

    from edgecomp.data import save_npz

    with tempfile.TemporaryDirectory(prefix="edgecomp-api-") as tmp:
        paths = {}
        for key, value in data.items():
            if value is None or isinstance(value, (str, os.PathLike)):
                paths[key] = None if value is None else str(value)
            elif key == "labels":
                paths[key] = str(Path(tmp) / "labels.npy")
                np.save(paths[key], np.asarray(value))
            elif isinstance(value, Mapping):
                paths[key] = str(save_npz(Path(tmp) / f"{key}.npz", value))
            else:  # an iterable of feeds: a DATA folder, one .npz per feed
                folder = Path(tmp) / key
                folder.mkdir()
                for i, feed in enumerate(value):
                    save_npz(folder / f"{i:08d}.npz", feed)
                paths[key] = str(folder)
        yield paths


def export(spec: str | None = None, *, output: str | os.PathLike, hf: str | os.PathLike | None = None,
           **options: Any):
    """``edgecomp export``: a PyTorch SPEC (``package.module:factory``) or a Hugging Face folder
    ``hf`` exported to ONNX at ``output`` and checked against torch; options as the command's
    (``exporter``, ``opset``, ``dynamic={"x": {0: "batch"}}``, ...)."""
    from edgecomp.export import OPTIONS, run

    return run(output, option_values(OPTIONS, options, "export"), spec=spec, hf=hf)


def optimize(model: ModelLike, *, values: Mapping[str, Any] | None = None, output: str | os.PathLike | None = None,
             **options: Any):
    """``edgecomp optimize``: fold constants and BatchNorms, fuse transformer blocks (``fusions``);
    ``values`` fixes inputs first (``--value``)."""
    from edgecomp.passes.optimize_graph import run
    from edgecomp.passes.options import OPTIONS

    m = _model(model)
    _specialize(m, values)
    return _save(run(m, option_values(OPTIONS, options, "optimize")), output, _inputs(model))


def quantize(model: ModelLike, data: Any = None, *, eval: Any = None, labels: Any = None, target: str | None = None,
             targets_file: str | os.PathLike | None = None, threads: int | None = None,
             values: Mapping[str, Any] | None = None, output: str | os.PathLike | None = None, **options: Any):
    """``edgecomp quantize``: static int8, calibrated on ``data``; with ``eval`` and ``tolerance``
    accuracy-aware; ``target`` is a profile name (its ISA, threads and int8 form); options as the
    command's (``method``, ``families``, ``max_samples``, ``tolerance``, ``format``, ...)."""
    from edgecomp.data import StepData, as_data
    from edgecomp.emulate.runner import target_runner
    from edgecomp.quantize import run
    from edgecomp.quantize.options import OPTIONS, for_target
    from edgecomp.targets import get_profile

    vals = option_values(OPTIONS, options, "quantize")
    profile = get_profile(target, targets_file)
    opts = for_target(vals, profile, threads=threads)  # the target's rules, as the CLI and convert apply them
    opts.target_runner, _ = target_runner(profile)
    m = _model(model)
    _specialize(m, values)
    result = run(m, opts, StepData(calibration=as_data(data), eval=as_data(eval), labels=_labels(labels)))
    return _save(result, output, _inputs(model, data, eval, labels, targets_file))


def prune(model: ModelLike, data: Any = None, *, eval: Any = None, labels: Any = None, threads: int | None = None,
          values: Mapping[str, Any] | None = None, output: str | os.PathLike | None = None, **options: Any):
    """``edgecomp prune``: structured (channels, neurons, heads) or unstructured pruning; ``data``
    gives activation importance, least-squares repair and the held-out check; options as the
    command's (``sparsity``, ``structured``, ``tolerance``, ``allow_degraded``, ...)."""
    from edgecomp.data import StepData, as_data
    from edgecomp.options import fields_of
    from edgecomp.prune import run
    from edgecomp.prune.options import OPTIONS, PruneOptions

    opts = PruneOptions(**fields_of(option_values(OPTIONS, options, "prune")), threads=threads or 1)
    m = _model(model)
    _specialize(m, values)
    result = run(m, opts, StepData(calibration=as_data(data), eval=as_data(eval), labels=_labels(labels)))
    return _save(result, output, _inputs(model, data, eval, labels))


def reduce_embeddings(model: ModelLike, *, text: str | os.PathLike | None = None,
                      tokenizer: str | os.PathLike | None = None, keep_ids: Sequence[int] | None = None,
                      new_tokens: Sequence[str] | None = None, output: str | os.PathLike | None = None,
                      **options: Any):
    """``edgecomp reduce-embeddings``: int8/int4 rows, low rank, vocabulary pruning, added tokens;
    ``text`` is a corpus file (one text a line) read with the ``tokenizer`` folder; the result's
    ``tokenizer_files`` hold a remapped tokenizer when one is made."""
    import numpy as np

    from edgecomp.data import StepData
    from edgecomp.embeddings import ReduceOptions, run
    from edgecomp.embeddings.options import OPTIONS
    from edgecomp.options import fields_of

    opts = ReduceOptions(**fields_of(option_values(OPTIONS, options, "reduce-embeddings")))
    result = run(_model(model), opts, StepData(text=None if text is None else str(text),
                                                tokenizer=None if tokenizer is None else str(tokenizer)),
                 keep_ids=None if keep_ids is None else np.asarray(keep_ids, dtype=np.int64),
                 new_tokens=None if new_tokens is None else list(new_tokens))
    return _save(result, output, _inputs(model, text, tokenizer))


def distill(teacher: str | os.PathLike | None = None, *, output: str | os.PathLike | None = None, data: Any = None,
            labels: Any = None, text: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
            teacher_hf: str | os.PathLike | None = None, threads: int | None = None, exporter: str = "auto",
            bench_runs: int = 50, resume: bool = False, **options: Any):
    """``edgecomp distill``: train a student (``student=`` SPEC or .onnx, or ``shrink=``) to imitate
    ``teacher`` (a SPEC or an .onnx file) on ``data`` or ``text``, export it (to ``output`` when
    given; the StepResult's model either way) and compare the two; options as the command's
    (``epochs``, ``lr``, ``max_steps``, ...)."""
    from edgecomp.distill import DistillConfig, step_result
    from edgecomp.distill import distill as run_distill
    from edgecomp.distill.options import OPTIONS

    vals = option_values(OPTIONS, options, "distill")
    with _on_disk(data=data, labels=labels) as paths:
        cfg = DistillConfig(teacher=None if teacher is None else str(teacher),
                            teacher_hf=None if teacher_hf is None else str(teacher_hf), data=paths["data"],
                            text=None if text is None else str(text),
                            tokenizer=None if tokenizer is None else str(tokenizer), labels=paths["labels"],
                            threads=threads, **vals)
        return step_result(run_distill(cfg, output, resume=resume, exporter=exporter, bench_runs=bench_runs,
                                       bench_threads=threads or 1))


def validate(reference: ModelLike, candidate: ModelLike, data: Any, *, labels: Any = None,
             threads: int | None = None, **options: Any):
    """``edgecomp validate``: the candidate's outputs against the reference's on ``data`` (max/mean
    abs error, cosine, top-1 or k-NN agreement; accuracy of both with ``labels``)."""
    import numpy as np

    from edgecomp.data import as_data
    from edgecomp.measure.options import VALIDATE_OPTIONS
    from edgecomp.measure.validate import validate as run_validate

    vals = option_values(VALIDATE_OPTIONS, options, "validate")
    if labels is not None and not isinstance(labels, (str, os.PathLike)):
        labels = np.asarray(labels)
    return run_validate(_model(reference), _model(candidate), as_data(data), labels, threads=threads or 1, k=vals["k"])


def bench(*models: ModelLike, data: Any = None, shapes: Mapping[str, Sequence[int]] | None = None,
          values: Mapping[str, Any] | None = None, target: str | None = None,
          targets_file: str | os.PathLike | None = None, **options: Any):
    """``edgecomp bench``: onnxruntime CPU latency of the models, interleaved, on the first sample
    of ``data`` (else a synthesized feed: ``shapes`` fills symbolic dims, ``values`` fixes inputs);
    options as the command's (``threads`` (default: the target's, else 1), ``warmup``, ``runs``)."""
    from edgecomp.data import input_specs, load_data
    from edgecomp.errors import OptionError
    from edgecomp.measure.bench import benchmark
    from edgecomp.measure.options import BENCH_OPTIONS
    from edgecomp.targets import get_profile

    if not models:
        raise ConfigError("bench needs at least one model")
    vals = option_values(BENCH_OPTIONS, options, "bench")
    if vals["profile"]:
        raise OptionError("profile", "is a report of `edgecomp bench --profile`; call "
                          "edgecomp.measure.profile.profile_models for its tables")
    profile = get_profile(target, targets_file)
    loaded = [_model(m) for m in models]
    feed = None
    if data is not None:
        from edgecomp.data import as_data

        specs = input_specs(loaded[0])
        ds = load_data(as_data(data), specs)
        feed = next(ds.feeds_for(specs))
    names = [str(m) if isinstance(m, (str, os.PathLike)) else f"model {i}" for i, m in enumerate(models)]
    return benchmark(loaded, threads=vals["threads"] or (profile.threads if profile else 1), warmup=vals["warmup"],
                     runs=vals["runs"], feed=feed, shapes=dict(shapes or {}), labels=names, values=_fixed(values))


def convert(spec: str | None = None, *, recipe: str | os.PathLike, output: str | os.PathLike,
            hf: str | os.PathLike | None = None, data: Any = None, eval: Any = None, labels: Any = None,
            text: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
            target: str | None = None, targets_file: str | os.PathLike | None = None,
            values: Mapping[str, Any] | None = None, overwrite: bool = False, ort_format: bool = False):
    """``edgecomp convert``: run ``recipe`` (a built-in name or a TOML file; its steps hold the
    options) from a SPEC or a Hugging Face folder into the folder ``output``, with its report."""
    from edgecomp.errors import SpecError
    from edgecomp.pipeline.recipe import Source
    from edgecomp.pipeline.convert import convert as run_convert
    from edgecomp.pipeline.recipe import load_recipe
    from edgecomp.targets import get_profile

    if bool(spec) == bool(hf):
        raise SpecError("give either a SPEC or hf=PATH")
    r = load_recipe(str(recipe))
    profile = get_profile(target, targets_file)
    with _on_disk(calibration=data, eval=eval, labels=labels) as paths:
        return run_convert(Source(spec=spec, hf=None if hf is None else str(hf)), r, output,
                           calibration=paths["calibration"], eval_data=paths["eval"], labels=paths["labels"],
                           text=None if text is None else str(text),
                           tokenizer=None if tokenizer is None else str(tokenizer), target=profile,
                           overwrite=overwrite, protect=_inputs(targets_file), ort_format=ort_format,
                           values=_fixed(values))

