"""``edgecomp convert``: run a recipe from a torch model to a validated edge artifact.

Every model-producing step writes ``NN-step.onnx`` into the output folder; ``validate`` scores
every model so far against the fp32 export, ``bench`` times them all interleaved; the final
model is copied to ``model.onnx``; ``report.json`` and ``report.html`` describe it all; gates are
checked last. The folder is built under a temporary name and renamed into place when complete,
so an interrupted run never leaves a half-written OUTDIR (and an existing one is replaced only
with ``overwrite``).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from edgecomp.errors import ConfigError, DataError
from edgecomp.io import check_output_dir, copy_file, model_size_bytes, replace_dir, work_dir
from edgecomp.pipeline.recipe import Recipe
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

    def baseline(self) -> StepRecord | None:
        return next((s for s in self.steps if s.model), None)

    def final(self) -> StepRecord | None:
        return next((s for s in reversed(self.steps) if s.model), None)


class _Context:
    """What steps share: the folder, data, target, and the models produced so far."""

    def __init__(self, source: Source, outdir: Path, data: dict[str, str | None], target: TargetProfile | None,
                 progress: bool):
        self.source, self.outdir, self.data, self.target, self.progress = source, outdir, data, target, progress
        self.records: list[StepRecord] = []
        self.current: Path | None = None

    def need(self, key: str, step: str) -> str:
        value = self.data.get(key)
        if not value:
            raise DataError(f"step '{step}' needs {key} data: pass --{key} DATA or set [data].{key} in the recipe")
        return value

    def model_records(self) -> list[StepRecord]:
        return [r for r in self.records if r.model]

    def out_path(self, rec: StepRecord) -> Path:
        return self.outdir / f"{rec.index:02d}-{rec.step}.onnx"

    @property
    def threads(self) -> int:
        return self.target.threads if self.target else 1


def _run_export(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.data import parse_shape
    from edgecomp.export import export_hf, export_spec

    o = rec.options
    dynamic = {k: {int(a): str(lbl) for a, lbl in v.items()} for k, v in o["dynamic"].items()}
    kw = dict(input_shapes={k: parse_shape(v) for k, v in o["input"].items()}, dynamic=dynamic, opset=o["opset"],
              exporter=o["exporter"], atol=o["atol"])
    out = ctx.out_path(rec)
    if ctx.source.hf:
        res = export_hf(ctx.source.hf, out, output=o["hf_output"], task=o["task"], **kw)
    else:
        if o["task"] != "auto":
            raise ConfigError(f"export task = {o['task']!r} applies to --hf sources; a SPEC's factory builds the model")
        res = export_spec(ctx.source.spec, out, **kw)
    rec.model = str(out)
    rec.summary = {"exporter": res.exporter, "fallback": res.fallback_reason, "max abs diff vs torch": res.max_abs_diff}
    if res.task:
        rec.summary["task"] = f"{res.task} (from {res.task_source})"


def _run_optimize(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.io import load_model, save_model
    from edgecomp.passes.base import run_pass
    from edgecomp.passes.optimize_graph import OptimizeGraphPass

    res = run_pass(OptimizeGraphPass(fold_constants=rec.options["fold_constants"], fusions=rec.options["fusions"]),
                   load_model(ctx.current))
    save_model(res.model, ctx.out_path(rec))
    rec.model = str(ctx.out_path(rec))
    rec.summary, rec.tables = res.summary, {"ops changed": res.rows}


def _run_quantize(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.data import load_data, load_labels
    from edgecomp.io import load_model, save_model
    from edgecomp.quantize import quantize_model
    from edgecomp.quantize.options import QuantizeOptions

    o = rec.options
    opts = QuantizeOptions(method=o["method"], percentile=o["percentile"], per_channel=o["per_channel"],
                           weight_bits=o["weight_bits"], smooth=o["smooth"], bias_correction=o["bias_correction"],
                           families=o["families"], exclude=tuple(o["exclude"]), embeddings=o["embeddings"],
                           max_samples=o["max_samples"] or None, isa=ctx.target.isa if ctx.target else None,
                           threads=ctx.threads, progress=ctx.progress)
    kw: dict[str, Any] = {}
    if o["tolerance"] >= 0:
        ev = load_data(ctx.need("eval", "quantize"))
        labels = load_labels(ctx.data["labels"], len(ev)) if ctx.data.get("labels") else None
        kw = dict(eval_data=ev, metric=o["metric"], tolerance=o["tolerance"], labels=labels)
    res = quantize_model(load_model(ctx.current), load_data(ctx.need("calibration", "quantize")), opts, **kw)
    save_model(res.model, ctx.out_path(rec))
    rec.model = str(ctx.out_path(rec))
    rec.summary = res.summary
    rec.tables = {"layers": res.rows, "op families": res.families, "embedding tables": res.embeddings}


def _run_prune(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.data import load_data
    from edgecomp.io import load_model, save_model

    o = rec.options
    model = load_model(ctx.current)
    if o["structured"]:
        from edgecomp.prune import prune_model
        from edgecomp.prune.options import PruneOptions

        opts = PruneOptions(sparsity=o["sparsity"], importance=o["importance"], scope=o["scope"],
                            protect=tuple(o["protect"]), round_to=o["round_to"], kinds=tuple(o["kinds"]),
                            repair=o["repair"], max_samples=o["max_samples"] or None, threads=ctx.threads)
        data = load_data(ctx.data["calibration"]) if ctx.data.get("calibration") else None
        res = prune_model(model, opts, data)
        model, rec.summary, rec.tables = res.model, res.summary, {"pruned groups": res.groups, "pruned layers": res.layers}
    else:
        from edgecomp.passes.base import run_pass
        from edgecomp.prune import verify_pruned
        from edgecomp.prune.prune_magnitude import PruneMagnitudePass

        res = run_pass(PruneMagnitudePass(sparsity=o["sparsity"], scope=o["scope"], protect=tuple(o["protect"])), model)
        verify_pruned(res.model, load_model(ctx.current))
        model, rec.summary, rec.tables = res.model, res.summary, {"sparsified layers": res.rows}
    save_model(model, ctx.out_path(rec))
    rec.model = str(ctx.out_path(rec))


def _run_distill(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.distill import DistillConfig, distill

    o = rec.options
    text = ctx.data.get("text")
    cfg = DistillConfig(teacher=ctx.source.spec, teacher_hf=ctx.source.hf, student=o["student"] or None,
                        shrink=None if o["student"] else (o["shrink"] or None), text=text,
                        tokenizer=ctx.data.get("tokenizer") or (ctx.source.hf if text else None),
                        data=None if text else ctx.need("calibration", "distill"), max_len=o["max_len"],
                        held_out=o["held_out"], temperature=o["temperature"], match=o["match"],
                        hidden_weight=o["hidden_weight"], epochs=o["epochs"], max_steps=o["max_steps"] or None,
                        batch_size=o["batch_size"], lr=o["lr"], seed=o["seed"], patience=o["patience"],
                        checkpoint=str(ctx.outdir / f"{rec.index:02d}-distill.ckpt"), threads=ctx.threads,
                        progress=ctx.progress, device=o["device"])
    res = distill(cfg, ctx.out_path(rec), bench_runs=0)
    rec.model = str(ctx.out_path(rec))
    rec.summary = {k: v for k, v in res.training.items() if isinstance(v, (int, float, str))}
    rec.tables = {"teacher vs student": res.rows}


def _run_reduce_embeddings(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.embeddings import ReduceOptions, reduce_embeddings
    from edgecomp.io import load_model, save_model
    from edgecomp.text import load_tokenizer, read_lines

    o = rec.options
    opts = ReduceOptions(bits=o["bits"] or None, block=o["block"] or None, rank=o["rank"] or None,
                         energy=o["energy"] or None, exact_rows=o["exact_rows"], prune_vocab=o["prune_vocab"])
    text, tok_path = ctx.data.get("text"), ctx.data.get("tokenizer") or ctx.source.hf
    tokenizer = load_tokenizer(tok_path) if (text and tok_path) else None
    res = reduce_embeddings(load_model(ctx.current), opts, tokenizer, read_lines(text) if tokenizer else None)
    save_model(res.model, ctx.out_path(rec))
    rec.model = str(ctx.out_path(rec))
    rec.summary = res.summary
    rec.tables = {r.name: r.rows for r in res.reports if r.rows}


def _run_validate(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.measure.validate import validate

    models = ctx.model_records()
    base = models[0]
    for m in models:
        v = validate(base.model, m.model, ctx.need("eval", "validate"), ctx.data.get("labels"), threads=ctx.threads,
                     k=rec.options["k"])
        o = v.outputs[0]
        m.cos_mean, m.cos_min, m.top1_agreement, m.knn_agreement = o.cosine_mean, o.cosine_min, o.top1_agreement, o.knn_agreement
        m.accuracy = v.cand_accuracy
    rec.summary = {"samples": v.samples, "models": len(models)}


def _run_bench(ctx: _Context, rec: StepRecord) -> None:
    from edgecomp.measure.bench import benchmark, first_feed

    models = ctx.model_records()
    feed_src = ctx.data.get("eval") or ctx.data.get("calibration")
    feed = first_feed(feed_src, models[0].model) if feed_src else None
    threads = rec.options["threads"] or ctx.threads
    res = benchmark([m.model for m in models], threads=threads, warmup=rec.options["warmup"],
                    runs=rec.options["runs"], feed=feed, labels=[f"{m.index:02d}-{m.step}" for m in models])
    for m, st in zip(models, res.models):
        m.latency_ratio, m.p50_ms = st.ratio_to_first, st.p50_ms
    rec.summary = {"threads": threads, "runs": rec.options["runs"], "feed": res.feed_shapes}


STEP_RUNNERS: dict[str, Callable[[_Context, StepRecord], None]] = {
    "export": _run_export, "optimize": _run_optimize, "prune": _run_prune, "distill": _run_distill,
    "reduce-embeddings": _run_reduce_embeddings, "quantize": _run_quantize,
    "validate": _run_validate, "bench": _run_bench,
}


def _measure(rec: StepRecord, shapes_from: str | None) -> None:
    from edgecomp.io import load_model
    from edgecomp.measure.bench import first_feed
    from edgecomp.measure.inspect import summarize

    rec.size_bytes = model_size_bytes(rec.model)
    shapes = {k: v.shape for k, v in first_feed(shapes_from, rec.model).items()} if shapes_from else None
    try:
        s = summarize(load_model(rec.model), shapes)
        rec.macs, rec.int8_mac_share = s.macs, s.int8_mac_share
    except Exception:  # MACs are informative; a model whose inputs need --shape just has none
        rec.macs = None


def _check_steps(recipe: Recipe, data: dict[str, str | None], source: Source) -> None:
    """Refuse, before anything runs, a recipe whose steps miss the data they need."""
    names = recipe.step_names()
    if names[0] != "export":
        raise ConfigError(f"{recipe.source}: the first step must be export (the fp32 baseline), not {names[0]!r}")
    task = recipe.steps[0].get("task", "auto")
    if source.spec and task != "auto":
        raise ConfigError(f"{recipe.source}: export task = {task!r} applies to Hugging Face folders (--hf), "
                          "not to a SPEC; drop it or convert --hf PATH")

    def need(key: str, step: str, why: str = "") -> None:
        if not data.get(key):
            raise DataError(f"{recipe.source}: step '{step}' needs {key} data{why}: pass --{key} or set [data].{key}")

    if data.get("labels") and not data.get("eval"):
        raise DataError(f"{recipe.source}: labels score the eval samples; pass --eval DATA with --labels")
    for s in recipe.steps:
        step = s["step"]
        if step == "validate":
            need("eval", step)
        elif step == "quantize":
            need("calibration", step)
            if s["tolerance"] >= 0:
                need("eval", step, " for its tolerance")
        elif step == "prune" and s["importance"] in ("activation", "obs"):
            need("calibration", step, f" for {s['importance']} importance")
        elif step == "distill" and not data.get("text"):
            need("calibration", step, " (or --text) to train on")
        elif step == "reduce-embeddings" and s["prune_vocab"]:
            need("text", step, " (the corpus) for prune_vocab")
        if step in ("distill", "reduce-embeddings") and data.get("text") and not (data.get("tokenizer") or source.hf):
            need("tokenizer", step, " to read --text")


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
            ort_format: bool = False,
            on_step: Callable[[StepRecord], None] | None = None) -> ConvertResult:
    """Run ``recipe`` on ``source`` into ``outdir``; see the module docstring.

    ``protect`` names further inputs (a targets file) that OUTDIR must not hold. ``ort_format``
    also writes ``model.ort`` and the reduced-build operator config (see :mod:`edgecomp.package`).
    """
    from edgecomp.render.html import write_reports

    given = {"calibration": calibration, "eval": eval_data, "labels": labels, "text": text, "tokenizer": tokenizer}
    data = {k: given[k] or recipe.data.get(k) for k in given}
    out = check_output_dir(outdir, [*data.values(), source.hf, source.spec_file(), recipe.source, *protect], overwrite)
    _check_steps(recipe, data, source)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    with work_dir(out) as work:
        ctx = _Context(source, work, data, target, progress)
        for i, options in enumerate(recipe.steps, start=1):
            rec = StepRecord(i, options["step"], {k: v for k, v in options.items() if k != "step"})
            ctx.records.append(rec)
            t0 = time.perf_counter()
            STEP_RUNNERS[rec.step](ctx, rec)
            rec.seconds = time.perf_counter() - t0
            if rec.model:
                ctx.current = Path(rec.model)
                _measure(rec, data.get("eval") or data.get("calibration"))
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

            feed_src = data.get("eval") or data.get("calibration")
            result.package = package_model(work / "model.onnx", work,
                                           feed=first_feed(feed_src, ctx.current) if feed_src else None)
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
