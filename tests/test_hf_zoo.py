"""Every compression command on every tiny Hugging Face architecture (tests/hf_zoo.py): it works
within explicit tolerances, or it refuses in one line.

A command that works writes a model that passes onnx.checker and loads in onnxruntime, keeps the
output names and shapes on the DATA, and keeps its promise against the fp32 export:

- quantize (``--families all``: every MatMul int8, no timing decides): holds int8 weights, mean
  cosine >= 0.98 on every float output;
- reduce-embeddings (row-wise int8): a smaller file, mean cosine >= 0.99;
- prune (channels, then heads, sparsity 0.25 with DATA: activation importance, least-squares
  repair): never more parameters nor
  a larger file; the report's parameter counts are the files' own; every layer the report lists
  has the weight shape it says; channels and heads removed add up to the groups' before - after;
  a head group's output projection lost head-size input rows per head; mean cosine >= PRUNE_MIN_COS
  (the tiny models are random, so a sanity floor: the pruned model is still the model);
- validate (fp32 vs the quantized model): its cosine is the one measured here (1e-3), and it
  gives top-1 agreement exactly for outputs named or shaped like logits (a ViT's pooler output and
  hidden states get none, embeddings get k-NN agreement instead).

A refusal is exit status != 0, one stderr line starting "Error:", no traceback, no "internal
error", and no output file. The refusals seen today are listed in REFUSED, each with the words its
line must hold: a command that turns from works to refused fails, and so does a fixed one (then
its entry goes). Head pruning works on every architecture here since edgecomp/prune/attention.py
follows fused QKV splits (GPT-2), folded heads (DeBERTa-v2), relative position biases (MPNet, T5)
and ViT/Whisper attention: none of it is listed as a refusal.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hf_zoo import HF_ZOO, MINILM, HFZoo
from test_zoo import Outcome, check_refusal, check_written
from zoo import float_outputs, outputs, param_count, pooled_cosine, sample_cosine

from edgecomp.cli import cli

pytest.importorskip("transformers")

#: The tiny models; the real MiniLM is the benchmark's (scripts/bench_hf_zoo.py).
NAMES = [n for n in HF_ZOO if n != MINILM]
#: The dynamo exports take seconds each: with the slow cases.
SLOW = {"bert-spec-torchscript", "bert-spec-dynamo", "vit-cls-spec-dynamo", "vit-cls-spec-torchscript"}
COMMANDS = ["quantize", "prune_channels", "prune_heads", "reduce_embeddings", "validate"]

QUANT_MIN_COS = 0.98
EMB_MIN_COS = 0.99
PRUNE_MIN_COS = 0.7
VALIDATE_ATOL = 1e-3

_NO_TABLE = r"no embedding table .* nothing to reduce"
#: (model, command) -> what its one refusal line says today.
REFUSED: dict[tuple[str, str], str] = {
    **{(n, "reduce_embeddings"): _NO_TABLE for n in NAMES if n.startswith(("vit", "whisper"))},
}


def command_args(cmd: str, model: Path, data: Path, out: Path, candidate: Path | None = None) -> list[str]:
    m, d, o, j = str(model), str(data), str(out), str(out.with_suffix(".json"))
    return {
        "quantize": ["quantize", m, "-o", o, "--calibration", d, "--families", "all", "--max-samples", "8",
                     "--json", j],
        # the tiny models are random: a cut may fall below prune's 0.95 floor (exit 3 with --allow-degraded)
        "prune_channels": ["prune", m, "-o", o, "--sparsity", "0.25", "--kinds", "channels", "--data", d,
                           "--allow-degraded", "--json", j],
        "prune_heads": ["prune", m, "-o", o, "--sparsity", "0.25", "--kinds", "heads", "--data", d,
                        "--allow-degraded", "--json", j],
        "reduce_embeddings": ["reduce-embeddings", m, "-o", o, "--bits", "8", "--min-rows", "0", "--json", j],
        "validate": ["validate", m, str(candidate), "--data", d, "--json", j],
    }[cmd]


class HFZooRun:
    """Builds each HF zoo model once and runs each (model, command) once per module."""

    def __init__(self, folder: Path):
        self.zoo = HFZoo(folder)
        self.outdir = folder / "out"
        self.outdir.mkdir(exist_ok=True)
        self._done: dict[tuple[str, str], Outcome] = {}

    def run(self, name: str, cmd: str) -> Outcome:
        key = (name, cmd)
        if key not in self._done:
            model, data = self.zoo.get(name)
            out = self.outdir / f"{name}.{cmd}.onnx"
            candidate = None
            if cmd == "validate":
                q = self.run(name, "quantize")
                candidate = q.out if q.ok else model
            args = command_args(cmd, model, data, out, candidate)
            res = CliRunner().invoke(cli, args)
            exc = res.exception if res.exception and not isinstance(res.exception, SystemExit) else None
            self._done[key] = Outcome(model, data, out, args, res.exit_code, res.stdout, res.stderr, exc)
        return self._done[key]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> HFZooRun:
    return HFZooRun(tmp_path_factory.mktemp("hf_zoo"))


# --- checks ----------------------------------------------------------------------------------

def _cosines(o: Outcome) -> dict[str, float]:
    names, ref = outputs(o.model, o.data)
    _, got = outputs(o.out, o.data)
    assert [[a.shape for a in r] for r in ref] == [[a.shape for a in g] for g in got], "output shapes changed"
    return {n: pooled_cosine(r, g) for (n, r), (_, g) in zip(float_outputs(names, ref), float_outputs(names, got))}


def _arrow(text: str) -> tuple[int, int]:
    a, b = re.split(r"\s*(?:→|->)\s*", str(text).replace(",", ""))
    return int(a), int(b)


def _weight_dims(m: onnx.ModelProto, layer: str) -> tuple[int, int]:
    """(in, out) of the layer's weight initializer: MatMul [in, out], Gemm by transB, Conv [out, in, ...]."""
    node = next((n for n in m.graph.node if n.name == layer), None)
    assert node is not None, f"the report lists layer {layer}, the pruned graph has no such node"
    inits = {t.name: t for t in m.graph.initializer}
    w = inits.get(node.input[1]) if len(node.input) > 1 else None
    assert w is not None, f"layer {layer}: weight {node.input[1:2]} is not an initializer"
    dims = list(w.dims)
    if node.op_type == "MatMul":
        return dims[-2], dims[-1]
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return (dims[1], dims[0]) if trans_b else (dims[0], dims[1])
    return dims[1], dims[0]


def check_prune_report(o: Outcome, kind: str) -> None:
    got = onnx.load(str(o.out))
    src = onnx.load(str(o.model))
    report = json.loads(Path(o.args[o.args.index("--json") + 1]).read_text())
    s = report["summary"]
    before, after = param_count(src), param_count(got)
    assert after <= before, f"pruned model has {after} parameters, its input {before}"
    assert o.out.stat().st_size <= o.model.stat().st_size, "pruned file is larger than its input"
    assert _arrow(s["parameters"]) == (before, after), \
        f"report says parameters {s['parameters']}, the files hold {before} → {after}"
    groups = [g for g in report["tables"]["groups"] if g["kind"] == kind]
    removed = sum(g["before"] - g["after"] for g in groups)
    assert removed == s[f"{kind} removed"] > 0, f"{kind} removed {s[f'{kind} removed']}, groups add up to {removed}"
    assert after < before
    for row in report["tables"]["layers"]:
        want_in, want_out = _arrow(row["in"])[1], _arrow(row["out"])[1]
        assert _weight_dims(got, row["layer"]) == (want_in, want_out), f"layer {row['layer']}: report {row}"
    if kind == "heads":
        rows = {r["layer"]: r for r in report["tables"]["layers"]}
        for g in groups:
            if g["after"] == g["before"]:
                continue
            for layer in g["group"].split(" + "):  # weight-shared layers (ALBERT) are one group
                full, kept = _arrow(rows[layer]["in"])
                assert full % g["before"] == 0 and kept == full // g["before"] * g["after"], \
                    f"head group {layer}: {g['before']} → {g['after']} heads but input rows {full} → {kept}"


def check_validate(o: Outcome) -> None:
    report = json.loads(Path(o.args[o.args.index("--json") + 1]).read_text())
    cand = Path(o.args[2])
    names, ref = outputs(o.model, o.data)
    _, got = outputs(cand, o.data)
    theirs = {r["name"]: r for r in report["outputs"]}
    for (n, r), (_, g) in zip(float_outputs(names, ref), float_outputs(names, got)):
        assert n in theirs, f"validate does not report output {n} ({sorted(theirs)})"
        c = sample_cosine(r, g)
        assert abs(theirs[n]["cosine_mean"] - c) <= VALIDATE_ATOL, \
            f"validate says cosine {theirs[n]['cosine_mean']:.4f} for {n}, measured {c:.4f}"
        logits_like = "logits" in n or (r[0].ndim == 2 and not np.allclose(np.linalg.norm(r[0], axis=1), 1, atol=1e-3)
                                        and not re.search("pooler|hidden|embed|feature", n))
        assert (theirs[n]["top1_agreement"] is not None) == logits_like, f"{n}: top-1 {theirs[n]['top1_agreement']}"
        if n == "logits":
            agree = float(np.mean([np.array_equal(a.argmax(-1), b.argmax(-1)) for a, b in zip(r, g)]))
            assert abs(theirs[n]["top1_agreement"] - agree) <= 1e-6
        unit = r[0].ndim == 2 and np.allclose(np.linalg.norm(r[0], axis=1), 1, atol=1e-3)
        assert (theirs[n]["knn_agreement"] is not None) == (unit and "logits" not in n), f"{n}: k-NN {theirs[n]}"


# --- the matrix ------------------------------------------------------------------------------

def _cases():
    for name in NAMES:
        for cmd in COMMANDS:
            marks = [pytest.mark.slow] if name in SLOW else []
            yield pytest.param(name, cmd, marks=marks, id=f"{name}-{cmd}")


@pytest.mark.parametrize(("name", "cmd"), list(_cases()))
def test_hf_zoo(hf_run: HFZooRun, name: str, cmd: str) -> None:
    o = hf_run.run(name, cmd)
    expected = REFUSED.get((name, cmd))
    if cmd.startswith("prune") and o.exit_code == 3:  # written below the floor: the report must say so
        assert json.loads(o.out.with_suffix(".json").read_text())["status"] == "degraded"
        assert any(w.startswith("warning: the pruned model departs") for w in o.stderr.splitlines()), o.stderr
    elif not o.ok:
        check_refusal(o)
        assert not o.out.exists(), f"refused but wrote {o.out}"
        assert expected is not None, f"{name} {cmd} refused: {o.message}"
        assert re.search(expected, o.message), f"refused, but not as expected ({expected!r}): {o.message}"
        return
    assert expected is None, f"{name} {cmd} works now (expected the refusal {expected!r}): drop it from REFUSED"
    assert o.exception is None and "Traceback" not in o.stdout + o.stderr
    if cmd == "validate":
        check_validate(o)
        return
    check_written(o)
    cos = _cosines(o)
    floor = {"quantize": QUANT_MIN_COS, "reduce_embeddings": EMB_MIN_COS}.get(cmd, PRUNE_MIN_COS)
    for n, c in cos.items():
        assert c >= floor, f"{cmd} output {n}: mean cosine {c:.4f} < {floor}"
    if cmd == "quantize":
        dtypes = {t.data_type for t in onnx.load(str(o.out)).graph.initializer}
        assert dtypes & {onnx.TensorProto.INT8, onnx.TensorProto.UINT8}, "quantized model holds no int8 weights"
    elif cmd == "reduce_embeddings":
        assert o.out.stat().st_size < o.model.stat().st_size, "reduce-embeddings wrote a file no smaller"
    else:
        check_prune_report(o, "channels" if cmd == "prune_channels" else "heads")


@pytest.mark.parametrize("name", [n if n not in SLOW else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_hf_zoo_model_is_what_it_says(hf_run: HFZooRun, name: str) -> None:
    """Each export passes onnx.checker, runs on its DATA, records the task it was inferred as, and
    text DATA has sentences of different lengths (the variable-length calibration real text gives)."""
    path, data = hf_run.zoo.get(name)
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    meta = {p.key: p.value for p in m.metadata_props}
    if HF_ZOO[name].exporter is None and HF_ZOO[name].output_names is None:
        assert meta["edgecomp.task"] == HF_ZOO[name].task
    names, out = outputs(path, data)
    assert all(np.isfinite(a).all() for o in out for a in o)
    if data.is_dir():
        lengths = {np.load(f)["input_ids"].shape[1] for f in data.glob("*.npz")}
        assert len(lengths) > 3, lengths
    if name == "vit-pooler":
        assert names == ["last_hidden_state", "pooler_output"]
