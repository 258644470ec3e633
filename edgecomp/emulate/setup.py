"""Prepare (and later find) the emulated arm64 onnxruntime: qemu-user, an aarch64 CPython and
onnxruntime's own aarch64 wheel of the host's version, all in a cache folder outside the repo.

The cache folder is ``--cache-dir``, else ``$EDGECOMP_ARM64_CACHE``, else
``$XDG_CACHE_HOME/edgecomp/arm64`` (``~/.cache/edgecomp/arm64``). It holds:

- ``apt/``: apt's lists, archive cache and an empty dpkg status of its own. The arm64 .debs are
  fetched with ``apt-get download`` under ``-o APT::Architecture=arm64`` and these private
  folders, so ``/etc/apt``, dpkg's architecture list and the system's package lists never change;
- ``debs/`` and ``sysroot/``: Debian's arm64 ``pythonX.Y-minimal``, ``libpythonX.Y-stdlib`` and
  the libraries they link, unpacked with ``dpkg -x`` (never installed);
- ``site-<onnxruntime version>/``: onnxruntime's ``manylinux_2_28_aarch64`` wheel (the older
  manylinux2014 tag stops at 1.16) and numpy, unzipped;
- ``cpus/<cpu>/``: a root per qemu CPU (links to the sysroot plus its own ``proc/cpuinfo``, see
  :mod:`edgecomp.emulate.cpus`), made on first use;
- ``results/``: emulated outputs, cached (see :mod:`edgecomp.emulate.runner`);
- ``manifest.json``: written last, so a half-prepared folder is never taken for a ready one.

Each step is skipped when its result is there, so a second run is offline and quick. qemu itself
is Debian's ``qemu-user`` (``qemu-aarch64``); ``$EDGECOMP_QEMU`` names another binary. Every
failure is one :class:`~edgecomp.errors.EmulationError` line saying what to do.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

from edgecomp.emulate.cpus import cpuinfo_text, parse_cpu
from edgecomp.errors import EmulationError

__all__ = ["Runtime", "default_cache_dir", "find_qemu", "prepare", "load_runtime", "CACHE_ENV", "QEMU_ENV"]

CACHE_ENV = "EDGECOMP_ARM64_CACHE"
QEMU_ENV = "EDGECOMP_QEMU"
_SETUP = "edgecomp targets setup arm64"
#: The libraries Debian's python3.X-minimal and its stdlib extension modules link (bookworm names).
_LIBS = ("libc6", "libexpat1", "zlib1g", "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libsqlite3-0",
         "libstdc++6", "libgcc-s1", "libuuid1", "libncursesw6", "libtinfo6", "libreadline8", "libcrypt1", "libgomp1")


@dataclasses.dataclass(frozen=True)
class Runtime:
    """A prepared cache folder: what runs the guest and which versions it holds."""

    cache: Path
    qemu: str
    onnxruntime: str
    numpy: str
    python: str  # "3.11"

    @property
    def sysroot(self) -> Path:
        return self.cache / "sysroot"

    @property
    def site(self) -> Path:
        return self.cache / f"site-{self.onnxruntime}"

    @property
    def results(self) -> Path:
        return self.cache / "results"

    @property
    def guest_python(self) -> str:
        return f"/usr/bin/python{self.python}"

    def cpu_root(self, cpu: str) -> Path:
        """The ``-L`` root for ``cpu``: links to the sysroot's folders and this CPU's ``proc/cpuinfo``."""
        parse_cpu(cpu)
        root = self.cache / "cpus" / cpu.replace(",", "_").replace("=", "-")
        (root / "proc").mkdir(parents=True, exist_ok=True)
        for entry in self.sysroot.iterdir():
            link = root / entry.name
            if entry.name != "proc" and not link.is_symlink():
                try:
                    link.symlink_to(entry)
                except FileExistsError:  # another process made it meanwhile
                    pass
        info = cpuinfo_text(cpu, os.cpu_count() or 1)
        path = root / "proc" / "cpuinfo"
        if not path.exists() or path.read_text() != info:
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(info)
            os.replace(tmp, path)
        return root

    def command(self, cpu: str, *args: str) -> list[str]:
        """The command line running the guest Python with ``args`` on the emulated ``cpu``.

        ``-I -S``: no environment variables, user site or site-packages of the host leak in (qemu
        falls back to host paths for files missing from the root).
        """
        return [self.qemu, "-cpu", cpu, "-L", str(self.cpu_root(cpu)), str(self.sysroot / self.guest_python[1:]),
                "-I", "-S", *args]


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgecomp" / "arm64"


def find_qemu(install: bool = False, log: Callable[[str], None] = lambda s: None) -> str:
    """The qemu-aarch64 binary; with ``install`` and root, apt-get Debian's qemu-user first."""
    if os.environ.get(QEMU_ENV):
        q = os.environ[QEMU_ENV]
        if not (os.path.isfile(q) and os.access(q, os.X_OK)):
            raise EmulationError(f"${QEMU_ENV} names {q}, which is not an executable qemu-aarch64; "
                                 f"fix it or unset it to use Debian's qemu-user")
        return q
    q = shutil.which("qemu-aarch64")
    if q:
        return q
    if install and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        log("installing Debian's qemu-user (apt-get install qemu-user)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "qemu-user"]
        if _run(cmd, env=env).returncode != 0:
            _run(["apt-get", "update", "-q"], env=env)
            _run(cmd, env=env)
        q = shutil.which("qemu-aarch64")
        if q:
            return q
    raise EmulationError("qemu-aarch64 not found; install Debian's qemu-user (sudo apt-get install qemu-user) "
                         f"or set ${QEMU_ENV} to a qemu-aarch64 binary")


def prepare(cache_dir: str | os.PathLike | None = None, log: Callable[[str], None] = lambda s: None) -> Runtime:
    """Make the cache folder ready (idempotent; offline when everything is there)."""
    import numpy
    import onnxruntime

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    qemu = find_qemu(install=True, log=log)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    debs = _download_debs(cache, py, log)
    _unpack_debs(cache, debs, log)
    rt = Runtime(cache, qemu, onnxruntime.__version__, numpy.__version__, py)
    _install_wheels(rt, log)
    manifest = {"onnxruntime": rt.onnxruntime, "numpy": rt.numpy, "python": py, "debs": sorted(p.name for p in debs)}
    tmp = cache / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, cache / "manifest.json")
    return rt


def load_runtime(cache_dir: str | os.PathLike | None = None) -> Runtime:
    """The prepared runtime, checked; a one-line EmulationError says what is missing or stale."""
    import onnxruntime

    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    manifest = cache / "manifest.json"
    if not manifest.is_file():
        raise EmulationError(f"no arm64 runtime in {cache}; prepare it with `{_SETUP}` (or point --cache-dir / "
                             f"${CACHE_ENV} at a prepared one)")
    try:
        m = json.loads(manifest.read_text())
        rt = Runtime(cache, "", str(m["onnxruntime"]), str(m["numpy"]), str(m["python"]))
    except (OSError, ValueError, KeyError, TypeError):
        raise EmulationError(f"the arm64 runtime in {cache} is broken (manifest.json unreadable); rerun `{_SETUP}`") \
            from None
    if rt.onnxruntime != onnxruntime.__version__:
        raise EmulationError(f"the arm64 runtime in {cache} holds onnxruntime {rt.onnxruntime} but the host has "
                             f"{onnxruntime.__version__}; rerun `{_SETUP}`")
    missing = [p for p in (rt.sysroot / rt.guest_python[1:], rt.site / "onnxruntime" / "__init__.py",
                           rt.site / "numpy" / "__init__.py") if not p.is_file()]
    if missing:
        raise EmulationError(f"the arm64 runtime in {cache} is broken ({missing[0].relative_to(cache)} is missing); "
                             f"rerun `{_SETUP}`")
    return dataclasses.replace(rt, qemu=find_qemu())


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _last_line(out: str) -> str:
    lines = [l.strip() for l in (out or "").splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith(("E:", "ERROR"))]
    return (errors or lines or ["no output"])[-1]


def _download_debs(cache: Path, py: str, log) -> list[Path]:
    """The arm64 .debs of CPython ``py`` and its libraries, fetched with a private apt state."""
    names = [f"python{py}-minimal", f"libpython{py}-minimal", f"libpython{py}-stdlib", *_LIBS]
    folder = cache / "debs"
    folder.mkdir(exist_ok=True)

    def have(name: str) -> Path | None:
        return next(iter(sorted(folder.glob(f"{name}_*_arm64.deb"))), None)

    missing = [n for n in names if have(n) is None]
    if missing:
        if not shutil.which("apt-get"):
            raise EmulationError("apt-get not found: preparing the arm64 runtime needs a Debian-based host "
                                 f"(or copy a prepared cache folder to {cache})")
        apt = cache / "apt"
        for d in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        (apt / "status").touch()
        opts = ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
                "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::Cache={apt / 'cache'}",
                "-o", f"Dir::State::status={apt / 'status'}", "-o", "APT::Sandbox::User=root", "-q"]
        log(f"downloading {len(missing)} arm64 Debian packages (python{py}, its libraries)")
        up = _run(["apt-get", *opts, "update"])
        got = _run(["apt-get", *opts, "download", *missing], cwd=folder)
        if got.returncode != 0:
            why = _last_line(got.stdout if up.returncode == 0 else up.stdout)
            raise EmulationError(f"cannot download the arm64 packages ({why}); run `{_SETUP}` where Debian's "
                                 f"mirror is reachable, or copy a prepared {cache}")
    return [have(n) for n in names]


def _unpack_debs(cache: Path, debs: list[Path], log) -> None:
    sysroot, stamp = cache / "sysroot", cache / "sysroot.debs"
    want = "\n".join(sorted(p.name for p in debs))
    if sysroot.is_dir() and stamp.is_file() and stamp.read_text() == want:
        return
    log("unpacking the arm64 packages into the sysroot (dpkg -x)")
    staged = cache / "sysroot.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    staged.mkdir()
    for deb in debs:
        r = _run(["dpkg", "-x", str(deb), str(staged)])
        if r.returncode != 0:
            shutil.rmtree(staged, ignore_errors=True)
            deb.unlink(missing_ok=True)
            raise EmulationError(f"cannot unpack {deb.name} ({_last_line(r.stdout)}); it was removed, rerun `{_SETUP}`")
    shutil.rmtree(sysroot, ignore_errors=True)
    shutil.rmtree(cache / "cpus", ignore_errors=True)  # their links point into the old sysroot
    os.replace(staged, sysroot)
    stamp.write_text(want)


def _install_wheels(rt: Runtime, log) -> None:
    """onnxruntime's and numpy's aarch64 wheels of the host's versions, unzipped into ``rt.site``."""
    if (rt.site / "onnxruntime" / "__init__.py").is_file() and (rt.site / "numpy" / "__init__.py").is_file():
        return
    wheels = rt.cache / "wheels"
    wheels.mkdir(exist_ok=True)
    pins = [f"onnxruntime=={rt.onnxruntime}", f"numpy=={rt.numpy}"]
    have = {n: sorted(wheels.glob(f"{n}-{v}-*aarch64*.whl")) for n, v in (("onnxruntime", rt.onnxruntime),
                                                                         ("numpy", rt.numpy))}
    if not all(have.values()):
        log(f"downloading the aarch64 wheels ({', '.join(pins)}, manylinux_2_28_aarch64)")
        tag = rt.python.replace(".", "")
        r = _run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
                  "--only-binary=:all:", "--python-version", tag, "--implementation", "cp", "--abi", f"cp{tag}",
                  "--platform", "manylinux_2_28_aarch64", "-d", str(wheels), *pins])
        if r.returncode != 0:
            raise EmulationError(f"cannot download {' and '.join(pins)} for aarch64 ({_last_line(r.stdout)}); run "
                                 f"`{_SETUP}` where PyPI is reachable")
        have = {n: sorted(wheels.glob(f"{n}-*aarch64*.whl")) for n in have}
    staged = rt.cache / f"{rt.site.name}.tmp"
    shutil.rmtree(staged, ignore_errors=True)
    for found in have.values():
        try:
            with zipfile.ZipFile(found[-1]) as z:
                z.extractall(staged)
        except (OSError, zipfile.BadZipFile) as e:
            shutil.rmtree(staged, ignore_errors=True)
            found[-1].unlink(missing_ok=True)
            raise EmulationError(f"cannot unzip {found[-1].name} ({e}); it was removed, rerun `{_SETUP}`") from None
    shutil.rmtree(rt.site, ignore_errors=True)
    os.replace(staged, rt.site)
