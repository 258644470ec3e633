"""report.html's plots: the size/fidelity/latency frontier of the steps measured in one run."""

from __future__ import annotations

import re

from edgecomp.pipeline.convert import ConvertResult, StepRecord
from edgecomp.render.html import frontier_svg, render_html
from edgecomp.render.text import pareto_front


def _steps():
    # (step, size bytes, latency vs fp32, mean cosine): the 90 MB fp32, a 24 MB int8, a 12 MB int4 that is
    # faster but worse, and a 30 MB one dominated by the int8 (larger and worse)
    rows = [("export", 90e6, 1.0, 1.0), ("quantize", 24e6, 0.6, 0.997), ("quantize", 12e6, 0.7, 0.99),
            ("prune", 30e6, 0.8, 0.95)]
    return [StepRecord(i, step, {}, model=f"{i:02d}-{step}.onnx", size_bytes=int(size), latency_ratio=lat, cos_mean=cos)
            for i, (step, size, lat, cos) in enumerate(rows, start=1)]


def _texts(svg: str) -> list[str]:
    return re.findall(r"<!-- (.*?) -->", svg)  # matplotlib writes each text's string beside its glyphs


def test_frontier_plots_every_sized_step_coloured_by_latency_and_marks_the_front():
    steps = _steps()
    pts = [{"label": f"{s.index:02d}-{s.step}", "size": s.size_bytes, "latency": s.latency_ratio,
            "quality": s.cos_mean} for s in steps]
    svg = frontier_svg([*pts, {"label": "untimed", "size": 5e6, "quality": 0.9}], "mean cosine vs fp32")
    texts = _texts(svg)
    assert {"01-export", "02-quantize", "03-quantize", "04-prune", "untimed"} <= set(texts)
    assert "latency vs fp32 (lower is better)" in texts  # the colour bar: latency is the third dimension
    assert "latency not measured" in texts and "model size, MB (lower is better)" in texts
    # the front drawn is the one of (size, quality): everything but the dominated 30 MB model
    front = pareto_front([(p["size"], p["quality"]) for p in pts])
    assert sorted(pts[i]["label"] for i in front) == ["01-export", "02-quantize", "03-quantize"]
    assert frontier_svg([{"label": "x", "quality": 1.0}], "q") is None  # nothing sized: no plot


def test_report_html_holds_the_frontier_of_the_run():
    res = ConvertResult("out", "m.onnx", "r.toml", None, "x86_64", None, _steps(), "out/model.onnx", [], True, "now")
    page = render_html(res)
    assert page.count("<svg") == 2  # latency/quality trade-off and the size/quality/latency frontier
    frontier = next(svg for svg in page.split("<svg")[1:] if "size / quality / latency frontier" in svg)
    assert {"01-export", "02-quantize", "03-quantize", "04-prune", "latency vs fp32 (lower is better)"} <= set(
        _texts(frontier))
