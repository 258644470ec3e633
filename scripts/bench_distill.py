#!/usr/bin/env python
"""Knowledge distillation benchmark → BENCHMARKS.md (section "distill").

    .venv/bin/python scripts/bench_distill.py --part minilm   # all-MiniLM-L6-v2 → 3 layers (~13 min on 2 cores)
    .venv/bin/python scripts/bench_distill.py --part digits   # MobileNetV2 digits, width 1.0 → 0.35 (~8 min)
    .venv/bin/python scripts/bench_distill.py --part layer-init --layer-init copy --minilm-steps 300
    .venv/bin/python scripts/bench_distill.py --part layer-init --layer-init blockwise --minilm-steps 300
                                                              # 6 → 3 with / without block-wise layer init

MiniLM: the teacher is all-MiniLM-L6-v2 (sentence embeddings); the student keeps its layers
0, 3, 5 and is distilled with `edgecomp distill --shrink layers=3` (its layers initialized block-wise
first, the default since 2026-12-07; the --part minilm rows of 2026-11-24 predate it; --part
layer-init compares the two, one arm per run) on unlabeled English from the
docstrings of installed packages (the held-out test sentences of ``_bench_common.text_splits``
are excluded). Fidelity on those 870 held-out sentences; latency at seq 128, batch 1, 1 thread,
interleaved; then the student through `edgecomp quantize` (int8 matmuls and int8 embedding
tables). Digits: teacher MobileNetV2 width 1.0; students width 0.35 distilled (soft targets
only, no labels; and soft targets + labels) and trained on labels alone with the same trainer,
epochs and seed; top-1 on the 360 held-out digits.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import io
import json
import pkgutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
from _bench_common import ROOT, embeddings, export_minilm, fidelity, md_table, minilm_path, text_splits, update_section

from edgecomp.measure.bench import benchmark
from edgecomp.render.text import host_line

#: Packages whose docstrings give unlabeled training text (with the stdlib modules).
TEXT_PACKAGES = ("numpy", "scipy", "sklearn", "torch", "onnx", "click", "email", "http", "xml", "logging", "asyncio",
                 "concurrent", "unittest", "importlib", "multiprocessing", "urllib")


def training_sentences(work: Path, limit: int) -> Path:
    """Up to ``limit`` docstring sentences, none of the held-out eval/test sentences, as a text file."""
    out = work / f"train_text_{limit}.txt"
    if out.exists():
        return out
    from edgecomp.text import STDLIB_MODULES, docstring_sentences

    names = list(STDLIB_MODULES)
    warnings.simplefilter("ignore")
    for pkg in TEXT_PACKAGES:
        try:
            mod = importlib.import_module(pkg)
        except Exception:
            continue
        names.append(pkg)
        for info in pkgutil.walk_packages(getattr(mod, "__path__", []), pkg + ".", onerror=lambda _n: None):
            if info.name.count(".") <= 3 and not any(s in info.name for s in ("test", "__main__", "setup")):
                names.append(info.name)
    usable = []
    for n in names:
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                importlib.import_module(n)
            usable.append(n)
        except BaseException:
            continue
    splits = text_splits()
    held = set(splits["test"]) | set(splits["eval"])
    sents = [s for s in docstring_sentences(tuple(usable)) if s not in held and "\n" not in s]
    out.write_text("\n".join(sents[:limit]) + "\n", encoding="utf-8")
    return out


def quantize_cli(src: Path, dst: Path, calib: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "edgecomp.cli", "quantize", str(src), "-o", str(dst),
                           "--calibration", str(calib)], capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise RuntimeError(proc.stdout + proc.stderr)


def bench_minilm(work: Path, args) -> tuple[str, list[str]]:
    from edgecomp.distill import DistillConfig, distill
    from edgecomp.io import load_model
    from edgecomp.measure.inspect import summarize
    from edgecomp.text import load_tokenizer, read_lines, tokenize, write_token_data

    t0 = time.perf_counter()
    teacher = export_minilm(work / "minilm.onnx")
    text = training_sentences(work, args.sentences)
    cfg = DistillConfig(teacher_hf=str(minilm_path()), shrink="layers=3", text=str(text), max_len=128,
                        batch_size=32, lr=args.minilm_lr, epochs=args.minilm_epochs, max_steps=args.minilm_steps,
                        match="cosine", held_out=0.03, eval_every=100, patience=4, seed=0, checkpoint_every=100,
                        threads=args.threads, progress=True)
    student = work / "minilm_l3.onnx"
    res = distill(cfg, student, bench_runs=0)
    tok = load_tokenizer(minilm_path())
    calib = write_token_data(tokenize(tok, read_lines(text)[:300]), work / "calib300")
    student_q = work / "minilm_l3.int8.onnx"
    quantize_cli(student, student_q, calib)
    wall = time.perf_counter() - t0

    splits = text_splits()
    test_feeds = tokenize(tok, splits["test"])
    ref = embeddings(teacher, test_feeds)
    latency_feed = tokenize(tok, [" ".join(splits["test"][:40])], max_len=128)[0]
    variants = {"teacher all-MiniLM-L6-v2 fp32": teacher, "student 3 layers fp32 (distilled)": student,
                "student 3 layers int8 (edgecomp quantize)": student_q}
    lat = benchmark(list(variants.values()), threads=1, warmup=5, runs=args.runs, feed=latency_feed, labels=list(variants))
    shapes = {k: list(v.shape) for k, v in latency_feed.items()}
    rows = []
    for (name, path), st in zip(variants.items(), lat.models):
        s = summarize(load_model(path), shapes)
        row = {"model": name, "params M": s.params / 1e6, "GMACs @128": s.macs / 1e9, "size MB": path.stat().st_size / 1e6,
               "latency vs teacher": st.ratio_to_first, "p50 ms": st.p50_ms}
        row.update(fidelity(ref, embeddings(path, test_feeds)))
        rows.append(row)
    t = res.training
    n_train = len(read_lines(text))
    notes = [f"training: {n_train} docstring sentences (3% held out for early stopping), batch 32, AdamW lr "
             f"{cfg.lr:g}, cosine loss on the sentence embeddings; {t['steps']} steps in {t['seconds']:.0f} s, best "
             f"held-out fidelity at step {t['best_step']}{' (stopped early)' if t['stopped_early'] else ''}; whole run "
             f"{wall:.0f} s wall (export, training, export, quantization)",
             "targets: student ≤ 0.55x teacher latency, mean cos ≥ 0.95, NN@10 ≥ 0.85; int8 student ≤ 0.35x, cos ≥ 0.93"]
    if rows[1]["mean cos"] < 0.95:
        curve = ", ".join(f"{h['held-out cos']:.3f}@{h['step']}" for h in t["history"] if "held-out cos" in h)
        notes.append(f"MISSED the fidelity targets: held-out cosine by step was {curve}, still rising at the last "
                     "step. Dropping every other layer starts the student far from the teacher (cos ≈ 0.4 at step 1); "
                     "the step budget that fits 15 minutes on 2 shared cores (~10k sentence passes) is one to two "
                     "orders of magnitude below what layer-dropped sentence encoders are usually distilled with. "
                     "Latency targets are met by construction (3 of 6 layers; int8 via edgecomp quantize)")
    cols = ["model", "params M", "GMACs @128", "size MB", "latency vs teacher", "p50 ms", "mean cos", "min cos", "NN@10"]
    return md_table(rows, cols), notes


def bench_layer_init(work: Path, args) -> dict:
    """One arm of the layer-initialization comparison: 6 → 3 layers with ``layer_init`` = args.layer_init,
    the held-out curve against training seconds, fidelity on the 870 test sentences (fp32)."""
    from edgecomp.distill import DistillConfig, distill
    from edgecomp.text import load_tokenizer, read_lines, tokenize

    teacher = export_minilm(work / "minilm.onnx")
    text = training_sentences(work, args.sentences)
    cfg = DistillConfig(teacher_hf=str(minilm_path()), shrink="layers=3", text=str(text), max_len=128,
                        batch_size=32, lr=args.minilm_lr, epochs=args.minilm_epochs, max_steps=args.minilm_steps,
                        match="cosine", held_out=0.03, eval_every=args.eval_every, patience=100, seed=0,
                        checkpoint_every=10_000, threads=args.threads, progress=True, layer_init=args.layer_init,
                        layer_init_fraction=args.layer_init_fraction, layer_init_inputs=args.layer_init_inputs,
                        hidden_weight=args.hidden_weight, block_loss=args.block_loss)
    t0 = time.perf_counter()
    curve: list[list] = []

    def tick(step: int, rec: dict) -> None:
        if step % 10 == 0:
            print(f"{'init' if 'layer loss' in rec else 'e2e'} step {step} {time.perf_counter() - t0:.0f}s {rec}", flush=True)
        if "held-out cos" in rec:
            phase = "init" if "layer loss" in rec else "e2e"
            curve.append([phase, step, round(time.perf_counter() - t0, 1), round(rec["held-out cos"], 4)])

    student = work / f"minilm_l3_{args.layer_init}.onnx"
    res = distill(cfg, student, bench_runs=0, callback=tick)
    seconds = time.perf_counter() - t0
    t = res.training
    init = t.get("layer_init")
    init_steps = init["steps"] if isinstance(init, dict) else 0
    if isinstance(init, dict):  # the phase's step 0 (the copied layers) happens before any callback
        curve.insert(0, ["init", 0, round(init["history"][0]["seconds"], 1), round(init["history"][0]["held-out cos"], 4)])
    else:
        curve.insert(0, ["e2e", 0, None, round(t["history"][0]["held-out cos"], 4)])
    tok = load_tokenizer(minilm_path())
    test_feeds = tokenize(tok, text_splits()["test"])
    fid = fidelity(embeddings(teacher, test_feeds), embeddings(student, test_feeds))
    return {"variant": args.layer_init + (f" ({args.layer_init_inputs} inputs, {args.block_loss} loss)" if init_steps else "")
            + (f" + hidden {args.hidden_weight:g}" if args.hidden_weight else ""),
            "init steps": init_steps, "e2e steps": t["steps"], "train s": round(seconds), "sentences": len(read_lines(text)),
            "best e2e step": t["best_step"], "groups": init["groups"] if isinstance(init, dict) else None,
            "curve": curve, **fid, "date": str(datetime.date.today()),
            "command": f"scripts/bench_distill.py --part layer-init --layer-init {args.layer_init} --minilm-steps "
                       f"{args.minilm_steps} --sentences {args.sentences} --eval-every {args.eval_every}"
                       + (f" --layer-init-fraction {args.layer_init_fraction:g}" if init_steps else "")
                       + (f" --layer-init-inputs {args.layer_init_inputs}" if args.layer_init_inputs != "teacher" else "")
                       + (f" --hidden-weight {args.hidden_weight:g}" if args.hidden_weight else "")
                       + (f" --block-loss {args.block_loss}" if args.block_loss != "mse" else "")}


#: What the layer-initialization arms measured 2026-12-07 showed (written from the curves above).
LAYER_INIT_NOTES = [
    "block-wise initialization does what it is asked: each student layer's relative squared error to its teacher "
    "group falls (150-step arm, 45 init steps: 0.269 → 0.149, 0.190 → 0.103, 0.543 → 0.236) and the whole student "
    "goes from held-out cos 0.603 (layers copied) to 0.819 (45 steps) / 0.850 (90 steps) before any end-to-end step; "
    "the end-to-end pass then continues from there (the layer-init default for `--shrink layers=N` since it measured "
    "better: 300 steps side by side, held-out 0.8956 vs 0.8910, test mean cos 0.8696 vs 0.8644, min cos 0.639 vs "
    "0.593, at equal seconds 0.893@1150s vs 0.891@1190s)",
    "but the gain is small: per step the layer initialization raises the sentence-embedding fidelity no faster than "
    "end-to-end training (0.850 vs 0.862 after 90 steps) and a step costs more (the teacher runs every step: its group "
    "inputs are recomputed, while end to end caches the teacher's embeddings once). One layer cannot reproduce two "
    "teacher layers' token states (relative error stays 0.10-0.24), and what it gets wrong is weighted alike in every "
    "token and dimension, while the pooled, normalized output forgives much of it; the end-to-end loss optimizes the "
    "output directly. The hand-off costs a little (0.819 → 0.814 at the first end-to-end evaluation: new optimizer "
    "state and warm-up)",
    "student-side inputs (each layer learns from the student's own previous layer, detached) measured no better "
    "than teacher inputs (test 0.8493 vs 0.8510 at 150 steps); hidden-state matching at the group boundaries during "
    "the end-to-end pass (`--hidden-weight 1`, which already pairs student layer j with teacher layer (j+1)L/N-1, the "
    "groups' ends) on top of the block-wise init was the best arm at 150 and 300 steps (test 0.8548 and 0.8733, "
    "held-out 0.8986; the 300-step run ran alone on a quieter machine, so its seconds do not compare with the "
    "side-by-side pair); it costs a teacher pass every step, and stays an option (`hidden_weight` is 0 by default)",
    "why 0.95 is missed: every curve still rises at the last step, but only ~0.015 held-out per doubling of the "
    "steps (0.879-0.883 at 150, 0.891-0.899 at 300; the earlier 900-step end-to-end run reached 0.917 held-out, "
    "0.902 test), so 0.95 is several doublings away at this learning rate and data; the "
    "held-out split (45 training-like docstring sentences) reads ~0.03 above the 870 stdlib test sentences. "
    "Layer-dropped sentence encoders are distilled with 1-2 orders of magnitude more sentence passes than the "
    "~10k that fit here on 2 shared cores: the initialization shortens the start, not that road (`--device cuda` "
    "runs the same on a GPU)",
]


def _layer_init_section(arms: dict[str, dict]) -> str:
    lines = ["### all-MiniLM-L6-v2 → 3 layers: block-wise layer initialization vs end-to-end only", "",
             "Each arm distills the same 3-layer student (teacher layers 0, 3, 5 copied) on the same sentences and "
             "seed; `blockwise` first trains each student layer to reproduce its group of teacher layers (L0 ← T0..T1, "
             "L1 ← T2..T3, L2 ← T4..T5; `edgecomp.distill.layer_init`), then continues end to end. Training seconds "
             "are wall time on 2 CPU cores shared with other jobs (inflated, noisy); compare the curves at equal "
             "seconds. Fidelity (fp32) on the 870 held-out test sentences.", ""]
    arms = dict(sorted(arms.items(), key=lambda kv: (kv[1]["init steps"] + kv[1]["e2e steps"], kv[0])))
    rows = [{**{k: a[k] for k in ("variant", "init steps", "e2e steps", "train s")},
             "held-out cos (last)": a["curve"][-1][3], **{k: a[k] for k in ("mean cos", "min cos", "NN@10")}}
            for a in arms.values()]
    lines += [md_table(rows, list(rows[0])), ""]
    best = max(arms.values(), key=lambda a: a["mean cos"])
    verdict = "met" if best["mean cos"] >= 0.95 and best["NN@10"] >= 0.85 else "**MISSED**"
    lines.append(f"- target (issue 24): mean cos ≥ 0.95 (NN@10 ≥ 0.85) with block-wise initialization: {verdict}; "
                 f"best arm {best['variant']} at {best['init steps'] + best['e2e steps']} steps: mean cos "
                 f"{best['mean cos']:.4f}, NN@10 {best['NN@10']:.4f}")
    lines += [f"- {n}" for n in LAYER_INIT_NOTES]
    for a in arms.values():
        pts = ", ".join(f"{c}@{s}{'i' if p == 'init' else ''}/{'start' if t is None else f'{t:.0f}s'}" for p, s, t, c in a["curve"])
        lines.append(f"- {a['variant']} ({a['date']}, `{a['command']}`): held-out cos@step/seconds "
                     f"(i: layer-init step) {pts}")
        if a.get("groups"):
            g = "; ".join(f"L{r['student layer']} ← T{r['teacher layers']} (from T{r['copied from']}): "
                          f"{r['group error before']:.3f} → {r['group error after']:.3f}" for r in a["groups"])
            fed = "its predecessor's output" if "student inputs" in a["variant"] else "the teacher's group input"
            lines.append(f"  - group error (relative squared error on the held-out split, each layer fed {fed}), "
                         f"copy → block-wise: {g}")
    return "\n".join(lines)


def bench_digits(work: Path, args) -> tuple[str, list[str]]:
    from edgecomp.distill import DistillConfig, distill
    from edgecomp.export import export_spec
    from edgecomp.io import load_model
    from edgecomp.measure.inspect import summarize
    from edgecomp.measure.validate import validate
    from models import digits

    if not digits.weights_path("mobilenet_v2", 1.0).is_file():
        digits.main(["--arch", "mobilenet_v2", "--width", "1.0"])
    xtr, ytr = digits.load_digits_32("train")
    xte, yte = digits.load_digits_32("test")
    np.savez(work / "digits_train.npz", x=xtr)
    np.save(work / "digits_train_labels.npy", ytr)
    np.savez(work / "digits_test.npz", x=xte)
    np.save(work / "digits_test_labels.npy", yte)
    teacher = work / "digits_teacher.onnx"
    export_spec("models.mobilenet_v2:digits_teacher", teacher, dynamic={"x": {0: "batch"}})
    base = dict(teacher="models.mobilenet_v2:digits_teacher", shrink="width=0.35", data=str(work / "digits_train.npz"),
                batch_size=64, lr=3e-3, epochs=args.digits_epochs, temperature=4.0, held_out=0.1, patience=None,
                seed=0, threads=args.threads, progress=True)
    runs = {"student 0.35, distilled (soft targets, no labels)": dict(),
            "student 0.35, distilled + labels": dict(labels=str(work / "digits_train_labels.npy")),
            "student 0.35, labels alone (same trainer)": dict(labels=str(work / "digits_train_labels.npy"), kd_weight=0.0)}
    paths, notes = {"teacher MobileNetV2 1.0": teacher}, []
    for i, (name, extra) in enumerate(runs.items()):
        out = work / f"digits_student_{i}.onnx"
        res = distill(DistillConfig(**base, **extra), out, bench_runs=0)
        paths[name] = out
        t = res.training
        notes.append(f"{name}: {t['steps']} steps in {t['seconds']:.0f} s, best held-out fidelity at step {t['best_step']}")
    lat = benchmark(list(paths.values()), threads=1, warmup=20, runs=args.runs * 5, feed={"x": xte[:1]}, labels=list(paths))
    rows = []
    for (name, path), st in zip(paths.items(), lat.models):
        v = validate(teacher, path, work / "digits_test.npz", work / "digits_test_labels.npy")
        s = summarize(load_model(path), {"x": [1, 1, 32, 32]})
        rows.append({"model": name, "params M": s.params / 1e6, "MMACs": s.macs / 1e6, "size MB": path.stat().st_size / 1e6,
                     "latency vs teacher": st.ratio_to_first, "p50 ms": st.p50_ms, "top-1": v.cand_accuracy,
                     "top-1 agreement": v.outputs[0].top1_agreement})
    for r in rows:
        r["vs teacher (points)"] = (r["top-1"] - rows[0]["top-1"]) * 100
        r["MACs ÷"] = rows[0]["MMACs"] / r["MMACs"]
    notes.append(f"training: {len(xtr)} train-split images (10% held out for early stopping), batch 64, AdamW lr 3e-3, "
                 f"{args.digits_epochs} epochs, T=4, no augmentation; the labels-alone row is the same trainer with the "
                 "soft-target weight at 0")
    notes.append("targets: distilled student top-1 within 1 point of the teacher, ≥ 3x fewer MACs, above labels alone")
    best_kd = max(r["top-1"] for r in rows[1:3])
    if best_kd <= rows[3]["top-1"]:
        notes.append(f"MISSED 'above labels alone': the best distilled student ({best_kd:.4f}) does not beat labels "
                     f"alone ({rows[3]['top-1']:.4f}); on 360 test images one image is 0.28 points, and all three "
                     "students are within two images of each other and of the teacher, so this set cannot separate them")
    cols = ["model", "params M", "MMACs", "MACs ÷", "size MB", "latency vs teacher", "p50 ms", "top-1",
            "vs teacher (points)", "top-1 agreement"]
    return md_table(rows, cols), notes


def _section(results: dict[str, tuple[str, list[str]]]) -> str:
    lines = ["## Knowledge distillation", "",
             f"Measured {datetime.date.today()}; {host_line().replace(chr(10), '; ')}. Latency: median of interleaved "
             "onnxruntime runs in one process, batch 1, 1 intra-op thread; ratios to the teacher row of the same run.",
             ""]
    heads = {"minilm": ("### all-MiniLM-L6-v2 → 3 layers (fidelity on 870 held-out sentences vs the teacher)",
                        "`.venv/bin/python scripts/bench_distill.py --part minilm`"),
             "digits": ("### Digits: MobileNetV2 width 1.0 → 0.35 (top-1 on the 360 held-out digits)",
                        "`.venv/bin/python scripts/bench_distill.py --part digits`")}
    for part in ("minilm", "digits"):
        if part not in results:
            continue
        head, cmd = heads[part]
        table, notes = results[part]
        lines += [head, "", f"Reproduce: {cmd}", "", table, "", *[f"- {n}" for n in notes], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["minilm", "digits", "all", "render", "layer-init"], default="all",
                    help="render: rewrite the section from the stored results only; layer-init: one arm of the "
                         "MiniLM 6 → 3 layer-initialization comparison (--layer-init), its own section")
    ap.add_argument("--layer-init", choices=["copy", "blockwise"], default="blockwise",
                    help="layer-init part: copy (end to end only) or blockwise (layer initialization first)")
    ap.add_argument("--layer-init-fraction", type=float, default=0.3)
    ap.add_argument("--layer-init-inputs", choices=["teacher", "student"], default="teacher")
    ap.add_argument("--hidden-weight", type=float, default=0.0, help="hidden-state matching at the group boundaries")
    ap.add_argument("--block-loss", choices=["mse", "cosine"], default="mse", help="layer-init part: the layers' loss")
    ap.add_argument("--eval-every", type=int, default=25, help="layer-init part: steps between held-out evaluations")
    ap.add_argument("--render-only", action="store_true", help="layer-init part: rewrite its section only")
    ap.add_argument("--workdir", default=str(ROOT / "out" / "bench_distill"))
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for training (1 holds up best when the cores are shared)")
    ap.add_argument("--sentences", type=int, default=6000, help="training sentences for MiniLM")
    ap.add_argument("--minilm-lr", type=float, default=5e-4)
    ap.add_argument("--minilm-epochs", type=int, default=5)
    ap.add_argument("--minilm-steps", type=int, default=900)
    ap.add_argument("--digits-epochs", type=int, default=25)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    store = work / "results.json"
    if args.part == "layer-init":
        results = json.loads(store.read_text()) if store.exists() else {}
        if not args.render_only:
            arm = bench_layer_init(work, args)
            results = json.loads(store.read_text()) if store.exists() else {}  # another arm may have run beside it
            results.setdefault("layer-init", {})[f"{arm['variant']} / {args.minilm_steps} steps"] = arm
            store.write_text(json.dumps(results))
        body = _layer_init_section(results.get("layer-init", {}))
        update_section("distill-layer-init", body)
        print(body)
        return
    parts = {"all": ["minilm", "digits"], "render": []}.get(args.part, [args.part])
    for part in parts:
        got = (bench_minilm if part == "minilm" else bench_digits)(work, args)
        results = json.loads(store.read_text()) if store.exists() else {}  # the other part may run beside this one
        results[part] = got
        store.write_text(json.dumps(results))
    body = _section(json.loads(store.read_text()) if store.exists() else {})
    update_section("distill", body)
    print(body)


if __name__ == "__main__":
    main()
