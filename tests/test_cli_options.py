"""The command line's shared flags are declared once, and it starts without the model libraries.

- ``--targets-file``, ``--shape``, ``--threads`` read the same in every command that has them;
  ``--target`` starts with the same text everywhere.
- Calibration data is ``--data``; ``--calibration`` still works where it was the name.
- ``import edgecomp.cli`` (what ``edgecomp --help`` runs) imports no torch, onnxruntime, onnx-ir
  or onnx, checked in a fresh interpreter, with a generous CPU bound (the target is 0.3 s; the
  bound leaves room for a loaded machine).
- ``distill`` and ``finetune`` refuse usage errors (student and data missing, bad values) in one
  line before torch, onnx-ir or onnx are imported.
"""

from __future__ import annotations

import resource
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.cli.options import SHAPE_HELP, TARGETS_FILE_HELP
from edgecomp.options import THREADS

HEAVY = ("torch", "onnxruntime", "onnx_ir", "onnx")


def _commands(group: click.Group = cli, prefix: str = ""):
    for name, cmd in group.commands.items():
        yield f"{prefix}{name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")


def _options(flag: str):
    return {name: p for name, cmd in _commands() for p in cmd.params if flag in p.opts}


def test_targets_file_reads_the_same_in_every_command():
    found = _options("--targets-file")
    assert {"bench", "validate", "quantize", "convert", "sweep", "targets", "targets measure"} <= set(found)
    for name, p in found.items():
        assert p.help == TARGETS_FILE_HELP, name
    out = CliRunner().invoke(cli, ["targets", "measure", "--help"], terminal_width=200).output
    assert "[measured.PROFILE]" in out


def test_shape_and_threads_read_the_same_in_every_command():
    shapes = _options("--shape")
    assert set(shapes) == {"bench", "inspect", "package"}
    assert {p.help for p in shapes.values()} == {SHAPE_HELP}
    threads = {n: p for n, p in _options("--threads").items() if n not in ("distill", "finetune")}  # torch training threads
    assert {"bench", "validate", "quantize", "prune", "targets measure"} <= set(threads)
    assert {p.help for p in threads.values()} == {THREADS.describe()[:1].upper() + THREADS.describe()[1:] + "."}
    targets = _options("--target")
    assert {"bench", "validate", "quantize", "convert", "sweep"} <= set(targets)
    assert all(p.help.startswith("Target profile (`edgecomp targets` lists them): ") for p in targets.values())


@pytest.mark.parametrize("flag", ["--data", "--calibration"])
def test_quantize_takes_data_and_its_old_name_calibration(tmp_path, mlp_path, flag):
    data = tmp_path / "d.npz"
    data.write_bytes(b"")
    # --mode dynamic refuses calibration data before any work: both names reach the same parameter
    res = CliRunner().invoke(cli, ["quantize", str(mlp_path), "-o", str(tmp_path / "q.onnx"), "--mode", "dynamic",
                                   flag, str(data)])
    assert res.exit_code == 2, res.output
    assert "--mode dynamic takes no --data" in res.output
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("command", ["quantize", "convert", "sweep", "targets measure"])
def test_calibration_is_an_alias_of_data(command):
    p = next(p for name, p in _options("--data").items() if name == command)
    assert p.opts == ["--data", "--calibration"] and p.name == "calibration"


def test_prune_and_distill_name_calibration_data_data():
    for name in ("prune", "distill"):
        p = _options("--data")[name]
        assert p.name == "calibration" and p.opts == ["--data"]


def test_importing_the_cli_loads_no_model_library():
    code = ("import sys, edgecomp.cli\n"
            f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')\n")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "none", f"import edgecomp.cli imported {out.stdout.strip()}"
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert cpu < 1.0, f"import edgecomp.cli took {cpu:.2f} s of CPU (target 0.3 s)"


def test_a_missing_model_is_refused_before_the_model_libraries_load(tmp_path):
    code = ("import sys\nfrom edgecomp.cli import cli\n"
            "try:\n    cli(['inspect', sys.argv[1]], prog_name='edgecomp')\n"
            "except SystemExit as e:\n"
            f"    print(e.code, ' '.join(m for m in {HEAVY!r} if m in sys.modules) or 'none')\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing.onnx")], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "1 none", out.stdout + out.stderr[-2000:]
    assert out.stderr.strip() == f"Error: ONNX model not found: {tmp_path / 'missing.onnx'} (check the path)"


@pytest.mark.parametrize("args, message", [
    (["distill", "{m}", "-o", "{out}"], "--shrink or a student SPEC gives the student; give one of them"),
    (["distill", "{m}", "--student", "{m}", "-o", "{out}"], "distill (or --text) needs --data DATA"),
    (["distill", "{m}", "--student", "{m}", "--data", "{m}", "--text", "{m}", "-o", "{out}"],
     "--text replaces the calibration data as the samples; give one of them"),
    (["distill", "a.b:c", "--shrink", "layers=2", "--data", "{m}", "--match-weight", "-1", "-o", "{out}"],
     "Invalid value for '--match-weight'"),
    (["finetune", "{m}", "-o", "{out}"], "finetune needs --data DATA"),
    (["finetune", "{m}", "--data", "{m}", "-o", "{out}"], "finetune needs --labels LABELS.npy"),
    (["finetune", "{m}", "--data", "{m}", "--labels", "{m}", "--freeze", "(", "-o", "{out}"],
     "pattern '(' is not a valid regular expression"),
])
def test_training_usage_errors_are_refused_before_torch_loads(tmp_path, args, message):
    # The model file is never read: every refusal here comes from the options alone. onnxruntime is
    # allowed: every command's code quiets its log first (edgecomp.cli.errors.quiet_onnxruntime).
    heavy = tuple(m for m in HEAVY if m != "onnxruntime")
    m = tmp_path / "m.onnx"
    m.write_bytes(b"")
    argv = [a.format(m=m, out=tmp_path / "out.onnx") for a in args]
    code = ("import sys\nfrom edgecomp.cli import cli\n"
            "try:\n    cli(sys.argv[1:], prog_name='edgecomp')\n"
            "except SystemExit as e:\n"
            f"    print(e.code, ' '.join(m for m in {heavy!r} if m in sys.modules) or 'none')\n")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().split(" ", 1)[1] == "none", out.stdout + out.stderr[-2000:]
    assert out.stdout.strip().split(" ", 1)[0] in ("1", "2")
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "out.onnx").exists()
