"""Targets over ssh: does a measured table timed through the device runner agree with one timed here?

A loopback sshd (the test fixture's: tests/remote/conftest.py, a temporary host key, nothing left
running) makes this machine a "device" reached over ssh. The digits MobileNetV2's table is then
measured alternately here (`edgecomp targets measure host`) and through the runner
(`edgecomp targets measure loop`, a profile with remote = ssh://...), ``--repeats`` times each, each a
fresh process: the two paths time the same CPU, so their ratios should agree within the
run-to-run spread of either. Then ``--runs`` `edgecomp quantize --target loop` runs decide from the
remote table and time the written model on the "device" (the never-slower check through the
runner). Wall seconds include the build of the int8 variants and, for the remote path, ssh.

    nice -n 10 python scripts/bench_remote_targets.py --repeats 2 --runs 3
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench_common import ROOT, md_table, update_section
from bench_never_slower import digits_model

sys.path.insert(0, str(ROOT))


class _Folders:
    """What the sshd helper needs of pytest's tmp_path_factory."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=name, dir=self.root))


def cli(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "edgecomp.cli", *args], capture_output=True, text=True, env=env)
    return res, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from tests.remote.conftest import _sshd

    from edgecomp.quantize.measured import read_table

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server_gen = _sshd(_Folders(folder), sftp=True)
        server = next(server_gen)
        try:
            model, calib = digits_model(folder)
            toml = folder / "devices.toml"
            toml.write_text(f'[profile.loop]\nremote = "{server.address}"\nthreads = 1\npython = "{sys.executable}"\n'
                            f'ssh_config = "{server.config}"\n')
            tables, walls = {}, {}
            for rep in range(1, args.repeats + 1):
                for profile in ("host", "loop"):
                    res, wall = cli("targets", "measure", profile, "--model", str(model), "--targets-file", str(toml),
                                    "--calibration", str(calib))
                    if res.returncode:
                        raise SystemExit(res.stderr)
                    key = f"{'here' if profile == 'host' else 'over ssh'} {rep}"
                    tables[key], walls[key] = read_table(toml, profile), wall
            fams = list(next(iter(tables.values())).families)
            table_rows = [{"families": f, **{k: t.families[f].text() for k, t in tables.items()}} for f in fams]
            table_rows.append({"families": "wall seconds", **{k: f"{w:.1f}" for k, w in walls.items()}})
            runs = []
            for i in range(1, args.runs + 1):
                out, js = folder / f"q{i}.onnx", folder / f"q{i}.json"
                res, wall = cli("quantize", str(model), "-o", str(out), "--calibration", str(calib), "--target", "loop",
                                "--targets-file", str(toml), "--json", str(js))
                if res.returncode not in (0, 5):
                    raise SystemExit(res.stderr)
                s = json.loads(js.read_text())["summary"]
                runs.append({"run": i, "exit": res.returncode, "layers int8": s["layers int8"],
                             "whole-model check on the device": s.get(f"latency vs float ({server.address})", "—"),
                             "decision": s.get("latency decision", "—"),
                             "model sha256": hashlib.sha256(out.read_bytes()).hexdigest()[:12],
                             "wall s": f"{wall:.1f}"})
            left = server.wait_clean()
        finally:
            server_gen.close()
    body = ("### Targets over ssh: the device runner's table vs this host's (issue 26)\n\n"
            f"`nice -n 10 python scripts/bench_remote_targets.py --repeats {args.repeats} --runs {args.runs}` on "
            f"{datetime.date.today()}, this shared 2-core machine loaded by the other helpers' sessions (7 in "
            "parallel): the digits MobileNetV2 (width 0.5), 200 calibration digits; the \"device\" is this machine "
            "behind a loopback sshd, so both paths time the same CPU. int8/float per family combination "
            "[95% interval] over rounds, each measurement a fresh `edgecomp targets measure` process, here and "
            "over ssh alternately:\n\n"
            + md_table(table_rows, ["families", *tables]) + "\n\n"
            f"`edgecomp quantize --target loop` ({args.runs} runs; families from the remote table, the written "
            "model timed against fp32 through the runner):\n\n"
            + md_table(runs, list(runs[0])) +
            f"\n\nWork folders left on the device afterwards: {len(left)}.\n")
    print(body)
    update_section("remote-targets", body)


if __name__ == "__main__":
    main()
