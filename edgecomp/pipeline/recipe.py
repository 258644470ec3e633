"""Recipes: an ordered list of steps with their options, plus acceptance gates.

A recipe is TOML (read with the standard library)::

    description = "int8 CNN for an AVX2 box"
    [data]                      # optional; paths relative to the recipe file
    calibration = "calib.npz"
    [values]                    # optional: inputs every deployment feeds the same (--value)
    sr = 16000
    [gates]
    max_accuracy_drop = 0.01    # fraction: 0.01 = 1 point (or 1 - cosine for embeddings)
    min_speedup = 1.05          # fp32 latency / final latency
    max_size_mb = 5
    [[steps]]
    step = "export"
    [[steps]]
    step = "quantize"
    method = "percentile"

Each step's options are the capability's own declarations (:mod:`edgecomp.options`, also behind
its CLI command), collected in :data:`STEP_OPTIONS`;
unknown steps or keys are rejected with the valid ones listed. Built-in recipes ship in
``edgecomp/pipeline/recipes/``.

``[values]`` fixes model inputs for every step after the export, as ``--value`` does for one
command (:class:`~edgecomp.passes.specialize_inputs.SpecializeInputsPass`): the exported model
stays the baseline, every later model is specialized (Ifs on those inputs inlined, guarded).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from pathlib import Path
from typing import Any

from edgecomp.distill.options import OPTIONS as DISTILL_OPTIONS
from edgecomp.embeddings.options import OPTIONS as EMBEDDING_OPTIONS
from edgecomp.embeddings.options import ReduceOptions
from edgecomp.errors import ConfigError, InputFileError, OptionError
from edgecomp.export.options import OPTIONS as EXPORT_OPTIONS
from edgecomp.finetune.options import DATA_NEEDED as FINETUNE_DATA_NEEDED
from edgecomp.finetune.options import OPTIONS as FINETUNE_OPTIONS
from edgecomp.paths import MAX_TOML_DEPTH, nesting_exceeds, read_toml
from edgecomp.measure.options import BENCH_OPTIONS, VALIDATE_DATA_NEEDED, VALIDATE_OPTIONS
from edgecomp.options import Option, coerce, in_range
from edgecomp.passes.options import OPTIONS as OPTIMIZE_OPTIONS
from edgecomp.prune.options import OPTIONS as PRUNE_OPTIONS
from edgecomp.quantize.options import DATA_NEEDED as QUANTIZE_DATA_NEEDED
from edgecomp.quantize.options import OPTIONS as QUANTIZE_OPTIONS

__all__ = ["Source", "STEP_OPTIONS", "STEP_DATA_NEEDED", "GATES", "DATA_KEYS", "Recipe", "load_recipe", "parse_recipe", "builtin_recipes",
           "apply_override", "BUILTIN_DIR"]

BUILTIN_DIR = Path(__file__).resolve().parent / "recipes"


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


def _step(options) -> dict[str, Option]:
    return {o.name: o for o in options}


#: Each step's options: the capability's own declarations (also the CLI's options).
STEP_OPTIONS: dict[str, dict[str, Option]] = {
    "export": _step(EXPORT_OPTIONS),
    "optimize": _step(OPTIMIZE_OPTIONS),
    "quantize": _step(QUANTIZE_OPTIONS),
    "prune": _step(PRUNE_OPTIONS),
    "distill": _step(DISTILL_OPTIONS),
    "finetune": _step(FINETUNE_OPTIONS),
    "reduce-embeddings": _step(EMBEDDING_OPTIONS),
    "validate": _step(VALIDATE_OPTIONS),
    "bench": _step(BENCH_OPTIONS),
}

#: The data a step reads whatever its options (key -> what reads it): the capability's own
#: declaration, which its ``run`` and the CLI check too; what option values need is in ``Option.needs``.
STEP_DATA_NEEDED: dict[str, dict[str, str]] = {"quantize": QUANTIZE_DATA_NEEDED, "validate": VALIDATE_DATA_NEEDED,
                                                "finetune": FINETUNE_DATA_NEEDED}

#: What a recipe's [data] table (or convert's options) may name: DATA, labels, text lines, tokenizer folder.
DATA_KEYS = ("calibration", "eval", "labels", "text", "tokenizer", "train_labels")

GATES = {
    "max_accuracy_drop": ("validate", "accuracy (or fidelity) drop of the final model vs fp32, as a fraction"),
    "min_speedup": ("bench", "fp32 latency / final latency"),
    "max_size_mb": (None, "final model file size in MB"),
}
_GATE_CHECKS = {
    "max_accuracy_drop": in_range(0, 1),
    "min_speedup": in_range(0, open_lo=True),
    "max_size_mb": in_range(0, open_lo=True),
}


@dataclasses.dataclass
class Recipe:
    name: str
    description: str
    steps: list[dict[str, Any]]  # each: {"step": name, **options with defaults filled}
    gates: dict[str, float]
    data: dict[str, str]
    source: str
    values: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # [values]: inputs fixed after export

    def step_names(self) -> list[str]:
        return [s["step"] for s in self.steps]


def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.toml"))}


def load_recipe(name_or_path: str | os.PathLike) -> Recipe:
    """A built-in recipe by name, or a TOML file; every value is checked here, before anything runs."""
    p = Path(name_or_path)
    builtins = builtin_recipes()
    if not p.exists() and str(name_or_path) in builtins:
        p = builtins[str(name_or_path)]
    if p.is_dir():
        raise InputFileError(f"recipe {p} is a directory; give a recipe TOML file or a built-in recipe name")
    if not p.exists():
        raise ConfigError(f"recipe {str(name_or_path)!r} is neither a file nor a built-in recipe "
                          f"({', '.join(builtins)}); see `edgecomp recipes`")
    doc = read_toml(p, "recipe")
    return parse_recipe(doc, name=p.stem, source=str(p), base=p.parent)


def parse_recipe(doc: dict[str, Any], name: str = "recipe", source: str = "<recipe>", base: Path | None = None) -> Recipe:
    """Check a parsed recipe document: steps, option types and values, gates, [data] paths."""
    if nesting_exceeds(doc, MAX_TOML_DEPTH):  # a document built in Python, not read by read_toml
        raise ConfigError(f"{source}: tables and arrays nested more than {MAX_TOML_DEPTH} levels deep; "
                          "a recipe nests a few levels (steps, a step, an option's list)")
    unknown = set(doc) - {"description", "steps", "gates", "data", "name", "values"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; valid: description, data, values, "
                          "gates, steps")
    for key in ("name", "description"):
        if not isinstance(doc.get(key, ""), str):
            raise ConfigError(f"{source}: {key} must be a string, got {doc[key]!r}")
    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{source}: no [[steps]]; a recipe lists at least one step ({', '.join(STEP_OPTIONS)})")
    steps = [_parse_step(s, i, source) for i, s in enumerate(raw_steps)]
    _check_students(steps, source)
    for table in ("gates", "data", "values"):
        if not isinstance(doc.get(table, {}), dict):
            raise ConfigError(f"{source}: {table} must be a table ([{table}] with key = value lines)")
    gates = dict(doc.get("gates", {}))
    for g, v in gates.items():
        if g not in GATES:
            raise ConfigError(f"{source}: unknown gate {g!r}; valid gates: {', '.join(GATES)}")
        _check_gate(g, v, source)
        needs = GATES[g][0]
        if needs and needs not in [s["step"] for s in steps]:
            raise ConfigError(f"{source}: gate {g} needs a '{needs}' step, which the recipe does not have")
    data = {}
    for k, v in doc.get("data", {}).items():
        if k not in DATA_KEYS:
            raise ConfigError(f"{source}: unknown [data] key {k!r}; valid: {', '.join(DATA_KEYS)}")
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{source}: [data] {k} must be a path string, got {v!r}")
        path = (base / v) if base and not Path(v).is_absolute() else Path(v)
        if not path.exists():
            where = f" (relative to the recipe's folder {base})" if base and not Path(v).is_absolute() else ""
            raise InputFileError(f"{source}: [data] {k} = {v!r}: {path} does not exist{where}; "
                                 f"fix the path or give --{k} instead")
        data[k] = str(path)
    return Recipe(doc.get("name", name), doc.get("description", ""), steps, gates, data, source,
                  {k: _fixed_value(k, v, source) for k, v in doc.get("values", {}).items()})


def _fixed_value(name: str, value: Any, where: str) -> list[float]:
    """A [values] entry: a number (or bool), or a non-empty list of them."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(x, (int, float)) and (isinstance(x, bool) or math.isfinite(x)) for x in items):
        raise ConfigError(f"{where}: [values] {name} must be a finite number or a list of numbers, got {value!r}")
    return [float(x) for x in items]


def _check_gate(gate: str, value: Any, where: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ConfigError(f"{where}: gate {gate} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{where}: gate {gate} must be a finite number, got {value!r}")
    problem = _GATE_CHECKS[gate](value)
    if problem:
        raise ConfigError(f"{where}: gate {gate} {problem}")


def _parse_step(raw: Any, index: int, source: str) -> dict[str, Any]:
    where = f"{source}: step {index + 1}"
    if not isinstance(raw, dict) or "step" not in raw:
        raise ConfigError(f"{where}: each [[steps]] entry needs step = \"NAME\" ({', '.join(STEP_OPTIONS)})")
    kind = raw["step"]
    if not isinstance(kind, str) or kind not in STEP_OPTIONS:
        raise ConfigError(f"{where}: unknown step {kind!r}; valid steps: {', '.join(STEP_OPTIONS)}")
    spec = STEP_OPTIONS[kind]
    where = f"{where} ({kind})"
    step = {"step": kind}
    for key, value in raw.items():
        if key == "step":
            continue
        if key not in spec:
            raise ConfigError(f"{where}: unknown key {key!r}; valid keys: {', '.join(spec) or 'none'}")
        step[key] = _coerce(value, spec[key], where, key)
    for key, opt in spec.items():
        step.setdefault(key, copy.deepcopy(opt.default))
    _check_step(step, where)
    return step


def _coerce(value: Any, opt: Option, where: str, key: str) -> Any:
    """``value`` checked as the option declares (see :func:`edgecomp.options.coerce`), named as a recipe key."""
    try:
        return coerce(opt, value)
    except OptionError as e:
        sep = ":" if e.problem.startswith("expected") else ""
        raise ConfigError(f"{where}: {key}{sep} {e.problem}") from None


def _check_step(step: dict[str, Any], where: str) -> None:
    """What one option alone cannot say: combinations that the step would refuse when it runs."""
    kind = step["step"]
    if kind == "reduce-embeddings":
        opts = ReduceOptions(**{k: v for k, v in step.items() if k != "step"})
        try:
            opts.validate()
        except OptionError as e:
            raise ConfigError(f"{where}: {e}") from None
        if not (opts.bits or opts.rank or opts.energy or opts.prune_vocab):
            raise ConfigError(f"{where}: nothing to do; set bits, rank, energy or prune_vocab")


def _check_students(steps: list[dict[str, Any]], source: str) -> None:
    """A distill step after a prune step heals the pruned model against the model before the prune
    (no shrink or student); elsewhere it needs shrink or student (one of them)."""
    pruned = False
    for i, s in enumerate(steps, start=1):
        pruned = pruned or s["step"] == "prune"
        if s["step"] != "distill":
            continue
        where = f"{source}: step {i} (distill)"
        if pruned and (s["student"] or s["shrink"]):
            raise ConfigError(f"{where}: after a prune step distill trains the pruned model against the unpruned one; "
                              "drop shrink and student")
        if not pruned and bool(s["student"]) == bool(s["shrink"]):
            raise ConfigError(f"{where}: give shrink (e.g. layers=3) or student = SPEC or .onnx file (one of them), "
                              "or put distill after a prune step to heal the pruned model")


def apply_override(recipe: Recipe, key: str, value: Any) -> Recipe:
    """A copy with ``STEP.option = value`` set on every step of that kind (``quantize.method``)
    or a gate (``gates.min_speedup``), checked as a recipe value is."""
    out = copy.deepcopy(recipe)
    head, _, opt = key.partition(".")
    if not opt:
        raise ConfigError(f"bad --grid key {key!r}; write STEP.OPTION (e.g. quantize.method) or gates.NAME")
    if head == "gates":
        if opt not in GATES:
            raise ConfigError(f"unknown gate {opt!r}; valid gates: {', '.join(GATES)}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"--grid {key}: gate values must be numbers, got {value!r}")
        _check_gate(opt, value, f"{recipe.source}: --grid {key}")
        needs = GATES[opt][0]
        if needs and needs not in recipe.step_names():
            raise ConfigError(f"--grid key {key!r}: gate {opt} needs a '{needs}' step, which the recipe does not have")
        out.gates[opt] = float(value)
        return out
    if head not in STEP_OPTIONS:
        raise ConfigError(f"--grid key {key!r}: unknown step {head!r}; valid steps: {', '.join(STEP_OPTIONS)}")
    if opt not in STEP_OPTIONS[head]:
        raise ConfigError(f"--grid key {key!r}: unknown option; valid: {', '.join(STEP_OPTIONS[head])}")
    hits = [(i, s) for i, s in enumerate(out.steps, 1) if s["step"] == head]
    if not hits:
        raise ConfigError(f"--grid key {key!r}: the recipe has no {head} step")
    for i, s in hits:
        where = f"{recipe.source}: step {i} ({head})"
        s[opt] = _coerce(value, STEP_OPTIONS[head][opt], f"{where} with --grid", opt)
        _check_step(s, f"{where} with --grid {key}={value!r}")
    _check_students(out.steps, f"{recipe.source} with --grid {key}={value!r}")
    return out
