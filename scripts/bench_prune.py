#!/usr/bin/env python
"""Structured pruning benchmark → BENCHMARKS.md (section "prune").

    .venv/bin/python scripts/bench_prune.py [--workdir out/bench_prune] [--runs 40]

1. MobileNetV2 width 1.0 at 224x224 (random init): 50% of channels, L2 magnitude, no data.
2. The trained MobileNetV2 digits classifier: 30% of channels; magnitude vs activation-based
   importance, repair off vs on (200 training samples); top-1 on the 360 held-out digits.
3. all-MiniLM-L6-v2: 50% of FFN neurons (and, separately, 25% of heads), calibrated on 200
   docstring sentences; mean cosine of sentence embeddings on 870 held-out sentences.

Latency: 1 intra-op thread, interleaved runs, one shared feed per model family.
"""

from __future__ import annotations

import argparse
import datetime
import time
from pathlib import Path

import numpy as np
from _bench_common import ROOT, embeddings, export_minilm, fidelity, md_table, minilm_path, text_splits, update_section

from edgecomp.data import load_data, save_npz
from edgecomp.export import export_spec
from edgecomp.io import load_model, save_model
from edgecomp.measure.bench import benchmark
from edgecomp.prune import prune_model
from edgecomp.prune.options import PruneOptions
from edgecomp.render.text import host_line
from edgecomp.runtime import make_session
from edgecomp.text import load_tokenizer, tokenize, write_token_data


def prune_to(src: Path, dst: Path, data=None, **opts) -> dict:
    model = load_model(src)
    t0 = time.perf_counter()
    result = prune_model(model, PruneOptions(**opts), data)
    save_model(result.model, dst)
    return {"seconds": time.perf_counter() - t0, "summary": result.summary, "layers": result.layers}


def bench_mnv2(work: Path, runs: int) -> str:
    fp32 = work / "mnv2.onnx"
    if not fp32.exists():
        export_spec("models.mobilenet_v2:imagenet_224", fp32)
    pruned = work / "mnv2.s50.onnx"
    rep = prune_to(fp32, pruned, sparsity=0.5, importance="l2")
    lat = benchmark([fp32, pruned], threads=1, warmup=5, runs=runs, labels=["fp32", "50% channels (L2)"])
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)}
    shapes = [[o.shape for o in make_session(p).run(None, feed)] for p in (fp32, pruned)]
    ratio = lat.models[1].ratio_to_first
    rows = [{"variant": s.model, "size MB": s.size_bytes / 1e6, "p50 ms": s.p50_ms, "latency vs fp32": s.ratio_to_first}
            for s in lat.models]
    return ("### MobileNetV2 width 1.0, 224x224 (random init), 50% structured, L2 magnitude\n\n"
            + md_table(rows, ["variant", "size MB", "p50 ms", "latency vs fp32"])
            + f"\n\nMACs {rep['summary']['MACs']}; parameters {rep['summary']['parameters']}; output shapes "
              f"{'unchanged' if shapes[0] == shapes[1] else 'CHANGED'} ({shapes[1][0]}). "
              f"Target ≤ 0.55x: **{'met' if ratio <= 0.55 else 'missed'}** ({ratio:.2f}x).\n")


def top1(path: Path, x: np.ndarray, y: np.ndarray) -> float:
    s = make_session(path)
    name = s.get_inputs()[0].name
    pred = [int(np.argmax(s.run(None, {name: x[i:i + 1]})[0])) for i in range(len(x))]
    return float((np.array(pred) == y).mean())


def bench_digits(work: Path, runs: int) -> str:
    from models.digits import load_digits_32

    fp32 = work / "digits.onnx"
    if not fp32.exists():
        export_spec("models.mobilenet_v2:digits_classifier", fp32)
    xtr, _ = load_digits_32("train")
    xte, yte = load_digits_32("test")
    calib = save_npz(work / "digits_train200.npz", {"x": xtr[:200].astype(np.float32)})
    data = load_data(calib)
    variants = {"fp32": (fp32, None)}
    for imp in ("l2", "activation"):
        for rep in (False, True):
            dst = work / f"digits.s30.{imp}.{'repair' if rep else 'cut'}.onnx"
            variants[f"30%, {imp}, repair {'on' if rep else 'off'}"] = (dst, prune_to(
                fp32, dst, data, sparsity=0.3, importance=imp, repair=rep, max_samples=200, round_to=8))
    ref_acc = top1(fp32, xte, yte)
    lat = benchmark([p for p, _ in variants.values()], threads=1, warmup=5, runs=runs, labels=list(variants))
    rows = []
    for (name, (path, rep)), st in zip(variants.items(), lat.models):
        acc = top1(path, xte, yte)
        rows.append({"variant": name, "top-1": acc, "drop (points)": (ref_acc - acc) * 100,
                     "p50 ms": st.p50_ms, "latency vs fp32": st.ratio_to_first,
                     "prune s": rep["seconds"] if rep else None})
    best = rows[-1]
    ok = best["drop (points)"] <= 1.0 and best["latency vs fp32"] <= 0.80
    return ("### MobileNetV2 digits classifier (trained, width 0.5), 30% of channels, 200 training samples\n\n"
            + md_table(rows, ["variant", "top-1", "drop (points)", "p50 ms", "latency vs fp32", "prune s"])
            + f"\n\nTop-1 on the 360 held-out digits; `--round-to 8` (odd channel counts made this tiny model "
              f"slower than fp32 in onnxruntime: 1.6-2.0x measured without it). The last 1280-channel conv stays whole: "
              f"the exporter's Reshape(-1) → Gather → Reshape before the classifier is not followed. Targets (activation + repair): drop ≤ 1.0 point and latency "
              f"≤ 0.80x: **{'met' if ok else 'missed'}** ({best['drop (points)']:.2f} points, "
              f"{best['latency vs fp32']:.2f}x).\n\n"
              "Diagnosis (digits latency): at 0.16 ms per image this model is mostly per-op overhead; the cut removes only 32% of MACs (7.5 M → 5.1 M) because the 1280-channel last conv stays whole (see above) and round-to-8 keeps the 8- and 16-channel groups whole, so the measured ratio stops at about 0.83x.\n")


def bench_minilm(work: Path, runs: int) -> str:
    fp32 = export_minilm(work / "minilm.onnx")
    tok = load_tokenizer(minilm_path())
    splits = text_splits()
    calib_dir = work / "calib200"
    if not calib_dir.exists():
        write_token_data(tokenize(tok, splits["calib"][:200]), calib_dir)
    data = load_data(calib_dir)
    test_feeds = tokenize(tok, splits["test"])
    latency_feed = tokenize(tok, [" ".join(splits["test"][:40])], max_len=128)[0]
    plans = [("FFN 50%, OBS, repair on", "channels", 0.5, "obs", True),
             ("FFN 50%, activation, repair on", "channels", 0.5, "activation", True),
             ("FFN 50%, activation, repair off", "channels", 0.5, "activation", False),
             ("FFN 50%, L2, repair off", "channels", 0.5, "l2", False),
             ("heads 25%, activation, repair on", "heads", 0.25, "activation", True),
             ("heads 25%, L2, repair off", "heads", 0.25, "l2", False)]
    variants = {"fp32": (fp32, None)}
    for i, (name, kind, sp, imp, rep) in enumerate(plans):
        dst = work / f"minilm.v{i}.onnx"
        variants[name] = (dst, prune_to(fp32, dst, data, sparsity=sp, kinds=(kind,), importance=imp, repair=rep))
    ref = embeddings(fp32, test_feeds)
    lat = benchmark([p for p, _ in variants.values()], threads=1, warmup=5, runs=runs, feed=latency_feed,
                    labels=list(variants))
    rows = []
    for (name, (path, rep)), st in zip(variants.items(), lat.models):
        row = {"variant": name, "size MB": path.stat().st_size / 1e6}
        row.update(fidelity(ref, embeddings(path, test_feeds)))
        row.update({"p50 ms": st.p50_ms, "latency vs fp32": st.ratio_to_first, "prune s": rep["seconds"] if rep else None})
        rows.append(row)
    main = rows[1]
    ok = main["latency vs fp32"] <= 0.80 and main["mean cos"] >= 0.97
    return ("### all-MiniLM-L6-v2, sentence embeddings, seq 128 latency feed, 200 calibration sentences\n\n"
            + md_table(rows, ["variant", "size MB", "mean cos", "min cos", "NN@10", "p50 ms", "latency vs fp32", "prune s"])
            + f"\n\nFidelity on the 870 held-out sentences (`text_splits()['test']`). Targets (FFN 50% with repair): "
              f"latency ≤ 0.80x and mean cosine ≥ 0.97: **{'met' if ok else 'missed'}** "
              f"({main['latency vs fp32']:.2f}x, cosine {main['mean cos']:.4f}).\n\n"
              "Diagnosis (MiniLM fidelity): half of every FFN is removed in one shot and only each down-projection is re-fitted (layer by layer, on the inputs its repaired predecessors give it); the remaining error compounds over the 6 layers. OBS selection (greedy Optimal Brain Surgeon on the down-projection's input Gram matrix) is the best selection tried; `--scope global` with activation importance (uneven cuts, 584-848 of 1536 neurons kept) measured cos 0.929 on 300 of these sentences, no better than per-layer. Reaching 0.97 likely needs a smaller cut or fine-tuning (distillation) after the cut.\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench_prune")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--only", choices=["mnv2", "digits", "minilm"], action="append")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    parts = {"mnv2": bench_mnv2, "digits": bench_digits, "minilm": bench_minilm}
    body = [f"## Structured pruning\n\nReproduce: `.venv/bin/python scripts/bench_prune.py` "
            f"(measured {datetime.date.today()}; {host_line()}; 1 intra-op thread, interleaved latency).\n"]
    for name in args.only or parts:
        t0 = time.perf_counter()
        body.append(parts[name](args.workdir, args.runs))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    update_section("prune", "\n".join(body))
    print("\n".join(body))


if __name__ == "__main__":
    main()
