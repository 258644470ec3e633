"""``edgecomp convert``: run a recipe from a torch model to a validated edge artifact.

Every model-producing step writes ``NN-step.onnx`` into the output folder; ``validate`` scores
every model so far against the fp32 export, ``bench`` times them all interleaved; the final
model is copied to ``model.onnx``; ``report.json`` and ``report.html`` describe it all; gates are
checked last. The folder is built under a temporary name and renamed into place when complete,
so an interrupted run never leaves a half-written OUTDIR (and an existing one is replaced only
with ``overwrite``).

Models stay in memory from step to step: export hands its model over in memory, each step's
model is written once (verified as it is written, :func:`edgecomp.io.save_model`) and never read
back; validate, bench and the report's sizes and MACs use the models in memory (distill's
student included). Every capability returns a
:class:`~edgecomp.step.StepResult`, recorded the same way for each (:func:`_record`); a quantize
step right after an optimize step with folding on does not clean the graph up again
(:class:`~edgecomp.step.StepContext` ``done``).

A step's result that misses its quality bar follows the rule of its command: a prune step below
the fidelity floor (0.95 on held-out calibration samples, else on synthesized inputs) stops the run
with one line unless it sets ``allow_degraded = true``; a step written below its floor or
tolerance is listed in ``ConvertResult.degraded`` (the CLI's exit status 3) unless a later
distill step heals it. A quantize step follows quantize's never-slower rule: with families auto a
model not faster than its input falls back to float; forced families keep int8 and the step is
listed in ``ConvertResult.not_faster`` (the CLI's exit status 5, after 4 and 3). With a measured
target table its families auto are decided from the table, and a target with ``remote = ...``
times the written model on its device (the rule of ``quantize --target``).
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
from edgecomp.io import check_output_dir, copy_file, replace_dir, saved_size_bytes, work_dir
from edgecomp.options import fields_of, need_data
from edgecomp.pipeline.recipe import STEP_DATA_NEEDED, STEP_OPTIONS, Recipe, Source
from edgecomp.step import StepContext, StepResult
from edgecomp.targets import TargetProfile, host_isa

__all__ = ["StepRecord", "ConvertResult", "convert", "STEP_RUNNERS"]


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
    evidence: dict[str, Any] = dataclasses.field(default_factory=dict)  # StepResult.evidence
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
    """What steps share: the folder, data, target, and the models produced so far, kept in memory
    as they were saved (validate and bench measure those; no step's file is read back)."""

    def __init__(self, source: Source, outdir: Path, data: StepData, target: TargetProfile | None, progress: bool):
        self.source, self.outdir, self.data, self.target, self.progress = source, outdir, data, target, progress
        self.records: list[StepRecord] = []
        self.table: Any = None  # the target's measured table (edgecomp.quantize.measured), for quantize steps
        self.current: Path | None = None
        self._model: Any = None  # ir.Model of self.current
        self.done: dict[str, dict[str, Any]] = {}  # passes that ran on the latest model (StepContext.done)
        self.models: dict[int, Any] = {}  # step index -> the ir.Model saved as that step's file

    def step_context(self) -> StepContext:
        return StepContext(threads=self.threads, progress=self.progress, target=self.target, done=dict(self.done))

    def latest_model(self):
        """The latest model, as saved (or as changed by :meth:`use`); steps change :meth:`latest` instead."""
        return self._model

    def model_of(self, rec: StepRecord):
        """The model of a step's file, as saved (in memory)."""
        return self.models[rec.index]

    def latest(self):
        """A copy of the latest model, for a step to change."""
        return self.latest_model().clone()

    def use(self, model) -> None:
        """Later steps start from ``model`` (changed in memory after the latest step's file was saved)."""
        self._model = model

    def save(self, rec: StepRecord, model) -> None:
        """Write a step's model (verified, atomically) and make it the latest."""
        from edgecomp.io import save_model

        save_model(model, self.out_path(rec))
        rec.model = str(self.out_path(rec))
        self._model = self.models[rec.index] = model
        self.done = {}  # a new model: what ran on the previous one does not carry over

    def model_records(self) -> list[StepRecord]:
        return [r for r in self.records if r.model]

    def out_path(self, rec: StepRecord) -> Path:
        return self.outdir / f"{rec.index:02d}-{rec.step}.onnx"

    @property
    def threads(self) -> int:
        return self.target.threads if self.target else 1


def _run_export(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.export import run

    _record(ctx, rec, run(None, rec.options, spec=ctx.source.spec, hf=ctx.source.hf))  # in memory; saved here


def _specialize(ctx: _Context, rec: StepRecord, values: dict[str, Any]) -> None:
    """Fix ``values`` in the exported model in memory: later steps start from the specialized
    model, while the export's file stays the fp32 baseline that validate and bench compare with."""
    from edgecomp.passes.base import run_pass
    from edgecomp.passes.specialize_inputs import SpecializeInputsPass

    model = ctx.latest()  # the export's own model stays the fp32 baseline (ctx.models)
    res = run_pass(SpecializeInputsPass(values=values), model)
    ctx.use(model)
    rec.summary["specialized"] = res.summary
    rec.tables["specialized Ifs"] = res.rows


def _record(ctx: _Context, rec: StepRecord, res: StepResult) -> None:
    """A capability's StepResult into the step's record (the same for every capability): its
    model saved and kept in memory, summary, tables, warnings, evidence and status."""
    ctx.save(rec, res.model)
    rec.summary, rec.tables, rec.evidence = res.summary, res.tables, res.evidence
    rec.warnings = [*rec.warnings, *res.warnings]
    rec.degraded, rec.not_faster = res.status == "degraded", res.status == "not faster"


def _run_optimize(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.passes.optimize_graph import run

    _record(ctx, rec, run(ctx.latest(), rec.options, ctx.data, ctx.step_context()))
    ctx.done = {"optimize": {"fold_constants": rec.options["fold_constants"]}}  # until a later step changes it


def _run_quantize(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.emulate.runner import target_runner
    from edgecomp.quantize import run
    from edgecomp.quantize.options import for_target
    from edgecomp.remote import profile_device

    opts = for_target(rec.options, ctx.target, threads=ctx.threads, progress=ctx.progress)  # the target's rules
    opts.target_runner, note = target_runner(ctx.target)
    # families auto decides from the target's measured table when there is one (as quantize --target
    # does), and the written model is timed against its input on the target's device when it has one
    opts.table = ctx.table if rec.options.get("families", "auto") == "auto" else None
    opts.device = profile_device(ctx.target)
    rec.warnings = [note] if note else []
    _record(ctx, rec, run(ctx.latest(), opts, ctx.data, ctx.step_context()))


def _run_prune(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.prune import run
    from edgecomp.prune.options import PruneOptions

    opts = PruneOptions(**fields_of(rec.options), threads=ctx.threads)
    _record(ctx, rec, run(ctx.latest(), opts, ctx.data, ctx.step_context()))


def _run_distill(ctx: _Context, rec: StepRecord) -> None:
    """Distill a student from the source model; after a prune step, heal the pruned model (the
    latest) by training it against the model that went into the prune. The student comes back in
    memory and is saved like every step's model."""
    from edgecomp.distill import run

    text = ctx.data.text
    before_prune = _input_of_first_prune(ctx)
    models = dict(teacher=ctx.source.spec, teacher_hf=ctx.source.hf)
    if before_prune:  # the trainer reads ONNX teacher and student from their files, saved by earlier steps
        models = dict(teacher=before_prune, teacher_hf=None, student=str(ctx.current))
    data = dataclasses.replace(ctx.data, tokenizer=ctx.data.tokenizer or (ctx.source.hf if text else None))
    res = run(None, {**rec.options, **models}, data, ctx.step_context(),
              checkpoint=str(ctx.outdir / f"{rec.index:02d}-distill.ckpt"))
    _record(ctx, rec, res)
    if before_prune:
        rec.summary["healed"] = f"{Path(models['student']).name} against {Path(before_prune).name}"


def _run_finetune(ctx: _Context, rec: StepRecord) -> None:
    """Fine-tune the latest model on the calibration DATA and its train_labels (a new head for a new task)."""
    from edgecomp.finetune import FinetuneOptions, run

    ckpt = ctx.outdir / f"{rec.index:02d}-finetune.ckpt"
    res = run(ctx.latest(), FinetuneOptions(**fields_of(rec.options)), ctx.data, ctx.step_context(), checkpoint=ckpt,
              threads=ctx.threads)
    ckpt.unlink(missing_ok=True)
    _record(ctx, rec, res)


def _task_models(ctx: _Context) -> list[StepRecord]:
    """The models that compute the current task: from the last step that gave the model a new head
    (a fine-tune to other classes) on, else all; validate compares them with the first of them."""
    models = ctx.model_records()
    start = max((i for i, r in enumerate(models) if r.step == "finetune" and r.summary.get("new head")), default=0)
    return models[start:]


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
    _record(ctx, rec, run(ctx.latest(), ReduceOptions(**fields_of(rec.options)), data, ctx.step_context()))


def _run_validate(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.measure.validate import run

    models = _task_models(ctx)
    res = run([ctx.model_of(m) for m in models], rec.options, ctx.data, ctx.step_context())
    first = {}  # each model's first output: the numbers the step table and the gates read
    for row in res.tables["fidelity"]:
        first.setdefault(row["model"], row)
    for m, row in zip(models, first.values()):
        m.cos_mean, m.cos_min, m.top1_agreement = row["cosine mean"], row["cosine min"], row["top-1 agreement"]
        m.knn_agreement, m.accuracy = row["kNN agreement"], row["accuracy"]
    rec.summary, rec.tables, rec.evidence = res.summary, res.tables, res.evidence
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
    feed = first_feed(feed_src, ctx.model_of(models[0])) if feed_src else None
    threads = rec.options["threads"] or ctx.threads
    labels = [f"{m.index:02d}-{m.step}" for m in models]
    where = {}
    if ctx.target and ctx.target.remote:  # the profile's device times the models: latency gates hold there
        from edgecomp.remote import profile_device
        from edgecomp.remote.measure import bench_on_device

        device = profile_device(ctx.target)
        where = {"device": device.probe().describe()}
        res = bench_on_device(device, [m.model for m in models], threads=threads, warmup=rec.options["warmup"],
                              runs=rec.options["runs"], feed=feed, labels=labels)
    else:
        res = benchmark([ctx.model_of(m) for m in models], threads=threads, warmup=rec.options["warmup"],
                        runs=rec.options["runs"], feed=feed, labels=labels)
    for m, st in zip(models, res.models):
        m.latency_ratio, m.p50_ms = st.ratio_to_first, st.p50_ms
    rec.summary = {"threads": threads, "runs": rec.options["runs"], "feed": res.feed_shapes, **where}
    if rec.options["profile"] and not where:  # the profiler runs on this host only
        _profile_ends(ctx, models, rec, threads, feed)


def _profile_ends(ctx: _Context, models: list[StepRecord], rec: StepRecord, threads: int, feed) -> None:
    """Where the time goes in the input and the final model (onnxruntime's profiler, separate runs)."""
    from edgecomp.measure.profile import PROFILE_NOTE, profile_models, side_by_side_rows
    from edgecomp.render.html import PROFILE_TABLE

    ends = [models[0], models[-1]] if len(models) > 1 else models[:1]
    profiles = profile_models([ctx.model_of(m) for m in ends], threads=threads, warmup=rec.options["warmup"],
                              runs=rec.options["runs"], feed=feed, labels=[f"{m.index:02d}-{m.step}" for m in ends])
    rec.tables = {**(rec.tables or {}), PROFILE_TABLE: side_by_side_rows(profiles)}
    rec.summary["profile"] = PROFILE_NOTE


STEP_RUNNERS: dict[str, Callable[[_Context, StepRecord], None]] = {
    "export": _run_export, "optimize": _run_optimize, "prune": _run_prune, "distill": _run_distill,
    "finetune": _run_finetune,
    "reduce-embeddings": _run_reduce_embeddings, "quantize": _run_quantize,
    "validate": _run_validate, "bench": _run_bench,
}


def _measure(rec: StepRecord, model, shapes_from: str | None) -> None:
    """Size, MACs and the int8 share of MACs of a step's model (in memory; the file for its size)."""
    from edgecomp.measure.bench import first_feed
    from edgecomp.measure.inspect import summarize

    rec.size_bytes = saved_size_bytes(rec.model)
    try:
        shapes = {k: v.shape for k, v in first_feed(shapes_from, model).items()} if shapes_from else None
        s = summarize(model, shapes)
        rec.macs, rec.int8_mac_share = s.macs, s.int8_mac_share
    except EdgecompError:  # MACs are informative; a model whose inputs the data does not fit just has none
        rec.macs = None


def _check_steps(recipe: Recipe, data: StepData, source: Source, target: TargetProfile | None = None) -> None:
    """Refuse, before anything runs, a recipe whose steps miss the data they need (the capabilities'
    own declarations: :data:`STEP_DATA_NEEDED` and ``Option.needs``) or break a rule of the target
    (an explicit quantize format its EP cannot run)."""
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
            need_data(list(STEP_OPTIONS[step].values()), s, available, STEP_DATA_NEEDED.get(step))
            if step == "quantize":
                from edgecomp.quantize.options import for_target

                for_target({k: v for k, v in s.items() if k != "step"}, target)
            if step == "distill" and not data.text:
                data.need("calibration", "distill (or text)")
            if step in ("distill", "reduce-embeddings") and data.text and not available["tokenizer"]:
                data.need("tokenizer", "text")
        except (OptionError, DataNeeded) as e:
            raise in_recipe_words(e, recipe.source, i, step) from None


#: A refused step's remedies (edgecomp.errors.BelowFloor) as a recipe user applies them.
_RECIPE_REMEDIES = {"calibration": "pass --data DATA (importance, repair and a check on real inputs)",
                    "sparsity": "lower sparsity", "protect": "protect the sensitive layers",
                    "allow_degraded": "set allow_degraded = true to keep it (e.g. to heal it with a distill step)"}


#: convert's flag for a data key, where it is not the key's own name
_CONVERT_FLAGS = {"calibration": "data", "train_labels": "train-labels"}


def in_recipe_words(e: OptionError | DataNeeded | BelowFloor, source: str, index: int,
                    step: str) -> ConfigError | DataError | BelowFloor:
    """A library error about an option or data key, or a refused result, as a recipe user reads it."""
    where = f"{source}: step {index} ({step})"
    if isinstance(e, BelowFloor):
        return BelowFloor(f"{where}: {e.finding}", {k: _RECIPE_REMEDIES.get(k, v) for k, v in e.remedies.items()})
    if isinstance(e, OptionError):
        return ConfigError(f"{where}: {e}")
    flag = _CONVERT_FLAGS.get(e.key, e.key)
    return DataError(f"{where}: {e.what} needs {e.key} data: pass --{flag} or set [data] {e.key} in the recipe")


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
            tokenizer: str | None = None, train_labels: str | None = None, target: TargetProfile | None = None,
            overwrite: bool = False, progress: bool = False, protect: Sequence[str | os.PathLike] = (),
            ort_format: bool = False, values: dict[str, Any] | None = None,
            on_step: Callable[[StepRecord], None] | None = None, table: Any = None) -> ConvertResult:
    """Run ``recipe`` on ``source`` into ``outdir``; see the module docstring.

    ``protect`` names further inputs (a targets file) that OUTDIR must not hold. ``ort_format``
    also writes ``model.ort`` and the reduced-build operator config (see :mod:`edgecomp.package`).
    ``values`` (over the recipe's ``[values]``) fixes inputs of every model after the export:
    :class:`~edgecomp.passes.specialize_inputs.SpecializeInputsPass` runs on the exported model
    in memory, recorded in the export step's summary. ``table`` (a measured target table,
    :func:`edgecomp.quantize.measured.table_for`) decides a quantize step's families auto; each
    step's summary says which evidence decided ("families evidence").
    """
    from edgecomp.render.html import write_reports

    given = {"calibration": calibration, "eval": eval_data, "labels": labels, "text": text, "tokenizer": tokenizer,
             "train_labels": train_labels}
    try:
        data = StepData(**{k: given[k] or recipe.data.get(k) for k in given})
    except DataNeeded as e:
        raise ConfigError(f"{recipe.source}: labels score the eval samples; pass --eval DATA with --labels") from e
    out = check_output_dir(outdir, [*dataclasses.astuple(data), source.hf, source.spec_file(), recipe.source,
                                    *protect], overwrite)
    _check_steps(recipe, data, source, target)
    fixed = {**recipe.values, **(values or {})}
    started = datetime.datetime.now().isoformat(timespec="seconds")
    degraded: list[str] = []
    with work_dir(out) as work:
        ctx = _Context(source, work, data, target, progress)
        ctx.table = table
        for i, options in enumerate(recipe.steps, start=1):
            rec = StepRecord(i, options["step"], {k: v for k, v in options.items() if k != "step"})
            ctx.records.append(rec)
            t0 = time.perf_counter()
            try:
                STEP_RUNNERS[rec.step](ctx, rec)
            except (OptionError, DataNeeded, BelowFloor) as e:
                raise in_recipe_words(e, recipe.source, i, rec.step) from None
            rec.seconds = time.perf_counter() - t0
            if rec.step == "distill" and not rec.summary.get("kept_input"):
                degraded = []  # healed against the model before the prune (a heal that kept its input did not)
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
                                           feed=first_feed(feed_src, ctx.model_of(ctx.model_records()[-1])) if feed_src else None)
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
