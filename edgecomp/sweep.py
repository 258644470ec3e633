"""``edgecomp sweep``: evaluate recipe variants in parallel on Ray and report the Pareto front.

A grid ``quantize.method=minmax,percentile gates.min_speedup=1.2,1.5`` expands to the cartesian
product of its values; each variant is a full ``convert`` into ``OUTDIR/variant-NN`` run as a Ray
task (a local Ray instance by default, an existing cluster with ``address``). As each variant
finishes, ``sweep.json`` is rewritten and, if it is the best so far (gates passed first, then
higher accuracy/fidelity, then lower latency), its model is copied to ``OUTDIR/best.onnx`` —
atomically, so an interrupted sweep keeps the best artifact found until then.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

from edgecomp.errors import ConfigError
from edgecomp.io import check_output_dir
from edgecomp.recipe import Recipe, apply_override

__all__ = ["parse_grid", "expand", "run_sweep", "SweepResult"]


def _value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_grid(items: Sequence[str]) -> dict[str, list[Any]]:
    grid = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"bad --grid {item!r}; write STEP.OPTION=V1,V2 (e.g. quantize.method=minmax,mse)")
        grid[key.strip()] = [_value(v) for v in values.split(",")]
    if not grid:
        raise ConfigError("give at least one --grid KEY=V1,V2")
    return grid


def expand(recipe: Recipe, grid: dict[str, list[Any]]) -> list[tuple[dict[str, Any], Recipe]]:
    """Every combination of grid values, validated against the recipe before anything runs."""
    variants = []
    for combo in itertools.product(*grid.values()):
        overrides = dict(zip(grid, combo))
        r = recipe
        for k, v in overrides.items():
            r = apply_override(r, k, v)
        variants.append((overrides, r))
    return variants


@dataclasses.dataclass
class SweepResult:
    outdir: str
    variants: list[dict[str, Any]]  # sorted by variant name, each with "pareto": bool
    best: dict[str, Any] | None
    interrupted: bool = False

    @property
    def pareto(self) -> list[str]:
        return [v["variant"] for v in self.variants if v["pareto"]]


def _variant_summary(index: int, overrides: dict[str, Any], result) -> dict[str, Any]:
    base, final = result.baseline(), result.final()
    use_acc = final.accuracy is not None
    return {"variant": f"variant-{index:02d}", **{k: v for k, v in overrides.items()},
            "latency": final.latency_ratio, "quality": final.accuracy if use_acc else final.cos_mean,
            "quality metric": "accuracy" if use_acc else "cosine", "fp32 quality": base.accuracy if use_acc else 1.0,
            "size MB": final.size_bytes / 1e6, "gates passed": result.passed, "model": result.final_model}


def _better(a: dict[str, Any], b: dict[str, Any] | None) -> bool:
    if b is None:
        return True
    ka = (a["gates passed"], a["quality"] if a["quality"] is not None else -1, -(a["latency"] or 1e9))
    kb = (b["gates passed"], b["quality"] if b["quality"] is not None else -1, -(b["latency"] or 1e9))
    return ka > kb


def _convert_variant(index: int, overrides, recipe, source, outdir, kwargs) -> dict[str, Any]:
    from edgecomp.convert import convert

    res = convert(source, recipe, Path(outdir) / f"variant-{index:02d}", **kwargs)
    return _variant_summary(index, overrides, res)


def run_sweep(source, recipe: Recipe, grid: dict[str, list[Any]], outdir: str | os.PathLike, *,
              address: str | None = None, max_parallel: int = 2, overwrite: bool = False,
              on_result: Callable[[dict[str, Any]], None] | None = None, **convert_kwargs: Any) -> SweepResult:
    from edgecomp.html_report import html_table, tradeoff_svg
    from edgecomp.io import write_json, write_text

    variants = expand(recipe, grid)
    data = [convert_kwargs.get(k) for k in ("calibration", "eval_data", "labels", "text", "tokenizer")]
    out = check_output_dir(outdir, [*data, source.hf, source.spec_file()], overwrite)
    try:
        import ray
    except ImportError as e:
        raise ConfigError("sweep needs Ray: pip install 'edgecomp[sweep]'") from e
    if out.exists():
        shutil.rmtree(out)
    out.mkdir()
    env = {"PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    init = dict(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
                runtime_env={"env_vars": env})
    if address is None:
        init["num_cpus"] = max_parallel
    ray.init(**init)
    task = ray.remote(num_cpus=1, max_retries=0)(_convert_variant)
    kwargs = dict(convert_kwargs, overwrite=False)
    pending = {task.remote(i, ov, r, source, str(out), kwargs): i for i, (ov, r) in enumerate(variants, 1)}
    done: list[dict[str, Any]] = []
    best = None
    interrupted = False
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            index = pending.pop(ref)
            try:
                summary = ray.get(ref)
            except Exception as e:  # one failed variant does not stop the sweep
                cause = getattr(e, "cause", None) or e
                summary = {"variant": f"variant-{index:02d}", **variants[index - 1][0], "error": str(cause).splitlines()[0],
                           "gates passed": False, "quality": None, "latency": None}
            done.append(summary)
            if "error" not in summary and _better(summary, best):
                best = summary
                tmp = out / ".best.onnx.tmp"
                shutil.copyfile(summary["model"], tmp)
                os.replace(tmp, out / "best.onnx")
            _write_sweep(out, done, best, write_json, write_text, html_table, tradeoff_svg)
            if on_result:
                on_result(summary)
    except KeyboardInterrupt:
        interrupted = True
        for ref in pending:
            ray.cancel(ref, force=True)
    finally:
        ray.shutdown()
    return SweepResult(str(out), _marked(done), best, interrupted)


def _marked(done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Variants sorted by name, each marked whether it is on the latency/quality Pareto front."""
    from edgecomp.report import pareto_front

    ok = [d for d in done if d.get("latency") is not None and d.get("quality") is not None]
    front = {ok[i]["variant"] for i in pareto_front([(d["latency"], d["quality"]) for d in ok])}
    return [{**d, "pareto": d["variant"] in front} for d in sorted(done, key=lambda d: d["variant"])]


def _write_sweep(out: Path, done, best, write_json, write_text, html_table, tradeoff_svg) -> None:
    ok = [d for d in done if d.get("latency") is not None and d.get("quality") is not None]
    rows = [{k: v for k, v in d.items() if k != "model"} for d in _marked(done)]
    write_json(out / "sweep.json", {"variants": rows, "best": best})
    svg = tradeoff_svg([{"label": d["variant"], "latency": d["latency"], "quality": d["quality"]} for d in ok],
                       ok[0]["quality metric"] if ok else "quality") or ""
    best_line = f"best so far: {best['variant']} → best.onnx" if best else "no successful variant yet"
    write_text(out / "sweep.html", f"<!doctype html><html><head><meta charset='utf-8'><title>edgecomp sweep</title>"
                                    f"</head><body><h1>edgecomp sweep</h1><p>{best_line}</p>{html_table(rows)}{svg}</body></html>")
