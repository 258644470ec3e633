"""Rendering: plain-text tables for the terminal and JSON-ready dicts. Nothing here measures."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from edgecomp.targets import Isa, TargetProfile, host_isa

__all__ = ["table", "fmt_bytes", "render_bench", "render_profile", "render_validation", "render_summary", "render_pass",
           "render_step", "host_line", "to_jsonable", "pareto_front", "step_rows"]


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} GB"


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}"
    return str(v)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    """A left-aligned text table of dict rows."""
    if not rows:
        return (title + "\n" if title else "") + "(empty)"
    cols = list(columns or dict.fromkeys(k for r in rows for k in r))
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = [title] if title else []
    lines.append("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


def host_line(profile: TargetProfile | None = None, isa: Isa | None = None) -> str:
    """'host ISA: ...' plus, for a profile, whether it matches the host."""
    isa = isa or host_isa()
    line = f"host ISA: {isa.describe()}"
    if profile is not None:
        match = "matches the host" if profile.matches_host(isa) else (
            f"DIFFERS from the host ({profile.isa.describe()}): numbers below are this host's, not the target's")
        line += f"\ntarget: {profile.name} — {profile.description}; {profile.threads} thread(s); profile ISA {match}"
    return line


def render_bench(result, profile: TargetProfile | None = None, device: str | None = None) -> str:
    """The bench table under a line saying where it ran: this host (and the profile), or ``device``."""
    rows = [{"model": s.model, "size": fmt_bytes(s.size_bytes), "p50 ms": s.p50_ms, "p90 ms": s.p90_ms,
             "p99 ms": s.p99_ms, "per s": s.throughput_per_s, "ratio": s.ratio_to_first} for s in result.models]
    shapes = ", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in result.feed_shapes.items())
    assumed = f" (assumed {', '.join(result.feed_defaults)}; set --shape to change)" if result.feed_defaults else ""
    head = (f"{device or host_line(profile)}\nthreads {result.threads} (inter-op 1), warmup {result.warmup}, "
            f"{result.runs} interleaved runs each, feed {shapes}{assumed}")
    return head + "\n" + table(rows)


def render_profile(profiles) -> str:
    """``bench --profile``: op types side by side (ms per inference, ratios to the first model) and
    each model's slowest nodes (:mod:`edgecomp.measure.profile`)."""
    from edgecomp.measure.profile import PROFILE_NOTE, node_rows, side_by_side_rows

    cover = "; ".join(f"{i + 1}: {p.runs} runs, mean {p.total_ms:.3g} ms (median {p.median_ms:.3g}), kernels "
                      f"{100 * p.kernel_coverage:.0f}%" for i, p in enumerate(profiles))
    parts = [table(side_by_side_rows(profiles), title=f"where the time goes ({cover})")]
    parts += [table(node_rows(p), title=f"slowest nodes of {i + 1}:{p.model}") for i, p in enumerate(profiles)]
    return "\n\n".join([*parts, f"note: {PROFILE_NOTE}"])


def render_validation(result) -> str:
    rows = [{"output": o.name, "max abs err": o.max_abs_err, "mean abs err": o.mean_abs_err,
             "cos mean": o.cosine_mean, "cos min": o.cosine_min, "top-1 agree": o.top1_agreement,
             "kNN@10": o.knn_agreement} for o in result.outputs]
    text = f"{result.samples} samples\n" + table(rows)
    if result.ref_accuracy is not None:
        text += (f"\naccuracy: reference {result.ref_accuracy:.4f}, candidate {result.cand_accuracy:.4f} "
                 f"(drop {result.accuracy_drop * 100:+.2f} points)")
    return text


def render_summary(s) -> str:
    lines = ["opset: " + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in s.opset.items())]
    lines += [f"input  {i.name}: {i.dtype} [{i.shape_text()}]" for i in s.inputs]
    lines += [f"output {n}: {d} [{sh}]" for n, d, sh in s.outputs]
    lines.append(f"parameters: {s.params:,} ({fmt_bytes(sum(b for _, b in s.params_by_dtype.values()))})")
    lines += [f"  {dt}: {n:,} elements, {fmt_bytes(b)}" for dt, (n, b) in s.params_by_dtype.items()]
    if s.macs is not None:
        shapes = ", ".join(f"{i.name}={'x'.join(map(str, s.probe_shapes.get(i.name, [])))}" for i in s.inputs)
        if s.feed_defaults:
            shapes += f" (assumed {', '.join(s.feed_defaults)})"
        lines.append(f"MACs: {s.macs:,} at {shapes}; in int8: {s.int8_mac_share:.1%}" if s.macs else
                     f"MACs: 0 at {shapes}")
    elif s.macs_note:
        lines.append(f"MACs: not counted ({s.macs_note})")
    lines.append(table([{"op": k, "count": v} for k, v in s.op_histogram.items()], title="ops:"))
    return "\n".join(lines)


def render_pass(report) -> str:
    head = f"{report.name}: {'modified' if report.modified else 'no change'}"
    if report.summary:
        head += " — " + ", ".join(f"{k} {_cell(v)}" for k, v in report.summary.items())
    return head + ("\n" + table(report.rows) if report.rows else "")


def render_step(result, titles: dict[str, str] | None = None) -> str:
    """Any capability's :class:`~edgecomp.step.StepResult` for the terminal: each non-empty table
    under its name (``titles`` may say more, e.g. where latencies were measured), with the columns
    the step chose to show, then the summary as one ``key: value`` line (nested values and unset
    ones left to --json). Warnings go to stderr, separately."""
    parts = [table(rows, result.columns.get(name), title=f"{(titles or {}).get(name, name)}:")
             for name, rows in result.tables.items() if rows]
    line = ", ".join(f"{k}: {_cell(v)}" for k, v in result.summary.items()
                     if v is not None and not isinstance(v, (dict, list, tuple)))
    return "\n".join([*parts, *([line] if line else [])])


def to_jsonable(obj: Any) -> Any:
    """Dataclasses (nested) to dicts, for --json."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if hasattr(obj, "to_json"):
            return obj.to_json()
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    return obj


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points not dominated when lower x (latency) and higher y (quality) are
    better, ordered by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best_y = [], float("-inf")
    for i in order:
        if points[i][1] > best_y:
            front.append(i)
            best_y = points[i][1]
    return front


def step_rows(steps) -> list[dict[str, Any]]:
    """One row per step of a convert run: the step table of the terminal and report.html."""
    rows = []
    for s in steps:
        rows.append({"step": f"{s.index:02d}-{s.step}", "seconds": f"{s.seconds:.1f}",
                     "size": fmt_bytes(s.size_bytes) if s.size_bytes else "-",
                     "MACs": f"{s.macs / 1e6:.1f}M" if s.macs else "-",
                     "int8 MACs": f"{s.int8_mac_share:.0%}" if s.int8_mac_share is not None and s.model else "-",
                     "latency vs fp32": s.latency_ratio, "cos mean": s.cos_mean,
                     "top-1 agree": s.top1_agreement, "kNN@10": s.knn_agreement, "accuracy": s.accuracy})
    return rows
