#!/usr/bin/env python
"""int4 MatMul weights chosen per layer on all-MiniLM-L6-v2: the size/fidelity/latency frontier →
BENCHMARKS.md (section "int4").

    .venv/bin/python scripts/bench_int4.py [--workdir out/bench_int4] [--texts 400] [--runs 40]

Rows: fp32; `edgecomp quantize` defaults (int8); `quantize --int4 auto` over the int8 token table,
over low-rank tables (rank 128 / 96, `reduce-embeddings --rank R --bits 8` on a stdlib-docstring
corpus), over the int4 table (`--bits 4 --block 64`); `--int4 .` (every MatMul int4, with the
fitted codes) for the size floor; and `--prune-vocab` on a domain corpus (docstrings of the
numpy/scipy/sklearn/torch family, 2,000 sentences) + int4 table + `--int4 auto`, measured on
held-out sentences of that domain. Fidelity on held-out sentences vs the fp32 embeddings (mean /
min cosine, NN@10 agreement); latency interleaved in a fresh process (`edgecomp bench`), 1 thread,
seq 128, as a ratio to fp32 and to the int8 model. Targets (issue 16): whole model <= 12 MB at
mean cos >= 0.99 and NN@10 >= 0.90, latency no worse than the int8 model; <= 9 MB with
--prune-vocab on a domain corpus.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _bench_common import (
    ROOT,
    bench_in_subprocess,
    embeddings,
    export_minilm,
    fidelity,
    md_table,
    minilm_path,
    text_splits,
    update_section,
)
from bench_embeddings import SCIENCE
from bench_quantize import edgecomp_quantize

from edgecomp.io import model_size_bytes
from edgecomp.render.text import host_line
from edgecomp.text import docstring_sentences, load_tokenizer, tokenize, write_token_data


def reduce_table(src: Path, dst: Path, *args) -> Path:
    if not dst.exists():
        proc = subprocess.run([sys.executable, "-m", "edgecomp.cli", "reduce-embeddings", str(src), "-o", str(dst),
                               *map(str, args)], capture_output=True, text=True, check=False)
        if proc.returncode:
            raise RuntimeError(proc.stdout + proc.stderr)
    return dst


def quantize(src: Path, dst: Path, calib: Path, *extra: str) -> dict:
    """`edgecomp quantize` (its JSON report kept beside the model; reused when both exist)."""
    report = Path(str(dst) + ".json")
    if dst.exists() and report.exists():
        return json.loads(report.read_text())
    print(f"quantize {src.name} -> {dst.name} {' '.join(extra)}", flush=True)
    return edgecomp_quantize(src, dst, calib, *extra)


def op_rows(seq: int = 128, rounds: int = 12) -> list[dict]:
    """One MiniLM-shaped MatMul (seq x 384 @ 384 x 1536, and 1536 x 384), timed interleaved in one
    thread: fp32, the int8 form of `quantize` (MatMulIntegerToFloat), MatMulNBits int4 blocks 32 /
    64 / 128 with int8 compute (accuracy_level 4) and block 32 dequantized to fp32 (level 0)."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from edgecomp.data import Dataset
    from edgecomp.measure.bench import compare_latency
    from edgecomp.passes.base import run_pass
    from edgecomp.quantize import quantize_model
    from edgecomp.quantize.options import QuantizeOptions
    from edgecomp.quantize.quantize_matmul_nbits import QuantizeMatMulNBitsPass

    rows = []
    rng = np.random.default_rng(0)
    for k, n in ((384, 1536), (1536, 384)):
        w = helper.make_tensor("w", TensorProto.FLOAT, (k, n), (rng.standard_normal((k, n)) * 0.05).astype(np.float32))
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, seq, k])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, n])], [w])
        fp32 = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
        x = rng.standard_normal((1, seq, k)).astype(np.float32)
        calib = Path(f"/tmp/bench_int4_op_{k}.npz")
        np.savez(calib, x=x)
        int8 = quantize_model(fp32.clone(), Dataset(calib), QuantizeOptions(families="all", min_cosine=None)).model
        forms = {"fp32": fp32, "int8 MatMulIntegerToFloat": int8}
        for block, level in ((32, 4), (64, 4), (128, 4), (32, 0)):
            nbits = QuantizeMatMulNBitsPass(block_size=block, accuracy_level=level)
            forms[f"int4 MatMulNBits block {block}, level {level}"] = run_pass(nbits, fp32.clone()).model
        est = compare_latency(list(forms.values()), {"x": x}, runs_per_round=20, min_rounds=rounds, max_rounds=rounds,
                              labels=list(forms))
        int8_ratio = est[0].ratio
        for e in est:
            rows.append({"MatMul": f"{seq}x{k} @ {k}x{n}", "form": e.label, "latency vs fp32": e.ratio,
                         "95% interval": f"[{e.low:.3f}, {e.high:.3f}]", "vs int8": e.ratio / int8_ratio})
    return rows


def minilm_setup(work: Path) -> tuple[Path, Path, Any, dict, Path]:
    """The fp32 MiniLM, its tokenizer (path and object), the text splits and 200 calibration sentences."""
    fp32 = export_minilm(work / "minilm.onnx")
    tok_path = minilm_path()
    tok = load_tokenizer(tok_path)
    splits = text_splits()
    calib = work / "calib"
    if not calib.exists():
        write_token_data(tokenize(tok, splits["calib"][:200]), calib)
    return fp32, tok_path, tok, splits, calib


def _int4_count(report: dict) -> str:
    text = report.get("summary", {}).get("int4", "")
    return text.split(" in int4")[0].replace(" int8 MatMuls", "") if " of " in text else "0"




def _quantize_unchecked(src: Path, dst: Path, calib: Path, compute: str, **options) -> dict:
    """``quantize --int4 . --int4-compute COMPUTE`` (and any other QuantizeOptions) through the library,
    without the never-slower timing; the report is kept beside the model and reused when both exist."""
    if dst.exists() and Path(str(dst) + ".json").exists():
        return json.loads(Path(str(dst) + ".json").read_text())
    import time

    import onnx_ir as ir

    import edgecomp.quantize.step as quantize_step
    from edgecomp.data import Dataset
    from edgecomp.io import save_model
    from edgecomp.quantize import quantize_model
    from edgecomp.quantize.options import QuantizeOptions
    from edgecomp.targets import host_isa

    options = {"int4": ".", **options}
    print(f"quantize {src.name} -> {dst.name} int4_compute={compute} {options} (no never-slower timing)", flush=True)
    quantize_step._check_speed = lambda *a, **k: None  # the summary then says "not timed"
    t0 = time.perf_counter()
    res = quantize_model(ir.load(str(src)), Dataset(calib), QuantizeOptions(int4_compute=compute, isa=host_isa(),
                                                                            **options))
    save_model(res.model, dst)
    report = {"summary": {k: str(v) for k, v in res.summary.items()}, "wall s": time.perf_counter() - t0,
              "rows": [{k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in r.items()}
                       for r in res.rows if r.get("decision") == "int4"]}
    Path(str(dst) + ".json").write_text(json.dumps(report))
    return report


def bench_at_rest(work: Path, texts: int, runs: int, nbits: bool = True) -> str:
    """Issue 23: every MatMul int4 (``--int4 .``, fitted codes) written at rest with int8 compute
    (``--int4-compute int8``) and as MatMulNBits, against the int8 default: size, fidelity, session
    load time (interleaved, 3 each) and latency (interleaved in a fresh process, 1 thread, seq 128)."""
    import os
    import time

    import onnxruntime as ort

    fp32, _, tok, splits, calib = minilm_setup(work)
    forms = [("int8 (quantize defaults)", "int8.onnx", ()),
             ("int4 every MatMul, at rest, int8 compute", "i4all_rest.onnx", ("--int4", ".", "--int4-compute", "int8")),
             ("int4 every MatMul, MatMulNBits", "i4all_nbits.onnx", ("--int4", ".", "--int4-compute", "nbits"))]
    if not nbits:  # GPTQ a second time did not fit a short session; the int4 section times MatMulNBits
        forms = forms[:2]
    reports = {label: quantize(fp32, work / name, calib, *extra) for label, name, extra in forms[:1]}
    # the int4 forms through the library with the written model's never-slower timing skipped: on a shared machine
    # its interval can fail to exclude 1.0 (then quantize writes the float model and there is nothing to measure);
    # the latency of what was written is measured below, interleaved, as for every row
    for label, name, extra in forms[1:]:
        reports[label] = _quantize_unchecked(fp32, work / name, calib, extra[-1])
    paths = [fp32] + [work / name for _, name, _ in forms]
    labels = ["fp32"] + [f[0] for f in forms]
    feeds = tokenize(tok, splits["test"][:texts])
    ref = embeddings(fp32, feeds)
    loads: dict[str, list[float]] = {lab: [] for lab in labels}
    for _ in range(3):
        for lab, path in zip(labels, paths):
            o = ort.SessionOptions()
            o.intra_op_num_threads = 1
            t0 = time.perf_counter()
            ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
            loads[lab].append(time.perf_counter() - t0)
    load_avg = os.getloadavg()[0]
    latency_feed = tokenize(tok, [" ".join(splits["test"][:40])], max_len=128)[0]
    stats = bench_in_subprocess(paths, labels, latency_feed, runs)
    int8_ratio = stats[1]["ratio_to_first"]
    rows = []
    for lab, path, st in zip(labels, paths, stats):
        rep = reports.get(lab, {}).get("summary", {})
        rows.append({"variant": lab, "size MB": model_size_bytes(path) / 1e6, "session load s": float(np.median(loads[lab])),
                     "latency vs fp32": st["ratio_to_first"], "latency vs int8": st["ratio_to_first"] / int8_ratio,
                     **fidelity(ref, embeddings(path, feeds)), "int4 form": rep.get("int4 form", "")})
    return (md_table(rows, ["variant", "size MB", "session load s", "latency vs fp32", "latency vs int8", "mean cos",
                            "min cos", "NN@10", "int4 form"])
            + f"\n\n1-minute load average during the latency run: {load_avg:.1f} (2 cores, shared).")

#: issue 23's size variants: (label, table recipe, quantize options, held-out text). Table recipes: t4 = int4 table
#: blocks of 64 (reduce-embeddings' default); t4b128p8 = int4 blocks of 128 then the position / token-type tables int8
#: (a second reduce-embeddings --bits 8 --min-rows 2); t4rowp8 = one scale per row; pruned = --prune-vocab on the domain
#: corpus, int4 table, int8 positions. Every int4 layer at rest with int8 compute.
SIZE_VARIANTS = (
    ("int4 every MatMul, block 32 asym + int4 table b64", "t4", {"int4": "."}, "stdlib"),
    ("int4 every MatMul, layouts auto + int4 table b128 + int8 positions", "t4b128p8",
     {"int4": ".", "int4_block": "auto", "int4_grid": "auto"}, "stdlib"),
    ("int4 every MatMul, block 128 sym + int4 table per row + int8 positions", "t4rowp8",
     {"int4": ".", "int4_block": 128, "int4_grid": "symmetric"}, "stdlib"),
    ("int4 auto (floor 0.99), layouts auto + int4 table b128 + int8 positions", "t4b128p8",
     {"int4": "auto", "int4_block": "auto", "int4_grid": "auto"}, "stdlib"),
    ("int4 auto (floor 0.995), layouts auto + int4 table b128 + int8 positions", "t4b128p8",
     {"int4": "auto", "int4_block": "auto", "int4_grid": "auto", "min_cosine": 0.995}, "stdlib"),
    ("pruned vocab (domain) + int4 table + int8 positions, int4 auto (floor 0.99), layouts auto", "pruned",
     {"int4": "auto", "int4_block": "auto", "int4_grid": "auto"}, "domain"),
    ("pruned vocab (domain) + int4 table + int8 positions, int4 auto (floor 0.995), layouts auto", "pruned",
     {"int4": "auto", "int4_block": "auto", "int4_grid": "auto", "min_cosine": 0.995}, "domain"),
    ("pruned vocab (domain) + int4 table + int8 positions, int4 auto (floor 0.994), layouts auto", "pruned",
     {"int4": "auto", "int4_block": "auto", "int4_grid": "auto", "min_cosine": 0.994}, "domain"),
)


def size_tables(work: Path, fp32: Path, tok_path: Path, dom_corpus: Path) -> dict[str, Path]:
    """The table recipes of :data:`SIZE_VARIANTS` (reduce-embeddings, cached by file)."""
    dom = ["--corpus", dom_corpus, "--tokenizer", tok_path]
    t4b128 = reduce_table(fp32, work / "t4b128.onnx", "--bits", 4, "--block", 128)
    t4row = reduce_table(fp32, work / "t4row.onnx", "--bits", 4, "--block", 384)
    pruned = reduce_table(fp32, work / "pruned_t4b64.onnx", "--prune-vocab", "--bits", 4, *dom)
    return {"t4": reduce_table(fp32, work / "t4.onnx", "--bits", 4),
            "t4b128p8": reduce_table(t4b128, work / "t4b128p8.onnx", "--bits", 8, "--min-rows", 2),
            "t4rowp8": reduce_table(t4row, work / "t4rowp8.onnx", "--bits", 8, "--min-rows", 2),
            "pruned": reduce_table(pruned, work / "pruned_t4p8.onnx", "--bits", 8, "--min-rows", 2)}


def _bytes_md(path: Path) -> str:
    import onnx_ir as ir

    from edgecomp.quantize.int4_at_rest import bytes_by_kind

    rows = [{**r, "MB": r["bytes"] / 1e6} for r in bytes_by_kind(ir.load(str(path)))]
    return md_table(rows, ["kind", "MB", "initializers", "largest"])


def bench_size(work: Path, texts: int, runs: int, only: str | None = None, quantize_only: bool = False) -> str:
    """Issue 23's size targets: each of :data:`SIZE_VARIANTS` quantized (cached: run it variant by variant with
    ``--size --quantize-only --only N`` first on a busy machine), then size, fidelity, latency vs fp32 and the int8 model (one
    interleaved run in a fresh process) and where the bytes of the smallest go; ``only``: comma indices."""
    fp32, tok_path, tok, splits, calib = minilm_setup(work)
    sci = docstring_sentences(SCIENCE)
    sci_corpus, sci_test = sci[:2000], sci[2000:2000 + texts]
    (work / "sci_corpus.txt").write_text("\n".join(sci_corpus) + "\n")
    sci_calib = work / "sci_calib"
    if not sci_calib.exists():
        write_token_data(tokenize(tok, sci_corpus[:200]), sci_calib)
    tables = size_tables(work, fp32, tok_path, work / "sci_corpus.txt")
    picked = [(i, v) for i, v in enumerate(SIZE_VARIANTS) if only is None or str(i) in only.split(",")]
    reports = {}
    for i, (label, table, options, text) in picked:
        reports[label] = _quantize_unchecked(tables[table], work / f"size{i}.onnx",
                                             sci_calib if text == "domain" else calib, "int8", **options)
    if quantize_only:
        return ""
    int8 = work / "int8.onnx"
    quantize(fp32, int8, calib)
    variants = [("fp32", fp32, "stdlib"), ("int8 (quantize defaults)", int8, "stdlib")]
    variants += [(label, work / f"size{i}.onnx", text) for i, (label, _, _, text) in picked]
    kept = set(np.concatenate([f["input_ids"][0] for f in tokenize(tok, sci_corpus)]).tolist())
    covered = [s for s, f in zip(sci_test, tokenize(tok, sci_test)) if set(f["input_ids"][0].tolist()) <= kept]
    feeds = {"stdlib": tokenize(tok, splits["test"][:texts]), "domain": tokenize(tok, sci_test),
             "domain, in-vocabulary": tokenize(tok, covered)}
    refs = {k: embeddings(fp32, f) for k, f in feeds.items()}
    latency_feed = tokenize(tok, [" ".join(splits["test"][:40])], max_len=128)[0]
    stats = bench_in_subprocess([v[1] for v in variants], [v[0] for v in variants], latency_feed, runs)
    int8_ratio = stats[1]["ratio_to_first"]
    rows = []
    for (label, path, text), st in zip(variants, stats):
        summary = reports.get(label, {}).get("summary", {})
        row = {"variant": label, "text": text, "size MB": model_size_bytes(path) / 1e6,
               "latency vs fp32": st["ratio_to_first"], "latency vs int8": st["ratio_to_first"] / int8_ratio,
               **fidelity(refs[text], embeddings(path, feeds[text])),
               "int4 layers": _int4_count(reports[label]) if label in reports else "—",
               "layouts": summary.get("int4 layouts", "—"), "quantize s": reports.get(label, {}).get("wall s")}
        rows.append(row)
        if text == "domain":
            rows.append({**row, "text": "domain, in-vocabulary",
                         **fidelity(refs["domain, in-vocabulary"], embeddings(path, feeds["domain, in-vocabulary"]))})
        print(json.dumps(row), flush=True)
    (work / "size_rows.json").write_text(json.dumps(rows, indent=1))
    cols = ["variant", "text", "size MB", "latency vs fp32", "latency vs int8", "mean cos", "min cos", "NN@10",
            "int4 layers", "layouts"]
    smallest = [min((r for r in rows if r["text"] == t and r["variant"] in reports), key=lambda r: r["size MB"])
                for t in ("stdlib", "domain")]
    parts = [md_table(rows, cols), ""]
    for r in smallest:
        path = next(p for lab, p, _ in variants if lab == r["variant"])
        parts += [f"Where the bytes of the smallest on {r['text']} text go ({r['variant']}, {r['size MB']:.2f} MB):", "",
                  _bytes_md(path), ""]
    return "\n".join(parts) + f"\n1-minute load average after the run: {__import__('os').getloadavg()[0]:.1f} (2 cores, shared)."


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=ROOT / "out" / "bench_int4")
    ap.add_argument("--texts", type=int, default=400, help="held-out test sentences (each domain)")
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--ops-only", action="store_true", help="only time the single-MatMul forms")
    ap.add_argument("--no-nbits", action="store_true", help="--at-rest without the MatMulNBits row")
    ap.add_argument("--at-rest", action="store_true",
                    help="only issue 23's int4 at rest with int8 compute vs MatMulNBits (section int4-at-rest)")
    ap.add_argument("--size", action="store_true",
                    help="only issue 23's size variants (int4 layouts, tables, pruned vocabulary; section int4-size)")
    ap.add_argument("--only", help="with --size: only these variants (comma indices of SIZE_VARIANTS)")
    ap.add_argument("--quantize-only", action="store_true", help="with --size: quantize (cache) them, write nothing")
    args = ap.parse_args()
    if args.size:
        args.workdir.mkdir(parents=True, exist_ok=True)
        table = bench_size(args.workdir, args.texts, args.runs, args.only, args.quantize_only)
        if not args.quantize_only:
            body = "\n".join([
                "## int4 sizes: layouts per layer, tables, pruned vocabulary (issue 23)", "",
                (f"Reproduce: `.venv/bin/python scripts/bench_int4.py --size --runs {args.runs}"
                f"{' --only ' + args.only if args.only else ''}` (measured "
                f"{datetime.date.today()} on {host_line()}). all-MiniLM-L6-v2; {args.texts} held-out sentences per "
                "text (stdlib docstrings; `domain` = numpy/scipy/sklearn/torch docstrings outside the 2,000-sentence "
                "pruning corpus; `domain, in-vocabulary` = those whose tokens the pruned table kept); latency 1 thread, "
                f"seq 128, {args.runs} interleaved runs in a fresh process. Every int4 layer is stored at rest and "
                "computed in int8 (`--int4-compute int8`); `layouts auto` = `--int4-block auto --int4-grid auto` "
                "(per layer, blocks 32/64/128, asymmetric or symmetric: the fewest bytes within 1.25x the layer's "
                "least held-out output error); `int4 auto (floor F)` = the layers whose written at-rest form keeps "
                "every output's cosine >= F on 32 held-out calibration samples."), "",
                table, SIZE_NOTES])
            update_section("int4-size", body)
            print(body)
        return
    if args.at_rest:
        args.workdir.mkdir(parents=True, exist_ok=True)
        body = "\n".join([
            "## int4 at rest, int8 compute (issue 23)", "",
            f"Reproduce: `.venv/bin/python scripts/bench_int4.py --at-rest{' --no-nbits' if args.no_nbits else ''}` (measured {datetime.date.today()} on "
            f"{host_line()}). all-MiniLM-L6-v2, {args.texts} held-out sentences, latency 1 thread, seq 128, "
            f"{args.runs} interleaved runs in a fresh process; session load: median of 3 interleaved creations.", "",
            bench_at_rest(args.workdir, args.texts, args.runs, nbits=not args.no_nbits), AT_REST_NOTES])
        update_section("int4-at-rest", body)
        print(body)
        return
    ops = op_rows()
    for r in ops:
        print(json.dumps(r), flush=True)
    if args.ops_only:
        return
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    fp32, tok_path, tok, splits, calib = minilm_setup(work)
    held = set(splits["test"])
    (work / "std_corpus.txt").write_text("\n".join(s for s in docstring_sentences() if s not in held) + "\n")
    sci = docstring_sentences(SCIENCE)
    sci_corpus, sci_test = sci[:2000], sci[2000:2000 + args.texts]
    (work / "sci_corpus.txt").write_text("\n".join(sci_corpus) + "\n")
    sci_calib = work / "sci_calib"
    if not sci_calib.exists():
        write_token_data(tokenize(tok, sci_corpus[:200]), sci_calib)
    std = ["--corpus", work / "std_corpus.txt", "--tokenizer", tok_path]
    dom = ["--corpus", work / "sci_corpus.txt", "--tokenizer", tok_path]

    t4 = reduce_table(fp32, work / "t4.onnx", "--bits", 4)
    r128 = reduce_table(fp32, work / "r128.onnx", "--rank", 128, "--bits", 8, *std)
    r96 = reduce_table(fp32, work / "r96.onnx", "--rank", 96, "--bits", 8, *std)
    pruned = reduce_table(fp32, work / "pruned_t4.onnx", "--prune-vocab", "--bits", 4, "--min-rows", 500, *dom)
    # (label, model, quantize report, held-out text: stdlib or the domain)
    plan = [("int8 (quantize defaults)", fp32, "int8.onnx", (), calib, "stdlib"),
            ("int4 auto + int8 table", fp32, "i4_t8.onnx", ("--int4", "auto"), calib, "stdlib"),
            ("int4 every MatMul + int8 table", fp32, "i4all_t8.onnx", ("--int4", "."), calib, "stdlib"),
            ("int4 auto + rank-128 table", r128, "i4_r128.onnx", ("--int4", "auto"), calib, "stdlib"),
            ("int4 auto + rank-96 table", r96, "i4_r96.onnx", ("--int4", "auto"), calib, "stdlib"),
            ("int4 every MatMul + rank-128 table", r128, "i4all_r128.onnx", ("--int4", "."), calib, "stdlib"),
            ("int4 auto + int4 table", t4, "i4_t4.onnx", ("--int4", "auto"), calib, "stdlib"),
            ("pruned vocab (domain) + int4 table + int4 auto", pruned, "i4_pruned.onnx", ("--int4", "auto"), sci_calib,
             "domain")]
    variants = [("fp32", fp32, {}, "stdlib")]
    for label, src, name, extra, cal, text in plan:
        variants.append((label, work / name, quantize(src, work / name, cal, *extra), text))

    kept = set(np.concatenate([f["input_ids"][0] for f in tokenize(tok, sci_corpus)]).tolist())
    covered = [s for s, f in zip(sci_test, tokenize(tok, sci_test)) if set(f["input_ids"][0].tolist()) <= kept]
    feeds = {"stdlib": tokenize(tok, splits["test"][: args.texts]), "domain": tokenize(tok, sci_test),
             "domain, in-vocabulary": tokenize(tok, covered)}
    refs = {k: embeddings(fp32, f) for k, f in feeds.items()}
    latency_feed = tokenize(tok, [" ".join(splits["test"][:40])], max_len=128)[0]
    stats = bench_in_subprocess([v[1] for v in variants], [v[0] for v in variants], latency_feed, args.runs)
    int8_ratio = next(st["ratio_to_first"] for v, st in zip(variants, stats) if v[0].startswith("int8"))
    rows = []
    for (label, path, report, text), st in zip(variants, stats):
        summary = report.get("summary", {})
        row = {"variant": label, "text": text, "size MB": model_size_bytes(path) / 1e6,
               "latency vs fp32": st["ratio_to_first"], "latency vs int8": st["ratio_to_first"] / int8_ratio,
               "int4 layers": _int4_count(report) if report else "—",
               **fidelity(refs[text], embeddings(path, feeds[text]))}
        row["quantize said"] = summary.get("int4", "")
        rows.append(row)
        if text == "domain":  # the same model on the held-out sentences whose tokens the pruned table kept
            rows.append({**row, "text": "domain, in-vocabulary", "quantize said": "",
                         **fidelity(refs["domain, in-vocabulary"], embeddings(path, feeds["domain, in-vocabulary"]))})
        print(json.dumps(row), flush=True)
    (work / "rows.json").write_text(json.dumps(rows, indent=1))
    cols = ["variant", "text", "size MB", "latency vs fp32", "latency vs int8", "mean cos", "min cos", "NN@10",
            "int4 layers"]
    body = "\n".join([
        "## int4 MatMul weights chosen per layer (issue 16, size target)",
        "",
        (f"Measured {datetime.date.today()} on {host_line()}; {args.texts} held-out sentences per text (stdlib "
         "docstrings; `domain` = numpy/scipy/sklearn/torch docstrings not in the 2,000-sentence pruning corpus), "
         f"latency 1 thread, seq 128, {args.runs} interleaved runs in a fresh process. int4 = `quantize --int4 auto` "
         "(MatMulNBits, block 32, accuracy_level 4: int8 compute) held to the default fidelity floor (every output's "
         "cosine >= 0.99 on 32 calibration samples the codes were not fitted to); `int4 every MatMul` = `--int4 .`; "
         "`domain, in-vocabulary` = the held-out domain sentences whose tokens the pruned table kept. "
         "Reproduce: `.venv/bin/python scripts/bench_int4.py`."),
        "",
        md_table(rows, cols),
        "",
        "One MatMul of MiniLM's shapes, each form timed interleaved (1 thread, 12 rounds of 20 runs):",
        "",
        md_table(ops, ["MatMul", "form", "latency vs fp32", "95% interval", "vs int8"]),
        "",
        "What quantize reported for each int4 variant:",
        "",
        *[f"- {r['variant']}: {r['quantize said']}" for r in rows if r.get("quantize said")],
        "",
        NOTES,
    ])
    update_section("int4", body)
    print(body)


#: issue 23's at-rest run (update when the numbers move)
AT_REST_NOTES = """
Issue 23, item 3 (this run, load ~7): int4 at rest with int8 compute **runs at the int8 model's speed** (1.017x the int8
model interleaved; quantize's own interleaved timing 0.992 [0.953, 1.032]), so on x86 int4 no longer costs 2.5-3.1x
(MatMulNBits, section int4); the session folds the int4 -> int8 chain once at load (+0.3 s here: 0.37 s vs 0.07 s;
checked in tests/quantize/test_int4_at_rest.py with the session's optimized_model_filepath: the optimized graph is the
int8 model's, weight byte for byte). Size 19.7 MB vs 23.7 MB: the encoder's MatMuls drop from 10.6 to ~6.6 MB, the
int8 token table (11.7 MB) is the rest, so the <= 12 MB target is **missed** here (it needs an int4 or low-rank table,
section int4). Fidelity with every MatMul int4: mean cos 0.9895, NN@10 0.892 (MatMulNBits with the same codes: 0.990 /
0.895); quantize chose the layers by measuring MatMulNBits candidates, not the at-rest form (their activation
quantization differs: per-32-block dynamic vs the static per-tensor grid) — since 2026-12-07 it measures the form it
writes (section int4-size).
MatMulNBits remains the form on ARM (`--int4-compute auto`); whether KleidiAI makes it faster there cannot be measured
on this host (the emulate profiles check numerics, not speed).
"""

#: issue 23's size run (update when the numbers move)
SIZE_NOTES = """
Targets (issue 23, size), this run (2 shared cores; 1-minute load 0.7 after it):
- <= 12 MB at mean cos >= 0.99 and NN@10 >= 0.90, full vocabulary: **missed**, on both counts. The smallest this form
  can write, every MatMul int4 in blocks of 128 symmetric + an int4 table with one scale per row + int8 positions, is
  **12.25 MB** at cos 0.980 / NN@10 0.854. Where its bytes go (table above): the 4-bit codes alone are 11.17 MB (table
  5.86 + MatMuls 5.31), then the float vectors (biases, LayerNorms, the int8 ops' per-column scales: 0.28), the int8
  position table 0.20, int4 scales 0.17, table scales 0.12, the chain's smoothing vectors 0.09 and 0.21 MB of graph
  (1,000 nodes). 12 MB needs fewer than 4 bits a weight somewhere, and fidelity is already short at 4 bits: every
  MatMul int4 in blocks of 32 gives cos 0.986-0.988 / NN@10 0.88 at 13.1-14.5 MB; int4 auto at the 0.99 floor kept
  one layer int8 (13.2 MB, cos 0.988, NN@10 0.887; its check on 32 calibration samples reads 0.9906, held-out text
  0.988); at the 0.995 floor (16 of 36 int4, 14.7 MB) cos 0.9928 but NN@10 0.8995: no full-vocabulary model here
  meets both fidelity targets below the int8 model's 23.7 MB (the cosine bound does not bound NN@10).
- <= 9 MB with a pruned domain vocabulary, cos >= 0.99 on in-domain text: **met** on the domain sentences whose
  tokens the pruned table kept: int4 auto at the 0.994 floor (`quantize --int4 auto --min-cosine 0.994`), 22 of 36 MatMuls int4, **8.62 MB, cos 0.9915, NN@10
  0.908** (floor 0.99: 7.97 MB, cos 0.988, NN@10 0.889, missed; floor 0.995: 9.19 MB, cos 0.993). On all domain
  sentences (with tokens the 2,000-sentence corpus never had, mapped to [UNK]) cos is 0.962 / min 0.14: that is the
  pruning (the pruned table alone, float encoder: 0.9695 / 0.165), not int4.
- Latency <= the int8 model's: the at-rest forms fold to the int8 graph at session load (the same ops, weights byte for
  byte: tests/quantize/test_int4_at_rest.py), so steady state is the int8 model's kernels; this run reads 0.993-1.016x
  the int8 model (interleaved; a run 10 minutes earlier at load ~8: 1.01-1.07x; quantize's own interleaved checks
  ranged 0.55-1.50x, every interval containing 1.0). What is really added: the int8 position table's dequantizing
  Gather, and with a pruned vocabulary the id-map Gather. **Met within noise, not shown strictly <= 1.0** on this
  shared host; rerun on an idle one.
What changed and what it bought:
- The per-layer int4 choice now measures the model as it is written (at rest with int8 compute, or MatMulNBits), not
  always a MatMulNBits stand-in.
- Layouts per layer (`--int4-block auto --int4-grid auto`): measured on MiniLM, a layer's held-out output error over
  its best layout (median over 36 layers): block 32 symmetric 1.24x, block 64 asymmetric 1.29x, 64 symmetric 1.53x,
  128 asymmetric 1.55x, 128 symmetric 1.76x; at the 1.25 ratio every layer stayed at block 32 and 22 of 36 went
  symmetric (no zero points: -0.2 MB). Larger blocks are worth 0.5 MB at most (block 128 scales 0.17 MB vs 0.66) and
  cost 1.5-1.8x the error: on MiniLM the size is in the 4-bit codes, not in the scales.
- Bytes removed from the at-rest form: the chain's second copy of the int8 weight scale (0.08 MB; it reads the op's
  own), the layer name on each of the chain's ~15 nodes a layer (0.25 MB), repeated scalars and shapes stored once.
- Tables: int4 blocks of 128 (fp16 scale + offset, 6.23 MB) or one scale per row (5.98 MB) vs blocks of 64 (6.59 MB);
  the position and token-type tables int8 (`reduce-embeddings --bits 8 --min-rows 2` after the int4 table): 0.79 ->
  0.20 MB. With a float encoder the block-128 table + int8 positions keep cos 0.9983 / NN@10 0.951: the table is not
  where int4 loses fidelity; the encoder's MatMuls are.
- Row 0 (block 32 asymmetric, table blocks of 64) was written before the two byte fixes above (+0.33 MB).
"""

#: the diagnosis of the measured run (targets met / missed, and why); update when the numbers move
NOTES = """
Targets (issue 16), measured on held-out text: **missed**, all three.
- <= 12 MB at mean cos >= 0.99 and NN@10 >= 0.90: **missed**. Smallest <= 12 MB: int4 auto + rank-96 table, 11.9 MB,
  cos 0.982, NN@10 0.854. Smallest at cos >= 0.99: int4 auto + int8 table, 19.7 MB, cos 0.9905 but NN@10 0.8955 (< 0.90).
- Latency no worse than int8: **missed**. Every int4 model runs 2.5-3.1x the int8 model (0.77-0.95x fp32; int8 0.31x).
- <= 9 MB with --prune-vocab: size met (8.1 MB), fidelity **missed**: domain cos 0.974 / NN@10 0.839 (in-vocabulary
  sentences 0.983 / 0.876).
Diagnosis:
- Codes: GPTQ (calibration Gram, one grid per block) won on all 36 MatMuls, held-out output error 0.23-0.85x
  round-to-nearest's (median 0.45x); int4 on every MatMul now reaches mean cos 0.990 (the RTN run of 2026-12-01:
  0.974). The cosine bound does not bound NN@10: at cos 0.990 neighbour agreement is 0.895.
- The per-layer choice works as designed but the bound is loose here: with the rank tables the check on held-out
  *calibration* samples reads 0.991 while held-out text reads 0.982-0.986, because the calibration sentences are in the
  corpus the low-rank table was fitted to. Use --tolerance with --eval on text outside that corpus for an honest bound
  (not run here: time). Only layer.5 attention/output/dense was kept int8 by auto (largest int4 error, 6.7e-3).
- Latency: on this AVX-512 VNNI host onnxruntime 1.32's MatMulNBits (accuracy_level 4: activations quantized per block
  at run time) is slower than MatMulIntegerToFloat at seq 128 at every block size (single op: block 32 4.6-5.8x, block
  128 1.6-2.1x the int8 op; intervals wide, the 2-core host was shared by other jobs). int4 is a size-only choice here.
- Size: the int4 encoder is ~7 MB; the table decides the rest (int8 11.7 MB, rank-128 ~5 MB, int4 6.2 MB); the low-rank
  table's error (NN@10 0.904 alone, bench:embeddings) adds to int4's, so <= 12 MB at NN@10 0.90 needs a better table.
- int4 auto adds 4-7 minutes to quantize on MiniLM on this loaded host (GPTQ, Gram pass, candidate builds, latency).
"""


if __name__ == "__main__":
    main()
