"""Untrusted inputs of distill and export: checkpoints that would run code, opsets the exporters
cannot write, SPEC factories that exit or whose forward rejects the example inputs.

Every failure is one `Error: ...` line through the CLI, runs nothing from the file, and leaves
no output behind.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from edgecomp.cli import cli
from edgecomp.distill import DistillConfig, prepare, train
from edgecomp.distill.trainer import CHECKPOINT_FORMAT, check_resume
from edgecomp.errors import DistillError, ExportError, SpecError
from edgecomp.export import call_factory, export_model, load_spec, opset_ranges

TINY = '''
import torch
from torch import nn

def teacher():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), (torch.randn(1, 8),)

def student():
    return nn.Sequential(nn.Linear(8, 4))
'''


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("trust")
    (d / "tiny.py").write_text(textwrap.dedent(TINY))
    np.savez(d / "x.npz", input=np.random.default_rng(0).standard_normal((40, 8)).astype(np.float32))
    return d


def _cfg(tiny: Path, **kw) -> DistillConfig:
    base = dict(teacher=f"{tiny}/tiny.py:teacher", student=f"{tiny}/tiny.py:student", data=str(tiny / "x.npz"),
                batch_size=8, epochs=1, held_out=0.2, threads=1)
    return DistillConfig(**{**base, **kw})


def _fails_one_line(args: list[str], out: Path | None = None) -> str:
    """Invoke the CLI; assert a non-zero exit with exactly one `Error:` line, no traceback, no output."""
    r = CliRunner().invoke(cli, args)
    lines = r.output.strip().splitlines()
    assert r.exit_code not in (0, None), r.output
    assert isinstance(r.exception, SystemExit), repr(r.exception)  # click's exit, not an escaped exception
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    assert "Traceback" not in r.output
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]  # no staged file
    return lines[0]


# --- checkpoints ------------------------------------------------------------------------------

class _OpensMarker:
    """Unpickling this calls open(marker, "w"): creating the file proves the pickle ran code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class _TouchesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def _raw_pickle(path: Path, marker: Path) -> None:
    with open(path, "wb") as f:
        pickle.dump({"format": CHECKPOINT_FORMAT, "payload": _OpensMarker(marker)}, f)


def _torch_save_open(path: Path, marker: Path) -> None:
    torch.save({"format": CHECKPOINT_FORMAT, "model": {"w": torch.ones(2)}, "payload": _OpensMarker(marker)}, path)


def _torch_save_system(path: Path, marker: Path) -> None:
    torch.save([torch.zeros(1), _TouchesMarker(marker)], path)


def _old_format(path: Path, marker: Path) -> None:
    """What format 1 wrote: numpy's RNG state (an ndarray) needs numpy's reconstructor to load."""
    torch.save({"format": 1, "rng": [{"numpy": np.random.get_state()}]}, path)


CRAFTED = {"raw pickle open()": _raw_pickle, "torch.save open()": _torch_save_open,
           "torch.save os.system": _torch_save_system, "old format numpy state": _old_format}


@pytest.fixture(scope="module")
def setup(tiny):
    return prepare(_cfg(tiny))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", list(CRAFTED))
def test_check_resume_runs_nothing_from_a_crafted_checkpoint(kind, setup, tmp_path):
    ckpt, marker = tmp_path / "evil.ckpt", tmp_path / "marker"
    CRAFTED[kind](ckpt, marker)
    assert not marker.exists()
    with pytest.raises(DistillError) as err:
        check_resume(ckpt, setup)
    assert not marker.exists()
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"cannot read checkpoint {ckpt}") and msg.endswith("delete it and start again")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["raw pickle open()", "torch.save os.system"])
def test_cli_resume_runs_nothing_from_a_crafted_checkpoint(kind, tiny, tmp_path):
    ckpt, marker, out = tmp_path / "evil.ckpt", tmp_path / "marker", tmp_path / "s.onnx"
    CRAFTED[kind](ckpt, marker)
    line = _fails_one_line(["distill", f"{tiny}/tiny.py:teacher", "--student", f"{tiny}/tiny.py:student",
                            "--data", str(tiny / "x.npz"), "-o", str(out), "--batch-size", "8", "--epochs", "1",
                            "--held-out", "0.2", "--threads", "1", "--resume", "--checkpoint", str(ckpt)], out)
    assert "cannot read checkpoint" in line and "delete it and start again" in line
    assert not marker.exists()


def test_checkpoint_holds_only_tensors_and_plain_values(tiny, tmp_path):
    cfg = _cfg(tiny, checkpoint=str(tmp_path / "a.ckpt"), max_steps=2)
    train(cfg)
    ckpt = torch.load(cfg.checkpoint, weights_only=True)  # would raise on any other object
    assert ckpt["format"] == CHECKPOINT_FORMAT == 2
    rng = ckpt["rng"][0]
    assert isinstance(rng["numpy"]["keys"], torch.Tensor) and isinstance(rng["python"]["internal"], list)

    # Loadable but not fitting this run (a model without the student's weights): one line.
    ckpt["model"] = {"nothing": torch.zeros(1)}
    torch.save(ckpt, tmp_path / "b.ckpt")
    with pytest.raises(DistillError, match=r"^checkpoint .*b\.ckpt is damaged or does not fit this run") as err:
        train(dataclasses.replace(cfg, checkpoint=str(tmp_path / "b.ckpt")), resume=True)
    assert "\n" not in str(err.value)


# --- export opsets ----------------------------------------------------------------------------

def _write(tmp_path: Path, name: str, body: str) -> str:
    (tmp_path / name).write_text(textwrap.dedent(body))
    return str(tmp_path / name)


LINEAR = '''
import pathlib
import torch
pathlib.Path(__file__).with_name("imported").touch()

def make():
    return torch.nn.Linear(8, 4), (torch.randn(2, 8),)
'''


def test_opset_ranges_are_torchs():
    from torch.onnx import _constants as c

    r = opset_ranges()
    assert r["torchscript"] == (c.ONNX_MIN_OPSET, c.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    assert r["dynamo"][1] == c.ONNX_MAX_OPSET and r["dynamo"][0] >= r["torchscript"][0]


@pytest.mark.parametrize("opset, exporter, want", [
    ("1", "auto", r"--opset'?: 1 is outside 7\.\.\d+ that torch .*ONNX exporters support \(TorchScript 7\.\.\d+, dynamo"),
    ("999", "auto", r"--opset'?: 999 is outside 7\.\.\d+"),
    ("999", "dynamo", r"--opset'?: 999 is outside 7\.\.\d+"),
    (str(opset_ranges()["torchscript"][1] + 1), "torchscript", r"outside 7\.\.\d+ that the TorchScript exporter"),
])
def test_export_refuses_an_opset_before_importing_the_spec(opset, exporter, want, tmp_path):
    spec = _write(tmp_path, "lin.py", LINEAR) + ":make"
    out = tmp_path / "m.onnx"
    line = _fails_one_line(["export", spec, "-o", str(out), "--opset", opset, "--exporter", exporter], out)
    assert re.search(want, line), line
    assert not (tmp_path / "imported").exists()  # refused before any export work


def test_auto_skips_only_the_exporters_that_cannot_write_the_opset():
    from edgecomp.export import HF_AUTO_ORDER
    from edgecomp.export.exporters import plan_exporters

    ts_hi = opset_ranges()["torchscript"][1]
    assert plan_exporters(ts_hi + 1, "auto", ("dynamo", "torchscript"))[0] == ("dynamo", None)
    (first, why), (second, ok) = plan_exporters(ts_hi + 1, "auto", HF_AUTO_ORDER)
    assert first == "torchscript" and f"above {ts_hi}" in why and (second, ok) == ("dynamo", None)
    (first, why), (second, ok) = plan_exporters(13, "auto", ("dynamo", "torchscript"))
    assert first == "dynamo" and "below 18" in why and (second, ok) == ("torchscript", None)
    assert plan_exporters(13, "dynamo", ("dynamo",)) == [("dynamo", None)]  # converts down, checked after
    with pytest.raises(ExportError, match="opset True is outside"):
        plan_exporters(True, "auto", ("dynamo",))


def test_export_model_refuses_an_opset_before_running_the_module():
    class Never(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("ran")

    with pytest.raises(ExportError, match="opset 999 is outside"):
        export_model(Never(), (torch.ones(1),), "unused.onnx", opset=999)


def test_auto_uses_torchscript_below_dynamos_range_and_says_why(tmp_path):
    spec = _write(tmp_path, "lin13.py", LINEAR) + ":make"
    out = tmp_path / "m.onnx"
    r = CliRunner().invoke(cli, ["export", spec, "-o", str(out), "--opset", "13"])
    assert r.exit_code == 0, r.output
    assert "fell back to the torchscript exporter (dynamo: opset 13 is below 18" in r.output
    assert {o.domain: o.version for o in onnx.load(str(out)).opset_import}[""] == 13


def test_a_model_written_at_another_opset_is_refused(tmp_path, monkeypatch):
    import edgecomp.export.exporters as ex

    real = ex._export_torchscript
    monkeypatch.setattr(ex, "_export_torchscript", lambda m, a, n, o, ax, opset: real(m, a, n, o, ax, 17))
    out = tmp_path / "m.onnx"
    with pytest.raises(ExportError, match=r"^export failed with torchscript: the torchscript exporter wrote opset 17, "
                                          r"not the requested 15$") as err:
        export_model(torch.nn.Linear(8, 4), (torch.randn(1, 8),), out, opset=15, exporter="torchscript")
    assert "\n" not in str(err.value) and not out.exists()


# --- misbehaving factories --------------------------------------------------------------------

FACTORIES = {
    "factory exits": ('''
        import sys
        def make():
            sys.exit(7)
        ''', [], r"^Error: factory .*f\.py:make exited \(sys\.exit\(7\)\) instead of returning an nn\.Module$"),
    "module exits at import": ('''
        import sys
        sys.exit("bye")
        def make():
            pass
        ''', [], r"^Error: importing .*f\.py exited \(sys\.exit\('bye'\)\); a SPEC module must not exit$"),
    "forward rejects the --input shape": ('''
        import torch
        def make():
            return torch.nn.Linear(8, 4)
        ''', ["--input", "x=1x3x224x224"],
        r"^Error: .*f\.py:make: forward failed on inputs x=1x3x224x224 \(RuntimeError: mat1 and mat2 shapes cannot be multiplied"),
    "forward rejects the example inputs": ('''
        import torch
        def make():
            return torch.nn.Conv2d(3, 4, 3), (torch.ones(1, 5, 8, 8), )
        ''', [], r"^Error: .*f\.py:make: forward failed on inputs input=1x5x8x8 \(RuntimeError: "),
    "forward takes other arguments": ('''
        import torch
        class Two(torch.nn.Module):
            def forward(self, a, b):
                return a + b
        def make():
            return Two(), (torch.ones(2, 3),)
        ''', [], r"forward failed on inputs a=2x3 \(TypeError: .*missing 1 required positional argument"),
    "forward raises a multi-line ValueError": ('''
        import torch
        class Picky(torch.nn.Module):
            def forward(self, ids):
                raise ValueError("ids must be below 100\\nsecond line\\nthird line")
        def make():
            return Picky(), (torch.ones(1, 4, dtype=torch.int64),)
        ''', [], r"forward failed on inputs ids=1x4:int64 \(ValueError: ids must be below 100\)$"),
    "forward exits": ('''
        import sys, torch
        class Quits(torch.nn.Module):
            def forward(self, x):
                sys.exit(2)
        def make():
            return Quits(), (torch.ones(1),)
        ''', [], r"f\.py:make: forward exited \(sys\.exit\(2\)\) on inputs x=1$"),
    "forward returns no tensor": ('''
        import torch
        class Says(torch.nn.Module):
            def forward(self, x):
                return "hello"
        def make():
            return Says(), (torch.ones(1),)
        ''', [], r"forward returned str; export needs a tensor"),
    "syntax error": ('''
        def make(:
            pass
        ''', [], r"^Error: importing .*f\.py failed: SyntaxError: "),
    "import error": ('''
        import no_such_module_for_edgecomp
        def make():
            pass
        ''', [], r"^Error: importing .*f\.py failed: ModuleNotFoundError: No module named 'no_such_module_for_edgecomp'$"),
    "multi-line error at import": ('''
        raise RuntimeError("first line\\nsecond line")
        ''', [], r"^Error: importing .*f\.py failed: RuntimeError: first line$"),
    "factory raises a multi-line error": ('''
        def make():
            raise KeyError("weights.pt\\nmissing")
        ''', [], r"^Error: calling the factory of .*f\.py:make'? failed: KeyError: "),
}


@pytest.mark.parametrize("case", list(FACTORIES))
def test_a_misbehaving_factory_is_one_line(case, tmp_path):
    body, extra, want = FACTORIES[case]
    spec = _write(tmp_path, "f.py", body) + ":make"
    out = tmp_path / "m.onnx"
    line = _fails_one_line(["export", spec, "-o", str(out), *extra], out)
    assert re.search(want, line), line


def test_keyboard_interrupt_in_a_factory_still_propagates(tmp_path):
    path = _write(tmp_path, "k.py", '''
        def make():
            raise KeyboardInterrupt
        ''')
    with pytest.raises(KeyboardInterrupt):
        call_factory(load_spec(f"{path}:make"), f"{path}:make")
    path = _write(tmp_path, "ki.py", "raise KeyboardInterrupt\n")
    with pytest.raises(KeyboardInterrupt):
        load_spec(f"{path}:make")


def test_a_spec_module_that_exits_on_import_by_name(tmp_path, monkeypatch):
    (tmp_path / "quits_on_import_mod.py").write_text("import sys\nsys.exit(5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(SpecError, match=r"importing 'quits_on_import_mod' .* exited \(sys\.exit\(5\)\)"):
        load_spec("quits_on_import_mod:make")
