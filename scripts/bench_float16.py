"""Float16 models on this CPU: the file as exported vs the forms edgecomp writes.

For each float16 model of the zoo (tests/zoo.py), interleaved on one thread
(:func:`edgecomp.measure.bench.compare_latency`, 95% interval of the median ratio):

- ``fp16``: the model as exported (onnxruntime's CPU EP inserts Casts around the ops it has no
  float16 kernel for);
- ``lift+store``: :class:`LiftFloat16Pass` then :class:`StoreFloat16Pass` — float32 compute,
  float16 inputs/outputs and float16 weights behind Casts (what ``quantize`` writes for the
  layers it leaves float);
- ``lift``: float32 compute and float32 weights (twice the file; shows what the Casts of the
  stored weights cost at run time: nothing once onnxruntime folds them at load);
- ``int8``: ``edgecomp quantize`` with its defaults (families timed on this host).

Sizes, and the mean output cosine of each form to ``fp16`` on the model's DATA, come with it.

    python scripts/bench_float16.py [--work DIR] [--models resnet-half,encoder-half,...]

Models are built (and quantized) in subprocesses so that this process never imports torch.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from _bench_common import ROOT

from edgecomp.data import input_specs, load_data
from edgecomp.io import load_model, save_model
from edgecomp.measure.bench import compare_latency
from edgecomp.measure.validate import validate
from edgecomp.passes.base import run_pass
from edgecomp.passes.float_precision import LiftFloat16Pass, StoreFloat16Pass, float32_tensor_names

MODELS = ["resnet-half", "mnv2-half", "encoder-half", "silero_vad_fp16", "mnv2_224-half"]


def build(work: Path, names: list[str]) -> dict[str, tuple[Path, Path]]:
    code = ("import sys, json; sys.path.insert(0, 'tests'); import zoo; z = zoo.Zoo(sys.argv[1]); "
            "print(json.dumps({n: [str(p) for p in z.get(n)] for n in sys.argv[2:]}))")
    out = subprocess.run([sys.executable, "-c", code, str(work), *names], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout
    import json

    return {n: (Path(m), Path(d)) for n, (m, d) in json.loads(out.strip().splitlines()[-1]).items()}


def forms(name: str, model: Path, data: Path, work: Path) -> dict[str, Path]:
    out = {"fp16": model}
    lifted = load_model(model)
    keep = float32_tensor_names(lifted)
    run_pass(LiftFloat16Pass(), lifted)
    out["lift"] = save_model(lifted, work / f"{name}.lift.onnx")
    run_pass(StoreFloat16Pass(keep_float32=keep), lifted)
    out["lift+store"] = save_model(lifted, work / f"{name}.lift_store.onnx")
    q = work / f"{name}.int8.onnx"
    res = subprocess.run([sys.executable, "-m", "edgecomp.cli", "quantize", str(model), "-o", str(q),
                          "--calibration", str(data)], cwd=ROOT, capture_output=True, text=True)
    if res.returncode == 0:
        out["int8"] = q
    else:
        print(f"{name}: quantize refused: {res.stderr.strip()}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/edgecomp-bench-float16")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--runs", type=int, default=20, help="runs per model per round")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    built = build(work, a.models.split(","))
    print("| model | form | size KB | latency vs fp16 (95% interval) | mean cosine to fp16 |")
    print("|---|---|---|---|---|")
    for name, (model, data) in built.items():
        paths = forms(name, model, data, work)
        feed = next(load_data(data, input_specs(load_model(model))).feeds_for(input_specs(load_model(model))))
        labels = list(paths)
        ratios = compare_latency(list(paths.values()), feed, runs_per_round=a.runs, min_rounds=5, max_rounds=12,
                                 labels=labels)
        for i, (form, path) in enumerate(paths.items()):
            speed = "1.00 (reference)" if i == 0 else ratios[i - 1].text()
            cos = 1.0 if i == 0 else min(o.cosine_mean for o in validate(model, path, data).outputs
                                         if o.cosine_mean == o.cosine_mean)
            print(f"| {name} | {form} | {path.stat().st_size / 1024:.0f} | {speed} | {cos:.5f} |", flush=True)


if __name__ == "__main__":
    main()
