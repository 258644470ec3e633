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
``edgecomp/recipes/``.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from edgecomp.errors import ConfigError
from edgecomp.export import DEFAULT_OPSET

__all__ = ["Option", "STEP_OPTIONS", "GATES", "DATA_KEYS", "Recipe", "load_recipe", "parse_recipe", "builtin_recipes",
           "apply_override", "BUILTIN_DIR"]

BUILTIN_DIR = Path(__file__).resolve().parent / "recipes"


@dataclasses.dataclass(frozen=True)
class Option:
    type: type | tuple[type, ...]
    default: Any
    help: str


STEP_OPTIONS: dict[str, dict[str, Option]] = {
    "export": {
        "exporter": Option(str, "auto", "auto | dynamo | torchscript"),
        "opset": Option(int, DEFAULT_OPSET, "ONNX opset"),
        "dynamic": Option(dict, {}, "input name -> {axis: label}, e.g. {x = {0 = 'batch'}}"),
        "input": Option(dict, {}, "input name -> shape text when the factory gives no example, e.g. {x = '1x3x224x224'}"),
        "hf_output": Option(str, "embeddings", "embeddings | hidden (for Hugging Face encoders)"),
        "atol": Option(float, 1e-4, "parity tolerance vs torch"),
    },
    "optimize": {
        "fusions": Option(str, "none", "none | bert"),
        "fold_constants": Option(bool, True, "constant and BatchNorm folding"),
    },
    "quantize": {
        "method": Option(str, "minmax", "minmax | percentile | entropy | mse"),
        "percentile": Option(float, 99.99, "for method = percentile"),
        "per_channel": Option(bool, True, "per-output-channel weight scales"),
        "weight_bits": Option((str, int), "auto", "auto | 7 | 8"),
        "smooth": Option((str, float), "auto", "auto | off | alpha"),
        "bias_correction": Option(str, "auto", "auto | on | off"),
        "families": Option(str, "auto", "auto | all | comma list of matmul,conv,conv-depthwise"),
        "exclude": Option(list, [], "regexes of node names kept float"),
        "embeddings": Option(bool, True, "int8 row-wise embedding tables"),
        "max_samples": Option(int, 0, "calibration samples to use (0: all)"),
        "metric": Option(str, "cosine", "cosine | top1 | mae (with tolerance, needs eval data)"),
        "tolerance": Option(float, -1.0, "allowed loss vs fp32; negative: no accuracy-aware fallback"),
    },
    "prune": {
        "sparsity": Option(float, 0.5, "fraction of each group's channels (or heads) removed"),
        "structured": Option(bool, True, "false: unstructured magnitude pruning (no speed-up on CPU)"),
        "importance": Option(str, "auto", "auto | l1 | l2 | activation | obs"),
        "scope": Option(str, "per-layer", "per-layer | global"),
        "protect": Option(list, [], "regexes of node names kept whole"),
        "round_to": Option(int, 0, "kept channel counts multiple of N (0: auto)"),
        "kinds": Option(list, ["channels", "heads"], "what structured pruning removes"),
        "repair": Option(bool, True, "least-squares repair from calibration data"),
        "max_samples": Option(int, 0, "calibration samples for importance/repair (0: all)"),
    },
    "distill": {
        "shrink": Option(str, "layers=3", "student derived from the teacher: layers=N or width=W ('' with student)"),
        "student": Option(str, "", "student SPEC instead of shrink"),
        "epochs": Option(int, 10, "passes over the training data"),
        "max_steps": Option(int, 0, "stop after this many steps (0: epochs decide)"),
        "batch_size": Option(int, 32, "samples per step"),
        "lr": Option(float, 1e-3, "AdamW learning rate"),
        "temperature": Option(float, 4.0, "soft-target temperature (logits)"),
        "match": Option(str, "cosine", "cosine | mse (embeddings)"),
        "hidden_weight": Option(float, 0.0, "weight of hidden-state matching"),
        "held_out": Option(float, 0.1, "fraction held out for early stopping"),
        "patience": Option(int, 3, "evaluations without improvement before stopping"),
        "max_len": Option(int, 128, "token length for text"),
        "seed": Option(int, 0, "random seed"),
    },
    "reduce-embeddings": {
        "bits": Option(int, 0, "8 or 4: row-wise storage (0: none)"),
        "block": Option(int, 0, "values per scale (0: default)"),
        "rank": Option(int, 0, "low-rank factorization rank (0: none)"),
        "energy": Option(float, 0.0, "rank retaining this energy fraction (0: none)"),
        "exact_rows": Option(int, 2000, "most frequent corpus tokens kept exact"),
        "prune_vocab": Option(bool, False, "keep only the corpus's tokens (needs text data)"),
    },
    "validate": {
        "k": Option(int, 10, "neighbours for the k-NN agreement of embeddings"),
    },
    "bench": {
        "runs": Option(int, 50, "timed runs per model (interleaved)"),
        "warmup": Option(int, 10, "untimed runs per model"),
        "threads": Option(int, 0, "intra-op threads (0: the target's, else 1)"),
    },
}

#: What a recipe's [data] table (or convert's options) may name: DATA, labels, text lines, tokenizer folder.
DATA_KEYS = ("calibration", "eval", "labels", "text", "tokenizer")

GATES = {
    "max_accuracy_drop": ("validate", "accuracy (or fidelity) drop of the final model vs fp32, as a fraction"),
    "min_speedup": ("bench", "fp32 latency / final latency"),
    "max_size_mb": (None, "final model file size in MB"),
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
    """A built-in recipe by name, or a TOML file."""
    p = Path(name_or_path)
    builtins = builtin_recipes()
    if not p.exists() and str(name_or_path) in builtins:
        p = builtins[str(name_or_path)]
    if not p.is_file():
        raise ConfigError(f"recipe {name_or_path!r} is neither a file nor a built-in recipe "
                          f"({', '.join(builtins)}); see `edgecomp recipes`")
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    return parse_recipe(doc, name=p.stem, source=str(p), base=p.parent)


def parse_recipe(doc: dict[str, Any], name: str = "recipe", source: str = "<recipe>", base: Path | None = None) -> Recipe:
    unknown = set(doc) - {"description", "steps", "gates", "data", "name"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key(s) {sorted(unknown)}; valid: description, data, gates, steps")
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
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise ConfigError(f"{source}: gate {g} must be a number, got {v!r}")
        needs = GATES[g][0]
        if needs and needs not in [s["step"] for s in steps]:
            raise ConfigError(f"{source}: gate {g} needs a '{needs}' step, which the recipe does not have")
    data = {}
    for k, v in doc.get("data", {}).items():
        if k not in DATA_KEYS:
            raise ConfigError(f"{source}: unknown [data] key {k!r}; valid: {', '.join(DATA_KEYS)}")
        if not isinstance(v, str):
            raise ConfigError(f"{source}: [data] {k} must be a path string, got {v!r}")
        data[k] = str((base / v) if base and not Path(v).is_absolute() else v)
    return Recipe(doc.get("name", name), doc.get("description", ""), steps, gates, data, source)


def _parse_step(raw: Any, index: int, source: str) -> dict[str, Any]:
    where = f"{source}: step {index + 1}"
    if not isinstance(raw, dict) or "step" not in raw:
        raise ConfigError(f"{where}: each [[steps]] entry needs step = \"NAME\" ({', '.join(STEP_OPTIONS)})")
    kind = raw["step"]
    if kind not in STEP_OPTIONS:
        raise ConfigError(f"{where}: unknown step {kind!r}; valid steps: {', '.join(STEP_OPTIONS)}")
    spec = STEP_OPTIONS[kind]
    step = {"step": kind}
    for key, value in raw.items():
        if key == "step":
            continue
        if key not in spec:
            raise ConfigError(f"{where} ({kind}): unknown key {key!r}; valid keys: {', '.join(spec) or 'none'}")
        step[key] = _coerce(value, spec[key], f"{where} ({kind}).{key}")
    for key, opt in spec.items():
        step.setdefault(key, copy.deepcopy(opt.default))
    return step


def _coerce(value: Any, opt: Option, where: str) -> Any:
    types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, bool) and bool not in types:
        raise ConfigError(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got a boolean")
    if not isinstance(value, types):
        raise ConfigError(f"{where}: expected {'/'.join(t.__name__ for t in types)}, got {value!r}")
    return value


def apply_override(recipe: Recipe, key: str, value: Any) -> Recipe:
    """A copy with ``STEP.option = value`` set on every step of that kind (``quantize.method``)
    or a gate (``gates.min_speedup``)."""
    out = copy.deepcopy(recipe)
    head, _, opt = key.partition(".")
    if not opt:
        raise ConfigError(f"bad --grid key {key!r}; write STEP.OPTION (e.g. quantize.method) or gates.NAME")
    if head == "gates":
        if opt not in GATES:
            raise ConfigError(f"unknown gate {opt!r}; valid gates: {', '.join(GATES)}")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"--grid {key}: gate values must be numbers, got {value!r}")
        out.gates[opt] = float(value)
        return out
    if head not in STEP_OPTIONS:
        raise ConfigError(f"--grid key {key!r}: unknown step {head!r}; valid steps: {', '.join(STEP_OPTIONS)}")
    if opt not in STEP_OPTIONS[head]:
        raise ConfigError(f"--grid key {key!r}: unknown option; valid: {', '.join(STEP_OPTIONS[head])}")
    hits = [s for s in out.steps if s["step"] == head]
    if not hits:
        raise ConfigError(f"--grid key {key!r}: the recipe has no {head} step")
    for s in hits:
        s[opt] = _coerce(value, STEP_OPTIONS[head][opt], key)
    return out
