"""A real sshd on 127.0.0.1 for the remote tests: Debian's openssh-server run in the foreground
(``sshd -D -e``) with its own config, a temporary host key, one authorized client key and a
client ssh config / known_hosts of its own (``ssh -F``; ~/.ssh is never read or written).

The "device" is this machine: the runner runs under the test environment's python
(``sys.executable``). sshd gives every session ``TMPDIR`` = a fresh folder (``SetEnv``), so a test
can check that no work folder is left behind. The fixture stops sshd (and every session it
started) when the module's tests end.
"""

from __future__ import annotations

import dataclasses
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclasses.dataclass
class Sshd:
    port: int
    user: str
    root: Path
    tmp: Path  # the sessions' TMPDIR: work folders appear here
    config: Path  # the client's ssh config (-F)
    proc: subprocess.Popen
    host_pub: Path

    @property
    def address(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.tmp.glob("edgecomp-remote.*"))

    def wait_clean(self, timeout: float = 10.0) -> list[str]:
        """The work folders still in TMPDIR after up to ``timeout`` s (remote cleanup is asynchronous
        when a connection was cut)."""
        end = time.monotonic() + timeout
        while self.leftovers() and time.monotonic() < end:
            time.sleep(0.1)
        return self.leftovers()

    def session_pids(self) -> list[int]:
        """Processes sshd started for connections: its children (one per connection)."""
        return _children(self.proc.pid)

    def all_pids(self) -> list[int]:
        """Every process below sshd: connections, their shells, runners."""
        found, todo = [], [self.proc.pid]
        while todo:
            kids = _children(todo.pop())
            found += kids
            todo += kids
        return found


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    yield from _sshd(tmp_path_factory, sftp=True)


@pytest.fixture(scope="session")
def sshd_without_sftp(tmp_path_factory):
    """An sshd with no SFTP subsystem (dropbear-like): scp must fall back to its legacy protocol."""
    yield from _sshd(tmp_path_factory, sftp=False)


def _sshd(tmp_path_factory, sftp: bool):
    if not os.path.exists(SSHD):
        pytest.skip("openssh-server is not installed (scripts/setup.sh installs it when run as root)")
    if os.geteuid() == 0:  # sshd run by root insists on its privilege-separation folder (Debian's unit makes it)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    root = tmp_path_factory.mktemp("sshd")
    os.chmod(root, 0o755)
    tmp = root / "device-tmp"
    tmp.mkdir()
    _keygen(root / "host_key")
    _keygen(root / "client_key")
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = _free_port()
    (root / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {root / 'host_key'}\n"
        f"AuthorizedKeysFile {root / 'authorized_keys'}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nUsePAM no\nStrictModes no\n"
        f"PidFile {root / 'sshd.pid'}\nPermitRootLogin yes\nSetEnv TMPDIR={tmp}\nLogLevel ERROR\n"
        "MaxStartups 50\nMaxSessions 50\n" + ("Subsystem sftp internal-sftp\n" if sftp else ""))
    host_pub = (root / "host_key.pub").read_text().split()
    (root / "known_hosts").write_text(f"[127.0.0.1]:{port} {host_pub[0]} {host_pub[1]}\n")
    (root / "ssh_config").write_text(
        f"Host 127.0.0.1\n  IdentityFile {root / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {root / 'known_hosts'}\n  GlobalKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    with open(root / "sshd.log", "w") as log:  # sshd keeps its own copy of the descriptor
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=subprocess.DEVNULL,
                                stderr=log, start_new_session=True)
    server = Sshd(port, getpass.getuser(), root, tmp, root / "ssh_config", proc, root / "host_key.pub")
    deadline = time.monotonic() + 10
    while True:
        if proc.poll() is not None:
            pytest.fail(f"sshd exited: {(root / 'sshd.log').read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail("sshd did not listen within 10 s")
            time.sleep(0.05)
    try:
        yield server
    finally:
        for pid in server.all_pids():  # sessions run in their own sessions (setsid): not in sshd's group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def mlp_model(width: int = 64, seed: int = 0, noise: float = 0.0) -> ModelProto:
    """x[N,16] -> MatMul(16,width) -> Relu -> MatMul(width,10) -> logits; ``noise`` perturbs the weights."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((16, width)).astype(np.float32) * 0.3
    w2 = rng.standard_normal((width, 10)).astype(np.float32) * 0.3
    if noise:
        w1 += np.random.default_rng(seed + 1).standard_normal(w1.shape).astype(np.float32) * noise
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["logits"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
