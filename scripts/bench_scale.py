#!/usr/bin/env python
"""Scale benchmark → BENCHMARKS.md (section "Scale"): how inspect, optimize, quantize and prune grow
with graph size.

    nice -n 10 .venv/bin/python scripts/bench_scale.py [--nodes 1000,5000,20000] [--variants chain,residual,conv]
        [--commands inspect,optimize,quantize,prune,prune-data] [--timeout 600] [--workdir out/bench_scale]
    nice -n 10 .venv/bin/python scripts/bench_scale.py --large   # the > 2 GiB model, alone

Generated graphs (float32, batch 1, hidden 16 so 20 k nodes stay ~7 MB):
- ``chain``: ``x → [MatMul(W) → Add(b) → Relu]*`` (3 nodes a block);
- ``residual``: ``x → [x + Relu(MatMul(x, W) + b)]*`` and every 4th block a side branch
  ``Relu(MatMul(x, W2))`` joined by Add (4-6 nodes a block: values with several consumers);
- ``conv``: ``x [1,8,4,4] → [x + Conv1x1(Relu(Conv3x3(x)))]*`` (4 nodes a block: prune's channel
  groups, the 3x3 conv's output channels are prunable, the residual ones one big group).

``--large``: an MLP ``x [1, 8192] → MatMul [8192, 16384] → Relu → MatMul [16384, 16384] → Relu →
MatMul [16384, 8192]`` with biases, 2.0 GiB of float32 weights (just over protobuf's 2 GiB limit),
saved with external data, through optimize → quantize (8 samples) → prune (structured, 25%) →
validate (the int8 and the pruned model against the input), quantize and prune reading optimize's output.

Every command runs in its own process (``python -m edgecomp.cli``); wall seconds, CPU seconds
(user + system: what a shared machine's load does not inflate much) and peak RSS (``os.wait4``'s
``ru_maxrss``) are recorded. The growth exponent is the slope of log(time) over log(nodes)
between the smallest and the largest size (1.0 = linear), of CPU and of wall time.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = 16
CHANNELS = 8


def _init(name, a):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def chain(blocks: int, rng) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        inits += [_init(f"W{i}", rng.standard_normal((HIDDEN, HIDDEN)) / 4), _init(f"b{i}", rng.standard_normal(HIDDEN) / 10)]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        x = f"r{i}"
    return _model(nodes, inits, x, [1, HIDDEN])


def residual(blocks: int, rng) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    for i in range(blocks):
        inits += [_init(f"W{i}", rng.standard_normal((HIDDEN, HIDDEN)) / 8), _init(f"b{i}", rng.standard_normal(HIDDEN) / 10)]
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        h = f"r{i}"
        if i % 4 == 3:
            inits.append(_init(f"V{i}", rng.standard_normal((HIDDEN, HIDDEN)) / 8))
            nodes += [helper.make_node("MatMul", [x, f"V{i}"], [f"sm{i}"], name=f"smm{i}"),
                      helper.make_node("Relu", [f"sm{i}"], [f"sr{i}"], name=f"srelu{i}"),
                      helper.make_node("Add", [h, f"sr{i}"], [f"j{i}"], name=f"join{i}")]
            h = f"j{i}"
        nodes.append(helper.make_node("Add", [x, h], [f"y{i}"], name=f"res{i}"))
        x = f"y{i}"
    # LayerNorm-free residual chains grow: scale each block's residual down via the weights above
    return _model(nodes, inits, x, [1, HIDDEN])


def conv(blocks: int, rng) -> onnx.ModelProto:
    nodes, inits, x = [], [], "x"
    c = CHANNELS
    for i in range(blocks):
        inits += [_init(f"K{i}", rng.standard_normal((c, c, 3, 3)) / 24), _init(f"kb{i}", rng.standard_normal(c) / 10),
                  _init(f"P{i}", rng.standard_normal((c, c, 1, 1)) / 8), _init(f"pb{i}", rng.standard_normal(c) / 10)]
        nodes += [helper.make_node("Conv", [x, f"K{i}", f"kb{i}"], [f"c{i}"], name=f"conv{i}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Conv", [f"r{i}", f"P{i}", f"pb{i}"], [f"p{i}"], name=f"pw{i}"),
                  helper.make_node("Add", [x, f"p{i}"], [f"y{i}"], name=f"res{i}")]
        x = f"y{i}"
    return _model(nodes, inits, x, [1, c, 4, 4])


VARIANTS = {"chain": (chain, 3), "residual": (residual, 4.75), "conv": (conv, 4)}


def _model(nodes, inits, out, shape) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build(variant: str, nodes: int, work: Path) -> tuple[Path, Path, int]:
    fn, per_block = VARIANTS[variant]
    blocks = max(1, round(nodes / per_block))
    path, data = work / f"{variant}_{nodes}.onnx", work / f"{variant}_{nodes}.npz"
    if not path.exists():
        model = fn(blocks, np.random.default_rng(0))
        onnx.save(model, path)
        shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        np.savez(data, x=np.random.default_rng(1).standard_normal((16, *shape[1:])).astype(np.float32))
    return path, data, len(onnx.load(path, load_external_data=False).graph.node)


def commands(path: Path, data: Path, work: Path) -> dict[str, list[str]]:
    out = work / "out"
    out.mkdir(exist_ok=True)
    stem = path.stem
    return {
        "inspect": ["inspect", str(path)],
        "optimize": ["optimize", str(path), "-o", str(out / f"{stem}.opt.onnx")],
        "quantize": ["quantize", str(path), "-o", str(out / f"{stem}.int8.onnx"), "--calibration", str(data),
                     "--max-samples", "8"],
        "prune": ["prune", str(path), "-o", str(out / f"{stem}.pruned.onnx"), "--sparsity", "0.25"],
        "quantize-all": ["quantize", str(path), "-o", str(out / f"{stem}.int8all.onnx"), "--calibration", str(data),
                         "--max-samples", "8", "--families", "all"],
        "prune-data": ["prune", str(path), "-o", str(out / f"{stem}.pruned_d.onnx"), "--sparsity", "0.25",
                       "--data", str(data), "--max-samples", "8"],
    }


def run_measured(args: list[str], timeout: float) -> dict:
    """One CLI run in a fresh process: wall seconds, peak RSS (MB), exit status."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    log = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "edgecomp.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline, rc, usage = t0 + timeout, None, None
    while rc is None:
        pid, status, usage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            rc = os.waitstatus_to_exitcode(status)
            break
        if time.perf_counter() > deadline:
            p.kill()
            _, status, usage = os.wait4(p.pid, 0)
            rc = "timeout"
            break
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    log.seek(0)
    tail = log.read().decode(errors="replace").strip().splitlines()[-1:]
    p.returncode = 0  # reaped above
    return {"seconds": seconds, "cpu s": usage.ru_utime + usage.ru_stime, "peak MB": usage.ru_maxrss / 1024, "rc": rc,
            "last line": tail[0] if tail else ""}


def build_large(work: Path) -> tuple[Path, Path]:
    """The > 2 GiB MLP (module docstring), weights written one by one as external data."""
    path, data = work / "large.onnx", work / "large.npz"
    if path.exists():
        return path, data
    rng = np.random.default_rng(0)
    dims, nodes, inits, x = [8192, 16384, 16384, 8192], [], [], "x"
    for i, (k, n) in enumerate(zip(dims, dims[1:])):
        w = rng.standard_normal((k, n), dtype=np.float32)
        w *= np.float32(1 / math.sqrt(k))
        inits += [numpy_helper.from_array(w, f"W{i}"), _init(f"b{i}", rng.standard_normal(n) / 10)]
        del w
        nodes += [helper.make_node("MatMul", [x, f"W{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"add{i}")]
        x = f"a{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"relu{i}"))
            x = f"r{i}"
    model = _model(nodes, inits, x, [1, dims[0]])
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = dims[-1]
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="large.onnx.data", size_threshold=1024)
    np.savez(data, x=rng.standard_normal((16, dims[0])).astype(np.float32))
    return path, data


def run_large(work: Path, timeout: float) -> list[dict]:
    path, data = build_large(work)
    out = work / "out"
    out.mkdir(exist_ok=True)
    opt, q, p = out / "large.opt.onnx", out / "large.int8.onnx", out / "large.pruned.onnx"
    steps = {
        "optimize": ["optimize", str(path), "-o", str(opt)],
        "quantize": ["quantize", str(opt), "-o", str(q), "--calibration", str(data), "--max-samples", "8"],
        "prune": ["prune", str(opt), "-o", str(p), "--sparsity", "0.25"],
        "validate int8": ["validate", str(path), str(q), "--data", str(data)],
        "validate pruned": ["validate", str(path), str(p), "--data", str(data)],
    }
    rows = []
    for name, args in steps.items():
        r = run_measured(args, timeout)
        r.update(command=name)
        rows.append(r)
        print(f"large {name:15s} {r['seconds']:7.1f} s {r['cpu s']:7.1f} cpu s {r['peak MB']:7.0f} MB rc={r['rc']} {r['last line'][:110]}",
              flush=True)
    return rows


def exponent(rows: list[dict], variant: str, command: str, key: str = "cpu s") -> float | None:
    pts = [(r["nodes"], r[key]) for r in rows if r["variant"] == variant and r["command"] == command
           and r["rc"] in (0, 3)]
    if len(pts) < 2:
        return None
    (n0, t0), (n1, t1) = min(pts), max(pts)
    return math.log(t1 / t0) / math.log(n1 / n0) if n1 > n0 else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1000,5000,20000")
    ap.add_argument("--variants", default="chain,residual,conv")
    ap.add_argument("--commands", default="inspect,optimize,quantize,prune,prune-data")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--workdir", default=str(ROOT / "out" / "bench_scale"))
    ap.add_argument("--large", action="store_true", help="only the > 2 GiB model through optimize → quantize → prune → validate")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    if args.large:
        run_large(work, args.timeout)
        return
    rows = []
    for n in map(int, args.nodes.split(",")):
        for variant in args.variants.split(","):
            path, data, count = build(variant, n, work)
            cmds = commands(path, data, work)
            for name in args.commands.split(","):
                r = run_measured(cmds[name], args.timeout)
                r.update(variant=variant, nodes=count, command=name)
                rows.append(r)
                print(f"{variant:9s} {count:6d} nodes {name:12s} {r['seconds']:7.1f} s {r['cpu s']:7.1f} cpu s {r['peak MB']:7.0f} MB "
                      f"rc={r['rc']} {r['last line'][:90]}", flush=True)
    print("\ngrowth exponents (log t / log n, smallest to largest size):")
    for variant in args.variants.split(","):
        for name in args.commands.split(","):
            e, w = exponent(rows, variant, name), exponent(rows, variant, name, "seconds")
            if e is not None:
                print(f"  {variant:9s} {name:12s} cpu {e:.2f}  wall {w:.2f}")


if __name__ == "__main__":
    main()
