"""ARM numerics: int8 models on onnxruntime's own aarch64 kernels (qemu-user) vs the x86 host.

For every emulated profile (arm64-neon, -dotprod, -i8mm, -sve, -sme, -sme-nokleidiai) and every
model variant: mean/worst cosine of the target's outputs to the host's fp32 reference, the
platform gap (1 - mean cosine of the same model, target vs host), and the emulation cost in
seconds per sample (session load and first inference included; never a target latency).

Models: all-MiniLM-L6-v2 (real weights; fp32 on one profile as the faithfulness check, edgecomp
static int8 in the contrib and QDQ forms, onnxruntime quantize_dynamic as an anchor) on the first
--samples held-out docstring sentences; the digits MobileNetV2 (fp32 and edgecomp int8) on the
first --digits-samples test digits.

Needs the emulated runtime (``edgecomp targets setup arm64``). Run it late and nice'd; it is
CPU-heavy (MiniLM int8 ~1.5-3 s of CPU per sentence under emulation, fp32 ~10 s):

    nice -n 10 python scripts/bench_targets.py --samples 8
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import numpy as np
from _bench_common import export_minilm, md_table, minilm_path, text_splits, update_section
from bench_quantize import edgecomp_quantize, ort_dynamic

from edgecomp.emulate import load_runtime
from edgecomp.emulate.numerics import target_fidelity
from edgecomp.render.text import host_line
from edgecomp.targets import BUILTIN_PROFILES
from edgecomp.text import load_tokenizer, tokenize, write_token_data

PROFILES = ["arm64-neon", "arm64-dotprod", "arm64-i8mm", "arm64-sve", "arm64-sme", "arm64-sme-nokleidiai"]


def rows_for(model_name: str, ref: Path, variants: dict[str, Path], feeds, profiles, runtime, workers) -> list[dict]:
    rows = []
    for variant, path in variants.items():
        for name in profiles:
            t0 = time.perf_counter()
            (r,) = target_fidelity(ref, path, feeds, [BUILTIN_PROFILES[name]], max_samples=len(feeds), runtime=runtime,
                                   workers=workers, progress=False)
            fid, gap = r.fidelity[0], r.platform_gap[0]
            row = {"model": model_name, "variant": variant, "target": name, "samples": r.samples,
                   "mean cos vs host fp32": f"{fid.cosine_mean:.6f}", "worst cos": f"{fid.cosine_min:.6f}",
                   "top-1 agree": fid.top1_agreement, "platform gap 1-cos": f"{1.0 - gap.cosine_mean:.2e}",
                   "gap max abs": f"{gap.max_abs_err:.2e}", "emulated s/sample": round(r.seconds_per_sample, 1),
                   "note": "emulation not trusted for SME" if r.note else ""}
            print(f"{row}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def minilm(work: Path, n: int, profiles, runtime, workers) -> list[dict]:
    fp32 = export_minilm(work / "minilm.onnx")
    tok = load_tokenizer(minilm_path())
    splits = text_splits()
    calib = write_token_data(tokenize(tok, splits["calib"][:100]), work / "calib100")
    feeds = tokenize(tok, splits["test"][:n])
    if not (work / "edgecomp.onnx").exists():
        edgecomp_quantize(fp32, work / "edgecomp.onnx", calib)
    if not (work / "edgecomp_qdq.onnx").exists():
        edgecomp_quantize(fp32, work / "edgecomp_qdq.onnx", calib, "--format", "qdq")
    if not (work / "ort_dyn.onnx").exists():
        ort_dynamic(fp32, work / "ort_dyn.onnx", False, False)
    int8 = {"edgecomp static int8 (contrib)": work / "edgecomp.onnx",
            "edgecomp static int8 (QDQ)": work / "edgecomp_qdq.onnx",
            "ORT quantize_dynamic (anchor)": work / "ort_dyn.onnx"}
    rows = rows_for("all-MiniLM-L6-v2", fp32, {"fp32": fp32}, feeds[: max(2, n // 2)], ["arm64-dotprod"], runtime,
                    workers)
    return rows + rows_for("all-MiniLM-L6-v2", fp32, int8, feeds, profiles, runtime, workers)


def digits(work: Path, n: int, profiles, runtime, workers) -> list[dict]:
    from edgecomp.export import export_spec
    from models import digits as dg

    if not dg.weights_path("mobilenet_v2", 0.5).is_file():
        dg.main(["--arch", "mobilenet_v2", "--width", "0.5"])
    fp32 = work / "digits.onnx"
    if not fp32.exists():
        export_spec("models.mobilenet_v2:digits_classifier", fp32, dynamic={"x": {0: "batch"}})
    xtr, _ = dg.load_digits_32("train")
    xte, _ = dg.load_digits_32("test")
    calib = work / "digits_calib.npz"
    np.savez(calib, x=xtr[:200])
    if not (work / "digits_int8.onnx").exists():
        edgecomp_quantize(fp32, work / "digits_int8.onnx", calib, "--families", "all")
    feeds = [{"x": xte[i:i + 1]} for i in range(n)]
    return rows_for("digits MobileNetV2", fp32, {"fp32": fp32, "edgecomp static int8": work / "digits_int8.onnx"},
                    feeds, profiles, runtime, workers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=8, help="MiniLM sentences per target")
    ap.add_argument("--digits-samples", type=int, default=16)
    ap.add_argument("--profiles", default=",".join(PROFILES))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgecomp_bench_targets"))
    ap.add_argument("--skip-minilm", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    profiles = args.profiles.split(",")
    runtime = load_runtime()
    t0 = time.perf_counter()
    rows = digits(args.work, args.digits_samples, profiles, runtime, args.workers)
    if not args.skip_minilm:
        rows += minilm(args.work, args.samples, profiles, runtime, args.workers)
    cols = ["model", "variant", "target", "samples", "mean cos vs host fp32", "worst cos", "top-1 agree",
            "platform gap 1-cos", "gap max abs", "emulated s/sample", "note"]
    body = "\n".join([
        "## ARM numerics (onnxruntime's aarch64 kernels under qemu-user)",
        "",
        f"Measured {datetime.date.today()} with `nice -n 10 python scripts/bench_targets.py --samples {args.samples} "
        f"--digits-samples {args.digits_samples}` ({time.perf_counter() - t0:.0f} s). Host: {host_line()}; "
        f"onnxruntime {runtime.onnxruntime} on both sides, qemu-user from Debian.",
        "",
        "Platform gap: 1 - mean cosine of the same model's outputs, emulated target vs this host. "
        "`emulated s/sample` is the cost of the check (session load and first inference included), "
        "never a target latency.",
        "",
        md_table(rows, cols),
    ])
    update_section("arm-numerics", body)
    print(body)


if __name__ == "__main__":
    main()
