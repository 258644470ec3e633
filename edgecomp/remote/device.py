"""Measuring on a device: bench and model outputs through a :class:`~edgecomp.remote.transport.Transport`.

One operation is: probe the device's python3, numpy and onnxruntime (one line naming what to
install when one is missing or older than the host's: onnxruntime by major.minor, numpy by major
version, python >= 3.8 for the runner); take a fresh work folder; copy the runner
(:mod:`edgecomp.remote.runner`), the models and the feeds (.npz) there; run the runner; copy its
results back; the folder goes when the operation ends, however it ends.

``bench`` follows local ``edgecomp bench`` (:func:`edgecomp.measure.bench.benchmark`): the same
feed (DATA's first sample or the same synthesized feed), warm-up, interleaved rounds, and the
host computes p50/p90/p99 and ratios to the first model from the device's raw times with the
same :class:`~edgecomp.measure.bench.LatencyStats`. ``outputs`` runs each model on every feed and
returns the arrays, which :func:`edgecomp.measure.validate.validate_many` compares as it does
local outputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from edgecomp.errors import RemoteError
from edgecomp.remote import runner as runner_module
from edgecomp.remote.transport import Transport

__all__ = ["DeviceInfo", "Device", "Workspace", "host_versions"]

RUNNER_PATH = Path(runner_module.__file__)


@dataclasses.dataclass
class DeviceInfo:
    address: str
    python: str
    numpy: str | None
    onnxruntime: str | None
    machine: str
    cpu: str | None
    cpus: int | None
    runner: int

    def describe(self) -> str:
        cpu = f"{self.cpu} ({self.machine})" if self.cpu else self.machine
        return (f"device: {self.address} — {cpu}, {self.cpus or '?'} CPU(s), onnxruntime {self.onnxruntime}, "
                f"python {self.python}")


def host_versions() -> dict[str, str]:
    import platform

    import onnxruntime

    return {"python": platform.python_version(), "numpy": np.__version__, "onnxruntime": onnxruntime.__version__}


def _version(text: str | None) -> tuple[int, ...]:
    parts = []
    for p in (text or "").split(".")[:2]:
        digits = "".join(c for c in p if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class Device:
    """A device reached through ``transport`` whose runner runs under ``python`` (a command line)."""

    def __init__(self, transport: Transport, python: str = "python3"):
        self.transport = transport
        self.python = " ".join(shlex.quote(w) for w in shlex.split(python)) or "python3"
        self._info: DeviceInfo | None = None

    def probe(self) -> DeviceInfo:
        """The device's versions, refused in one line when python3, numpy or onnxruntime is missing or old."""
        if self._info:
            return self._info
        code = RUNNER_PATH.read_text()
        # the runner's own probe, sent inline: nothing is written on the device yet
        done = self.transport.run(f"{self.python} -c {shlex.quote(code)} probe")
        line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        try:
            info = json.loads(line)
        except ValueError:
            info = None
        if done.returncode != 0 or not isinstance(info, dict):
            raise RemoteError(f"{self.transport.address}: `{self.python}` does not run there "
                              f"({_first(done.stderr) or 'exit status ' + str(done.returncode)}); install python3 "
                              "(>= 3.8) or point --remote-python at it")
        host = host_versions()
        missing = []
        if _version(info["python"]) < (3, 8):
            missing.append("python3 >= 3.8")
        if info["numpy"] is None or _version(info["numpy"])[:1] < _version(host["numpy"])[:1]:
            missing.append(f"numpy>={_version(host['numpy'])[0]}")
        if info["onnxruntime"] is None or _version(info["onnxruntime"]) < _version(host["onnxruntime"]):
            missing.append("onnxruntime>={}.{}".format(*_version(host["onnxruntime"])))
        if missing:
            have = ", ".join(f"{k} {info[k] or 'missing'}" for k in ("python", "numpy", "onnxruntime"))
            packages = " ".join(shlex.quote(m) for m in missing if not m.startswith("python3"))
            todo = f"`{self.python} -m pip install {packages}`" if packages else "a newer python3"
            raise RemoteError(f"{self.transport.address} has {have}; install {todo} there (the host has "
                              f"onnxruntime {host['onnxruntime']}, numpy {host['numpy']})")
        self._info = DeviceInfo(self.transport.address, info["python"], info["numpy"], info["onnxruntime"],
                                info["machine"], info["cpu"], info["cpus"], info["runner"])
        return self._info

    def bench(self, models: Sequence[str], feed: Mapping[str, np.ndarray], threads: int, warmup: int, runs: int,
              pin: Sequence[int] | None = None) -> list[list[float]]:
        """Per model, the seconds of each of ``runs`` interleaved runs on the device."""
        with self.workspace(models) as ws:
            result, _ = ws.run("bench", {"threads": threads, "warmup": warmup, "runs": runs,
                                         "pin": list(pin) if pin else None}, feeds=[feed])
        return result["times_s"]

    def rounds(self, models: Sequence[str], feed: Mapping[str, np.ndarray], threads: int, rounds: int,
               round_seconds: float, min_runs: int, max_runs: int) -> list[list[list[float]]]:
        """``rounds`` rounds of paired interleaved runs on the device, the runs per round sized
        there so a round lasts about ``round_seconds``: ``[round][model]`` -> that round's seconds."""
        with self.workspace(models) as ws:
            result, _ = ws.run("bench", {"threads": threads, "warmup": 1, "rounds": rounds,
                                         "round_seconds": round_seconds, "min_runs": min_runs, "max_runs": max_runs},
                               feeds=[feed])
        n = result["runs_per_round"]
        return [[t[r * n:(r + 1) * n] for t in result["times_s"]] for r in range(rounds)]

    def outputs(self, models: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]], threads: int = 1,
                ) -> list[tuple[list[str], list[list[np.ndarray]]]]:
        """Per model: its output names and, per output, its value on each feed (as on the host)."""
        with self.workspace(models) as ws:
            return ws.outputs(feeds, threads)

    @contextlib.contextmanager
    def workspace(self, models: Sequence[str]) -> Iterator["Workspace"]:
        """A work folder on the device holding the runner and ``models`` (with their external-data
        files); jobs run in it until the block ends, then it goes."""
        self.probe()
        with tempfile.TemporaryDirectory(prefix="edgecomp-remote-") as tmp:
            local = Path(tmp)
            staged, names = _stage_models(local, models)
            with self.transport.workdir() as remote:
                self._put(staged, remote)
                yield Workspace(self, local, remote, names)

    def _put(self, paths: Sequence[Path], remote: str) -> None:
        try:
            self.transport.put(paths, remote)
        except RemoteError:
            self._refuse_if_full(remote, sum(_size(p) for p in paths))
            raise

    def _refuse_if_full(self, remote: str, needed: int) -> None:
        """A failed copy is a full disk when the folder's filesystem has less room than the files
        (SFTP reports ENOSPC as a bare "Failure")."""
        try:
            done = self.transport.run(f"df -Pk {shlex.quote(remote)} | tail -n 1", timeout=30)
            free_kb = int(done.stdout.split()[3])
        except (RemoteError, ValueError, IndexError):
            return
        if free_kb * 1024 < needed:
            raise RemoteError(f"{self.transport.address}: the device's disk is full ({free_kb} kB free where the work "
                              f"folder is, {needed // 1024} kB needed); free space there or set TMPDIR on the device")

    def _run_failure(self, done, status: dict) -> str:
        where = self.transport.address
        if "error" in status:
            if status.get("errno") == 28:  # ENOSPC
                return f"{where}: the device's disk is full ({status['error']}); free space in its temporary folder"
            return f"{where}: {status['error']}"
        if done.returncode == 3:
            return f"{where}: the runner lost its connection to the host and stopped; rerun when the link is stable"
        if done.returncode < 0 or done.returncode in (137, 143, 129):
            return f"{where}: the runner was killed on the device (exit status {done.returncode}); out of memory?"
        return f"{where}: the runner failed ({_first(done.stderr) or 'exit status ' + str(done.returncode)})"


class Workspace:
    """Jobs run in one device work folder (see :meth:`Device.workspace`)."""

    def __init__(self, device: Device, local: Path, remote: str, models: list[str]):
        self.device, self.local, self.remote, self.models = device, local, remote, models
        self._jobs = 0

    def run(self, mode: str, job: dict, feeds: Sequence[Mapping[str, np.ndarray]] = (),
            ) -> tuple[dict, dict[str, np.ndarray]]:
        """Run the runner's ``mode`` on ``feeds`` (copied over first), and bring its results back."""
        self._jobs += 1
        tag = f"j{self._jobs}"
        job = {**job, "models": self.models, "feeds": f"{tag}.npz", "outputs": f"{tag}.out.npz"}
        files = [self.local / f"{tag}.json", self.local / f"{tag}.npz"]
        files[0].write_text(json.dumps(job))
        np.savez(files[1], **{f"{i}/{name}": np.asarray(v) for i, feed in enumerate(feeds) for name, v in feed.items()})
        transport, where = self.device.transport, shlex.quote(self.remote)
        try:
            self.device._put(files, self.remote)
        finally:
            for f in files:
                f.unlink()
        done = transport.run(f"cd {where} && exec {self.device.python} runner.py {mode} {tag}.json", keep_stdin=True)
        status = _last_json(done.stdout)
        if done.returncode != 0 or not status.get("ok"):
            raise RemoteError(self.device._run_failure(done, status))
        result_path = self.local / "result.json"
        transport.get(f"{self.remote}/result.json", result_path)
        result = json.loads(result_path.read_text())
        result_path.unlink()
        arrays: dict[str, np.ndarray] = {}
        if mode == "outputs":
            out = self.local / f"{tag}.out.npz"
            transport.get(f"{self.remote}/{tag}.out.npz", out)
            transport.run(f"rm -f {where}/{tag}.out.npz", timeout=60)  # the device keeps one chunk's outputs at most
            with np.load(out, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            out.unlink()
        return result, arrays

    def outputs(self, feeds: Sequence[Mapping[str, np.ndarray]], threads: int = 1,
                ) -> list[tuple[list[str], list[list[np.ndarray]]]]:
        """Per model: its output names and, per output, its value on each of ``feeds``."""
        result, arrays = self.run("outputs", {"threads": threads}, feeds)
        return [(names, [[arrays[f"{m}/{f}/{j}"] for f in range(len(feeds))] for j in range(len(names))])
                for m, names in enumerate(result["output_names"])]


def _stage_models(local: Path, models: Sequence[str]) -> tuple[list[Path], list[str]]:
    """runner.py and a folder ``mI`` per model holding it and its external-data files under the
    names its graph refers to; the folders and the runner's remote names. The model is hard-linked
    (or copied); its data files are copied: onnx refuses to load a data file with several hard
    links (a hard-link attack guard), which would break the user's own model while we stage."""
    from edgecomp.io import external_data_files

    runner = local / "runner.py"
    runner.write_text(RUNNER_PATH.read_text())
    staged, names = [runner], []
    for i, m in enumerate(models):
        src = Path(m)
        folder = local / f"m{i}"
        folder.mkdir()
        _link_or_copy(src, folder / src.name)
        for f in external_data_files(src):
            dst = folder / f.relative_to(src.parent)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
        staged.append(folder)
        names.append(f"m{i}/{src.name}")
    return staged, names


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src.resolve())
    except OSError:
        shutil.copyfile(src, dst)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _last_json(stdout: str) -> dict:
    for line in reversed((stdout or "").strip().splitlines()):
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return {}


def _first(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""
