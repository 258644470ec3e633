"""Every command on every zoo model (tests/zoo.py): it works, or it refuses in one line.

A command that works must write a model that passes onnx.checker and loads in onnxruntime,
keeps the input's default-domain opset (or says it upgraded it), and keeps its promise on the
DATA: optimize within 1e-4 of the input model, quantize at mean cosine >= 0.98 on every float
output, prune never more parameters than the input and the same outputs. A refusal is exit
status != 0, exactly one stderr line starting "Error:", no traceback, no "internal error"
(the CLI's own words for a bug), and no output file.

Cases that fail today are ``xfail(strict=True)`` with the failure as the reason: when a fix
lands they pass, turn red, and the marker must go. Slow cases (dynamo exports, the larger
variants) run with ``pytest -m slow tests/test_zoo.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from zoo import (
    LARGE,
    ZOO,
    Zoo,
    default_opset,
    float_outputs,
    outputs,
    param_count,
    pooled_cosine,
    sample_cosine,
    session,
)

from edgecomp.cli import cli

#: Run by default: the third-party files and one file per way a user's file arrives.
FAST = ["silero_vad", "silero_vad_op15", "mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet",
        "resnet-ts17", "resnet-ts11", "resnet-vc17", "resnet-const", "resnet-neg1", "resnet-bn",
        "resnet-ident", "encoder-ts17", "encoder-const", "encoder-neg1", "encoder-nofold",
        "encoder-ident", "paddle_crnn", "overridable_cnn"]
SLOW = [n for n in ZOO if n not in FAST and n not in LARGE]

COMMANDS = ["inspect", "optimize", "quantize", "quantize_all", "prune", "prune_data", "validate", "bench", "bench_data"]

#: (model, command) -> the failure seen today. strict: a fix makes the case pass and fail the run.
XFAIL: dict[tuple[str, str], str] = {}

OPT_ATOL = 1e-4
QUANT_MIN_COS = 0.98


def command_args(cmd: str, model: Path, data: Path, out: Path, zoo_run=None, name: str = "") -> list[str]:
    m, d, o = str(model), str(data), str(out)
    if cmd == "inspect":
        return ["inspect", m, "--json", o.replace(".onnx", ".json")]
    if cmd == "optimize":
        return ["optimize", m, "-o", o]
    if cmd == "quantize":
        return ["quantize", m, "-o", o, "--calibration", d]
    if cmd == "quantize_all":  # every op family int8, not only those measured faster on this host
        return ["quantize", m, "-o", o, "--calibration", d, "--families", "all"]
    if cmd == "prune":
        return ["prune", m, "-o", o, "--sparsity", "0.3"]
    if cmd == "prune_data":
        return ["prune", m, "-o", o, "--sparsity", "0.3", "--data", d]
    if cmd == "validate":
        return ["validate", m, str(zoo_run.validate_candidate(name)), "--data", d, "--json", o.replace(".onnx", ".json")]
    if cmd == "bench":
        return ["bench", m, "--runs", "5", "--warmup", "1"]
    if cmd == "bench_data":
        return ["bench", m, "--runs", "5", "--warmup", "1", "--data", d]
    raise ValueError(cmd)


@dataclasses.dataclass
class Outcome:
    model: Path
    data: Path
    out: Path
    args: list[str]
    exit_code: int
    stdout: str
    stderr: str
    exception: BaseException | None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def message(self) -> str:
        lines = self.stderr.strip().splitlines()
        return lines[-1] if lines else f"exit {self.exit_code}"


class ZooRun:
    """Builds zoo models and runs each (model, command) once per session."""

    def __init__(self, folder: Path):
        self.zoo = Zoo(folder)
        self.outdir = folder / "out"
        self.outdir.mkdir(exist_ok=True)
        self._done: dict[tuple[str, str], Outcome] = {}

    def run(self, name: str, cmd: str) -> Outcome:
        key = (name, cmd)
        if key not in self._done:
            model, data = self.zoo.get(name)
            out = self.outdir / f"{name}.{cmd}.onnx"
            args = command_args(cmd, model, data, out, self, name)
            res = CliRunner().invoke(cli, args)
            exc = res.exception if res.exception and not isinstance(res.exception, SystemExit) else None
            self._done[key] = Outcome(model, data, out, args, res.exit_code, res.stdout, res.stderr, exc)
        return self._done[key]

    def validate_candidate(self, name: str) -> Path:
        """validate compares fp32 with the model quantized with --families all (no timing decides
        what it holds), else the optimized one, else the model itself. The fast encoder cases use
        plain quantize's output (already built; --families all costs them seconds each)."""
        first = "quantize" if name.startswith("encoder") and name in FAST else "quantize_all"
        for cmd in (first, "optimize"):
            o = self.run(name, cmd)
            if o.ok:
                return o.out
        return self.zoo.get(name)[0]


@pytest.fixture(scope="session")
def zoo_run(tmp_path_factory):
    run = ZooRun(tmp_path_factory.mktemp("zoo"))
    yield run
    if os.environ.get("ZOO_MATRIX"):  # the outcomes as JSON, for reports: ZOO_MATRIX=matrix.json pytest ...
        rows = [{"model": k[0], "command": k[1], "exit": o.exit_code, "args": [str(a) for a in o.args],
                 "stderr": o.stderr.strip(), "stdout_tail": o.stdout.strip().splitlines()[-3:]}
                for k, o in run._done.items()]
        Path(os.environ["ZOO_MATRIX"]).write_text(json.dumps(rows, indent=1))


# --- helpers ---------------------------------------------------------------------------------

def check_refusal(o: Outcome) -> None:
    text = o.stdout + o.stderr
    assert o.exception is None, f"crashed: {o.exception!r}"
    assert "Traceback" not in text, "traceback in the output"
    lines = o.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), f"refusal is not one 'Error:' line: {lines[-5:]}"
    assert "internal error" not in lines[0], lines[0]
    if o.args[0] in ("optimize", "quantize", "prune"):
        assert not o.out.exists(), f"refused but wrote {o.out}"


def check_written(o: Outcome) -> onnx.ModelProto:
    assert o.out.is_file(), f"exit 0 but no {o.out}"
    onnx.checker.check_model(str(o.out))
    session(o.out)
    src, got = onnx.load(str(o.model)), onnx.load(str(o.out))
    before, after = default_opset(src), default_opset(got)
    if after != before:
        says = after > before and (re.search(rf"opset\W[^\n]*\b{before}\s*(?:→|->|to)\s*{after}\b", o.stdout)
                                   or re.search(r"upgrad|convert", o.stdout, re.I) and str(after) in o.stdout)
        assert says, f"opset changed {before} -> {after} without saying so"
    return got


def check_same_interface(o: Outcome) -> None:
    """Same output names, and the same output shapes on the DATA."""
    ref_names, ref = outputs(o.model, o.data, limit=4)
    names, got = outputs(o.out, o.data, limit=4)
    assert names == ref_names, f"outputs {ref_names} became {names}"
    for n, r, g in zip(names, ref, got):
        assert [a.shape for a in r] == [a.shape for a in g], f"output {n} shapes {r[0].shape} became {g[0].shape}"


# --- the matrix ------------------------------------------------------------------------------

#: --families all matters where auto keeps a family float (convs, timed on this host); on the
#: encoders and silero it repeats quantize, so there it runs with the slow cases.
QUANTIZE_ALL_FAST = ("resnet-", "mtcnn_", "paddle_crnn", "overridable_cnn")


def _cases():
    for name in FAST + SLOW:
        for cmd in COMMANDS:
            slow = name in SLOW or cmd == "quantize_all" and not name.startswith(QUANTIZE_ALL_FAST)
            marks = [pytest.mark.slow] if slow else []
            if (name, cmd) in XFAIL:
                marks.append(pytest.mark.xfail(strict=True, reason=XFAIL[(name, cmd)]))
            yield pytest.param(name, cmd, marks=marks, id=f"{name}-{cmd}")


@pytest.mark.parametrize(("name", "cmd"), list(_cases()))
def test_zoo(zoo_run: ZooRun, name: str, cmd: str) -> None:
    o = zoo_run.run(name, cmd)
    if not o.ok:
        check_refusal(o)
        return
    assert o.exception is None and "Traceback" not in o.stdout + o.stderr
    if cmd == "inspect":
        summary = json.loads(Path(o.args[-1]).read_text())
        src = onnx.load(str(o.model))
        assert summary["opset"][""] == default_opset(src), f"inspect says opset {summary['opset']}"
        counted = sum(v[0] for v in summary["params_by_dtype"].values())
        assert counted == param_count(src), f"inspect counts {counted} parameters, the file holds {param_count(src)}"
    elif cmd == "optimize":
        check_written(o)
        names, ref = outputs(o.model, o.data)
        _, got = outputs(o.out, o.data)
        for n, r, g in zip(names, ref, got):
            d = max(float(np.max(np.abs(a.astype(np.float64) - b))) if a.size else 0.0 for a, b in zip(r, g))
            assert d <= OPT_ATOL, f"optimize changed output {n} by {d:.3g} (> {OPT_ATOL})"
    elif cmd in ("quantize", "quantize_all"):
        check_written(o)
        names, ref = outputs(o.model, o.data)
        _, got = outputs(o.out, o.data)
        for (n, r), (_, g) in zip(float_outputs(names, ref), float_outputs(names, got)):
            c = pooled_cosine(r, g)
            assert c >= QUANT_MIN_COS, f"quantized output {n}: mean cosine {c:.4f} < {QUANT_MIN_COS}"
    elif cmd in ("prune", "prune_data"):
        got = check_written(o)
        before, after = param_count(onnx.load(str(o.model))), param_count(got)
        assert after <= before, f"pruned model has {after} parameters, its input {before}"
        check_same_interface(o)
    elif cmd == "validate":
        report = json.loads(Path(o.args[-1]).read_text())
        cand = Path(o.args[2])
        names, ref = outputs(o.model, o.data)
        _, got = outputs(cand, o.data)
        mine = {n: sample_cosine(r, g) for (n, r), (_, g) in zip(float_outputs(names, ref), float_outputs(names, got))}
        theirs = {r["name"]: r["cosine_mean"] for r in report["outputs"]}
        for n, c in mine.items():
            assert n in theirs, f"validate does not report output {n} ({sorted(theirs)})"
            assert abs(theirs[n] - c) <= 1e-3, f"validate says cosine {theirs[n]:.4f} for {n}, measured {c:.4f}"


@pytest.mark.parametrize("name", FAST + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW])
def test_zoo_model_is_what_it_says(zoo_run: ZooRun, name: str) -> None:
    """Each zoo file holds the feature it is named for, runs on its DATA, and passes onnx.checker."""
    path, data = zoo_run.zoo.get(name)
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    ops = {n.op_type for n in m.graph.node}
    variant = name.rpartition("-")[2] if "-" in name else ""
    want_opset = {"ts11": 11, "ts13": 13, "dynamo18": 18, "dynamo": 18}.get(variant)
    if want_opset is None and name.split("-")[0] in ("resnet", "mnv2", "encoder", "digits", "mtcnn_pnet",
                                                    "mtcnn_rnet", "mtcnn_onet"):
        want_opset = 17
    if want_opset:
        assert default_opset(m) == want_opset
    if variant == "const":
        assert not m.graph.initializer and "Constant" in ops
    if variant == "neg1":
        assert m.graph.input[0].type.tensor_type.shape.dim[0].dim_value == -1
    if variant == "bn":
        assert "BatchNormalization" in ops
    if variant == "ident":
        assert "Identity" in ops
    if name == "silero_vad":
        assert "If" in ops and not m.graph.initializer
    names, out = outputs(path, data, limit=2)
    assert all(np.isfinite(a).all() for o in out for a in o)
