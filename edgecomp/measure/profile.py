"""Where the time goes: onnxruntime's own profiler, per op type and per node.

Each model gets its own profiled session (``SessionOptions.enable_profiling``; the trace is written
into a temporary folder, read, and removed). The runs are interleaved (A B A B ...) like
:func:`edgecomp.measure.bench.benchmark`'s, but they are *separate* runs: the profiler records
every kernel and so adds overhead, and the latency that bench reports stays the unprofiled one.

The trace is a list of Chrome-trace events. Two kinds are read:

- ``cat == "Session"``, ``name == "model_run"``: one per ``session.run`` with its duration ``dur``
  in microseconds. The first ``warmup`` runs are left out; the rest are the profiled runs.
- ``cat == "Node"``, ``name`` ending in ``_kernel_time``: one per node executed, with
  ``args.op_name`` (the op type *after* onnxruntime's fusions: FusedMatMul, QLinearMatMul,
  SkipLayerNormalization ...) and ``dur`` in microseconds. A node event belongs to the run whose
  ``[ts, ts + dur]`` window holds its start. Control-flow nodes (If, Loop, Scan) are timed
  including their bodies, whose nodes have events of their own: every node counts its *own* time,
  its duration less the durations of the nodes nested directly inside it (intervals on one
  thread: the sequential executor runs one node at a time).

Per op type: milliseconds per inference (the sum of its node times over the profiled runs, divided
by the number of runs: a mean, so the rows add up; a run preempted on a busy machine raises it, and
``run_ms``/``run_kernel_ms`` keep each run's numbers), the share of the total and the node count per run. The total the shares
refer to is the profiler's own ``model_run`` duration of the same runs: it is the time these
kernels ran in (same runs, same profiling overhead), while bench's latency comes from other runs.
What the kernels do not cover (allocation, input/output copies, scheduling between kernels) is
listed as its own row, ``(between kernels)``, so the rows add up to the measured total exactly
and the kernel coverage is visible (high for compute-bound models, low for tiny ones where fixed
per-run costs dominate).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from edgecomp.data import Feed, image_size_hint, input_specs, synthesize_feed
from edgecomp.errors import OptionError
from edgecomp.io import load_model
from edgecomp.runtime import make_session, run_feed, with_input_floats

__all__ = ["OpTime", "NodeTime", "ModelProfile", "aggregate", "profile_models", "side_by_side_rows", "node_rows",
           "BETWEEN_KERNELS", "PROFILE_NOTE"]

BETWEEN_KERNELS = "(between kernels)"
PROFILE_NOTE = ("profiled in separate runs (onnxruntime's profiler adds overhead; the latency above is from "
                "unprofiled runs: where a profiled median is well above that p50, the profiler's per-node cost "
                "dominates and the shares of small nodes are inflated); op times are means per inference, op types "
                "after onnxruntime's fusions, control-flow nodes without their bodies")


@dataclasses.dataclass
class OpTime:
    op_type: str
    ms: float            # per inference
    share: float         # of the measured total (model_run)
    count: float         # nodes of this type per inference


@dataclasses.dataclass
class NodeTime:
    node: str
    op_type: str
    ms: float
    share: float


@dataclasses.dataclass
class ModelProfile:
    model: str
    runs: int
    total_ms: float       # mean model_run duration of the profiled runs (the profiler's measured total)
    kernel_ms: float      # mean sum of node kernel times per run
    wall_ms: float | None  # mean wall time of the profiled runs as seen from Python (None for a parsed trace)
    ops: list[OpTime]     # slowest first, without the between-kernels remainder
    nodes: list[NodeTime]  # slowest first
    run_ms: list[float] = dataclasses.field(default_factory=list)         # each profiled run's model_run
    run_kernel_ms: list[float] = dataclasses.field(default_factory=list)  # each profiled run's kernel sum

    @property
    def kernel_coverage(self) -> float:
        return self.kernel_ms / self.total_ms if self.total_ms > 0 else 0.0

    @property
    def median_ms(self) -> float:
        """The median profiled run: against bench's unprofiled p50, the profiler's own cost."""
        return float(np.median(self.run_ms)) if self.run_ms else self.total_ms

    @property
    def between_ms(self) -> float:
        return max(self.total_ms - self.kernel_ms, 0.0)


def _run_windows(events: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
    return sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")


def _kernels(events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [e for e in events if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time")]


def _self_times(kernels: Sequence[Mapping[str, Any]]) -> list[float]:
    """Each node's own time: its duration less the nodes that ran inside it (the body of an If,
    Loop or Scan is profiled node by node *and* inside the control-flow node's own time)."""
    def span(k: int) -> tuple[float, float]:
        return float(kernels[k]["ts"]), float(kernels[k]["ts"]) + float(kernels[k]["dur"])

    own = [float(e["dur"]) for e in kernels]
    stack: list[int] = []  # the nodes enclosing the current one, innermost last
    for k in sorted(range(len(kernels)), key=lambda k: (span(k)[0], -own[k])):
        ts, end = span(k)
        while stack and end > span(stack[-1])[1] + 1:  # 1 us: ts and dur are rounded separately
            stack.pop()
        if stack:
            own[stack[-1]] -= end - ts
        stack.append(k)
    return [max(u, 0.0) for u in own]


def aggregate(events: Sequence[Mapping[str, Any]], model: str = "model", skip_runs: int = 0,
              wall_ms: float | None = None, top: int = 10) -> ModelProfile:
    """Per-op-type and top-node times of one trace, over its runs after the first ``skip_runs``."""
    windows = _run_windows(events)[skip_runs:]
    if not windows:
        raise OptionError("runs", "the profile has no timed run (model_run events) to aggregate")
    starts = np.array([w[0] for w in windows])
    op_us: dict[str, float] = defaultdict(float)
    op_n: dict[str, int] = defaultdict(int)
    node_us: dict[str, float] = defaultdict(float)
    node_op: dict[str, str] = {}
    per_run = np.zeros(len(windows))
    kernels = _kernels(events)
    for e, self_us in zip(kernels, _self_times(kernels)):
        ts = float(e["ts"])
        i = int(np.searchsorted(starts, ts, side="right")) - 1
        if i < 0 or ts > windows[i][1]:
            continue  # a warmup run's node
        op = str(e.get("args", {}).get("op_name", "?"))
        node = str(e["name"])[: -len("_kernel_time")]
        op_us[op] += self_us
        per_run[i] += self_us
        op_n[op] += 1
        node_us[node] += self_us
        node_op[node] = op
    n = len(windows)
    total = sum(b - a for a, b in windows) / n / 1e3
    kernel = sum(op_us.values()) / n / 1e3

    def share(us: float) -> float:
        return us / n / 1e3 / total if total > 0 else 0.0

    ops = [OpTime(op, us / n / 1e3, share(us), op_n[op] / n) for op, us in op_us.items()]
    nodes = [NodeTime(k, node_op[k], us / n / 1e3, share(us)) for k, us in node_us.items()]
    ops.sort(key=lambda o: (-o.ms, o.op_type))
    nodes.sort(key=lambda x: (-x.ms, x.node))
    return ModelProfile(model, n, total, kernel, wall_ms, ops, nodes[:top], [(b - a) / 1e3 for a, b in windows],
                        [float(u) / 1e3 for u in per_run])


def profile_models(models: Sequence[str | os.PathLike | ir.Model], *, threads: int = 1, warmup: int = 10,
                   runs: int = 50, feed: Feed | None = None, shapes: Mapping[str, Sequence[int]] | None = None,
                   values: Mapping[str, np.ndarray] | None = None, labels: Sequence[str] | None = None,
                   top: int = 10) -> list[ModelProfile]:
    """Profile each model in its own profiled session, runs interleaved, on one feed (synthesized
    from the first model like bench's when not given)."""
    if runs < 1:
        raise OptionError("runs", f"must be >= 1, got {runs}")
    labels = list(labels) if labels else [str(m) for m in models]
    if feed is None:
        first = models[0] if isinstance(models[0], ir.Model) else load_model(models[0])
        feed = synthesize_feed(input_specs(first), shapes, values=values, image_size=image_size_hint(first))
        del first
    sessions: list = []
    with tempfile.TemporaryDirectory(prefix="edgecomp-profile-") as tmp:
        try:
            for i, m in enumerate(models):
                sessions.append(make_session(m, threads=threads, profile_prefix=os.path.join(tmp, f"m{i}")))
            wall = _profiled_runs(sessions, feed, warmup, runs)
            traces = []
            while sessions:  # a session ends its profile once; the trace is read before the folder goes
                with open(sessions.pop(0).end_profiling(), encoding="utf-8") as fh:
                    traces.append(json.load(fh))
        finally:
            for sess in sessions:  # on an error: end the profilers while their folder still exists
                sess.end_profiling()
    return [aggregate(ev, lab, skip_runs=warmup + 1, wall_ms=w, top=top) for ev, lab, w in zip(traces, labels, wall)]


def _profiled_runs(sessions: Sequence, feed: Feed, warmup: int, runs: int) -> list[float]:
    """Check and warm up each session (runs left out of the profile), then ``runs`` interleaved
    runs; each session's mean wall time in ms."""
    feeds = [with_input_floats(s, feed) for s in sessions]
    for s, f in zip(sessions, feeds):
        for _ in range(warmup + 1):
            run_feed(s, f)
    wall = [0.0 for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds[i])
            wall[i] += time.perf_counter() - t0
    return [w / runs * 1e3 for w in wall]


def side_by_side_rows(profiles: Sequence[ModelProfile]) -> list[dict[str, Any]]:
    """One row per op type (slowest in the first model first): ms per inference of each model and
    each later model's ratio to the first; a last row for the time between kernels and one total."""
    if not profiles:
        return []
    order = list(dict.fromkeys(o.op_type for p in profiles for o in p.ops))
    first = {o.op_type: o.ms for o in profiles[0].ops}
    order.sort(key=lambda op: -first.get(op, -1.0))
    times = [{o.op_type: o.ms for o in p.ops} for p in profiles]
    for p, t in zip(profiles, times):
        t[BETWEEN_KERNELS] = p.between_ms
        t["total"] = p.total_ms
    counts = [{o.op_type: o.count for o in p.ops} for p in profiles]
    rows = []
    for op in [*order, BETWEEN_KERNELS, "total"]:
        row: dict[str, Any] = {"op type": op}
        for k, (p, t) in enumerate(zip(profiles, times)):
            ms = t.get(op)
            row[f"{_short(p.model, k)} ms"] = ms
            if k == 0:
                row[f"{_short(p.model, k)} share"] = None if ms is None else f"{100 * ms / p.total_ms:.1f}%"
            else:
                row[f"ratio {k + 1}/1"] = ms / times[0][op] if ms is not None and times[0].get(op) else None
        n = [c.get(op) for c in counts]
        row["nodes/run"] = None if all(c is None for c in n) else " / ".join("—" if c is None else f"{c:g}" for c in n)
        rows.append(row)
    return rows


def node_rows(profile: ModelProfile) -> list[dict[str, Any]]:
    return [{"node": n.node, "op type": n.op_type, "ms": n.ms, "share": f"{100 * n.share:.1f}%"} for n in profile.nodes]


def _short(label: str, k: int) -> str:
    return f"{k + 1}:{os.path.basename(label)}"
