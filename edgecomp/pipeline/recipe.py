"""Recipes: an ordered list of steps with their options, plus acceptance gates.

A recipe is TOML (read with the standard library)::

    description = "int8 CNN for an AVX2 box"
    [data]                      # optional; paths relative to the recipe file
    calibration = "calib.npz"
    [gates]
    max_accuracy_drop = 0.01    # fraction: 0.01 = 1 point (or 1 - cosine for embeddings)
    min_speedup = 1.05          # fp32 latency / final latency
    max_size_mb = 5
    [[steps]]
    step = "export"
    [[steps]]
    step = "quantize"
    method = "percentile"

Each step's options are declared once in :data:`STEP_OPTIONS` (type, default, description);
unknown steps or keys are rejected with the valid ones listed. Built-in recipes ship in
``edgecomp/pipeline/recipes/``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

from edgecomp.errors import ConfigError, InputFileError
from edgecomp.export import DEFAULT_OPSET, HF_TASKS
from edgecomp.graph import compile_patterns
from edgecomp.io import read_toml
from edgecomp.prune.options import IMPORTANCES, KINDS
from edgecomp.quantize.calibration import METHODS
from edgecomp.quantize.options import FAMILIES, METRICS

__all__ = ["Option", "STEP_OPTIONS", "GATES", "DATA_KEYS", "Recipe", "load_recipe", "parse_recipe", "builtin_recipes",
           "apply_override", "BUILTIN_DIR"]

BUILTIN_DIR = Path(__file__).resolve().parent / "recipes"

#: A value check: what is wrong with the value (the text after the option's name, e.g.
#: "must be in (0, 1), got 7.5"), or None when it is fine.
Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One step option: its type(s), default, description, and what values it takes.

    ``choices`` lists the only values allowed (compared as text, so ``weight_bits = 7`` and
    ``"7"`` are the same); ``check`` refuses values out of range. The defaults, including the
    placeholders meaning "unset" (0, -1, ""), pass both.
    """

    type: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    check: Check | None = None

    def __post_init__(self) -> None:
        # The listing (`edgecomp recipes --options`) shows the choices and the range.
        if self.choices:
            listed = " | ".join(str(c) for c in self.choices)
            object.__setattr__(self, "help", f"{listed} ({self.help})" if self.help else listed)
        if getattr(self.check, "text", None):
            object.__setattr__(self, "help", f"{self.help}; {self.check.text}")

    def problem(self, value: Any) -> str | None:
        """What is wrong with an (already type-checked) value, or None."""
        if self.choices is not None and str(value) not in {str(c) for c in self.choices}:
            return f"must be one of {', '.join(str(c) for c in self.choices)}, got {value!r}"
        return self.check(value) if self.check else None


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def _range(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False,
           open_hi: bool = False) -> Check:
    """A check for ``lo <(=) value <(=) hi`` (either bound may be left out)."""
    if lo is not None and hi is not None:
        text = f"must be in {'(' if open_lo else '['}{_num(lo)}, {_num(hi)}{')' if open_hi else ']'}"
    elif lo is not None:
        text = f"must be {'>' if open_lo else '>='} {_num(lo)}"
    else:
        text = f"must be {'<' if open_hi else '<='} {_num(hi)}"

    def check(v: Any) -> str | None:
        ok = ((lo is None or (v > lo if open_lo else v >= lo)) and (hi is None or (v < hi if open_hi else v <= hi)))
        return None if ok else f"{text}, got {v!r}"

    check.text = text
    return check


def _patterns(v: list) -> str | None:
    try:
        compile_patterns(v, "pattern")
    except ConfigError as e:
        return str(e)
    return None


def _kinds(v: list) -> str | None:
    if not v or any(k not in KINDS for k in v):
        return f"must be a non-empty list of {', '.join(KINDS)}, got {v!r}"
    return None


def _families(v: str) -> str | None:
    if v in ("auto", "all") or (v and not set(v.split(",")) - set(FAMILIES)):
        return None
    return f"must be auto, all, or a comma list of {', '.join(FAMILIES)}, got {v!r}"


def _smooth(v: str | float) -> str | None:
    if v in ("auto", "off"):
        return None
    try:
        alpha = float(v)
    except ValueError:
        alpha = math.nan
    return None if 0 < alpha < 1 else f"must be auto, off, or an alpha in (0, 1), got {v!r}"


def _dynamic(v: dict) -> str | None:
    for name, axes in v.items():
        if not isinstance(axes, dict) or not all(
                str(a).isdigit() and isinstance(lbl, str) and lbl for a, lbl in axes.items()):
            return (f"must map input names to {{axis = 'label'}} tables, e.g. {{x = {{0 = 'batch'}}}}; "
                    f"got {name} = {axes!r}")
    return None


def _shapes(v: dict) -> str | None:
    from edgecomp.data import parse_shape
    from edgecomp.errors import DataError

    for name, text in v.items():
        if not isinstance(text, str):
            return f"must map input names to shape text, e.g. {{x = '1x3x224x224'}}; got {name} = {text!r}"
        try:
            parse_shape(text)
        except DataError as e:
            return f"{name}: {e}"
    return None


_SHRINK = re.compile(r"\s*(layers|width)\s*=\s*([0-9.]+)\s*")


def _shrink(v: str) -> str | None:
    # The grammar of edgecomp.distill.students.parse_shrink, which imports torch (seconds at parse time).
    m = _SHRINK.fullmatch(v)
    if v == "":
        return None  # with student = SPEC; the step check refuses neither
    if m:
        try:
            value = float(m.group(2))
        except ValueError:
            value = math.nan
        if (m.group(1) == "layers" and value >= 1 and value == int(value)) or (m.group(1) == "width" and 0 < value < 1):
            return None
    return f"must be layers=N (N >= 1, transformer encoders) or width=W (0 < W < 1, CNNs), got {v!r}"


def _device(v: str) -> str | None:
    # Availability is checked when training starts (edgecomp.distill.trainer.resolve_device imports torch).
    if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        return None
    return f"must be auto, cpu or cuda[:N], got {v!r}"


def _spec(v: str) -> str | None:
    target, sep, attr = v.rpartition(":")
    if v and (not sep or not target or not attr):
        return f"must be a SPEC like package.module:factory or path/to/file.py:factory, got {v!r}"
    if v and target.endswith(".py") and not Path(target).is_file():
        return f"names the file {target}, which does not exist (relative to the working directory)"
    return None


STEP_OPTIONS: dict[str, dict[str, Option]] = {
    "export": {
        "exporter": Option(str, "auto", "", choices=("auto", "dynamo", "torchscript")),
        "opset": Option(int, DEFAULT_OPSET, "ONNX opset", check=_range(7, 30)),
        "dynamic": Option(dict, {}, "input name -> {axis: label}, e.g. {x = {0 = 'batch'}}", check=_dynamic),
        "input": Option(dict, {}, "input name -> shape text when the factory gives no example, e.g. {x = '1x3x224x224'}",
                        check=_shapes),
        "hf_output": Option(str, "embeddings", "for Hugging Face encoders", choices=("embeddings", "hidden")),
        "task": Option(str, "auto", "for Hugging Face folders; auto: from config.json's architectures",
                       choices=("auto", *HF_TASKS)),
        "atol": Option(float, 1e-4, "parity tolerance vs torch", check=_range(0, open_lo=True)),
    },
    "optimize": {
        "fusions": Option(str, "none", "", choices=("none", "bert")),
        "fold_constants": Option(bool, True, "constant and BatchNorm folding"),
    },
    "quantize": {
        "method": Option(str, "minmax", "", choices=METHODS),
        "percentile": Option(float, 99.99, "for method = percentile", check=_range(50, 100, open_lo=True, open_hi=True)),
        "per_channel": Option(bool, True, "per-output-channel weight scales"),
        "weight_bits": Option((str, int), "auto", "auto: from the target's ISA", choices=("auto", 7, 8)),
        "smooth": Option((str, float), "auto", "auto | off | alpha in (0, 1)", check=_smooth),
        "bias_correction": Option(str, "auto", "", choices=("auto", "on", "off")),
        "families": Option(str, "auto", f"auto | all | comma list of {','.join(FAMILIES)}", check=_families),
        "exclude": Option(list, [], "regexes of node names kept float", check=_patterns),
        "embeddings": Option(bool, True, "int8 row-wise embedding tables"),
        "max_samples": Option(int, 0, "calibration samples to use (0: all)", check=_range(0)),
        "metric": Option(str, "cosine", "with tolerance, needs eval data", choices=METRICS),
        "tolerance": Option(float, -1.0, "allowed loss vs fp32; negative: no accuracy-aware fallback"),
    },
    "prune": {
        "sparsity": Option(float, 0.5, "fraction of each group's channels (or heads) removed",
                           check=_range(0, 1, open_lo=True, open_hi=True)),
        "structured": Option(bool, True, "false: unstructured magnitude pruning (no speed-up on CPU)"),
        "importance": Option(str, "auto", "", choices=IMPORTANCES),
        "scope": Option(str, "per-layer", "", choices=("per-layer", "global")),
        "protect": Option(list, [], "regexes of node names kept whole", check=_patterns),
        "round_to": Option(int, 0, "kept channel counts multiple of N (0: auto)", check=_range(0)),
        "kinds": Option(list, list(KINDS), "what structured pruning removes: " + ", ".join(KINDS), check=_kinds),
        "repair": Option(bool, True, "least-squares repair from calibration data"),
        "max_samples": Option(int, 0, "calibration samples for importance/repair (0: all)", check=_range(0)),
    },
    "distill": {
        "shrink": Option(str, "layers=3", "student derived from the teacher: layers=N or width=W ('' with student)",
                         check=_shrink),
        "student": Option(str, "", "student SPEC instead of shrink", check=_spec),
        "epochs": Option(int, 10, "passes over the training data", check=_range(1)),
        "max_steps": Option(int, 0, "stop after this many steps (0: epochs decide)", check=_range(0)),
        "batch_size": Option(int, 32, "samples per step", check=_range(1)),
        "lr": Option(float, 1e-3, "AdamW learning rate", check=_range(0, open_lo=True)),
        "temperature": Option(float, 4.0, "soft-target temperature (logits)", check=_range(0, open_lo=True)),
        "match": Option(str, "cosine", "embeddings", choices=("cosine", "mse")),  # distill.losses.MATCH_KINDS (torch)
        "hidden_weight": Option(float, 0.0, "weight of hidden-state matching", check=_range(0)),
        "held_out": Option(float, 0.1, "fraction held out for early stopping", check=_range(0, 1, open_hi=True)),
        "patience": Option(int, 3, "evaluations without improvement before stopping", check=_range(1)),
        "max_len": Option(int, 128, "token length for text", check=_range(1)),
        "seed": Option(int, 0, "random seed", check=_range(0, 2**32 - 1)),
        "device": Option(str, "auto", "auto (CUDA when torch sees a GPU) | cpu | cuda[:N]", check=_device),
    },
    "reduce-embeddings": {
        "bits": Option(int, 0, "8 or 4: row-wise storage; 0: none", choices=(0, 4, 8)),
        "block": Option(int, 0, "values per scale (0: default)", check=_range(0)),
        "rank": Option(int, 0, "low-rank factorization rank (0: none)", check=_range(0)),
        "energy": Option(float, 0.0, "rank retaining this energy fraction (0: none)", check=_range(0, 1)),
        "exact_rows": Option(int, 2000, "most frequent corpus tokens kept exact", check=_range(0)),
        "prune_vocab": Option(bool, False, "keep only the corpus's tokens (needs text data)"),
    },
    "validate": {
        "k": Option(int, 10, "neighbours for the k-NN agreement of embeddings", check=_range(1)),
    },
    "bench": {
        "runs": Option(int, 50, "timed runs per model (interleaved)", check=_range(1)),
        "warmup": Option(int, 10, "untimed runs per model", check=_range(0)),
        "threads": Option(int, 0, "intra-op threads (0: the target's, else 1)", check=_range(0)),
    },
}

#: What a recipe's [data] table (or convert's options) may name: DATA, labels, text lines, tokenizer folder.
DATA_KEYS = ("calibration", "eval", "labels", "text", "tokenizer")

GATES = {
    "max_accuracy_drop": ("validate", "accuracy (or fidelity) drop of the final model vs fp32, as a fraction"),
    "min_speedup": ("bench", "fp32 latency / final latency"),
    "max_size_mb": (None, "final model file size in MB"),
}
_GATE_CHECKS: dict[str, Check] = {
    "max_accuracy_drop": _range(0, 1),
    "min_speedup": _range(0, open_lo=True),
    "max_size_mb": _range(0, open_lo=True),
}


@dataclasses.dataclass
class Recipe:
    name: str
    description: str
    steps: list[dict[str, Any]]  # each: {"step": name, **options with defaults filled}
    gates: dict[str, float]
    data: dict[str, str]
    source: str

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
    unknown = set(doc) - {"description", "steps", "gates", "data", "name"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; valid: description, data, gates, steps")
    for key in ("name", "description"):
        if not isinstance(doc.get(key, ""), str):
            raise ConfigError(f"{source}: {key} must be a string, got {doc[key]!r}")
    raw_steps = doc.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ConfigError(f"{source}: no [[steps]]; a recipe lists at least one step ({', '.join(STEP_OPTIONS)})")
    steps = [_parse_step(s, i, source) for i, s in enumerate(raw_steps)]
    for table in ("gates", "data"):
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
    return Recipe(doc.get("name", name), doc.get("description", ""), steps, gates, data, source)


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
    """``value`` of the option's type (an int where a float is expected becomes a float), in range."""
    types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
    expected = "/".join(t.__name__ for t in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{where}: {key}: expected {expected}, got a boolean ({str(value).lower()})")
    if not isinstance(value, types):
        raise ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {key} must be a finite number, got {value!r}")
    problem = opt.problem(value)
    if problem:
        raise ConfigError(f"{where}: {key} {problem}")
    return value


def _check_step(step: dict[str, Any], where: str) -> None:
    """What one option alone cannot say: combinations that the step would refuse when it runs."""
    kind = step["step"]
    if kind == "distill" and not step["student"] and not step["shrink"]:
        raise ConfigError(f"{where}: give shrink (e.g. layers=3) or student = SPEC")
    if kind == "reduce-embeddings":
        if step["rank"] and step["energy"]:
            raise ConfigError(f"{where}: give rank or energy, not both (got rank = {step['rank']}, "
                              f"energy = {step['energy']:g})")
        if not (step["bits"] or step["rank"] or step["energy"] or step["prune_vocab"]):
            raise ConfigError(f"{where}: nothing to do; set bits, rank, energy or prune_vocab")


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
    return out
