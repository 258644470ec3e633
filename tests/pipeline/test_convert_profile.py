"""convert's report: where the time goes in the input and the final model (bench step ``profile``)."""

import json
import re

import pytest

from edgecomp.pipeline.convert import Source, convert
from edgecomp.pipeline.recipe import parse_recipe
from edgecomp.render.html import PROFILE_TABLE


def _texts(svg: str) -> list[str]:
    return re.findall(r"<!-- (.*?) -->", svg)  # matplotlib writes each text's string beside its glyphs


@pytest.mark.parametrize("profile", [True, False])
def test_report_html_charts_where_the_time_goes(tmp_path, profile):
    recipe = parse_recipe({"steps": [
        {"step": "export", "exporter": "torchscript"}, {"step": "optimize", "fusions": "bert"},
        {"step": "bench", "runs": 5, "warmup": 1, "profile": profile}]})
    res = convert(Source(spec="models.text_encoder:tiny_encoder"), recipe, tmp_path / "out")
    page = (tmp_path / "out" / "report.html").read_text()
    bench = json.loads((tmp_path / "out" / "report.json").read_text())["steps"][-1]
    if not profile:
        assert PROFILE_TABLE not in bench["tables"] and "where the time goes" not in page
        return
    rows = bench["tables"][PROFILE_TABLE]
    assert [k for k in rows[0] if k.endswith(" ms")] == ["1:01-export ms", "2:02-optimize ms"]
    ops = [r["op type"] for r in rows if r["op type"] not in ("total", "(between kernels)")]
    assert "MatMul" in ops or "FusedMatMul" in ops
    for label in ("1:01-export ms", "2:02-optimize ms"):  # each model's rows add up to its measured total
        total = next(r[label] for r in rows if r["op type"] == "total")
        assert sum(r[label] or 0.0 for r in rows if r["op type"] != "total") == pytest.approx(total)
    chart = next(svg for svg in page.split("<svg")[1:] if "where the time goes, per op type" in svg)
    texts = set(_texts(chart))
    assert set(ops[:12]) <= texts and {"01-export", "02-optimize", "(between kernels)"} <= texts
    assert (f"({len(ops) - 12} other op types)" in texts) == (len(ops) > 12)
    assert res.final().model.endswith("02-optimize.onnx")
