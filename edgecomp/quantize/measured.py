"""Measured target tables: int8-vs-float latency per op family, measured once, decided from many times.

``edgecomp targets measure PROFILE --model M --targets-file F`` builds M's int8 plan (calibrated on
``--data`` DATA, else on one synthesized feed: the scales do not change the speed), then
times the float model against M with each op family (matmul, conv, depthwise conv, attention: M's
own layers and shapes) in int8, alone and in every combination (families interact: a lone int8
family pays quantize/dequantize at its borders), interleaved, in at least :data:`MIN_ROUNDS` and up to
:data:`MAX_ROUNDS` rounds of about a third of a second each
(:func:`edgecomp.measure.bench.compare_latency`: each round's ratio of medians, a Student-t 95%
interval over the rounds; on the profile's device when it has ``remote = ssh://...``, through
:func:`edgecomp.remote.measure.compare_on_device`, the rounds sized by the device's own speed), and stores per family the ratio, its interval, the rounds and the layers
measured under ``[measured.PROFILE.families."KEY"]`` (KEY: the combination, e.g. ``conv,matmul``) in F, with the date, CPU, ISA, onnxruntime version and
threads. F is rewritten atomically with tomlkit, which keeps the user's other tables and comments.

``quantize --families auto --target PROFILE --targets-file F`` (or no ``--target``: the table
measured for ``host``) then decides from the table with the same rule as the in-command timing
(:func:`edgecomp.quantize.families.choose_families`): the fastest stored combination of the
families the model has is int8 when its interval lies below 1.0 and its ratio is at most 0.97. No timing happens at decision time, so the same
command gives the same model on a busy or an idle machine; the family table says which evidence
was used. A family the table lacks stays float (the row says to measure a model that has it).
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import tempfile
import time
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.errors import ConfigError

__all__ = [
    "MAX_ROUNDS",
    "MIN_ROUNDS",
    "FamilyRatio",
    "MeasuredTable",
    "cpu_name",
    "decide_from_table",
    "measure_table",
    "read_table",
    "table_for",
    "write_table",
]

MIN_ROUNDS, MAX_ROUNDS = 8, 30
MIN_RUNS, MAX_RUNS = 9, 300  # runs per round (a median of fewer is itself noisy)
ROUND_SECONDS = 0.35
GAIN = 0.97  # the same threshold as the in-command choice


@dataclasses.dataclass
class FamilyRatio:
    ratio: float  # int8 latency over float, the model with this family alone in int8
    low: float
    high: float
    rounds: int
    layers: list[str]  # "N x Op x[act shape] w[weight shape]" of the layers measured

    def text(self) -> str:
        return f"{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}] over {self.rounds} rounds"


@dataclasses.dataclass
class MeasuredTable:
    profile: str
    date: str
    cpu: str
    isa: str
    onnxruntime: str
    threads: int
    model: str
    families: dict[str, FamilyRatio]

    def describe(self) -> str:
        return (f"measured table [measured.{self.profile}] of {self.date} ({self.cpu}, onnxruntime "
                f"{self.onnxruntime}, {self.threads} thread(s), model {self.model})")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def decide_from_table(table: MeasuredTable, present: list[str]) -> tuple[set[str], list[dict[str, Any]]]:
    """The families to make int8 by the stored ratios: the fastest stored combination of families
    the model has, when its interval lies below 1.0 and its ratio is at most 0.97; a row per
    stored combination that applies, and one per family no stored combination covers."""
    usable = {k: r for k, r in table.families.items() if set(k.split(",")) <= set(present)}
    best = min(usable, key=lambda k: usable[k].ratio) if usable else None
    win = best is not None and usable[best].high < 1.0 and usable[best].ratio <= GAIN
    rows = []
    for k, r in usable.items():
        reason = ""
        if k == best:
            reason = ("the fastest stored combination, faster than float beyond noise" if win else
                      f"no stored combination is >= {round((1 - GAIN) * 100)}% faster beyond noise: all float")
        rows.append({"families": k, "latency ratio int8/float": r.ratio, "95% interval": f"[{r.low:.3f}, {r.high:.3f}]",
                     "rounds": r.rounds, "decision": "chosen" if (win and k == best) else "-", "reason": reason,
                     "evidence": table.describe()})
    covered = {f for k in usable for f in k.split(",")}
    rows += [{"families": f, "decision": "-", "evidence": table.describe(),
              "reason": f"not in the table: run `edgecomp targets measure {table.profile}` on a model with {f} layers"}
             for f in present if f not in covered]
    return (set(best.split(",")) if win else set()), rows


def measure_table(model_path: str | os.PathLike, profile: str, threads: int = 1,
                  calibration: str | os.PathLike | None = None, fmt: str = "contrib", device=None,
                  isa: str | None = None) -> MeasuredTable:
    """Time each op family combination of the model in int8 against float on this host, or on
    ``device`` (an :class:`edgecomp.remote.device.Device`; ``isa``: the profile's ISA, stored with
    the table) (see the module)."""
    import onnxruntime as ort

    from edgecomp.data import Dataset, image_size_hint, input_specs, synthesize_feed
    from edgecomp.errors import PassFailed
    from edgecomp.io import load_model
    from edgecomp.passes.base import run_pass
    from edgecomp.passes.optimize_graph import OptimizeGraphPass
    from edgecomp.passes.upgrade_opset import UpgradeOpsetPass
    from edgecomp.quantize.calibration import calibrate
    from edgecomp.quantize.layers import family_of, find_layers, no_layer_message
    from edgecomp.quantize.options import FAMILIES, MIN_OPSET, OPSET_REASON, QuantizeOptions
    from edgecomp.quantize.plan import build, make_plan
    from edgecomp.targets import host_isa

    model = load_model(model_path)
    opts = QuantizeOptions(format=fmt, threads=threads, min_cosine=None)
    run_pass(UpgradeOpsetPass(min_opset=MIN_OPSET, reason=OPSET_REASON), model)
    run_pass(OptimizeGraphPass(), model)
    ir.passes.common.NameFixPass()(model)
    layers, skipped = find_layers(model)
    if not layers:
        raise PassFailed(no_layer_message(model, skipped, []))
    specs = input_specs(model)
    with tempfile.TemporaryDirectory() as tmp:
        if calibration is None:  # the scales do not change the speed: one synthesized feed calibrates
            calibration = Path(tmp) / "feed.npz"
            feed0 = synthesize_feed(specs, None, image_size=image_size_hint(model))
            np.savez(calibration, **feed0)  # the batch axis is the sample axis
        data = Dataset(calibration)
        data.check_against(specs)
        stats = calibrate(model, layers, data, opts)  # the qdq form as written by default: no node units
        plan, _ = make_plan(model, layers, stats, opts, data)
        feed = next(iter(data.feeds_for(specs)))
    present = [f for f in FAMILIES if any(l.family == f for l in layers)]
    # every combination, as the in-command choice does: families interact (a lone int8 family pays
    # quantize/dequantize at its borders, which int8 neighbours share), so a table of lone families
    # can call each one slower while all of them together are faster, or the reverse
    combos = [c for k in range(1, len(present) + 1) for c in combinations(present, k)]
    variants = [build(model, {n: p for n, p in plan.items() if family_of(layers, n) in c}, format=fmt) for c in combos]
    keys = [",".join(c) for c in combos]
    if device is not None:  # the profile's device: its own runs size the rounds and time them
        from edgecomp.remote.measure import compare_on_device

        est = compare_on_device(device, [model, *variants], feed, threads=threads, round_seconds=ROUND_SECONDS,
                                min_rounds=MIN_ROUNDS, max_rounds=MAX_ROUNDS, min_runs=MIN_RUNS, max_runs=MAX_RUNS,
                                labels=["float", *keys])
        info = device.probe()
        cpu, ort_version = info.cpu or info.machine, info.onnxruntime
    else:
        est = _compare_here(model, variants, feed, threads, keys)
        cpu, ort_version = cpu_name(), ort.__version__
    families = {k: FamilyRatio(e.ratio, e.low, e.high, e.rounds, _layer_texts(model, [l for l in layers if l.family in c]))
                for k, c, e in zip(keys, combos, est)}
    return MeasuredTable(profile, datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                         cpu, isa or host_isa().describe(), ort_version, threads, Path(model_path).name, families)


def _compare_here(model: ir.Model, variants: list[ir.Model], feed, threads: int, keys: list[str]):
    """:func:`edgecomp.measure.bench.compare_latency` of the variants against float on this host."""
    from edgecomp.measure import bench  # looked up at call time: tests inject a fake clock there
    from edgecomp.runtime import make_session, run_feed

    session = make_session(model, threads=threads)
    run_feed(session, feed)
    t0 = time.perf_counter()
    run_feed(session, feed)
    one = max(time.perf_counter() - t0, 1e-5)
    del session
    runs = int(np.clip(ROUND_SECONDS / (one * (1 + len(variants))), MIN_RUNS, MAX_RUNS))
    return bench.compare_latency([model, *variants], feed, threads=threads, runs_per_round=runs,
                                 min_rounds=MIN_ROUNDS, max_rounds=MAX_ROUNDS, labels=["float", *keys])


def _layer_texts(model: ir.Model, layers) -> list[str]:
    """``"N x Op x[act shape] w[weight shape]"`` per distinct layer shape (the table stays short)."""
    from collections import Counter

    nodes = {n.name: n for n in model.graph}
    counts: Counter[str] = Counter()
    for layer in layers:
        node = nodes[layer.node]
        act = node.inputs[0].shape if node.inputs[0] is not None else None
        w = node.inputs[1] if len(node.inputs) > 1 else None
        weight = f" w{_dims(w.shape)}" if (w is not None and w.const_value is not None) else ""
        counts[f"{layer.op} x{_dims(act)}{weight}"] += 1
    return [f"{n} x {text}" for text, n in counts.items()]


def _dims(shape) -> str:
    return "[?]" if shape is None else "[" + ", ".join(str(d) for d in shape) + "]"


def read_table(path: str | os.PathLike, profile: str) -> MeasuredTable | None:
    """The table stored for ``profile`` in the targets file (None when it has none)."""
    from edgecomp.paths import read_toml

    doc = read_toml(path, "target profile file").get("measured", {})
    t = doc.get(profile) if isinstance(doc, dict) else None
    if t is None:
        return None
    where = f"{path}: [measured.{profile}]"
    try:
        fams = {f: FamilyRatio(float(v["ratio"]), float(v["low"]), float(v["high"]), int(v["rounds"]),
                               [str(s) for s in v.get("layers", [])]) for f, v in t["families"].items()}
        return MeasuredTable(profile, str(t["date"]), str(t["cpu"]), str(t["isa"]), str(t["onnxruntime"]),
                             int(t["threads"]), str(t["model"]), fams)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ConfigError(f"{where} is not a table `edgecomp targets measure` wrote ({type(e).__name__}: {e}); "
                          "measure again") from None


def table_for(path: str | os.PathLike, profile: str | None) -> tuple[MeasuredTable | None, str | None]:
    """The table that decides families auto for ``profile`` (``host`` when None) in the targets
    file, and a warning when a ``host`` table was measured on another CPU or onnxruntime than
    this host's (a device's table is the device's: nothing here to compare it with)."""
    import onnxruntime as ort

    name = profile or "host"
    table = read_table(path, name)
    if table is None or name != "host" or (table.onnxruntime, table.cpu) == (ort.__version__, cpu_name()):
        return table, None
    return table, (f"the {table.describe()} was measured on another CPU or onnxruntime (this host: {cpu_name()}, "
                   f"onnxruntime {ort.__version__}); run `edgecomp targets measure host` again")


def write_table(path: str | os.PathLike, table: MeasuredTable) -> Path:
    """Store ``table`` as ``[measured.PROFILE]`` in the targets file, atomically, keeping every other
    table and comment (tomlkit edits the document in place); a missing file is created."""
    import tomlkit

    from edgecomp.io import write_text

    p = Path(path)
    doc = tomlkit.parse(p.read_text(encoding="utf-8")) if p.exists() else tomlkit.document()
    measured = doc.get("measured")
    if measured is None:
        measured = tomlkit.table(is_super_table=True)
        doc["measured"] = measured
    entry = tomlkit.table()
    for key in ("date", "cpu", "isa", "onnxruntime", "threads", "model"):
        entry[key] = getattr(table, key)
    fams = tomlkit.table(is_super_table=True)
    for f, r in table.families.items():
        t = tomlkit.table()
        t.update({"ratio": round(r.ratio, 4), "low": round(r.low, 4), "high": round(r.high, 4), "rounds": r.rounds,
                  "layers": r.layers})
        fams[f] = t
    entry["families"] = fams
    measured[table.profile] = entry
    return write_text(p, tomlkit.dumps(doc))
