"""report.json and a self-contained report.html (tables and inline SVG plots, no network).

Plots (matplotlib, rendered to inline SVG): latency vs accuracy/fidelity of every step (and
sweep point) with the Pareto front marked; the size/fidelity/latency frontier (size vs quality,
each point coloured by its latency, the front of models neither larger nor worse marked); and
per-layer quantization sensitivity; where the time goes (ms per inference per op type, from
onnxruntime's profiler) in the input and the final model, when the bench step profiles.
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from edgecomp.io import OUTPUT_MARKER, write_json, write_text
from edgecomp.render.text import fmt_bytes, pareto_front, step_rows, to_jsonable

__all__ = ["frontier_svg", "html_table", "render_html", "sensitivity_svg", "tradeoff_svg", "write_reports",
           "profile_svg", "PROFILE_TABLE"]

#: the bench step's table of op times (edgecomp.measure.profile.side_by_side_rows), drawn as a bar chart
PROFILE_TABLE = "where the time goes"

_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.pass{color:#137333;font-weight:bold}.fail{color:#b3261e;font-weight:bold}
details{margin:1em 0}summary{cursor:pointer;font-weight:bold}.plots{display:flex;flex-wrap:wrap;gap:2em}"""


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def html_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "<p>(none)</p>"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def tradeoff_svg(points: Sequence[dict[str, Any]], quality_label: str) -> str | None:
    """Latency ratio (x, lower is better) vs quality (y, higher is better), Pareto front marked."""
    pts = [p for p in points if p.get("latency") is not None and p.get("quality") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front([(p["latency"], p["quality"]) for p in pts])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([p["latency"] for p in pts], [p["quality"] for p in pts], color="#1a73e8", zorder=3)
    for p in pts:
        ax.annotate(p["label"], (p["latency"], p["quality"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    fx = [pts[i]["latency"] for i in front]
    fy = [pts[i]["quality"] for i in front]
    ax.plot(fx, fy, color="#e8710a", marker="o", label="Pareto front", zorder=2)
    ax.set_xlabel("latency vs fp32 (lower is better)")
    ax.set_ylabel(quality_label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def frontier_svg(points: Sequence[dict[str, Any]], quality_label: str) -> str | None:
    """Size in MB (x, lower is better) vs quality (y), each point coloured by its latency ratio
    (the third dimension; grey where latency was not measured), the size/quality front marked."""
    pts = [p for p in points if p.get("size") is not None and p.get("quality") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mb = [p["size"] / 1e6 for p in pts]
    front = pareto_front([(m, p["quality"]) for m, p in zip(mb, pts)])
    fig, ax = plt.subplots(figsize=(6.6, 4.2))
    timed = [i for i, p in enumerate(pts) if p.get("latency") is not None]
    untimed = [i for i in range(len(pts)) if i not in timed]
    if untimed:
        ax.scatter([mb[i] for i in untimed], [pts[i]["quality"] for i in untimed], color="#9e9e9e", zorder=3,
                   label="latency not measured")
    if timed:
        dots = ax.scatter([mb[i] for i in timed], [pts[i]["quality"] for i in timed], zorder=3, cmap="viridis_r",
                          c=[pts[i]["latency"] for i in timed], s=60, edgecolors="black", linewidths=0.5)
        fig.colorbar(dots, ax=ax, label="latency vs fp32 (lower is better)")
    for m, p in zip(mb, pts):
        ax.annotate(p["label"], (m, p["quality"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.plot([mb[i] for i in front], [pts[i]["quality"] for i in front], color="#e8710a", label="size/quality front",
            zorder=2)
    ax.set_xlabel("model size, MB (lower is better)")
    ax.set_ylabel(quality_label)
    ax.set_title("size / quality / latency frontier", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def sensitivity_svg(rows: Sequence[dict[str, Any]]) -> str | None:
    """Per-layer sensitivity (loss when only that layer is int8), float layers highlighted."""
    rs = [r for r in rows if r.get("sensitivity") is not None]
    key = "sensitivity"
    if not rs:
        rs, key = [r for r in rows if r.get("sim error") is not None], "sim error"
    if not rs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(rs)), 3.6))
    colors = ["#b3261e" if r.get("decision") == "float" else "#1a73e8" for r in rs]
    ax.bar(range(len(rs)), [r[key] for r in rs], color=colors)
    ax.set_xticks(range(len(rs)))
    ax.set_xticklabels([r["layer"] for r in rs], rotation=90, fontsize=6)
    ax.set_ylabel("loss with only this layer int8" if key == "sensitivity" else "simulated relative output error")
    ax.set_title("per-layer sensitivity (red: kept float)", fontsize=9)
    return _svg(fig)


def profile_svg(rows: Sequence[dict[str, Any]], top: int = 12) -> str | None:
    """Milliseconds per inference of each op type (one bar per model, grouped), from the rows of
    :func:`edgecomp.measure.profile.side_by_side_rows` (slowest in the input model first; past the
    ``top`` slowest, the rest as one bar); the total row is left out."""
    cols = [c for c in dict.fromkeys(k for r in rows for k in r) if c.endswith(" ms")]
    rs = [r for r in rows if r.get("op type") != "total"]
    if not cols or not rs:
        return None
    if len(rs) > top + 1:  # the slowest op types by name, the rest summed (the between-kernels row stays last)
        ops, rest, between = rs[:top], rs[top:-1], rs[-1]
        other = {"op type": f"({len(rest)} other op types)", **{c: sum(r.get(c) or 0.0 for r in rest) for c in cols}}
        rs = [*ops, other, between]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, max(2.4, 0.2 * len(rs) * len(cols) + 0.8)))
    height = 0.8 / len(cols)
    for k, c in enumerate(cols):
        ax.barh([i + k * height for i in range(len(rs))], [r.get(c) or 0.0 for r in rs], height=height,
                label=c[: -len(" ms")].split(":", 1)[-1])
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rs))])
    ax.set_yticklabels([str(r["op type"]) for r in rs], fontsize=7)
    ax.invert_yaxis()  # slowest op type of the input model on top
    ax.set_xlabel("ms per inference (onnxruntime profiler)")
    ax.set_title("where the time goes, per op type", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8)
    return _svg(fig)


def _quality(result) -> tuple[list[dict[str, Any]], str]:
    models = [s for s in result.steps if s.model]
    use_acc = any(s.accuracy is not None for s in models)
    label = "task accuracy" if use_acc else "mean cosine vs fp32"
    pts = [{"label": f"{s.index:02d}-{s.step}", "latency": s.latency_ratio, "size": s.size_bytes,
            "quality": s.accuracy if use_acc else s.cos_mean} for s in models]
    return pts, label


def render_html(result, extra_points: Sequence[dict[str, Any]] = ()) -> str:
    pts, qlabel = _quality(result)
    plots = [tradeoff_svg([*pts, *extra_points], qlabel), frontier_svg([*pts, *extra_points], qlabel)]
    sections = []
    for s in result.steps:
        for name, rows in s.tables.items():
            if rows:
                sections.append(f"<details><summary>{s.index:02d}-{s.step}: {html.escape(name)} ({len(rows)})</summary>"
                                f"{html_table(rows)}</details>")
            if name == "layers":
                plots.append(sensitivity_svg(rows))
            if name == PROFILE_TABLE:
                plots.append(profile_svg(rows))
    gates = "".join(
        f"<li class='{'pass' if g['passed'] else 'fail'}'>{html.escape(g['gate'])}: {_cell(g['value'])} "
        f"(limit {_cell(g['limit'])}) — {'pass' if g['passed'] else 'FAIL'}</li>" for g in result.gates) or "<li>none</li>"
    target = (f"target {html.escape(result.target)}: profile ISA "
              f"{'matches' if result.target_matches_host else 'DIFFERS from'} the host" if result.target else "no target profile")
    final = result.final()
    decisions = _decisions(result.steps)
    mobile = ""
    if getattr(result, "package", None):
        pk = result.package
        mobile = (f"<h2>ORT Mobile</h2><p>model.ort ({fmt_bytes(pk.summary['ort size bytes'])}, max abs diff vs .onnx "
                  f"{_cell(pk.max_abs_diff)}), {len(pk.operators)} operator lines in required_operators_and_types.config"
                  f"</p>{html_table(pk.usability)}")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgecomp report</title><style>{_CSS}</style></head>
<body><h1>edgecomp convert report</h1>
<p>source <code>{html.escape(result.source)}</code>, recipe <code>{html.escape(result.recipe)}</code>, started {result.started}<br>
host ISA: {html.escape(result.host_isa)}; {target}</p>
<p>final model <code>{html.escape(str(result.final_model))}</code>: {fmt_bytes(final.size_bytes if final else None)}; overall:
<span class="{'pass' if result.passed else 'fail'}">{'all gates pass' if result.passed else 'a gate FAILED'}</span></p>
<h2>Gates</h2><ul>{gates}</ul>
<h2>Steps</h2>{html_table(step_rows(result.steps))}{decisions}{mobile}
<h2>Plots</h2><div class="plots">{''.join(p for p in plots if p)}</div>
<h2>Per-step details</h2>{''.join(sections) or '<p>(none)</p>'}
</body></html>"""


#: What a quantize step decided on latency, and from which evidence (edgecomp.quantize.speed, .measured).
_DECISION_KEYS = ("families evidence", "latency vs float", "latency decision")


def _decisions(steps) -> str:
    """Quantize steps' int8 decisions and their evidence (the family table or timing, the written
    model timed against its input on this host or the device), one list per step."""
    items = []
    for s in steps:
        lines = [f"{html.escape(k)}: {html.escape(str(v))}" for k, v in s.summary.items()
                 if k.startswith(_DECISION_KEYS) and v]
        if lines:
            items.append(f"<li>{s.index:02d}-{s.step}<ul>{''.join(f'<li>{x}</li>' for x in lines)}</ul></li>")
    return f"<h2>Latency decisions</h2><ul>{''.join(items)}</ul>" if items else ""


def write_reports(result, folder: Path, extra_points: Sequence[dict[str, Any]] = ()) -> None:
    write_json(folder / "report.json", {OUTPUT_MARKER: "convert", **to_jsonable(result)})
    write_text(folder / "report.html", render_html(result, extra_points))
