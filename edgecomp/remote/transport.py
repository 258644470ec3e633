"""Reaching a device: run commands there, copy files both ways, hold a work folder that always goes.

A :class:`Transport` is what the device session (:mod:`edgecomp.remote.device`) needs: ``run``
a command line, ``put`` files and folders into a remote folder, ``get`` one back, and ``workdir()``, a fresh
remote folder that is removed in every case. :func:`parse_address` turns ``ssh://user@host[:port]``
into an :class:`SshTransport`; ``adb://SERIAL`` is recognised and refused with what it would take
(see the package docstring).

SSH is the system ``ssh``/``scp`` (OpenSSH): the user's ``~/.ssh/config``, keys, agent and
``known_hosts`` apply as for any ssh command. It always runs with ``BatchMode=yes`` (never a
password or host-key prompt) and never touches ``StrictHostKeyChecking``: an unknown or changed
host key is refused with one line saying how to accept it. ``ConnectTimeout`` and
``ServerAliveInterval`` (a dropped link is noticed within ~3 intervals) follow ``connect_timeout``;
each command has its own ``command_timeout``.

The work folder lives as long as an *anchor* session: ``mktemp -d`` then ``cat`` reading stdin,
under ``trap 'rm -rf DIR' EXIT`` (and HUP/INT/TERM/PIPE). The host holds the anchor's stdin open
while it works and closes it when done; a dropped connection or a killed host closes it too, so
the remote shell removes the folder whatever happened on the host's side (Ctrl-C, SIGTERM, SIGKILL,
a cable pulled). On a clean end the host also waits for the anchor's "removed" line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import shlex
import signal
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

from edgecomp.errors import RemoteError

__all__ = ["Transport", "SshTransport", "parse_address", "DEFAULT_CONNECT_TIMEOUT_S", "DEFAULT_COMMAND_TIMEOUT_S"]

DEFAULT_CONNECT_TIMEOUT_S = 10.0
DEFAULT_COMMAND_TIMEOUT_S = 600.0
_ADDRESS = re.compile(r"ssh://(?:(?P<user>[^@/:\s]+)@)?(?P<host>\[[0-9a-fA-F:]+\]|[^@/:\s\[\]]+)(?::(?P<port>\d{1,5}))?/?")


class Transport:
    """What a device session needs from a link to the device (ssh today; adb could follow)."""

    address: str

    def run(self, command: str, timeout: float | None = None, keep_stdin: bool = False) -> subprocess.CompletedProcess:
        raise NotImplementedError

    def put(self, paths: Sequence[Path], remote_dir: str) -> None:
        raise NotImplementedError

    def get(self, remote_path: str, local_path: Path) -> None:
        raise NotImplementedError

    def workdir(self) -> contextlib.AbstractContextManager[str]:
        raise NotImplementedError


def parse_address(address: str, **options) -> Transport:
    """The transport for ``ssh://user@host[:port]``; one line for anything else."""
    if address.startswith("adb://"):
        raise RemoteError(f"{address}: adb targets are not supported yet (they need onnxruntime's Android "
                          "library plus a native runner pushed with adb); use an ssh:// address, e.g. Termux's sshd")
    m = _ADDRESS.fullmatch(address)
    if not m or (m["port"] and not 0 < int(m["port"]) < 65536):
        raise RemoteError(f"{address!r} is not a device address; write ssh://user@host or ssh://user@host:port")
    return SshTransport(m["host"].strip("[]"), m["user"], int(m["port"]) if m["port"] else None, **options)


@dataclasses.dataclass
class SshTransport(Transport):
    host: str
    user: str | None = None
    port: int | None = None
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT_S
    command_timeout: float = DEFAULT_COMMAND_TIMEOUT_S
    config_file: str | None = None  # ssh -F (tests; users normally rely on ~/.ssh/config)
    tmp_parent: str | None = None  # where mktemp -d creates the work folder (default: the device's $TMPDIR or /tmp)

    @property
    def address(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{user}{host}" + (f":{self.port}" if self.port else "")

    def _options(self) -> list[str]:
        alive = max(1, int(self.connect_timeout / 3))
        opts = ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, round(self.connect_timeout))}",
                "-o", f"ServerAliveInterval={alive}", "-o", "ServerAliveCountMax=3"]
        return (["-F", self.config_file] if self.config_file else []) + opts

    def _target(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def _ssh(self, command: str) -> list[str]:
        """ssh running ``command`` under ``sh -c`` (the login shell may be fish or csh; commands here are POSIX sh)."""
        port = ["-p", str(self.port)] if self.port else []
        return ["ssh", *self._options(), *port, "-T", self._target(), "sh -c " + shlex.quote(command)]

    def _scp_host(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" if self.user else host

    def _scp(self, sources: list[str], dest: str, legacy: bool = False) -> list[str]:
        port = ["-P", str(self.port)] if self.port else []
        return ["scp", "-q", "-r", *(["-O"] if legacy else []), *self._options(), *port, *sources, dest]

    def run(self, command: str, timeout: float | None = None, keep_stdin: bool = False) -> subprocess.CompletedProcess:
        """``command`` (a remote shell line) run on the device; its stdin stays open while it runs
        when ``keep_stdin`` (the runner's watchdog reads it)."""
        timeout = timeout or self.command_timeout
        proc = subprocess.Popen(self._ssh(command), stdin=subprocess.PIPE if keep_stdin else subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout) if not keep_stdin else _communicate_open(proc, timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            raise RemoteError(f"{self.address}: the command ran longer than {timeout:g} s and was stopped; "
                              "raise --command-timeout, or bench fewer --runs") from None
        finally:
            _stop(proc)
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if done.returncode == 255:
            raise RemoteError(self._ssh_failure(err))
        return done

    def put(self, paths: Sequence[Path], remote_dir: str) -> None:
        self._copy([str(p) for p in paths], f"{self._scp_host()}:{shlex.quote(remote_dir)}/", "copying to")

    def get(self, remote_path: str, local_path: Path) -> None:
        self._copy([f"{self._scp_host()}:{shlex.quote(remote_path)}"], str(local_path), "copying back from")

    def _copy(self, sources: list[str], dest: str, what: str, legacy: bool = False) -> None:
        """scp, over SFTP (OpenSSH >= 9 default); a device without an SFTP server (dropbear, a
        minimal sshd_config) gets the legacy scp protocol (-O) instead."""
        try:
            done = subprocess.run(self._scp(sources, dest, legacy), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                  timeout=self.command_timeout, check=False)
        except subprocess.TimeoutExpired:
            raise RemoteError(f"{self.address}: {what} the device took longer than {self.command_timeout:g} s; "
                              "raise --command-timeout") from None
        if done.returncode != 0 and not legacy and any(
                k in done.stderr.lower() for k in ("subsystem request failed", "scp: connection closed")):
            return self._copy(sources, dest, what, legacy=True)
        if done.returncode != 0:
            err = done.stderr
            if "No space left" in err or "write failed" in err.lower():
                raise RemoteError(f"{self.address}: the device's disk is full ({what} its work folder failed: "
                                  f"{_first(err)}); free space in {self.tmp_parent or 'its temporary folder'}")
            raise RemoteError(self._ssh_failure(err) if _is_ssh_failure(err) else
                              f"{self.address}: {what} the device failed: {_first(err)}")

    @contextlib.contextmanager
    def workdir(self) -> Iterator[str]:
        """A fresh remote folder, removed when the block ends, the connection drops or the host dies."""
        parent = shlex.quote(self.tmp_parent) if self.tmp_parent else '"${TMPDIR:-/tmp}"'
        script = (f'd=$(mktemp -d {parent}/edgecomp-remote.XXXXXX) || exit 97; '
                  'trap \'rm -rf "$d"; echo removed\' EXIT; trap "exit 1" HUP INT TERM PIPE; '
                  'echo "$d"; cat >/dev/null')
        anchor = subprocess.Popen(self._ssh(script), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)
        previous = _sigterm_raises()
        try:
            path = _read_line(anchor, self.connect_timeout + 10)
            if not path.startswith("/"):
                try:
                    err = anchor.communicate(timeout=5)[1] or ""
                except subprocess.TimeoutExpired:
                    err = ""
                _stop(anchor)
                if anchor.returncode == 255 or _is_ssh_failure(err):
                    raise RemoteError(self._ssh_failure(err))
                raise RemoteError(f"{self.address}: could not create a work folder with mktemp -d in "
                                  f"{self.tmp_parent or '$TMPDIR or /tmp'}: {_first(err)}")
            yield path
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            _close_anchor(anchor)

    def _ssh_failure(self, stderr: str) -> str:
        """One line for an ssh exit status 255 (ssh itself failed, not the remote command)."""
        low = stderr.lower()
        where = self.address
        if "host key verification failed" in low or "no matching host key" in low or "remote host identification" in low:
            port = f" -p {self.port}" if self.port else ""
            return (f"{where}: the device's host key is not known (or changed); check it and accept it once with "
                    f"`ssh{port} {self._target()}`, or add it to known_hosts (edgecomp never turns host-key checking off)")
        if "permission denied" in low or "too many authentication failures" in low:
            return (f"{where}: the device refused the login; set up key login (e.g. `ssh-copy-id {self._target()}`): "
                    "edgecomp runs ssh with BatchMode and never types a password")
        if "could not resolve" in low or "name or service not known" in low:
            return f"{where}: the host name does not resolve; check the address or your ssh config"
        if "connection refused" in low or "timed out" in low or "no route" in low or "unreachable" in low:
            return f"{where}: the device is unreachable ({_first(stderr)}); check that it is on and runs sshd"
        if "broken pipe" in low or "connection reset" in low or "closed by" in low or "timeout, server" in low \
                or "lost connection" in low or not stderr.strip():
            return f"{where}: the connection to the device was lost ({_first(stderr) or 'ssh exited 255'}); rerun when it is back"
        return f"{where}: ssh failed: {_first(stderr)}"


def _is_ssh_failure(stderr: str) -> bool:
    low = stderr.lower()
    return any(k in low for k in ("host key", "permission denied", "connection refused", "could not resolve",
                                  "timed out", "lost connection", "connection closed", "connection reset",
                                  "no route", "unreachable", "broken pipe"))


def _first(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip() and not ln.startswith("Warning: Permanently")]
    return lines[0][:300] if lines else ""


def _communicate_open(proc: subprocess.Popen, timeout: float) -> tuple[str, str]:
    """stdout and stderr of ``proc`` while its stdin stays open (the remote watchdog reads it)."""
    import threading

    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, s=s: out.__setitem__(k, s.read()), daemon=True)
               for k, s in (("out", proc.stdout), ("err", proc.stderr))]
    for r in readers:
        r.start()
    proc.wait(timeout=timeout)
    for r in readers:
        r.join(5)
    return out.get("out", ""), out.get("err", "")


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    import threading

    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    return line[0].strip() if line else ""


def _close_anchor(anchor: subprocess.Popen) -> None:
    """End the anchor session: EOF on its stdin makes the remote shell remove the folder."""
    try:
        if anchor.stdin:
            anchor.stdin.close()
    except OSError:
        pass
    try:
        anchor.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    _stop(anchor)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        try:
            if stream:
                stream.close()
        except OSError:
            pass


def _sigterm_raises():
    """While the work folder is held, SIGTERM unwinds like Ctrl-C so ``finally`` closes the anchor."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, handler)
