"""The zoo matrix (tests/zoo.py) at larger settings, with onnxruntime's own quantizers as anchors.

For every zoo model: each edgecomp command (inspect, optimize, quantize, prune with and without
DATA, validate, bench), then onnxruntime's ``quantize_static`` (QDQ, per channel, calibrated
on the model's DATA through a CalibrationDataReader) and ``quantize_dynamic``. Each row says
whether the step worked, was refused (its one-line message) or failed (what went wrong), and for
every model written: size, latency relative to the fp32 file (``edgecomp bench fp32 candidate``
on 1 thread, interleaved, in a fresh process so torch's thread pools do not skew it), the mean
cosine of its float outputs on the DATA (the worst output), and parameters (initializers +
Constant tensors, subgraphs included).

    .venv/bin/python scripts/bench_zoo.py                       # every model; writes out/bench_zoo.md
    .venv/bin/python scripts/bench_zoo.py --quick --models silero_vad,mtcnn_onet
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import onnx  # noqa: E402
from _bench_common import md_table  # noqa: E402
from zoo import ZOO, Zoo, default_opset, feeds, fidelity, param_count  # noqa: E402

#: The test matrix's small variants are covered by tests/test_zoo.py; the benchmark runs every
#: zoo model, the large ones included.
STEPS = ["inspect", "optimize", "quantize", "prune", "prune_data", "validate", "bench", "ort_static", "ort_dynamic"]
WRITES = {"optimize", "quantize", "prune", "prune_data", "ort_static", "ort_dynamic"}


def _cli(args: list[str]) -> tuple[int, str, str]:
    from click.testing import CliRunner

    from edgecomp.cli import cli

    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception and not isinstance(res.exception, SystemExit):
        return 1, res.stdout, f"crashed: {type(res.exception).__name__}: {res.exception}"
    return res.exit_code, res.stdout, res.stderr


class _Reader:
    """onnxruntime CalibrationDataReader over a DATA path (npz with a sample axis or a folder)."""

    def __init__(self, data: Path, inputs: set[str], limit: int | None):
        self._it = iter([{k: v for k, v in f.items() if k in inputs} for f in feeds(data, limit)])

    def get_next(self):
        return next(self._it, None)


def _ort_static(model: Path, data: Path, out: Path, limit: int | None) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    inputs = {i.name for i in onnx.load(str(model)).graph.input}
    reader = type("Reader", (_Reader, CalibrationDataReader), {})(data, inputs, limit)
    quantize_static(str(model), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _ort_dynamic(model: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(model), str(out), weight_type=QuantType.QInt8)


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def bench_ratio(fp32: Path, cand: Path, data: Path, runs: int) -> float | str:
    """ratio_to_first of ``edgecomp bench fp32 cand`` on 1 thread, in a fresh process."""
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "bench.json"
        p = subprocess.run([sys.executable, "-m", "edgecomp.cli", "bench", str(fp32), str(cand), "--data", str(data),
                            "--runs", str(runs), "--warmup", str(max(1, runs // 10)), "--threads", "1", "--json", str(js)],
                           capture_output=True, text=True, cwd=ROOT)
        if p.returncode:
            return "bench: " + _first_line(p.stderr)
        return float(json.loads(js.read_text())["models"][1]["ratio_to_first"])


def run_model(zoo: Zoo, name: str, runs: int, max_samples: int | None, outdir: Path) -> list[dict]:
    rows: list[dict] = []
    t0 = time.perf_counter()
    try:
        model, data = zoo.get(name)
    except Exception as e:
        return [{"model": name, "step": "build", "status": "failed", "note": f"{type(e).__name__}: {e}"[:300]}]
    fp32 = onnx.load(str(model))
    base_params = param_count(fp32)
    rows.append({"model": name, "step": "fp32", "status": f"opset {default_opset(fp32)}",
                 "size MB": model.stat().st_size / 1e6, "params": base_params,
                 "note": f"built in {time.perf_counter() - t0:.1f}s; {ZOO[name].what}"})
    outs: dict[str, Path] = {}
    limit = ["--max-samples", str(max_samples)] if max_samples else []
    for step in STEPS:
        out = outdir / f"{name}.{step}.onnx"
        out.unlink(missing_ok=True)
        row = {"model": name, "step": step}
        t1 = time.perf_counter()
        if step.startswith("ort_"):
            try:
                if step == "ort_static":
                    _ort_static(model, data, out, max_samples)
                else:
                    _ort_dynamic(model, out)
                rc, msg = 0, ""
            except Exception as e:
                rc, msg = 1, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            stdout = ""
        else:
            args = {
                "inspect": ["inspect", model],
                "optimize": ["optimize", model, "-o", out],
                "quantize": ["quantize", model, "-o", out, "--calibration", data, *limit],
                "prune": ["prune", model, "-o", out, "--sparsity", "0.3"],
                "prune_data": ["prune", model, "-o", out, "--sparsity", "0.3", "--data", data, *limit],
                "validate": ["validate", model, outs.get("quantize", outs.get("optimize", model)), "--data", data],
                "bench": ["bench", model, "--runs", str(runs)],
            }[step]
            rc, stdout, stderr = _cli(args)
            msg = _first_line(stderr)
        row["seconds"] = time.perf_counter() - t1
        if rc:
            row["status"] = "refused" if msg.startswith("Error:") and "internal error" not in msg else "failed"
            row["note"] = msg.removeprefix("Error: ")[:300]
            rows.append(row)
            continue
        row["status"] = "works"
        if step in WRITES:
            if not out.is_file():
                row.update(status="failed", note="exit 0 but nothing written")
                rows.append(row)
                continue
            outs[step] = out
            m = onnx.load(str(out))
            row["size MB"] = out.stat().st_size / 1e6
            row["params"] = param_count(m)
            notes = []
            if default_opset(m) != default_opset(fp32):
                notes.append(f"opset {default_opset(fp32)} -> {default_opset(m)}")
            if step in ("optimize", "prune", "prune_data") and row["params"] > base_params:
                notes.append("more parameters than fp32")
            if step.startswith("prune") and row["params"] == base_params:
                notes.append("nothing removed")
            try:
                onnx.checker.check_model(str(out))
            except Exception as e:
                notes.append(f"onnx.checker: {str(e).splitlines()[0][:120]}")
            try:
                cos = fidelity(model, out, data)
                row["cos mean"] = min(cos.values()) if cos else None
                if cos and len(cos) > 1 and min(cos.values()) < 0.9999:
                    notes.append(f"worst output {min(cos, key=cos.get)}")
            except Exception as e:  # a written model that does not run (onnxruntime's own quantizers too)
                row["status"] = "failed"
                notes.append(str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__)
                row["note"] = "; ".join(notes)
                rows.append(row)
                continue
            ratio = bench_ratio(model, out, data, runs)
            if isinstance(ratio, str):
                notes.append(ratio[:200])
            else:
                row["latency vs fp32"] = ratio
            row["note"] = "; ".join(notes)
        elif step == "inspect":
            row["note"] = next((ln for ln in stdout.splitlines() if ln.startswith("MACs")), "")[:200]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "out" / "bench_zoo.md"), help="markdown file to write")
    ap.add_argument("--workdir", default=str(ROOT / "out" / "bench_zoo"), help="where models and outputs go")
    ap.add_argument("--models", help="comma-separated zoo names (default: all)")
    ap.add_argument("--quick", action="store_true", help="20 bench runs, 8 samples: checks the script works")
    ap.add_argument("--runs", type=int, help="bench runs per model (default 200, --quick 20)")
    a = ap.parse_args(argv)
    names = a.models.split(",") if a.models else list(ZOO)
    unknown = [n for n in names if n not in ZOO]
    if unknown:
        ap.error(f"unknown zoo models {unknown}; known: {', '.join(ZOO)}")
    runs = a.runs or (20 if a.quick else 200)
    max_samples = 8 if a.quick else None
    work = Path(a.workdir)
    (work / "out").mkdir(parents=True, exist_ok=True)
    zoo = Zoo(work)
    rows: list[dict] = []
    t0 = time.perf_counter()
    for name in names:
        got = run_model(zoo, name, runs, max_samples, work / "out")
        rows += got
        for r in got:
            print(f"{r['model']:20s} {r['step']:12s} {r['status']:10s} {r.get('note', '')[:140]}", file=sys.stderr)
    cols = ["model", "step", "status", "size MB", "params", "latency vs fp32", "cos mean", "seconds", "note"]
    import onnxruntime
    import torch

    head = (f"# zoo benchmark\n\n{len(names)} models, bench {runs} runs on 1 thread, "
            f"{'8 samples' if max_samples else 'all DATA samples'}; onnxruntime {onnxruntime.__version__}, "
            f"onnx {onnx.__version__}, torch {torch.__version__}; {time.perf_counter() - t0:.0f}s\n\n"
            "status: works, refused (one-line error, its message in note) or failed (crash, internal error, or "
            "a written model that does not run on its DATA). cos mean: mean cosine of float outputs vs fp32 on the "
            "DATA (worst output; for outputs of < 8 values per sample the cosine over all samples together). "
            "latency vs fp32: `edgecomp bench fp32 candidate` ratio_to_first, 1 thread, interleaved.\n\n")
    text = head + md_table(rows, cols) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
