#!/usr/bin/env python
"""Block inputs for block-wise healing, at the same steps: teacher vs student vs mix vs end to end (issue #24).

    .venv/bin/python scripts/bench_block_inputs.py --part minilm --mode student --steps 60 --eval-every 15
    .venv/bin/python scripts/bench_block_inputs.py --part digits --mode e2e --steps 100

One heal per call (``--mode teacher|student|mix`` runs ``distill --blockwise --block-input MODE``, ``e2e``
``--no-blockwise``), so each fits a few minutes on a shared machine; each call appends one JSON line
(held-out curve: minutes, b/e phase, step, cosine[, top-1 agreement]; test fidelity) to WORKDIR/results.jsonl.
The pruned models are those of ``scripts/bench_heal.py`` (made here when missing, reused otherwise):
all-MiniLM-L6-v2 with 50% of every FFN cut (OBS + repair), healed on docstring sentences, fidelity on the
870 held-out test sentences; the digits MobileNetV2 0.5 with 50% of channels cut, healed on the training
images with labels, top-1 on the 360 held-out digits.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _bench_common import ROOT, embeddings, export_minilm, fidelity, minilm_path, text_splits
from bench_heal import digits_setup, prune_file, top1

from edgecomp.data import load_data
from edgecomp.distill import DistillConfig, distill


def _minilm(work: Path, args) -> tuple[dict, callable]:
    from bench_distill import training_sentences

    from edgecomp.text import load_tokenizer, tokenize, write_token_data

    fp32 = export_minilm(work / "minilm.onnx")
    tok = load_tokenizer(minilm_path())
    calib = work / "calib200"
    if not calib.exists():
        write_token_data(tokenize(tok, text_splits()["calib"][:200]), calib)
    pruned = work / "minilm.ffn50.onnx"
    prune_file(fp32, pruned, load_data(calib), True, sparsity=0.5, kinds=("channels",), importance="obs")
    cfg = dict(teacher=str(fp32), student=str(pruned), text=str(training_sentences(work, 6000)),
               tokenizer=str(minilm_path()), max_len=128, batch_size=32, lr=2e-4, epochs=10, match="cosine",
               held_out=0.03)

    def test(out: Path) -> dict:
        feeds = tokenize(tok, text_splits()["test"])
        return {k: round(v, 4) for k, v in fidelity(embeddings(fp32, feeds), embeddings(out, feeds)).items()}

    return cfg, test


def _digits(work: Path, args) -> tuple[dict, callable]:
    _, fp32, pruned, _, train, labels, (xte, yte) = digits_setup(work, True)
    cfg = dict(teacher=str(fp32), student=str(pruned), data=str(train), labels=str(labels),
               batch_size=64, lr=1e-3, epochs=100, held_out=0.1)

    def test(out: Path) -> dict:
        ref = top1(fp32, xte, yte)
        return {"top-1": round(top1(out, xte, yte), 4), "vs fp32 (points)": round((top1(out, xte, yte) - ref) * 100, 2),
                "pruned vs fp32 (points)": round((top1(pruned, xte, yte) - ref) * 100, 2)}

    return cfg, test


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench_heal")
    ap.add_argument("--part", choices=["minilm", "digits"], required=True)
    ap.add_argument("--mode", choices=["teacher", "student", "mix", "e2e"], required=True)
    ap.add_argument("--steps", type=int, required=True)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--hidden-weight", type=float, default=0.0, help="e2e: also match the block boundaries")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    cfg, test = (_minilm if args.part == "minilm" else _digits)(args.workdir, args)
    cfg.update(max_steps=args.steps, eval_every=args.eval_every, patience=100, seed=0, threads=1,
               hidden_weight=args.hidden_weight)
    cfg.update(dict(blockwise=False) if args.mode == "e2e" else dict(blockwise=True, block_input=args.mode))
    out = args.workdir / f"{args.part}.{args.mode}-{args.steps}.onnx"
    t0, curve = time.perf_counter(), []

    def seen(step, rec):
        if "held-out cos" in rec:
            curve.append([round((time.perf_counter() - t0) / 60, 2), "b" if "block loss" in rec else "e", step,
                          round(rec["held-out cos"], 4), *([round(rec["top-1 agreement"], 4)] if "top-1 agreement" in rec else [])])

    res = distill(DistillConfig(**cfg), out, bench_runs=0, callback=seen)
    blocks = res.training.get("blockwise")
    rec = {"part": args.part, "mode": args.mode, "steps": args.steps, "hidden weight": args.hidden_weight,
           "wall s": round(time.perf_counter() - t0), "test": test(out), "curve": curve,
           "block phase best step": blocks.get("best step") if isinstance(blocks, dict) else blocks}
    print(json.dumps(rec))
    with open(args.workdir / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
