"""Run a model on onnxruntime's own aarch64 kernels, under qemu-user, from the host.

:class:`EmulatedRunner` takes a model (an ``ir.Model``, serialized bytes or a path) and a list of
feeds and returns each sample's outputs as the target's onnxruntime computes them:

- one emulated process per core (``workers``), each loading the model once and running its share
  of the samples (round-robin, so long and short samples spread evenly);
- every finished sample is kept in the result cache, keyed by sha256 of (model bytes, the
  sample's feed, the qemu CPU, the session config, onnxruntime's version): a rerun, or a run cut
  by the timeout, only computes what is missing;
- a bounded wall-clock ``timeout_s`` over the whole run; progress (samples done, ETA) on stderr;
- every failure is one line: the aarch64 build cannot load the model (ModelLoadError), it rejects
  a feed (DataError), the emulator was killed or crashed, or the timeout passed (EmulationError);
  the temporary folder (model file, feeds, partial outputs) is removed in every case.

Numerics only: emulation runs ~100-300x slower than the device and its timings say nothing about
ARM latency (:data:`LATENCY_NOTE`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir

from edgecomp.emulate.cpus import has_sme, parse_cpu
from edgecomp.emulate.limits import DEFAULT_TIMEOUT_S
from edgecomp.emulate.setup import Runtime, load_runtime
from edgecomp.errors import ConfigError, DataError, EmulationError, ModelLoadError
from edgecomp.io import load_model, model_bytes, model_from_bytes

__all__ = ["Emulation", "EmulatedRun", "EmulatedRunner", "TargetRunner", "LATENCY_NOTE", "DEFAULT_TIMEOUT_S", "self_check",
           "target_runner"]

LATENCY_NOTE = ("latency under emulation says nothing about the target (qemu runs ~100-300x slower than the "
                "device): only numerics are reported; measure latency on the device with `edgecomp bench`")
_GUEST = Path(__file__).with_name("guest.py")


@dataclasses.dataclass(frozen=True)
class Emulation:
    """What a target profile asks of the emulator: a qemu CPU and onnxruntime session config."""

    name: str
    cpu: str
    kleidiai: bool = True

    @classmethod
    def of(cls, profile) -> "Emulation":
        """From a :class:`~edgecomp.targets.TargetProfile` with an ``emulate`` entry."""
        if not getattr(profile, "emulate", None):
            raise ConfigError(f"target {profile.name!r} has no emulate entry, so its numerics cannot be checked; "
                              f"choose an arm64-* target or add emulate = \"<qemu cpu>\" to its profile")
        parse_cpu(profile.emulate)
        return cls(profile.name, profile.emulate, profile.kleidiai)

    @property
    def config(self) -> dict[str, str]:
        return {} if self.kleidiai else {"mlas.disable_kleidiai": "1"}

    @property
    def note(self) -> str | None:
        """Why this emulation's results may not hold on the device (None: trusted)."""
        if has_sme(self.cpu) and self.kleidiai:
            return ("emulation not trusted for SME (qemu 7.2): KleidiAI's SME int8 kernels gave wrong results "
                    "under it; compare with kleidiai = false")
        return None


@dataclasses.dataclass
class EmulatedRun:
    names: list[str]
    outputs: list[list[np.ndarray]]  # per sample, per output
    cached: int  # samples taken from the result cache
    seconds: float  # wall time of the emulated processes (emulation cost, not target latency)


class EmulatedRunner:
    """Runs models on one emulated target (see the module docstring)."""

    def __init__(self, emulation: Emulation, runtime: Runtime | None = None, workers: int | None = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, cache: bool = True,
                 progress: Callable[[str], None] | None | bool = None):
        self.emulation = emulation
        self.runtime = runtime or load_runtime()
        self.workers = max(1, workers or os.cpu_count() or 1)
        if not timeout_s > 0:
            raise ConfigError(f"the timeout must be > 0 seconds, got {timeout_s!r}")
        self.timeout_s, self.cache = float(timeout_s), cache
        self._progress = (lambda s: None) if progress is False else (progress or _stderr_progress)

    def run(self, model: ir.Model | bytes | str | os.PathLike, feeds: Sequence[Mapping[str, np.ndarray]],
            label: str | None = None) -> EmulatedRun:
        data, names = _serialized(model)
        label = label or (str(model) if isinstance(model, (str, os.PathLike)) else "the model")
        keys = [self._key(data, feed) for feed in feeds]
        outputs: list[list[np.ndarray] | None] = [self._cached(k) for k in keys]
        cached = sum(o is not None for o in outputs)
        todo = [i for i, o in enumerate(outputs) if o is None]
        start = time.monotonic()
        if todo:
            self.runtime.results.mkdir(parents=True, exist_ok=True)
            tmp_root = self.runtime.cache / "tmp"
            tmp_root.mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
                done = self._emulate(Path(tmp), data, feeds, todo, keys, label)
            for i in todo:
                outputs[i] = done[i]
        return EmulatedRun(names, outputs, cached, time.monotonic() - start)  # type: ignore[arg-type]

    # --- the emulated processes ----------------------------------------------------------------

    def _emulate(self, tmp: Path, data: bytes, feeds, todo: list[int], keys: list[str], label: str) -> dict:
        (tmp / "model.onnx").write_bytes(data)
        out = tmp / "out"
        out.mkdir()
        chunks = [todo[w::self.workers] for w in range(min(self.workers, len(todo)))]
        procs, finished = [], {}
        try:
            for w, chunk in enumerate(chunks):
                feeds_path = tmp / f"feeds{w}.npz"
                np.savez(feeds_path, **{f"{i}:{name}": np.asarray(a) for i in chunk for name, a in feeds[i].items()})
                job = tmp / f"job{w}.json"
                job.write_text(json.dumps({"model": str(tmp / "model.onnx"), "feeds": str(feeds_path),
                                           "out": str(out), "config": self.emulation.config}))
                err = open(tmp / f"err{w}.txt", "wb")
                procs.append((subprocess.Popen(
                    self.runtime.command(self.emulation.cpu, str(_GUEST), str(self.runtime.site), str(job)),
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True,
                    env=_guest_env()), err, tmp / f"err{w}.txt"))
            self._wait(procs, out, todo, keys, label)
        finally:
            for p, err, _ in procs:
                if p.poll() is None:
                    _kill(p)
                err.close()
            finished = self._keep(out, todo, keys)
        return finished

    def _wait(self, procs, out: Path, todo: list[int], keys: list[str], label: str) -> None:
        start, shown, n = time.monotonic(), -1, len(todo)
        name = self.emulation.name
        while True:
            finished = [p.poll() is not None for p, _, _ in procs]
            done = len(list(out.glob("*.npz")))
            elapsed = time.monotonic() - start
            if done != shown:
                eta = f", ETA {elapsed / done * (n - done):.0f} s" if 0 < done < n else ""
                self._progress(f"{name}: {done}/{n} samples emulated{eta}")
                shown = done
            for (p, _, err_path), fin in zip(procs, finished):
                if fin and p.returncode != 0:
                    raise self._failure(p.returncode, err_path, label)
            if all(finished):
                return
            if elapsed > self.timeout_s:
                raise EmulationError(f"the emulated run on {name} passed the {self.timeout_s:g} s timeout with "
                                     f"{done}/{n} samples done (kept in the cache: a rerun resumes); raise the "
                                     f"timeout or lower the sample count")
            time.sleep(0.2)

    def _failure(self, rc: int, err_path: Path, label: str) -> Exception:
        lines = [l.strip() for l in err_path.read_text(errors="replace").splitlines() if l.strip()]
        last = lines[-1] if lines else ""
        name, ver = self.emulation.name, self.runtime.onnxruntime
        if rc == 3 and last.startswith("LOAD "):
            return ModelLoadError(f"onnxruntime {ver} for aarch64 ({name}) cannot load {label}: {last[5:]}; "
                                  f"the target build may lack an op or type the host build has")
        if rc == 4 and last.startswith("RUN "):
            return DataError(f"onnxruntime {ver} for aarch64 ({name}) rejected an input of {label}: {last[4:]}")
        if rc < 0:
            try:
                sig = signal.Signals(-rc).name
            except ValueError:
                sig = f"signal {-rc}"
            why = " (out of memory?)" if rc == -signal.SIGKILL else ""
            return EmulationError(f"the emulator running {label} on {name} was killed by {sig}{why}; lower the "
                                  f"sample count or the number of workers and rerun")
        return EmulationError(f"the emulated onnxruntime on {name} failed on {label} (exit {rc}: "
                              f"{last or 'no message'}); check the runtime with `edgecomp targets setup arm64`")

    # --- the result cache ----------------------------------------------------------------------

    def _key(self, data: bytes, feed: Mapping[str, np.ndarray]) -> str:
        h = hashlib.sha256()
        h.update(hashlib.sha256(data).digest())
        for name in sorted(feed):
            a = np.ascontiguousarray(feed[name])
            h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
        h.update(json.dumps([self.emulation.cpu, self.emulation.config, self.runtime.onnxruntime]).encode())
        return h.hexdigest()[:40]

    def _cached(self, key: str) -> list[np.ndarray] | None:
        path = self.runtime.results / f"{key}.npz"
        if not (self.cache and path.is_file()):
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                return [z[str(j)] for j in range(len(z.files))]
        except (OSError, ValueError, KeyError):
            path.unlink(missing_ok=True)  # a damaged entry is recomputed
            return None

    def _keep(self, out: Path, todo: list[int], keys: list[str]) -> dict[int, list[np.ndarray]]:
        """Read the finished samples and move them into the result cache (also after a timeout or a
        failure, so a rerun resumes)."""
        got = {}
        for i in todo:
            f = out / f"{i}.npz"
            if not f.is_file():
                continue
            with np.load(f, allow_pickle=False) as z:
                got[i] = [z[str(j)] for j in range(len(z.files))]
            if self.cache:
                os.replace(f, self.runtime.results / f"{keys[i]}.npz")
        return got


class TargetRunner:
    """``runner(model, feeds)`` for :class:`edgecomp.measure.evaluate.Evaluator`: each sample's outputs
    on the emulated target (cached, so the final check of the chosen model costs nothing new)."""

    def __init__(self, emulation: Emulation, runtime: Runtime | None = None, max_samples: int = 16,
                 timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None):
        if max_samples < 1:
            raise ConfigError(f"the target sample count must be >= 1, got {max_samples}")
        self.emulation, self.max_samples = emulation, max_samples
        self._runner = EmulatedRunner(emulation, runtime, workers, timeout_s, progress=False)

    def __call__(self, model: ir.Model, feeds: Sequence[Mapping[str, np.ndarray]]) -> list[list[np.ndarray]]:
        return self._runner.run(model, feeds, label="a candidate").outputs

    def describe(self) -> str:
        em = self.emulation
        text = (f"{em.name} (onnxruntime {self._runner.runtime.onnxruntime} for aarch64 under qemu -cpu {em.cpu}"
                f"{'' if em.kleidiai else ', KleidiAI off'}; float reference on this host)")
        return text + (f"; {em.note}" if em.note else "")


def target_runner(profile, max_samples: int = 16) -> tuple[TargetRunner | None, str | None]:
    """The runner that judges candidates on ``profile``'s emulated CPU, and a note when it cannot.

    ``(None, None)`` for a profile without ``emulate``. When the emulated runtime is not prepared
    (or broken), ``(None, note)``: the caller judges on this host's numerics and shows the note,
    which says so and how to prepare the runtime; quantizing for a target must not need the
    emulation, while ``validate --target``, which asks for target numerics only, refuses instead."""
    if profile is None or not profile.emulate:
        return None, None
    emulation = Emulation.of(profile)  # a bad emulate entry is refused, prepared runtime or not
    try:
        runtime = load_runtime()
    except EmulationError as e:
        return None, f"numerics judged on this host, not on {profile.name}'s emulated CPU: {e}"
    return TargetRunner(emulation, runtime, max_samples=max_samples), None


def self_check(runtime: Runtime, cpu: str = "cortex-a53") -> str:
    """Run a tiny model in the emulated onnxruntime and on the host; one line saying it works."""
    from edgecomp.runtime import make_session, run_feed

    model = _tiny_model()
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((2, 8)).astype(np.float32)}
    runner = EmulatedRunner(Emulation("self-check", cpu), runtime, workers=1, timeout_s=300, cache=False,
                            progress=False)
    got = runner.run(model, [feed], label="the self-check model").outputs[0][0]
    want = run_feed(make_session(model), feed)[0]
    if got.shape != want.shape or not np.allclose(got, want, atol=1e-5):
        raise EmulationError(f"the arm64 runtime in {runtime.cache} runs but computes wrong results "
                             f"(max error {np.abs(got - want).max():.3g}); rerun `edgecomp targets setup arm64`")
    return (f"arm64 runtime ready in {runtime.cache}: onnxruntime {runtime.onnxruntime} (aarch64), numpy "
            f"{runtime.numpy}, CPython {runtime.python} under {runtime.qemu}")


def _tiny_model() -> ir.Model:
    from edgecomp.graph import add_initializer

    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 17}, name="self_check")
    w = add_initializer(graph, "w", np.linspace(-1, 1, 32, dtype=np.float32).reshape(8, 4))
    mm = ir.Node("", "MatMul", [x, w])
    relu = ir.Node("", "Relu", mm.outputs)
    graph.extend([mm, relu])
    y = relu.outputs[0]
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([2, 4])
    graph.outputs.append(y)
    return ir.Model(graph, ir_version=8)


def _serialized(model: ir.Model | bytes | str | os.PathLike) -> tuple[bytes, list[str]]:
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    elif isinstance(model, bytes):
        data = model
        return data, [o.name for o in model_from_bytes(data).graph.outputs]
    return model_bytes(model), [o.name for o in model.graph.outputs]


def _guest_env() -> dict[str, str]:
    """The guest's environment: nothing of the host's Python settings, one OpenMP/BLAS thread."""
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")}
    return {**keep, "OMP_NUM_THREADS": "1"}


def _kill(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    p.wait()


def _stderr_progress(line: str) -> None:
    if sys.stderr.isatty():
        print(f"\r{line}\033[K", end="", file=sys.stderr, flush=True)
        if "ETA" not in line:
            print(file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)
