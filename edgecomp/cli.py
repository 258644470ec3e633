"""The ``edgecomp`` command line: parse options, call the library, render, exit.

Library errors (:class:`~edgecomp.errors.EdgecompError`) become one-line messages with a
non-zero exit status; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import click

from edgecomp.errors import EdgecompError
from edgecomp.export import DEFAULT_OPSET
from edgecomp.render import text as rpt

__all__ = ["main", "cli"]


class _Group(click.Group):
    """One line per failure unless --debug (accepted before or after the subcommand).

    EdgecompError is the library's own one-line message; OS errors (disk full, read-only,
    permissions, long names) name the path and what to do; anything else is reported as an
    internal error with its first line. Library warnings and onnxruntime's log lines are
    silenced outside --debug, so the error is the only line on stderr.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug", *(a for i, a in enumerate(args) if i >= end or a != "--debug")]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        with _library_logging(debug):
            try:
                return super().invoke(ctx)
            except click.exceptions.NoArgsIsHelpError:
                raise
            except click.UsageError as e:
                raise _UsageLine(e) from None
            except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except Exception as e:
                if debug:
                    raise
                raise click.ClickException(_one_line(e)) from None


class _UsageLine(click.ClickException):
    """A usage error as one line (click prints usage and a hint around it otherwise)."""

    exit_code = 2

    def __init__(self, e: click.UsageError):
        cmd = e.ctx.command_path if e.ctx else "edgecomp"
        super().__init__(f"{e.format_message()} (see '{cmd} --help')")


def _one_line(e: Exception) -> str:
    from edgecomp.io import first_line

    if isinstance(e, EdgecompError):
        return str(e)
    if isinstance(e, OSError):
        return _os_error_line(e)
    if isinstance(e, MemoryError):
        return "out of memory; use smaller inputs (--shape, --max-samples) or a machine with more memory"
    return f"internal error ({type(e).__name__}: {first_line(e)}); rerun with --debug for the traceback and report it"


def _os_error_line(e: OSError) -> str:
    import errno

    where = f" {e.filename}" if e.filename else ""
    advice = {
        errno.ENOSPC: "free some space or choose another output folder",
        errno.EDQUOT: "free some space or choose another output folder",
        errno.EROFS: "choose a writable output folder",
        errno.EACCES: "check the permissions or choose another path",
        errno.EPERM: "check the permissions or choose another path",
        errno.ENAMETOOLONG: "choose a shorter file name",
        errno.ENOENT: "check the path",
    }.get(e.errno, "check the path and try again")
    return f"{e.strerror or type(e).__name__}:{where}; {advice} (nothing was left half-written)"


@contextlib.contextmanager
def _library_logging(debug: bool):
    """Keep onnxruntime's log lines and library warnings off stderr unless --debug."""
    import logging
    import warnings

    import onnxruntime as ort

    ort.set_default_logger_severity(3 if debug else 4)
    if debug:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "transformers")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="edgecomp")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Prepare PyTorch models for mobile and edge CPUs: export to ONNX, optimize,
    prune, quantize, reduce embeddings, distill, and validate with onnxruntime."""
    ctx.obj = {"debug": debug}


# --- shared options ---------------------------------------------------------------------------

class _Number(click.ParamType):
    """A finite float within bounds (click's FloatRange lets NaN through)."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None, low_open: bool = False,
                 high_open: bool = False):
        self.low, self.high, self.low_open, self.high_open = low, high, low_open, high_open

    def convert(self, value, param, ctx):
        import math

        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.low is not None and (x < self.low or (self.low_open and x == self.low)):
            self.fail(f"{value} is out of range; {self._range()}", param, ctx)
        if self.high is not None and (x > self.high or (self.high_open and x == self.high)):
            self.fail(f"{value} is out of range; {self._range()}", param, ctx)
        return x

    def _range(self) -> str:
        lo = "" if self.low is None else f"{self.low} <{'' if self.low_open else '='} "
        hi = "" if self.high is None else f" <{'' if self.high_open else '='} {self.high}"
        return f"give {lo}x{hi}"


_POSITIVE = _Number(0, low_open=True)
_NON_NEGATIVE = _Number(0)
_FRACTION = _Number(0, 1, low_open=True, high_open=True)
_ANY = _Number()

def _output_option(f):
    return click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
                        help="Output file (written atomically; never one of the inputs).")(f)


def _json_option(f):
    """--json PATH, checked against every other path argument before the command does any work."""

    @functools.wraps(f)
    def checked(**params):
        if params.get("json_path"):
            _check_json_path(params["json_path"], params)
        return f(**params)

    return click.option("--json", "json_path", type=click.Path(dir_okay=False),
                        help="Also write the results as JSON to this file.")(checked)


def _check_json_path(path: str, params: dict) -> None:
    from edgecomp.io import check_output_path

    others = [v for k, v in params.items() if k != "json_path" and isinstance(v, str) and v]
    others += [v for v in params.values() if isinstance(v, tuple) for v in v if isinstance(v, str)]
    check_output_path(path, others)


def _threads_option(f, help="onnxruntime intra-op threads (inter-op is 1); default 1, or the --target profile's."):
    return click.option("--threads", type=click.IntRange(1), default=None, help=help)(f)


def _training_threads_option(f):
    return _threads_option(f, help="torch threads for training (default: all cores); onnxruntime checks use 1.")


def _value_option(f):
    return click.option("--value", "values", multiple=True, metavar="NAME=V[,V...]",
                        help="Fix an input's value, e.g. sr=16000 (one value fills the input; repeatable).")(f)


def _parse_values(values) -> dict:
    from edgecomp.data import parse_value

    return dict(parse_value(v) for v in values)


def _parse_shapes(values, what="--shape"):
    from edgecomp.data import parse_shape
    from edgecomp.errors import DataError

    out = {}
    for v in values:
        name, sep, shape = v.partition("=")
        if not sep or not name:
            raise DataError(f"bad {what} {v!r}; write NAME=1x3x224x224")
        out[name] = parse_shape(shape)
    return out


def _write_json(path, obj) -> None:
    """Write --json (its path was checked before the command ran)."""
    if path:
        from edgecomp.io import write_json

        write_json(path, rpt.to_jsonable(obj))
        click.echo(f"wrote {path}")


# --- commands ---------------------------------------------------------------------------------

@cli.command()
@click.argument("spec", required=False)
@_output_option
@click.option("--hf", "hf_path", type=click.Path(exists=True, file_okay=False),
              help="Export a local Hugging Face model folder instead of a SPEC, by the task its config.json names.")
@click.option("--hf-output", type=click.Choice(["embeddings", "hidden"]), default="embeddings", show_default=True,
              help="feature-extraction: pooled, L2-normalized embeddings (text: mean pooling; ViT: [CLS]; "
                   "Whisper: mean over frames) or last hidden states.")
@click.option("--task", metavar="NAME", default=None,
              help="With --hf: feature-extraction, text-classification, token-classification, image-classification "
                   "or text-generation, instead of the task inferred from config.json's architectures.")
@click.option("--input", "inputs", multiple=True, metavar="NAME=SHAPE[:dtype]",
              help="Example input shape when the factory gives none, e.g. x=1x3x224x224 (repeatable).")
@click.option("--dynamic", multiple=True, metavar="NAME:AXIS=label",
              help="Make an input axis symbolic, e.g. x:0=batch (repeatable).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True, help="ONNX opset.")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="auto tries torch's dynamo exporter first and falls back to TorchScript.")
@click.option("--atol", type=_POSITIVE, default=1e-4, show_default=True, help="Parity tolerance (absolute).")
def export(spec, output, hf_path, hf_output, task, inputs, dynamic, opset, exporter, atol):
    """Export a PyTorch model to ONNX and check it against torch in onnxruntime.

    SPEC is package.module:factory or path/to/file.py:factory; the factory returns an
    nn.Module or (module, example_inputs). --hf PATH exports a local Hugging Face folder by its
    task (from config.json's architectures, or --task); auto tries TorchScript first for it (its
    graph runs faster in onnxruntime; see HF_AUTO_ORDER).

    Example:

        edgecomp export models.mobilenet_v2:imagenet_224 -o mnv2.onnx --dynamic x:0=batch
    """
    from edgecomp.errors import SpecError
    from edgecomp.export import export_hf, export_spec

    shapes = _parse_shapes(inputs, "--input")
    axes: dict[str, dict[int, str]] = {}
    for d in dynamic:
        try:
            left, label = d.split("=", 1)
            name, axis = left.rsplit(":", 1)
            axes.setdefault(name, {})[int(axis)] = label
        except ValueError:
            raise SpecError(f"bad --dynamic {d!r}; write NAME:AXIS=label, e.g. x:0=batch") from None
    kwargs = dict(input_shapes=shapes, dynamic=axes, opset=opset, exporter=exporter, atol=atol)
    if hf_path:
        if spec:
            raise SpecError("give either a SPEC or --hf, not both")
        res = export_hf(hf_path, output, output=hf_output, task=task, **kwargs)
    elif task:
        raise SpecError("--task applies to --hf PATH; a SPEC's factory builds the model itself")
    elif spec:
        res = export_spec(spec, output, **kwargs)
    else:
        raise SpecError("give a SPEC (package.module:factory or file.py:factory) or --hf PATH")
    if res.fallback_reason:
        click.echo(f"note: fell back to the {res.exporter} exporter ({res.fallback_reason})")
    what = f", task {res.task} (from {res.task_source})," if res.task else ""
    click.echo(f"exported {res.path}{what} with the {res.exporter} exporter in {res.seconds:.1f}s; "
               f"inputs {res.input_names}, outputs {res.output_names}; "
               f"onnxruntime vs torch max abs diff {res.max_abs_diff:.2e}")


@cli.command()
@click.argument("teacher", required=False)
@_output_option
@click.option("--teacher-hf", type=click.Path(exists=True, file_okay=False),
              help="Teacher: a local Hugging Face encoder folder (sentence embeddings) instead of a SPEC.")
@click.option("--student", help="Student SPEC (package.module:factory or file.py:factory).")
@click.option("--shrink", help="Derive the student: layers=N (encoders, evenly spaced teacher layers) or width=W (CNNs).")
@click.option("--project", is_flag=True, help="Learn a linear map when the student's output width differs.")
@click.option("--data", type=click.Path(), help="DATA keyed by the teacher's inputs (unlabeled is enough).")
@click.option("--text", type=click.Path(), help="Text file, one sample per line (with --tokenizer).")
@click.option("--tokenizer", type=click.Path(), help="Local Hugging Face tokenizer folder (default: --teacher-hf).")
@click.option("--max-len", type=click.IntRange(2), default=128, show_default=True, help="Token limit for --text.")
@click.option("--labels", type=click.Path(), help=".npy of class ids for the samples: adds cross-entropy.")
@click.option("--objective", type=click.Choice(["auto", "logits", "embeddings"]), default="auto", show_default=True,
              help="auto: soft targets for logits, matching for unit-norm embeddings.")
@click.option("--temperature", type=_POSITIVE, default=4.0, show_default=True, help="Soft-target temperature.")
@click.option("--kd-weight", type=_NON_NEGATIVE, default=1.0, show_default=True, help="Weight of the soft-target KL (logits).")
@click.option("--match", type=click.Choice(["cosine", "mse"]), default="cosine", show_default=True,
              help="Embedding / hidden-state matching loss.")
@click.option("--match-weight", type=_NON_NEGATIVE, default=1.0, show_default=True, help="Weight of output matching (embeddings).")
@click.option("--hidden-weight", type=_NON_NEGATIVE, default=0.0, show_default=True, help="Weight of hidden-state matching.")
@click.option("--ce-weight", type=_NON_NEGATIVE, default=1.0, show_default=True, help="Weight of cross-entropy (with --labels).")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True)
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this many steps (overrides --epochs).")
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True, help="Global batch size.")
@click.option("--lr", type=_POSITIVE, default=1e-3, show_default=True, help="AdamW peak learning rate (cosine decay).")
@click.option("--held-out", type=_Number(0, 1, high_open=True), default=0.1, show_default=True,
              help="Fraction held out for early stopping and validation.")
@click.option("--eval-every", type=click.IntRange(1), help="Steps between held-out evaluations (default: each epoch).")
@click.option("--patience", type=click.IntRange(1), default=3, show_default=True,
              help="Evaluations without better fidelity before stopping.")
@click.option("--seed", type=int, default=0, show_default=True, help="Fixes initialization, split and data order.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint file (default: OUTPUT.ckpt).")
@click.option("--checkpoint-every", type=click.IntRange(1), default=100, show_default=True, help="Steps between checkpoints.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint (refused if written by other options or data).")
@click.option("--nproc", type=click.IntRange(1), default=1, show_default=True,
              help="Data-parallel processes on this machine (torch.distributed, gloo).")
@click.option("--nnodes", type=click.IntRange(1), default=1, show_default=True, help="Machines (torchrun rendezvous).")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", help="torchrun c10d rendezvous endpoint, for --nnodes > 1.")
@click.option("--rdzv-id", help="torchrun rendezvous id (the same on every machine).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True)
@click.option("--bench-runs", type=click.IntRange(0), default=50, show_default=True,
              help="Interleaved latency runs, teacher vs student (0 skips).")
@click.option("--device", default="auto", show_default=True, metavar="auto|cpu|cuda[:N]",
              help="Where to train: auto takes a CUDA GPU when torch sees one (bf16 mixed precision), else the CPU.")
@_training_threads_option
@_json_option
def distill(teacher, output, teacher_hf, student, shrink, project, data, text, tokenizer, max_len, labels, objective,
            temperature, kd_weight, match, match_weight, hidden_weight, ce_weight, epochs, max_steps, batch_size, lr,
            held_out, eval_every, patience, seed, checkpoint, checkpoint_every, resume, nproc, nnodes, rdzv_endpoint,
            rdzv_id, exporter, bench_runs, device, threads, json_path):
    """Train a smaller student to imitate TEACHER (a SPEC) and export it to ONNX.

    The student comes from --student SPEC or --shrink (layers=3 for encoders, width=0.5 for
    CNNs). Training runs on CPU with held-out early stopping, checkpoints and --resume; the
    student is then exported like `edgecomp export` and compared with the teacher
    (parameters, MACs, size, interleaved latency, fidelity, accuracy).

    Example:

        edgecomp distill models.mobilenet_v2:digits_teacher --shrink width=0.35 --data train.npz -o student.onnx
    """
    from edgecomp.distill import DistillConfig
    from edgecomp.distill import distill as run_distill

    cfg = DistillConfig(teacher=teacher, teacher_hf=teacher_hf, student=student, shrink=shrink, project=project,
                        data=data, text=text, tokenizer=tokenizer, max_len=max_len, labels=labels, held_out=held_out,
                        objective=objective, temperature=temperature, kd_weight=kd_weight, match=match,
                        match_weight=match_weight, hidden_weight=hidden_weight, ce_weight=ce_weight, epochs=epochs,
                        max_steps=max_steps, batch_size=batch_size, lr=lr, seed=seed, eval_every=eval_every,
                        patience=patience, checkpoint=checkpoint, checkpoint_every=checkpoint_every, threads=threads,
                        progress=True, device=device)
    result = run_distill(cfg, output, resume=resume, nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                         rdzv_id=rdzv_id, exporter=exporter, bench_runs=bench_runs, bench_threads=threads or 1)
    if result is None:
        click.echo("training done; the student is exported on the machine that holds rank 0")
        return
    t = result.training
    click.echo(f"trained {t['steps']} steps in {t['seconds']:.0f}s ({result.objective}); best held-out fidelity at "
               f"step {t['best_step']}{', stopped early' if t['stopped_early'] else ''}; checkpoint {result.checkpoint}")
    rows = [{k: (rpt.fmt_bytes(v) if k == "size bytes" else v) for k, v in r.items()} for r in result.rows]
    click.echo(rpt.table(rows, title="teacher vs student (held-out samples):"))
    click.echo(rpt.render_validation(result.validation))
    click.echo(f"wrote {result.output} ({result.exporter} exporter)")
    _write_json(json_path, {"training": t, "rows": result.rows, "validation": result.validation,
                            "bench": result.bench})


@cli.command()
@click.argument("model", type=click.Path())
@_output_option
@click.option("--fusions", type=click.Choice(["none", "bert"]), default="none", show_default=True,
              help="Also apply onnxruntime's transformer fusions (Attention, SkipLayerNorm, BiasGelu).")
@click.option("--no-fold", is_flag=True, help="Skip constant folding / BatchNorm folding.")
@_json_option
def optimize(model, output, fusions, no_fold, json_path):
    """Clean up a graph: fold constants and BatchNorms, optionally fuse transformer blocks.

    Example:

        edgecomp optimize mnv2.onnx -o mnv2.opt.onnx
    """
    from edgecomp.io import check_output_path, load_model, save_model
    from edgecomp.passes.base import run_pass
    from edgecomp.passes.optimize_graph import OptimizeGraphPass

    check_output_path(output, [model])
    m = load_model(model)
    result = run_pass(OptimizeGraphPass(fold_constants=not no_fold, fusions=fusions), m)
    save_model(result.model, output, inputs=[model])
    click.echo(rpt.render_pass(result))
    click.echo(f"wrote {output}")
    _write_json(json_path, result.to_json())


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@_threads_option
@click.option("--warmup", type=click.IntRange(0), default=10, show_default=True, help="Untimed runs per model.")
@click.option("--runs", type=click.IntRange(1), default=50, show_default=True, help="Timed runs per model.")
@click.option("--pin", metavar="CPUS", help="Pin to CPUs, e.g. 0 or 0-1.")
@click.option("--data", type=click.Path(), help="DATA whose first sample is the feed (else synthesized).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=SHAPE",
              help="Shape for symbolic dims, e.g. input_ids=1x128 (default: batch 1, sequence 128, images 224).")
@_value_option
@click.option("--target", help="Target profile (threads, pinning); see `edgecomp targets`.")
@click.option("--targets-file", type=click.Path(), help="TOML file with extra [profile.NAME] tables.")
@_json_option
def bench(models, threads, warmup, runs, pin, data, shapes, values, target, targets_file, json_path):
    """Measure onnxruntime CPU latency; several models run interleaved (A B A B ...).

    Prints p50/p90/p99, throughput and each model's ratio to the first.

    Example:

        edgecomp bench mnv2.onnx mnv2.int8.onnx --runs 100 --threads 1
    """
    from edgecomp.io import existing_file
    from edgecomp.measure.bench import benchmark, first_feed, pin_cpus
    from edgecomp.targets import get_profile

    for m in models:
        existing_file(m, "ONNX model")
    profile = get_profile(target, targets_file) if target else None
    if profile and profile.pin and not pin:
        pin = profile.pin
    if pin:
        pin_cpus(pin)
    threads = threads or (profile.threads if profile else 1)
    feed = first_feed(data, models[0]) if data else None
    shape_map = {k: v[0] for k, v in _parse_shapes(shapes).items()}
    result = benchmark(models, threads=threads, warmup=warmup, runs=runs, feed=feed, shapes=shape_map,
                       values=_parse_values(values))
    click.echo(rpt.render_bench(result, profile))
    _write_json(json_path, {"host_isa": rpt.host_line(profile), **rpt.to_jsonable(result)})


@cli.command()
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="DATA: .npz with a sample axis, or a folder of .npz feeds.")
@click.option("--labels", type=click.Path(), help=".npy of integer labels: report task accuracy of both models.")
@_threads_option
@_json_option
def validate(reference, candidate, data, labels, threads, json_path):
    """Compare a candidate model's outputs with a reference model's on real inputs.

    Reports max/mean abs error, cosine (mean, worst), top-1 agreement for logits, k-NN
    agreement for embeddings, and accuracy of both with --labels.

    Example:

        edgecomp validate mnv2.onnx mnv2.int8.onnx --data digits_test.npz --labels digits_test_labels.npy
    """
    from edgecomp.measure.validate import validate as run_validate

    result = run_validate(reference, candidate, data, labels, threads=threads or 1)
    click.echo(rpt.render_validation(result))
    _write_json(json_path, result)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--shape", "shapes", multiple=True, metavar="NAME=SHAPE",
              help="Shape for symbolic dims when counting MACs (default: batch 1, sequence 128, images 224).")
@_value_option
@click.option("--no-macs", is_flag=True, help="Skip running the model to count MACs.")
@_json_option
def inspect(model, shapes, values, no_macs, json_path):
    """Show ops, parameters by dtype, estimated MACs (and the share in int8), opset and I/O.

    Example:

        edgecomp inspect mnv2.onnx --shape x=1x3x224x224
    """
    from edgecomp.io import load_model
    from edgecomp.measure.inspect import summarize

    m = load_model(model)
    shape_map = {k: v[0] for k, v in _parse_shapes(shapes).items()}
    summary = summarize(m, shape_map, probe=not no_macs, values=_parse_values(values))
    click.echo(rpt.render_summary(summary))
    summary.probe_shapes = {}
    _write_json(json_path, summary)


@cli.command("reduce-embeddings")
@click.argument("model", type=click.Path())
@_output_option
@click.option("--bits", type=click.Choice(["8", "4"]), help="Row-wise int8, or int4 in blocks (of the low-rank factor with --rank).")
@click.option("--block", type=click.IntRange(2), help="Values per scale within a row. Default: whole row (int8), 64 (int4).")
@click.option("--rank", type=click.IntRange(1), help="Low-rank factorization: [V, R] table + [R, D] projection.")
@click.option("--energy", type=_Number(0, 1, low_open=True), help="Instead of --rank: the smallest rank retaining this energy, e.g. 0.99.")
@click.option("--corpus", type=click.Path(), help="Text file, one text per line: its token counts weight the factorization / pick kept ids.")
@click.option("--tokenizer", type=click.Path(), help="The model's tokenizer folder (tokenizer.json).")
@click.option("--exact-rows", type=click.IntRange(0), default=2000, show_default=True,
              help="With --corpus and --rank: keep this many most frequent tokens exact (residual table).")
@click.option("--weight-power", type=_ANY, default=0.5, show_default=True,
              help="With --corpus: row weight (count + 1) ** power in the factorization.")
@click.option("--prune-vocab", is_flag=True, help="Keep only token ids in --corpus / --keep-ids plus special tokens.")
@click.option("--keep-ids", type=click.Path(), help="File of token ids to keep (whitespace or comma separated).")
@click.option("--unk-id", type=click.IntRange(0), help="Unknown-token id for pruned ids (default: the tokenizer's).")
@click.option("--remap-tokenizer", is_flag=True,
              help="Write a renumbered tokenizer beside the model instead of an id map in the graph.")
@click.option("--add-tokens", type=click.Path(), help="File of new words, one a line: appended rows = mean of their sub-tokens.")
@click.option("--min-rows", type=click.IntRange(0), default=1000, show_default=True,
              help="Quantize only tables with at least this many rows.")
@_json_option
def reduce_embeddings(model, output, bits, block, rank, energy, corpus, tokenizer, exact_rows, weight_power, prune_vocab,
                      keep_ids, unk_id, remap_tokenizer, add_tokens, min_rows, json_path):
    """Shrink embedding tables: row-wise int8/int4, low rank, vocabulary pruning, added tokens.

    Tables are float initializers read by Gather with run-time ids (also when tied to an
    output projection). With --add-tokens or --remap-tokenizer a tokenizer folder
    OUTPUT-STEM.tokenizer/ is written beside the model.

    Example:

        edgecomp reduce-embeddings minilm.onnx -o minilm.emb.onnx --rank 256 --bits 8 --corpus texts.txt --tokenizer model/
    """
    from edgecomp.embeddings import ReduceOptions
    from edgecomp.embeddings import reduce_embeddings as run_reduce
    from edgecomp.embeddings.tokenizer import read_ids, write_tokenizer
    from edgecomp.io import check_output_path, load_model, save_model
    from edgecomp.text import load_tokenizer, read_lines

    inputs = [model] + [p for p in (corpus, keep_ids, add_tokens, tokenizer) if p]
    check_output_path(output, inputs)
    tok_folder = Path(output).parent / (Path(output).stem + ".tokenizer")
    if tokenizer and (remap_tokenizer or add_tokens) and tok_folder.resolve() == Path(tokenizer).resolve():
        from edgecomp.errors import OutputError

        raise OutputError(f"the tokenizer written beside {output} would replace --tokenizer {tokenizer}; choose another -o")
    opts = ReduceOptions(bits=int(bits) if bits else None, block=block, rank=rank, energy=energy, power=weight_power,
                         exact_rows=exact_rows, prune_vocab=prune_vocab, remap_tokenizer=remap_tokenizer,
                         unk_id=unk_id, min_rows=min_rows)
    m = load_model(model)
    result = run_reduce(m, opts, tokenizer=load_tokenizer(tokenizer) if tokenizer else None,
                        corpus=read_lines(corpus) if corpus else None, keep_ids=read_ids(keep_ids) if keep_ids else None,
                        new_tokens=read_lines(add_tokens) if add_tokens else None)
    save_model(result.model, output, inputs=inputs)
    for r in result.reports:
        click.echo(rpt.render_pass(r))
    click.echo(", ".join(f"{k}: {v}" for k, v in result.summary.items()))
    if result.tokenizer_files:
        write_tokenizer(result.tokenizer_files, tok_folder)
        click.echo(f"wrote {tok_folder}/")
    click.echo(f"wrote {output}")
    _write_json(json_path, {"summary": result.summary, "passes": [r.to_json() for r in result.reports]})


@cli.command()
@click.argument("model", type=click.Path())
@_output_option
@click.option("--calibration", type=click.Path(), help="DATA to calibrate activation ranges on (static mode).")
@click.option("--method", type=click.Choice(["minmax", "percentile", "entropy", "mse"]), default="minmax",
              show_default=True, help="How activation ranges are chosen from calibration statistics.")
@click.option("--percentile", type=_Number(0, 100, low_open=True), default=99.99, show_default=True, help="For --method percentile.")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option("--weight-bits", type=click.Choice(["auto", "7", "8"]), default="auto", show_default=True,
              help="auto: 7 where u8xs8 can saturate (x86 without VNNI), else 8.")
@click.option("--smooth", default="auto", show_default=True,
              help="SmoothQuant: auto (alpha per activation where it lowers the simulated error), off, or an alpha.")
@click.option("--bias-correction", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True)
@click.option("--families", default="auto", show_default=True,
              help="Op families to quantize: auto (those measured faster in int8), all, or e.g. matmul,conv.")
@click.option("--exclude", multiple=True, metavar="REGEX", help="Keep layers whose node name matches float.")
@click.option("--no-embeddings", is_flag=True, help="Keep embedding tables (Gather) float.")
@click.option("--max-samples", type=click.IntRange(1), help="Use at most this many calibration samples.")
@click.option("--eval", "eval_data", type=click.Path(), help="DATA for accuracy-aware fallback (held out).")
@click.option("--labels", type=click.Path(), help="Labels for --eval (makes --metric top1 task accuracy).")
@click.option("--metric", type=click.Choice(["cosine", "top1", "mae"]), default="cosine", show_default=True)
@click.option("--tolerance", type=_NON_NEGATIVE, help="Allowed loss vs fp32: 1-cosine, accuracy drop (fraction), or MAE.")
@click.option("--target", help="Target profile whose ISA decides weight bits (default: this host).")
@click.option("--targets-file", type=click.Path(), help="TOML file with extra [profile.NAME] tables.")
@click.option("--mode", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="dynamic runs onnxruntime's quantize_dynamic, for comparison only.")
@_threads_option
@_json_option
def quantize(model, output, calibration, method, percentile, per_tensor, weight_bits, smooth, bias_correction,
             families, exclude, no_embeddings, max_samples, eval_data, labels, metric, tolerance, target, targets_file, mode,
             threads, json_path):
    """Static int8 quantization, calibrated and accuracy-aware, in onnxruntime's fast form.

    Activation scales are fixed from calibration (no DynamicQuantizeLinear). With --eval and
    --tolerance, the most sensitive layers stay float until the metric is within tolerance;
    the best model found is always written, and the exit status is 3 when the tolerance
    could not be met.

    Example:

        edgecomp quantize minilm.onnx -o minilm.int8.onnx --calibration calib/ --eval held/ --metric cosine --tolerance 0.003
    """
    from edgecomp.data import load_data, load_labels
    from edgecomp.errors import ConfigError
    from edgecomp.io import check_output_path, load_model, save_model
    from edgecomp.quantize import quantize_model
    from edgecomp.quantize.dynamic import quantize_dynamic_ort
    from edgecomp.quantize.options import QuantizeOptions
    from edgecomp.targets import get_profile

    check_output_path(output, [p for p in (model, calibration, eval_data, labels, targets_file) if p])
    if labels and not eval_data:
        raise ConfigError("--labels score --eval samples; give --eval DATA with them (or drop --labels)")
    profile = get_profile(target, targets_file) if target else None
    if mode == "dynamic":
        if calibration or eval_data or tolerance is not None:
            raise ConfigError("--mode dynamic takes no --calibration, --eval or --tolerance (it is onnxruntime's "
                              "quantize_dynamic, for comparison)")
        quantize_dynamic_ort(model, output, profile.isa if profile else None)
        click.echo(f"wrote {output} (onnxruntime quantize_dynamic, for comparison)")
        return
    if not calibration:
        raise ConfigError("static quantization needs --calibration DATA (samples to fix activation ranges on)")
    m = load_model(model)
    opts = QuantizeOptions(method=method, percentile=percentile, per_channel=not per_tensor, weight_bits=weight_bits,
                           smooth=smooth, bias_correction=bias_correction, families=families, exclude=tuple(exclude),
                           embeddings=not no_embeddings,
                           max_samples=max_samples, isa=profile.isa if profile else None,
                           threads=threads or (profile.threads if profile else 1), progress=True)
    calib = load_data(calibration)
    ev = load_data(eval_data) if eval_data else None
    y = load_labels(labels, len(ev)) if (labels and ev is not None) else None
    if (eval_data is None) != (tolerance is None):
        raise ConfigError("accuracy-aware mode needs both --eval DATA and --tolerance X")
    result = quantize_model(m, calib, opts, eval_data=ev, metric=metric, tolerance=tolerance, labels=y)
    save_model(result.model, output, inputs=[model])
    click.echo(rpt.host_line(profile))
    click.echo(rpt.table(result.families, title="op families (latency measured on this host):"))
    cols = ["layer", "op", "family", "decision", "reason", "sensitivity", "smoothquant α", "bias corrected",
            "act range", "sim error"]
    click.echo(rpt.table([{c: r.get(c) for c in cols} for r in result.rows], title="layers:"))
    if result.embeddings:
        click.echo(rpt.table(result.embeddings, title="embedding tables:"))
    click.echo(", ".join(f"{k}: {v}" for k, v in result.summary.items() if k != "cleanup"))
    click.echo(f"wrote {output}")
    _write_json(json_path, {"summary": result.summary, "families": result.families, "layers": result.rows,
                            "embeddings": result.embeddings})
    if result.met_tolerance is False:
        raise click.exceptions.Exit(3)


@cli.command()
@click.argument("model", type=click.Path())
@_output_option
@click.option("--sparsity", type=_FRACTION, required=True,
              help="Fraction removed, in (0, 1): of each group's channels/heads (structured) or of weights.")
@click.option("--structured/--unstructured", default=True, show_default=True,
              help="Remove whole channels, neurons and heads (faster), or zero single weights (smaller zipped only).")
@click.option("--data", type=click.Path(), help="DATA for activation-based importance and least-squares repair.")
@click.option("--importance", type=click.Choice(["auto", "l1", "l2", "activation", "obs"]), default="auto", show_default=True,
              help="auto: activation-based with --data, else L2 weight magnitude.")
@click.option("--scope", type=click.Choice(["per-layer", "global"]), default=None,
              help="Rank per group or across the model. Default: per-layer (structured), global (unstructured).")
@click.option("--protect", multiple=True, metavar="REGEX", help="Keep layers whose node name matches whole (repeatable).")
@click.option("--round-to", type=click.IntRange(0), default=0, show_default=True,
              help="Keep channel counts multiples of N; 0 = auto: 8 for groups of >= 32 channels "
                   "(odd counts ran up to 2x slower in onnxruntime), else 1.")
@click.option("--kinds", default="channels,heads", show_default=True,
              help="What structured pruning removes: channels (incl. FFN neurons), heads, or both.")
@click.option("--no-repair", is_flag=True, help="With --data, skip the least-squares re-fit of consumer layers.")
@click.option("--max-samples", type=click.IntRange(1), help="Use at most this many DATA samples.")
@_threads_option
@_json_option
def prune(model, output, sparsity, structured, data, importance, scope, protect, round_to, kinds, no_repair,
          max_samples, threads, json_path):
    """Prune a model: physically remove channels, neurons and attention heads (structured, the
    default), or zero the smallest weights (--unstructured).

    Structured pruning finds the channels that must go together from the graph (residual
    Add/Concat, depthwise convs, Flatten into a Linear, FFN neurons, attention heads); a group
    reaching an op it cannot follow stays whole and the report names the op. With --data,
    consumer layers are re-fitted by least squares to the unpruned model's outputs. The result
    is checked with onnx.checker and onnxruntime before it is written.

    Example:

        edgecomp prune mnv2.onnx -o mnv2.pruned.onnx --sparsity 0.3 --data calib.npz --max-samples 200
    """
    from edgecomp.data import load_data
    from edgecomp.io import check_output_path, load_model, save_model

    check_output_path(output, [model] + ([data] if data else []))
    m = load_model(model)
    if structured:
        from edgecomp.prune import prune_model
        from edgecomp.prune.options import PruneOptions

        opts = PruneOptions(sparsity=sparsity, importance=importance, scope=scope or "per-layer",
                            protect=tuple(protect), round_to=round_to,
                            kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                            repair=not no_repair, max_samples=max_samples, threads=threads or 1)
        opts.validate()
        result = prune_model(m, opts, load_data(data) if data else None)
        save_model(result.model, output, inputs=[model])
        click.echo(rpt.table(result.groups, title="groups:"))
        click.echo(rpt.table(result.layers, title="layers:"))
        click.echo(", ".join(f"{k}: {v}" for k, v in result.summary.items() if v is not None))
        click.echo(f"wrote {output}")
        for line in result.warnings:
            click.echo(f"warning: {line}", err=True)
        _write_json(json_path, {"summary": result.summary, "groups": result.groups, "layers": result.layers,
                                "fidelity": result.fidelity, "warnings": result.warnings})
        return
    from edgecomp.errors import ConfigError
    from edgecomp.passes.base import run_pass
    from edgecomp.prune import verify_pruned
    from edgecomp.prune.prune_magnitude import PruneMagnitudePass

    ignored = [opt for opt, used in (("--data", data), ("--importance", importance != "auto"), ("--round-to", round_to),
                                     ("--no-repair", no_repair), ("--max-samples", max_samples)) if used]
    if ignored:
        raise ConfigError(f"--unstructured ranks weights by magnitude alone; drop {', '.join(ignored)}")
    reference = load_model(model)
    result = run_pass(PruneMagnitudePass(sparsity=sparsity, scope=scope or "global", protect=protect), m)
    verify_pruned(result.model, reference)
    save_model(result.model, output, inputs=[model])
    click.echo(rpt.table(result.rows, title="layers:"))
    s = result.summary
    click.echo(f"sparsity reached {s['sparsity reached']:.2%}; zipped weights {rpt.fmt_bytes(s['zipped weights before'])} "
               f"→ {rpt.fmt_bytes(s['zipped weights after'])}")
    click.echo(f"note: {s['note']}")
    click.echo(f"wrote {output}")
    _write_json(json_path, result)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Output folder: model.ort, required_operators_and_types.config, package.json.")
@click.option("--data", type=click.Path(), help="DATA whose first sample checks the .ort against the .onnx (else synthesized).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=SHAPE", help="Shape for symbolic dims of the check feed.")
@_value_option
@click.option("--overwrite", is_flag=True, help="Replace an OUTDIR that `edgecomp package` wrote before.")
def package(model, outdir, data, shapes, values, overwrite):
    """Package a model for ORT Mobile: model.ort, the operator config of a reduced-size build,
    and onnxruntime's verdict on which mobile EPs (NNAPI, CoreML) can take it.

    The .ort file is loaded in onnxruntime and checked against the .onnx outputs first.

    Example:

        edgecomp package minilm.int8.onnx -o out/minilm-mobile
    """
    from edgecomp.io import OUTPUT_MARKER, check_output_dir, existing_file, replace_dir, work_dir, write_json
    from edgecomp.measure.bench import first_feed
    from edgecomp.package import package_model

    existing_file(model, "ONNX model")
    out = check_output_dir(outdir, [model, data], overwrite)
    feed = first_feed(data, model) if data else None
    with work_dir(out) as work:
        res = package_model(model, work, feed=feed, shapes={k: v[0] for k, v in _parse_shapes(shapes).items()},
                            values=_parse_values(values))
        write_json(work / "package.json", {OUTPUT_MARKER: "package", "model": str(model), **rpt.to_jsonable(res)})
        replace_dir(work, out)
    click.echo(rpt.table(res.usability, title="onnxruntime mobile usability (share of nodes each EP can take):"))
    click.echo(", ".join(f"{k}: {v}" for k, v in res.summary.items()))
    click.echo(f"wrote {out}/model.ort, required_operators_and_types.config, package.json")


@cli.command()
@click.option("--targets-file", type=click.Path(), help="TOML file with extra [profile.NAME] tables.")
def targets(targets_file):
    """List target CPU profiles and say which match this host's ISA.

    Example:

        edgecomp targets --targets-file my_devices.toml
    """
    from edgecomp.targets import host_isa, load_profiles

    profiles = load_profiles(targets_file)
    isa = host_isa()
    click.echo(rpt.host_line(isa=isa))
    rows = [{"name": p.name, "threads": p.threads, "ISA": p.isa.describe(), "matches host": p.matches_host(isa),
             "description": p.description} for p in profiles.values()]
    click.echo(rpt.table(rows))


def _data_options(f):
    f = click.option("--tokenizer", type=click.Path(), help="Tokenizer folder for --text (default: the --hf folder).")(f)
    f = click.option("--text", type=click.Path(), help="Text, one per line: distillation data / embedding corpus.")(f)
    f = click.option("--labels", type=click.Path(), help="Labels (.npy) for --eval: task accuracy.")(f)
    f = click.option("--eval", "eval_data", type=click.Path(), help="Held-out DATA for validate/tolerance.")(f)
    f = click.option("--calibration", type=click.Path(), help="DATA for calibration / repair.")(f)
    return f


def _convert_source(spec, hf):
    from edgecomp.errors import SpecError
    from edgecomp.pipeline.convert import Source

    if bool(spec) == bool(hf):
        raise SpecError("give either a SPEC or --hf PATH")
    return Source(spec=spec, hf=hf)


@cli.command()
@click.argument("spec", required=False)
@click.option("--recipe", required=True, help="A built-in recipe name (see `edgecomp recipes`) or a TOML file.")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Output folder: every model, report.json, report.html.")
@click.option("--hf", "hf_path", type=click.Path(exists=True, file_okay=False), help="A local Hugging Face encoder instead of SPEC.")
@_data_options
@click.option("--target", help="Target profile (threads, ISA for quantization).")
@click.option("--targets-file", type=click.Path(), help="TOML file with extra [profile.NAME] tables.")
@click.option("--overwrite", is_flag=True, help="Replace an OUTDIR that edgecomp wrote before.")
@click.option("--ort-format", is_flag=True,
              help="Also write model.ort and required_operators_and_types.config for ORT Mobile (see `edgecomp package`).")
def convert(spec, recipe, outdir, hf_path, calibration, eval_data, labels, text, tokenizer, target, targets_file,
            overwrite, ort_format):
    """Run a recipe from a torch model to a validated edge artifact, with a report.

    Exit status 4 when a gate of the recipe fails (after everything is written).

    Example:

        edgecomp convert models.mobilenet_v2:digits_classifier --recipe cnn-int8 -o out/digits \\
            --calibration out/demo/train.npz --eval out/demo/test.npz --labels out/demo/test_labels.npy
    """
    from edgecomp.pipeline.convert import convert as run_convert
    from edgecomp.pipeline.recipe import load_recipe
    from edgecomp.targets import get_profile

    source = _convert_source(spec, hf_path)
    r = load_recipe(recipe)
    profile = get_profile(target, targets_file) if target else None
    res = run_convert(source, r, outdir, calibration=calibration, eval_data=eval_data, labels=labels, text=text,
                      tokenizer=tokenizer, target=profile,
                      overwrite=overwrite, progress=True, protect=[p for p in (targets_file,) if p], ort_format=ort_format,
                      on_step=lambda rec: click.echo(f"step {rec.index:02d} {rec.step}: done in {rec.seconds:.1f}s", err=True))
    click.echo(rpt.host_line(profile))
    click.echo(rpt.table(rpt.step_rows(res.steps), title=f"recipe {r.name}:"))
    for g in res.gates:
        click.echo(f"gate {g['gate']}: {g['value'] if g['value'] is None else round(g['value'], 4)} "
                   f"(limit {g['limit']}) {'pass' if g['passed'] else 'FAIL'}")
    if res.package:
        click.echo(rpt.table(res.package.usability, title="onnxruntime mobile usability:"))
    click.echo(f"wrote {outdir}/model.onnx{', model.ort' if res.package else ''}, report.json, report.html")
    if not res.passed:
        raise click.exceptions.Exit(4)


@cli.command()
@click.option("--options", "show_options", is_flag=True, help="Also list every step's options (type, default).")
def recipes(show_options):
    """List the built-in recipes and their steps.

    Example:

        edgecomp recipes --options
    """
    from edgecomp.pipeline.recipe import STEP_OPTIONS, builtin_recipes, load_recipe

    if show_options:
        rows = [{"step": step, "option": name, "type": "/".join(t.__name__ for t in (o.type if isinstance(o.type, tuple) else (o.type,))),
                 "default": o.default, "meaning": o.help} for step, opts in STEP_OPTIONS.items() for name, o in opts.items()]
        click.echo(rpt.table(rows, title="step options:"))

    rows = []
    for name, path in builtin_recipes().items():
        r = load_recipe(path)
        rows.append({"recipe": name, "steps": " → ".join(r.step_names()),
                     "gates": ", ".join(f"{k}={v}" for k, v in r.gates.items()), "description": r.description})
    click.echo(rpt.table(rows))


@cli.command()
@click.argument("spec", required=False)
@click.option("--recipe", required=True, help="A built-in recipe name or a TOML file.")
@click.option("--grid", "grid", multiple=True, required=True, metavar="STEP.OPTION=V1,V2",
              help="Values to sweep, e.g. quantize.method=minmax,mse (repeatable: cartesian product).")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False))
@click.option("--hf", "hf_path", type=click.Path(exists=True, file_okay=False))
@_data_options
@click.option("--target", help="Target profile.")
@click.option("--targets-file", type=click.Path())
@click.option("--address", help="Address of an existing Ray cluster (default: start a local one).")
@click.option("--connect-timeout", type=_POSITIVE, default=30.0, show_default=True,
              help="Seconds to wait for the --address cluster before giving up.")
@click.option("--max-parallel", type=click.IntRange(1), default=2, show_default=True, help="Local Ray CPUs.")
@click.option("--overwrite", is_flag=True)
def sweep(spec, recipe, grid, outdir, hf_path, calibration, eval_data, labels, text, tokenizer, target, targets_file,
          address, connect_timeout, max_parallel, overwrite):
    """Evaluate recipe variants in parallel on Ray and report the Pareto front.

    The best artifact so far is kept in OUTDIR/best.onnx as variants finish, also when interrupted.

    Example:

        edgecomp sweep models.mobilenet_v2:digits_classifier --recipe cnn-int8 -o out/sweep \\
            --grid quantize.method=minmax,mse --grid quantize.tolerance=0.002,0.01 \\
            --calibration out/demo/train.npz --eval out/demo/test.npz --labels out/demo/test_labels.npy
    """
    from edgecomp.pipeline.recipe import load_recipe
    from edgecomp.pipeline.sweep import parse_grid, run_sweep
    from edgecomp.targets import get_profile

    source = _convert_source(spec, hf_path)
    profile = get_profile(target, targets_file) if target else None
    res = run_sweep(source, load_recipe(recipe), parse_grid(grid), outdir, address=address,
                    connect_timeout=connect_timeout, max_parallel=max_parallel, protect=[p for p in (targets_file,) if p],
                    overwrite=overwrite, calibration=calibration, eval_data=eval_data, labels=labels, text=text,
                    tokenizer=tokenizer, target=profile,
                    on_result=lambda d: click.echo(f"{d['variant']} done: latency {d.get('latency')}, "
                                                   f"quality {d.get('quality')}", err=True))
    rows = [{k: v for k, v in d.items() if k != "model"} for d in res.variants]
    click.echo(rpt.table(rows, title="variants:"))
    click.echo(f"best: {res.best['variant'] if res.best else 'none'} → {outdir}/best.onnx; sweep.json, sweep.html")
    if res.interrupted:
        raise click.ClickException("interrupted; results so far are in " + outdir)


def main() -> None:
    cli(prog_name="edgecomp")


if __name__ == "__main__":
    main()
