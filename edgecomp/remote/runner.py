"""edgecomp's device runner: copied to the device and run there by its own python3.

Needs only the standard library, numpy and onnxruntime (never edgecomp). Modes:

- ``probe``: one JSON line with the runner version, python, numpy and onnxruntime versions (null
  when missing), the machine and the CPU name (``/proc/cpuinfo``), so the host can refuse a device
  that lacks them before copying anything.
- ``bench JOB.json``: sessions as edgecomp's host sessions (``threads`` intra-op, 1 inter-op,
  sequential, all graph optimizations, CPU EP), pinned to ``pin`` when given; each model's float
  inputs cast to its own float type; one checked run plus ``warmup`` runs each; then ``runs``
  interleaved rounds (A B C A B C ...) timed with ``time.perf_counter``. Writes the raw per-run
  seconds to ``result.json``; the host computes the percentiles and ratios exactly as local bench.
  With ``rounds`` (version 2), the runs form rounds of paired interleaved runs for
  :func:`edgecomp.measure.bench.estimates_from_rounds`: ``runs`` per round is sized here, on the
  device, from one run of the first model after its checked run, so a round lasts about ``round_seconds``
  (clipped to ``min_runs``..``max_runs``), and ``rounds`` x that many runs are timed.
- ``outputs JOB.json``: every model on every feed of ``feeds`` (default ``feeds.npz``; keys
  ``FEED/INPUT``), which is deleted once read (the host streams DATA in chunks through one work
  folder); writes ``outputs`` (default ``outputs.npz``; keys ``MODEL/FEED/OUTPUT_INDEX``) and the
  output names in ``result.json``.

Models are named by their path in the work folder (``mI/NAME.onnx``): a model's external-data
files sit beside it under the names its graph refers to.

Versions: 1 bench and outputs; 2 bench ``rounds``, outputs ``feeds``/``outputs`` file names.

A watchdog thread reads stdin: the host keeps it open while it waits, so EOF means the connection
is gone (dropped, or the host was killed); the runner then exits at once instead of computing for
nobody. Failures are one JSON line ``{"error": ...}`` on stdout and exit status 2.
"""

import json
import os
import sys
import threading
import time

RUNNER_VERSION = 2


def _watch_stdin():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except Exception:
        pass
    os._exit(3)


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "Model", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return None


def probe():
    import platform

    info = {"runner": RUNNER_VERSION, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_name(), "cpus": os.cpu_count(), "numpy": None, "onnxruntime": None}
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except Exception:
        pass
    try:
        import onnxruntime
        info["onnxruntime"] = onnxruntime.__version__
    except Exception:
        pass
    return info


_FLOATS = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def _session(path, threads):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise RuntimeError("onnxruntime on the device cannot load %s: %s" % (os.path.basename(path), _line(e)))


def _cast(session, feed):
    want = {i.name: _FLOATS.get(i.type) for i in session.get_inputs()}
    return {k: v.astype(want[k]) if want.get(k) and v.dtype.kind == "f" and v.dtype != want[k] else v
            for k, v in feed.items()}


def _run(session, feed):
    try:
        return session.run(None, feed)
    except Exception as e:
        raise RuntimeError("onnxruntime on the device rejected the input: %s" % _line(e))


def _feeds(path):
    import numpy as np

    feeds = {}
    with np.load(path, allow_pickle=False) as z:
        for key in z.files:
            feed, _, name = key.partition("/")
            feeds.setdefault(int(feed), {})[name] = z[key]
    return [feeds[i] for i in sorted(feeds)]


def bench(job):
    if job.get("pin"):
        try:
            os.sched_setaffinity(0, job["pin"])
        except (OSError, AttributeError) as e:
            raise RuntimeError("cannot pin to CPUs %s on the device (it has %s CPUs): %s"
                               % (job["pin"], os.cpu_count(), getattr(e, "strerror", None) or e))
    feed = _feeds(job.get("feeds", "feeds.npz"))[0]
    sessions = [_session(m, job["threads"]) for m in job["models"]]
    feeds = [_cast(s, feed) for s in sessions]
    for s, f in zip(sessions, feeds):
        _run(s, f)
        for _ in range(job["warmup"]):
            s.run(None, f)
    runs = job.get("runs", 1)
    if job.get("rounds"):  # this device's speed sizes the rounds, as the host's does for a local comparison
        one = _once(sessions[0], feeds[0])  # after the checked run, which pays the allocations
        runs = int(min(max(job["round_seconds"] / (one * len(sessions)), job["min_runs"]), job["max_runs"]))
    times = [[] for _ in sessions]
    for _ in range(runs * job.get("rounds", 1)):
        for i, s in enumerate(sessions):
            t0 = time.perf_counter()
            s.run(None, feeds[i])
            times[i].append(time.perf_counter() - t0)
    return {"times_s": times, "runs_per_round": runs}


def _once(session, feed):
    t0 = time.perf_counter()
    session.run(None, feed)
    return max(time.perf_counter() - t0, 1e-5)


def outputs(job):
    import numpy as np

    feeds = _feeds(job.get("feeds", "feeds.npz"))
    os.remove(job.get("feeds", "feeds.npz"))  # the device holds one chunk of DATA at a time
    arrays, names = {}, []
    for m, path in enumerate(job["models"]):
        s = _session(path, job["threads"])
        names.append([o.name for o in s.get_outputs()])
        for f, feed in enumerate(feeds):
            for j, arr in enumerate(_run(s, _cast(s, feed))):
                arrays["%d/%d/%d" % (m, f, j)] = arr
    np.savez(job.get("outputs", "outputs.npz"), **arrays)
    return {"output_names": names, "feeds": len(feeds)}


def _line(e):
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def main(argv):
    mode = argv[1] if len(argv) > 1 else "probe"
    if mode == "probe":
        print(json.dumps(probe()))
        return 0
    threading.Thread(target=_watch_stdin, daemon=True).start()
    try:
        with open(argv[2]) as f:
            job = json.load(f)
        result = {"bench": bench, "outputs": outputs}[mode](job)
        with open("result.json.tmp", "w") as f:
            json.dump(result, f)
        os.replace("result.json.tmp", "result.json")
    except OSError as e:
        print(json.dumps({"error": "the device failed in its work folder: %s" % (e.strerror or e),
                          "errno": e.errno}))
        return 2
    except Exception as e:
        print(json.dumps({"error": _line(e)}))
        return 2
    print(json.dumps({"ok": True}))
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    sys.stdout.flush()
    os._exit(code)  # the watchdog thread blocks in stdin: a normal shutdown would wait on its lock
