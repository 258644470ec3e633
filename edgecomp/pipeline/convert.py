"""``edgecomp convert``: run a recipe from a torch model to a validated edge artifact.

Every model-producing step writes ``NN-step.onnx`` into the output folder; ``validate`` scores
every model so far against the fp32 export, ``bench`` times them all interleaved; the final
model is copied to ``model.onnx``; ``report.json`` and ``report.html`` describe it all; gates are
checked last. The folder is built under a temporary name and renamed into place when complete,
so an interrupted run never leaves a half-written OUTDIR (and an existing one is replaced only
with ``overwrite``).

A step's result that misses its quality bar follows the rule of its command: a prune step below
the fidelity floor (0.95 on held-out calibration samples, else on synthesized inputs) stops the run
with one line unless it sets ``allow_degraded = true``; a step written below its floor or
tolerance is listed in ``ConvertResult.degraded`` (the CLI's exit status 3) unless a later
distill step heals it. A quantize step follows quantize's never-slower rule: with families auto a
model not faster than its input falls back to float; forced families keep int8 and the step is
listed in ``ConvertResult.not_faster`` (the CLI's exit status 5, after 4 and 3).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from edgecomp.data import StepData
from edgecomp.errors import BelowFloor, ConfigError, DataError, DataNeeded, EdgecompError, OptionError
from edgecomp.io import check_output_dir, copy_file, model_size_bytes, replace_dir, work_dir
from edgecomp.options import fields_of, need_data
from edgecomp.pipeline.recipe import STEP_OPTIONS, Recipe
from edgecomp.targets import TargetProfile, host_isa

__all__ = ["Source", "StepRecord", "ConvertResult", "convert", "STEP_RUNNERS"]


@dataclasses.dataclass
class Source:
    """What to convert: a SPEC, or a Hugging Face encoder folder."""

    spec: str | None = None
    hf: str | None = None

    def describe(self) -> str:
        return self.spec or f"hf:{self.hf}"

    def spec_file(self) -> str | None:
        """The file of a ``path/to/file.py:factory`` SPEC (an input that must not be overwritten)."""
        target = (self.spec or "").rpartition(":")[0]
        return target if target.endswith(".py") else None


@dataclasses.dataclass
class StepRecord:
    index: int
    step: str
    options: dict[str, Any]
    seconds: float = 0.0
    model: str | None = None
    size_bytes: int | None = None
    macs: int | None = None
    int8_mac_share: float | None = None
    latency_ratio: float | None = None
    p50_ms: float | None = None
    cos_mean: float | None = None
    cos_min: float | None = None
    top1_agreement: float | None = None
    knn_agreement: float | None = None
    accuracy: float | None = None
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    tables: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    warnings: list[str] = dataclasses.field(default_factory=list)
    degraded: bool = False  # its model misses its floor or tolerance (written because the recipe allows it)
    not_faster: bool = False  # quantize with forced families: int8 written, not faster than its input here


@dataclasses.dataclass
class ConvertResult:
    outdir: str
    source: str
    recipe: str
    target: str | None
    host_isa: str
    target_matches_host: bool | None
    steps: list[StepRecord]
    final_model: str | None
    gates: list[dict[str, Any]]
    passed: bool
    started: str
    package: Any = None  # PackageResult with --ort-format: model.ort, operator config, mobile EP verdict
    degraded: list[str] = dataclasses.field(default_factory=list)  # degraded steps no later distill healed
    not_faster: list[str] = dataclasses.field(default_factory=list)  # forced-int8 steps slower-or-equal (exit 5)

    def baseline(self) -> StepRecord | None:
        return next((s for s in self.steps if s.model), None)

    def final(self) -> StepRecord | None:
        return next((s for s in reversed(self.steps) if s.model), None)


class _Context:
    """What steps share: the folder, data, target, and the models produced so far (the latest one
    also in memory, so the next step does not read back the file just written)."""

    def __init__(self, source: Source, outdir: Path, data: StepData, target: TargetProfile | None, progress: bool):
        self.source, self.outdir, self.data, self.target, self.progress = source, outdir, data, target, progress
        self.records: list[StepRecord] = []
        self.current: Path | None = None
        self._model: Any = None  # ir.Model of self.current

    def latest_model(self):
        """The latest model (read from its file once); steps change :meth:`latest` instead."""
        from edgecomp.io import load_model

        if self._model is None:
            self._model = load_model(self.current)
        return self._model

    def latest(self):
        """A copy of the latest model, for a step to change."""
        return self.latest_model().clone()

    def forget(self) -> None:
        """The latest model was written by a step itself (export, distill): read it when needed."""
        self._model = None

    def save(self, rec: StepRecord, model) -> None:
        """Write a step's model (verified, atomically) and make it the latest."""
        from edgecomp.io import save_model

        save_model(model, self.out_path(rec))
        rec.model = str(self.out_path(rec))
        self._model = model

    def model_records(self) -> list[StepRecord]:
        return [r for r in self.records if r.model]

    def out_path(self, rec: StepRecord) -> Path:
        return self.outdir / f"{rec.index:02d}-{rec.step}.onnx"

    @property
    def threads(self) -> int:
        return self.target.threads if self.target else 1


def _run_export(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.export import run

    out = ctx.out_path(rec)
    res = run(out, rec.options, spec=ctx.source.spec, hf=ctx.source.hf)
    rec.model = str(out)
    ctx.forget()
    rec.summary = {"exporter": res.exporter, "fallback": res.fallback_reason, "max abs diff vs torch": res.max_abs_diff}
    if res.task:
        rec.summary["task"] = f"{res.task} (from {res.task_source})"


def _specialize(ctx: _Context, rec: StepRecord, values: dict[str, Any]) -> None:
    """Fix ``values`` in the exported model in memory: later steps start from the specialized
    model, while the export's file stays the fp32 baseline that validate and bench compare with."""
    from edgecomp.passes.base import run_pass
    from edgecomp.passes.specialize_inputs import SpecializeInputsPass

    res = run_pass(SpecializeInputsPass(values=values), ctx.latest_model())
    rec.summary["specialized"] = res.summary
    rec.tables["specialized Ifs"] = res.rows


def _run_optimize(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.passes.optimize_graph import run

    res = run(ctx.latest(), rec.options, ctx.data)
    ctx.save(rec, res.model)
    rec.summary, rec.tables = res.summary, {"ops changed": res.rows}


def _run_quantize(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.quantize import run
    from edgecomp.quantize.options import QuantizeOptions

    values = dict(rec.options)
    if ctx.target and ctx.target.ep:  # a mobile EP runs the QDQ form only
        values["format"] = ctx.target.quant_format
    from edgecomp.emulate.runner import target_runner

    runner, note = target_runner(ctx.target)
    opts = QuantizeOptions(**fields_of(values), isa=ctx.target.isa if ctx.target else None,
                           threads=ctx.threads, progress=ctx.progress, target_runner=runner)
    res = run(ctx.latest(), opts, ctx.data)
    ctx.save(rec, res.model)
    rec.summary, rec.degraded = res.summary, res.met_tolerance is False
    rec.not_faster = res.forced_not_faster
    rec.warnings = [note, *res.warnings] if note else res.warnings
    rec.tables = {"layers": res.rows, "op families": res.families, "embedding tables": res.embeddings}


def _run_prune(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.prune import run
    from edgecomp.prune.options import PruneOptions

    opts = PruneOptions(**fields_of(rec.options), threads=ctx.threads)
    data = ctx.data if opts.structured else StepData()  # magnitude pruning reads no data
    res = run(ctx.latest(), opts, data, progress=ctx.progress)
    ctx.save(rec, res.model)
    rec.summary, rec.warnings = res.summary, res.warnings
    rec.degraded = res.degraded or res.met_tolerance is False
    rec.tables = ({"pruned groups": res.groups, "pruned layers": res.layers} if opts.structured
                  else {"sparsified layers": res.layers})


def _run_distill(ctx: _Context, rec: StepRecord) -> None:
    """Distill a student from the source model; after a prune step, heal the pruned model (the
    latest) by training it against the model that went into the prune."""
    from edgecomp.distill import DistillConfig, distill

    text = ctx.data.text
    before_prune = _input_of_first_prune(ctx)
    models = dict(teacher=ctx.source.spec, teacher_hf=ctx.source.hf)
    if before_prune:
        models = dict(teacher=before_prune, teacher_hf=None, student=str(ctx.current))
    cfg = DistillConfig(**{**rec.options, **models}, text=text,
                        tokenizer=ctx.data.tokenizer or (ctx.source.hf if text else None),
                        data=None if text else ctx.data.need("calibration", "distill"),
                        checkpoint=str(ctx.outdir / f"{rec.index:02d}-distill.ckpt"), threads=ctx.threads,
                        progress=ctx.progress)
    res = distill(cfg, ctx.out_path(rec), bench_runs=0)
    rec.model = str(ctx.out_path(rec))
    ctx.forget()
    rec.summary = {k: v for k, v in res.training.items() if isinstance(v, (int, float, str))}
    if before_prune:
        rec.summary["healed"] = f"{Path(ctx.current).name} against {Path(before_prune).name}"
    rec.tables = {"teacher vs student": res.rows}
    blocks = res.training.get("blockwise")
    if isinstance(blocks, dict):  # healed block by block: the matched boundaries
        rec.tables["block-wise boundaries"] = blocks["boundaries"]


def _input_of_first_prune(ctx: _Context) -> str | None:
    """The model a prune step started from (the latest model before the first prune), if one ran."""
    models = ctx.model_records()
    for i, r in enumerate(models):
        if r.step == "prune":
            return models[i - 1].model if i else None
    return None


def _run_reduce_embeddings(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.embeddings import ReduceOptions, run

    data = dataclasses.replace(ctx.data, tokenizer=ctx.data.tokenizer or ctx.source.hf)
    if not data.tokenizer:
        data = dataclasses.replace(data, text=None)  # without a tokenizer the corpus cannot be read
    res = run(ctx.latest(), ReduceOptions(**fields_of(rec.options)), data)
    ctx.save(rec, res.model)
    rec.summary = res.summary
    rec.tables = {r.name: r.rows for r in res.reports if r.rows}


def _run_validate(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.measure.validate import validate_many

    models = ctx.model_records()
    results = validate_many(models[0].model, [m.model for m in models], ctx.data.need("eval", "validate"),
                            ctx.data.labels, threads=ctx.threads, k=rec.options["k"])
    for m, v in zip(models, results):
        o = v.outputs[0]
        m.cos_mean, m.cos_min, m.top1_agreement, m.knn_agreement = o.cosine_mean, o.cosine_min, o.top1_agreement, o.knn_agreement
        m.accuracy = v.cand_accuracy
    rec.summary = {"samples": results[0].samples, "models": len(models)}
    if ctx.target and ctx.target.emulate:  # the artifact's numerics on the target, beside the host's
        _validate_on_target(ctx, rec, models)


def _validate_on_target(ctx: _Context, rec: StepRecord, models) -> None:
    from edgecomp.emulate import LATENCY_NOTE
    from edgecomp.emulate.numerics import fidelity_rows, target_fidelity
    from edgecomp.emulate.runner import target_runner

    note = target_runner(ctx.target)[1]
    if note:  # not prepared: the host's numerics only, and the report says so
        rec.warnings.append(note)
        return
    on_target = target_fidelity(models[0].model, models[-1].model, ctx.data.need("eval", "validate"), [ctx.target],
                                threads=ctx.threads, k=rec.options["k"], progress=False if not ctx.progress else None)
    rec.tables = {**(rec.tables or {}), f"numerics on {ctx.target.name} (emulated)": fidelity_rows(on_target)}
    fid, gap = on_target[0].fidelity[0], on_target[0].platform_gap[0]
    rec.summary.update({"target cos mean": fid.cosine_mean, "target platform gap 1-cos": 1.0 - gap.cosine_mean,
                        "target latency": LATENCY_NOTE})


def _run_bench(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.measure.bench import benchmark, first_feed

    models = ctx.model_records()
    feed_src = ctx.data.eval or ctx.data.calibration
    feed = first_feed(feed_src, models[0].model) if feed_src else None
    threads = rec.options["threads"] or ctx.threads
    labels = [f"{m.index:02d}-{m.step}" for m in models]
    where = {}
    if ctx.target and ctx.target.remote:  # the profile's device times the models: latency gates hold there
        from edgecomp.remote import connect
        from edgecomp.remote.measure import bench_on_device

        device = connect(ctx.target.remote, python=ctx.target.python or "python3", config_file=ctx.target.ssh_config)
        where = {"device": device.probe().describe()}
        res = bench_on_device(device, [m.model for m in models], threads=threads, warmup=rec.options["warmup"],
                              runs=rec.options["runs"], feed=feed, labels=labels)
    else:
        res = benchmark([m.model for m in models], threads=threads, warmup=rec.options["warmup"],
                        runs=rec.options["runs"], feed=feed, labels=labels)
    for m, st in zip(models, res.models):
        m.latency_ratio, m.p50_ms = st.ratio_to_first, st.p50_ms
    rec.summary = {"threads": threads, "runs": rec.options["runs"], "feed": res.feed_shapes, **where}
    if rec.options["profile"] and not where:  # the profiler runs on this host only
        _profile_ends(models, rec, threads, feed)


def _profile_ends(models: list[StepRecord], rec: StepRecord, threads: int, feed) -> None:
    """Where the time goes in the input and the final model (onnxruntime's profiler, separate runs)."""
    from edgecomp.measure.profile import PROFILE_NOTE, profile_models, side_by_side_rows
    from edgecomp.render.html import PROFILE_TABLE

    ends = [models[0], models[-1]] if len(models) > 1 else models[:1]
    profiles = profile_models([m.model for m in ends], threads=threads, warmup=rec.options["warmup"],
                              runs=rec.options["runs"], feed=feed, labels=[f"{m.index:02d}-{m.step}" for m in ends])
    rec.tables = {**(rec.tables or {}), PROFILE_TABLE: side_by_side_rows(profiles)}
    rec.summary["profile"] = PROFILE_NOTE


STEP_RUNNERS: dict[str, Callable[[_Context, StepRecord], None]] = {
    "export": _run_export, "optimize": _run_optimize, "prune": _run_prune, "distill": _run_distill,
    "reduce-embeddings": _run_reduce_embeddings, "quantize": _run_quantize,
    "validate": _run_validate, "bench": _run_bench,
}


def _measure(rec: StepRecord, model, shapes_from: str | None) -> None:
    """Size, MACs and the int8 share of MACs of a step's model (in memory; the file for its size)."""
    from edgecomp.measure.bench import first_feed
    from edgecomp.measure.inspect import summarize

    rec.size_bytes = model_size_bytes(rec.model)
    try:
        shapes = {k: v.shape for k, v in first_feed(shapes_from, model).items()} if shapes_from else None
        s = summarize(model, shapes)
        rec.macs, rec.int8_mac_share = s.macs, s.int8_mac_share
    except EdgecompError:  # MACs are informative; a model whose inputs the data does not fit just has none
        rec.macs = None


#: Data a step always reads; what its option values need is declared with the options.
_STEP_NEEDS = {"quantize": ("calibration", "static quantization"), "validate": ("eval", "validate")}


def _check_steps(recipe: Recipe, data: StepData, source: Source) -> None:
    """Refuse, before anything runs, a recipe whose steps miss the data they need."""
    names = recipe.step_names()
    if names[0] != "export":
        raise ConfigError(f"{recipe.source}: the first step must be export (the fp32 baseline), not {names[0]!r}")
    available = data.available()
    available["tokenizer"] = available["tokenizer"] or bool(source.hf)
    for i, s in enumerate(recipe.steps, start=1):
        step = s["step"]
        try:
            if step == "export" and source.spec and s["task"] != "auto":
                raise OptionError("task", "applies to Hugging Face folders (--hf), not to a SPEC; drop it or "
                                          "convert --hf PATH")
            if step in _STEP_NEEDS:
                data.need(*_STEP_NEEDS[step])
            need_data(list(STEP_OPTIONS[step].values()), s, available)
            if step == "distill" and not data.text:
                data.need("calibration", "distill (or text)")
            if step in ("distill", "reduce-embeddings") and data.text and not available["tokenizer"]:
                data.need("tokenizer", "text")
        except (OptionError, DataNeeded) as e:
            raise in_recipe_words(e, recipe.source, i, step) from None


#: A refused step's remedies (edgecomp.errors.BelowFloor) as a recipe user applies them.
_RECIPE_REMEDIES = {"calibration": "pass --calibration DATA (importance, repair and a check on real inputs)",
                    "sparsity": "lower sparsity", "protect": "protect the sensitive layers",
                    "allow_degraded": "set allow_degraded = true to keep it (e.g. to heal it with a distill step)"}


def in_recipe_words(e: OptionError | DataNeeded | BelowFloor, source: str, index: int,
                    step: str) -> ConfigError | DataError | BelowFloor:
    """A library error about an option or data key, or a refused result, as a recipe user reads it."""
    where = f"{source}: step {index} ({step})"
    if isinstance(e, BelowFloor):
        return BelowFloor(f"{where}: {e.finding}", {k: _RECIPE_REMEDIES.get(k, v) for k, v in e.remedies.items()})
    if isinstance(e, OptionError):
        return ConfigError(f"{where}: {e}")
    return DataError(f"{where}: {e.what} needs {e.key} data: pass --{e.key} or set [data] {e.key} in the recipe")


def _gates(recipe: Recipe, steps: list[StepRecord]) -> list[dict[str, Any]]:
    models = [s for s in steps if s.model]
    base, final = models[0], models[-1]
    out = []
    for gate, limit in recipe.gates.items():
        value = None
        if gate == "max_size_mb":
            value = final.size_bytes / 1e6
        elif gate == "min_speedup" and final.latency_ratio:
            value = 1.0 / final.latency_ratio
        elif gate == "max_accuracy_drop":
            value = _accuracy_drop(base, final)
        if value is None:
            passed = False
        elif gate.startswith("max_"):
            passed = value <= limit
        else:
            passed = value >= limit
        out.append({"gate": gate, "limit": limit, "value": value, "passed": passed})
    return out


def _accuracy_drop(base: StepRecord, final: StepRecord) -> float | None:
    if base.accuracy is not None and final.accuracy is not None:
        return base.accuracy - final.accuracy
    if final.top1_agreement is not None:
        return 1.0 - final.top1_agreement
    if final.cos_mean is not None:
        return 1.0 - final.cos_mean
    return None


def convert(source: Source, recipe: Recipe, outdir: str | os.PathLike, *, calibration: str | None = None,
            eval_data: str | None = None, labels: str | None = None, text: str | None = None,
            tokenizer: str | None = None, target: TargetProfile | None = None,
            overwrite: bool = False, progress: bool = False, protect: Sequence[str | os.PathLike] = (),
            ort_format: bool = False, values: dict[str, Any] | None = None,
            on_step: Callable[[StepRecord], None] | None = None) -> ConvertResult:
    """Run ``recipe`` on ``source`` into ``outdir``; see the module docstring.

    ``protect`` names further inputs (a targets file) that OUTDIR must not hold. ``ort_format``
    also writes ``model.ort`` and the reduced-build operator config (see :mod:`edgecomp.package`).
    ``values`` (over the recipe's ``[values]``) fixes inputs of every model after the export:
    :class:`~edgecomp.passes.specialize_inputs.SpecializeInputsPass` runs on the exported model
    in memory, recorded in the export step's summary.
    """
    from edgecomp.render.html import write_reports

    given = {"calibration": calibration, "eval": eval_data, "labels": labels, "text": text, "tokenizer": tokenizer}
    try:
        data = StepData(**{k: given[k] or recipe.data.get(k) for k in given})
    except DataNeeded as e:
        raise ConfigError(f"{recipe.source}: labels score the eval samples; pass --eval DATA with --labels") from e
    out = check_output_dir(outdir, [*dataclasses.astuple(data), source.hf, source.spec_file(), recipe.source,
                                    *protect], overwrite)
    _check_steps(recipe, data, source)
    fixed = {**recipe.values, **(values or {})}
    started = datetime.datetime.now().isoformat(timespec="seconds")
    degraded: list[str] = []
    with work_dir(out) as work:
        ctx = _Context(source, work, data, target, progress)
        for i, options in enumerate(recipe.steps, start=1):
            rec = StepRecord(i, options["step"], {k: v for k, v in options.items() if k != "step"})
            ctx.records.append(rec)
            t0 = time.perf_counter()
            try:
                STEP_RUNNERS[rec.step](ctx, rec)
            except (OptionError, DataNeeded, BelowFloor) as e:
                raise in_recipe_words(e, recipe.source, i, rec.step) from None
            rec.seconds = time.perf_counter() - t0
            degraded = [] if rec.step == "distill" else degraded  # healed against the model before the prune
            degraded += [f"{i:02d}-{rec.step}"] if rec.degraded else []
            if rec.model:
                ctx.current = Path(rec.model)
                _measure(rec, ctx.latest_model(), data.eval or data.calibration)
                if rec.step == "export" and fixed:
                    _specialize(ctx, rec, fixed)
            if on_step:
                on_step(rec)
        copy_file(ctx.current, work / "model.onnx")
        isa = host_isa()
        result = ConvertResult(str(out), source.describe(), recipe.source, target.name if target else None,
                               isa.describe(), target.matches_host(isa) if target else None, ctx.records,
                               str(out / "model.onnx"), [], True, started)
        if ort_format:
            from edgecomp.measure.bench import first_feed
            from edgecomp.package import package_model

            feed_src = data.eval or data.calibration
            result.package = package_model(work / "model.onnx", work,
                                           feed=first_feed(feed_src, ctx.current) if feed_src else None)
        result.degraded = degraded
        result.not_faster = [f"{r.index:02d}-{r.step}" for r in ctx.records if r.not_faster]
        result.gates = _gates(recipe, ctx.records)
        result.passed = all(g["passed"] for g in result.gates)
        _relocate(result, work, out)
        write_reports(result, work)
        replace_dir(work, out)
    return result


def _relocate(result: ConvertResult, work: Path, out: Path) -> None:
    """Point recorded model paths at their final location inside OUTDIR."""
    for s in result.steps:
        if s.model:
            s.model = str(out / Path(s.model).name)
