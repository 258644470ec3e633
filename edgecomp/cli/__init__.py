"""The ``edgecomp`` command line: parse options, call the library, render, exit.

Library errors (:class:`~edgecomp.errors.EdgecompError`) become one-line messages with a
non-zero exit status; ``--debug`` shows the traceback instead (:mod:`edgecomp.cli.errors`). The
click options come from the capabilities' declarations and the shared flags of
:mod:`edgecomp.cli.options`; both, and each command's library code, are imported only when that
command runs, so ``edgecomp --help`` and a refusal at parse time start fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgecomp.cli.command import Group
from edgecomp.cli.command import deferred as _deferred
from edgecomp.cli.options import POSITIVE as _POSITIVE
from edgecomp.cli.options import Declared, ModelPath, shape_option, target_option, targets_file_option
from edgecomp.cli.options import data_option as _data_option
from edgecomp.cli.options import declared as _declared
from edgecomp.cli.options import json_option as _json_option
from edgecomp.cli.options import option_values as _values
from edgecomp.cli.options import output_option as _output_option
from edgecomp.cli.options import threads_option as _threads_option
from edgecomp.cli.options import training_threads_option as _training_threads_option
from edgecomp.cli.options import value_option as _value_option
from edgecomp.cli.options import write_json as _write_json
from edgecomp.errors import BelowFloor
from edgecomp.options import fields_of
from edgecomp.render import text as rpt

__all__ = ["main", "cli"]

# The declarations behind each command's options, imported when the command is parsed.
DISTILL_OPTIONS = Declared("edgecomp.distill.options")
EMBEDDING_OPTIONS = Declared("edgecomp.embeddings.options")
EXPORT_OPTIONS = Declared("edgecomp.export.options")
BENCH_OPTIONS = Declared("edgecomp.measure.options", "BENCH_OPTIONS")
VALIDATE_OPTIONS = Declared("edgecomp.measure.options", "VALIDATE_OPTIONS")
OPTIMIZE_OPTIONS = Declared("edgecomp.passes.options")
PRUNE_OPTIONS = Declared("edgecomp.prune.options")
QUANTIZE_OPTIONS = Declared("edgecomp.quantize.options")
FINETUNE_OPTIONS = Declared("edgecomp.finetune.options")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks on errors.")
@click.version_option(package_name="edgecomp")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Prepare PyTorch models for mobile and edge CPUs: export to ONNX, optimize,
    prune, quantize, reduce embeddings, distill, and validate with onnxruntime."""
    ctx.obj = {"debug": debug}



# --- helpers of several commands -------------------------------------------------------------

def _parse_values(values) -> dict:
    from edgecomp.data import parse_value

    return dict(parse_value(v) for v in values)


def _specialize(m, values):
    """--value on optimize/quantize/prune: fix those inputs in the loaded model (SpecializeInputsPass:
    the Ifs they decide inlined, a guard against other values); its record is shown, a value that
    changes nothing is warned about. None without --value."""
    if not values:
        return None
    from edgecomp.passes.base import run_pass
    from edgecomp.passes.specialize_inputs import SpecializeInputsPass

    res = run_pass(SpecializeInputsPass(values=_parse_values(values)), m)
    click.echo(rpt.render_pass(res))
    for line in res.summary.get("no effect", []):
        click.echo(f"warning: --value {line}", err=True)
    return res


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


def _finish(result, output, json_path, titles=None, extra=None) -> None:
    """The end of every command that writes a model: the result rendered (one renderer for every
    capability's StepResult), ``wrote``, its warnings on stderr, --json, and its exit status."""
    click.echo(rpt.render_step(result, titles))
    click.echo(f"wrote {output}")
    for line in result.warnings:
        click.echo(f"warning: {line}", err=True)
    _write_json(json_path, {**result.to_json(), **(extra or {})})
    if result.exit_status:
        raise click.exceptions.Exit(result.exit_status)


# --- commands ---------------------------------------------------------------------------------

@cli.command()
@click.argument("spec", required=False)
@_output_option
@click.option("--hf", "hf_path", type=click.Path(exists=True, file_okay=False),
              help="Export a local Hugging Face model folder instead of a SPEC, by the task its config.json names.")
@_declared(EXPORT_OPTIONS)
def export(spec, output, hf_path, **options):
    """Export a PyTorch model to ONNX and check it against torch in onnxruntime.

    SPEC is package.module:factory or path/to/file.py:factory; the factory returns an
    nn.Module or (module, example_inputs). --hf PATH exports a local Hugging Face folder by its
    task (from config.json's architectures, or --task); auto tries TorchScript first for it (its
    graph runs faster in onnxruntime; see HF_AUTO_ORDER).

    Example:

        edgecomp export models.mobilenet_v2:imagenet_224 -o mnv2.onnx --dynamic x:0=batch
    """
    from edgecomp.export import run

    res = run(output, _values(EXPORT_OPTIONS, options), spec=spec, hf=hf_path)
    s, ev = res.summary, res.evidence
    if s["fallback"]:
        click.echo(f"note: fell back to the {s['exporter']} exporter ({s['fallback']})")
    what = f", task {s['task']}," if s.get("task") else ""
    click.echo(f"exported {ev['path']}{what} with the {s['exporter']} exporter in {ev['seconds']:.1f}s; "
               f"inputs {ev['inputs']}, outputs {ev['outputs']}; "
               f"onnxruntime vs torch max abs diff {s['max abs diff vs torch']:.2e}")


@cli.command()
@click.argument("teacher", required=False)
@_output_option
@click.option("--teacher-hf", type=click.Path(exists=True, file_okay=False),
              help="Teacher: a local Hugging Face encoder folder (sentence embeddings) instead of a SPEC.")
@_declared(DISTILL_OPTIONS)
@_data_option("--data", "calibration", "DATA keyed by the teacher's inputs (unlabeled is enough).")
@_data_option("--text", "text", "Text file, one sample per line (with --tokenizer).")
@_data_option("--tokenizer", "tokenizer", "Local Hugging Face tokenizer folder (default: --teacher-hf).")
@_data_option("--labels", "labels", ".npy of class ids for the samples: adds cross-entropy.")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint file (default: OUTPUT.ckpt).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint (refused if written by other options or data).")
@click.option("--keep-checkpoint", is_flag=True, help="Keep the checkpoint after the student is written (removed by default).")
@click.option("--nproc", type=click.IntRange(1), default=1, show_default=True,
              help="Data-parallel processes on this machine (torch.distributed, gloo).")
@click.option("--nnodes", type=click.IntRange(1), default=1, show_default=True, help="Machines (torchrun rendezvous).")
@click.option("--rdzv-endpoint", metavar="HOST:PORT", help="torchrun c10d rendezvous endpoint, for --nnodes > 1.")
@click.option("--rdzv-id", help="torchrun rendezvous id (the same on every machine).")
@click.option("--exporter", type=click.Choice(["auto", "dynamo", "torchscript"]), default="auto", show_default=True,
              help="How a torch student is exported (an ONNX student keeps its own graph).")
@click.option("--bench-runs", type=click.IntRange(0), default=50, show_default=True,
              help="Interleaved latency runs, teacher vs student (0 skips).")
@_training_threads_option
@_json_option
def distill(teacher, output, teacher_hf, calibration, text, tokenizer, labels, checkpoint, resume, keep_checkpoint, nproc,
            nnodes, rdzv_endpoint, rdzv_id, exporter, bench_runs, threads, json_path, **options):
    """Train a smaller student to imitate TEACHER (a SPEC or an .onnx file) and export it to ONNX.

    The student comes from --student (a SPEC, or an .onnx file such as a pruned model, which is
    healed: its weights are trained and written back into its own graph) or --shrink (layers=3
    for encoders, width=0.5 for CNNs). Training runs on CPU with held-out early stopping, checkpoints and --resume; the
    student is then exported like `edgecomp export` and compared with the teacher
    (parameters, MACs, size, interleaved latency, fidelity, accuracy).

    Example:

        edgecomp distill models.mobilenet_v2:digits_teacher --shrink width=0.35 --data train.npz -o student.onnx
        edgecomp distill teacher.onnx --student pruned.onnx --text corpus.txt --tokenizer tok/ -o healed.onnx
    """
    from edgecomp.distill.config import DistillConfig

    cfg = DistillConfig(teacher=teacher, teacher_hf=teacher_hf, data=calibration, text=text, tokenizer=tokenizer,
                        labels=labels, checkpoint=checkpoint, threads=threads, progress=True,
                        **_values(DISTILL_OPTIONS, options))
    cfg.check()  # a usage error is refused before torch is imported (seconds)
    from edgecomp.distill import distill as run_distill

    result = run_distill(cfg, output, resume=resume, nproc=nproc, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                         rdzv_id=rdzv_id, exporter=exporter, bench_runs=bench_runs, bench_threads=threads or 1,
                         keep_checkpoint=keep_checkpoint)
    if result is None:
        click.echo("training done; the student is exported on the machine that holds rank 0")
        return
    t = result.training
    blocks = t.get("blockwise")
    if isinstance(blocks, dict):  # the block phase came first; t['steps'] counts the end-to-end pass
        click.echo(f"healed block by block: {len(blocks['trained blocks'])} of {blocks['blocks']} blocks trained for "
                   f"{blocks['steps']} steps (best {blocks['best step']}) between "
                   f"{', '.join(b['value'] for b in blocks['boundaries'])}")
    kept = f"checkpoint {result.checkpoint}" if keep_checkpoint else "checkpoint removed"
    click.echo(f"trained {t['steps']} steps in {t['seconds']:.0f}s ({result.objective}); best held-out fidelity at "
               f"step {t['best_step']}{', stopped early' if t['stopped_early'] else ''}; {kept}")
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    rows = [{k: (rpt.fmt_bytes(v) if k == "size bytes" else v) for k, v in r.items()} for r in result.rows]
    click.echo(rpt.table(rows, title="teacher vs student (held-out samples):"))
    click.echo(rpt.render_validation(result.validation))
    how = {"student graph": "trained weights written into the student's graph",
           "student graph (unchanged)": "the student as given"}.get(result.exporter, f"{result.exporter} exporter")
    click.echo(f"wrote {result.output} ({how})")
    _write_json(json_path, {"training": t, "rows": result.rows, "validation": result.validation,
                            "bench": result.bench})


@cli.command()
@click.argument("model", type=ModelPath())
@_output_option
@_declared(FINETUNE_OPTIONS)
@_data_option("--data", "calibration", "DATA keyed by the model's inputs (a seeded held_out share scores it).")
@_data_option("--labels", "train_labels", ".npy, one per sample: class ids (cross-entropy) or target vectors (MSE).")
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Checkpoint file (default: OUTPUT.ckpt).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint; with new DATA, a batch update of the "
              "model it holds.")
@click.option("--keep-checkpoint", is_flag=True, help="Keep the checkpoint after the model is written (needed to "
              "--resume later).")
@_training_threads_option
@_json_option
def finetune(model, output, calibration, train_labels, checkpoint, resume, keep_checkpoint, threads, json_path,
             **options):
    """Fine-tune any ONNX MODEL on labeled DATA and write the weights back into its own graph.

    --new-head N replaces the final classifier for a task with N classes (transfer learning);
    --freeze REGEX keeps matching weights fixed. The held-out split reports task accuracy before
    and after; the written model is checked against the trained weights in onnxruntime.

    Example:

        edgecomp finetune digits.onnx --data parity.npz --labels parity.npy --new-head 2 --keep-checkpoint -o parity.onnx
        edgecomp finetune parity.onnx --data week2.npz --labels week2.npy --resume --checkpoint parity.onnx.ckpt -o p2.onnx
    """
    from edgecomp.finetune.options import DATA_NEEDED, OPTIONS, FinetuneOptions
    from edgecomp.options import need_data

    opts = FinetuneOptions(**fields_of(_values(FINETUNE_OPTIONS, options)))
    # Usage errors are refused before onnx and torch are imported (seconds).
    need_data(OPTIONS, {}, {"calibration": calibration, "train_labels": train_labels}, DATA_NEEDED)
    from edgecomp.data import StepData
    from edgecomp.finetune import run
    from edgecomp.io import check_output_path, load_model, save_model

    inputs = [p for p in (model, calibration, train_labels) if p]
    out = check_output_path(output, inputs)
    ckpt = checkpoint or str(out) + ".ckpt"
    res = run(load_model(model), opts, StepData(calibration=calibration, train_labels=train_labels), checkpoint=ckpt,
              resume=resume, threads=threads)
    save_model(res.model, out, inputs=inputs)
    if not keep_checkpoint:
        Path(ckpt).unlink(missing_ok=True)
    s = res.summary
    if res.evidence["head"]:
        click.echo(s["new head"])
    click.echo(f"trained {s['steps']} steps in {s['seconds']:.0f}s ({s['optimizer']}, {s['labels']}); best held-out "
               f"at step {s['best step']}{', stopped early' if s['stopped early'] else ''}; "
               + (f"checkpoint {ckpt}" if keep_checkpoint else "checkpoint removed"))
    for key in ("held-out accuracy", "held-out mse"):
        if f"{key} after" in s:
            click.echo(f"{key}: {s[f'{key} before']:.4f} before, {s[f'{key} after']:.4f} after (onnxruntime)")
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"wrote {out} (trained weights in the model's own graph; onnxruntime vs torch max abs diff "
               f"{s['onnxruntime vs torch max abs diff']:.2e})")
    _write_json(json_path, res.to_json())


@cli.command()
@click.argument("model", type=ModelPath())
@_output_option
@_declared(OPTIMIZE_OPTIONS)
@_value_option
@_json_option
def optimize(model, output, values, json_path, **options):
    """Clean up a graph: fold constants and BatchNorms, optionally fuse transformer blocks.

    --value NAME=V fixes an input the deployment always feeds the same (a sample rate, a mode):
    the Ifs it decides are inlined and what it makes constant is folded; the input stays, and
    any other value fed later makes the model fail with a message naming the fixed value.

    Example:

        edgecomp optimize mnv2.onnx -o mnv2.opt.onnx
        edgecomp optimize silero_vad.onnx -o vad16k.onnx --value sr=16000
    """
    from edgecomp.io import check_output_path, load_model, save_model
    from edgecomp.passes.float_precision import refuse_unrunnable_floats
    from edgecomp.passes.optimize_graph import run

    check_output_path(output, [model])
    m = load_model(model)
    refuse_unrunnable_floats(m)
    spec = _specialize(m, values)
    result = run(m, options)
    save_model(result.model, output, inputs=[model])
    _finish(result, output, json_path, extra={"specialize": spec.to_json()} if spec else None)


def _remote_options(f):
    """--remote and the device link's options (bench, validate); a profile's remote = ... is the default."""
    from edgecomp.remote.transport import DEFAULT_COMMAND_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S

    f = click.option("--command-timeout", type=click.FloatRange(min=1), default=DEFAULT_COMMAND_TIMEOUT_S,
                     show_default=True, help="Seconds one command on the device may take (--remote).")(f)
    f = click.option("--connect-timeout", type=click.FloatRange(min=1), default=DEFAULT_CONNECT_TIMEOUT_S,
                     show_default=True, help="Seconds to reach the device (--remote).")(f)
    f = click.option("--ssh-config", type=click.Path(dir_okay=False),
                     help="ssh config file for --remote (ssh -F; default: your ~/.ssh/config).")(f)
    f = click.option("--remote-python", metavar="COMMAND",
                     help="The device's python with onnxruntime and numpy (default python3, or the profile's python).")(f)
    f = click.option("--remote", metavar="ssh://USER@HOST[:PORT]",
                     help="Run the models on this device over ssh (default: the --target profile's remote).")(f)
    return f


def _device(profile, remote=None, remote_python=None, ssh_config=None, connect_timeout=None, command_timeout=None):
    """The device to measure on: --remote, else the profile's remote; None to measure here."""
    address = remote or (profile.remote if profile else None)
    if not address:
        return None
    from edgecomp.remote import connect
    from edgecomp.remote.transport import DEFAULT_COMMAND_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S

    from_profile = profile if profile and not remote else None
    return connect(address, python=remote_python or (from_profile.python if from_profile else None) or "python3",
                   config_file=ssh_config or (from_profile.ssh_config if from_profile else None),
                   connect_timeout=connect_timeout or DEFAULT_CONNECT_TIMEOUT_S,
                   command_timeout=command_timeout or DEFAULT_COMMAND_TIMEOUT_S)


@cli.command()
@click.argument("models", nargs=-1, required=True, type=ModelPath())
@_declared(BENCH_OPTIONS)
@click.option("--pin", metavar="CPUS", help="Pin to CPUs, e.g. 0 or 0-1.")
@click.option("--data", type=click.Path(), help="DATA whose first sample is the feed (else synthesized).")
@shape_option
@_value_option
@target_option("its threads and CPU pinning; one with remote = ... measures on that device")
@targets_file_option()
@_remote_options
@_json_option
def bench(models, threads, warmup, runs, profile, pin, data, shapes, values, target, targets_file, json_path,
          **remote):
    """Measure onnxruntime CPU latency; several models run interleaved (A B A B ...).

    Prints p50/p90/p99, throughput and each model's ratio to the first. --profile then runs
    onnxruntime's profiler in separate runs: milliseconds per op type side by side, and the
    slowest nodes of each model.

    Example:

        edgecomp bench mnv2.onnx mnv2.int8.onnx --runs 100 --threads 1

        edgecomp bench mnv2.onnx mnv2.int8.onnx --remote ssh://pi@pi5.local
        edgecomp bench minilm.onnx minilm.int8.onnx --profile
    """
    from edgecomp.paths import existing_file
    from edgecomp.measure.bench import benchmark, first_feed, parse_cpus, pin_cpus
    from edgecomp.targets import get_profile

    for m in models:
        existing_file(m, "ONNX model")
    profile_ops, profile = profile, get_profile(target, targets_file)  # --profile; the target profile
    if profile and profile.pin and not pin:
        pin = profile.pin
    device = _device(profile, **remote)
    if device and profile_ops:
        raise click.UsageError("--profile runs onnxruntime's profiler on this host; drop --remote (or --profile)")
    if pin and not device:
        pin_cpus(pin)
    threads = threads or (profile.threads if profile else 1)
    feed = first_feed(data, models[0]) if data else None
    shape_map = {k: v[0] for k, v in _parse_shapes(shapes).items()}
    if device:
        from edgecomp.remote.measure import bench_on_device

        info = device.probe()
        result = bench_on_device(device, models, threads=threads, warmup=warmup, runs=runs, feed=feed, shapes=shape_map,
                                 values=_parse_values(values), pin=parse_cpus(pin) if pin else None)
        click.echo(rpt.render_bench(result, profile, device=info.describe()))
        _write_json(json_path, {"device": rpt.to_jsonable(info), **rpt.to_jsonable(result)})
        return
    result = benchmark(models, threads=threads, warmup=warmup, runs=runs, feed=feed, shapes=shape_map,
                       values=_parse_values(values))
    click.echo(rpt.render_bench(result, profile))
    ops = _profile_ops(models, threads, warmup, runs, feed, shape_map, _parse_values(values)) if profile_ops else None
    _write_json(json_path, {"host_isa": rpt.host_line(profile), **rpt.to_jsonable(result),
                            **({"profile": rpt.to_jsonable(ops)} if ops else {})})


def _profile_ops(models, threads, warmup, runs, feed, shapes, values):
    """bench --profile: onnxruntime's profiler over separate runs, printed side by side."""
    from edgecomp.measure.profile import profile_models

    ops = profile_models(models, threads=threads, warmup=warmup, runs=runs, feed=feed, shapes=shapes, values=values)
    click.echo("\n" + rpt.render_profile(ops))
    return ops


def _emulation_options(f):
    """--target (several), --targets-file, --max-samples, --timeout and --cache-dir of target numerics
    (made when validate is parsed: their defaults live in modules that import onnx-ir)."""
    f = _deferred(_emulation_limits)(f)
    f = targets_file_option()(f)
    f = target_option("an emulated one (arm64-*, or one with emulate = ...) runs the candidate there, one with "
                      "remote = ... runs both models on that device; repeat for several", multiple=True)(f)
    return f


def _emulation_limits():
    from edgecomp.emulate.limits import DEFAULT_MAX_SAMPLES, DEFAULT_TIMEOUT_S

    return [click.Option(["--max-samples"], type=click.IntRange(1), default=DEFAULT_MAX_SAMPLES, show_default=True,
                         help="Samples run on each emulated target (evenly spaced over DATA)."),
            click.Option(["--timeout"], type=click.FloatRange(min=1), default=DEFAULT_TIMEOUT_S, show_default=True,
                         help="Seconds the emulated runs of one target may take in all."),
            click.Option(["--cache-dir"], type=click.Path(file_okay=False),
                         help="The emulated runtime's folder (default ~/.cache/edgecomp/arm64 or $EDGECOMP_ARM64_CACHE).")]


@cli.command()
@click.argument("reference", type=click.Path())
@click.argument("candidate", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="DATA: .npz with a sample axis, or a folder of .npz feeds.")
@click.option("--labels", type=click.Path(), help=".npy of integer labels: report task accuracy of both models.")
@_declared(VALIDATE_OPTIONS)
@_threads_option
@_emulation_options
@_remote_options
@_json_option
def validate(reference, candidate, data, labels, k, threads, json_path, targets, targets_file, max_samples, timeout,
             cache_dir, **remote):
    """Compare a candidate model's outputs with a reference model's on real inputs.

    Reports max/mean abs error, cosine (mean, worst), top-1 agreement for logits, k-NN
    agreement for embeddings, and accuracy of both with --labels. Each --target with an emulated
    CPU (arm64-*, see `edgecomp targets`) also runs the candidate in onnxruntime's own aarch64
    build under qemu: fidelity to the host's fp32 reference and the platform gap (the candidate,
    target vs host), on --max-samples samples evenly spaced over DATA. Numerics only, never latency.

    Example:

        edgecomp validate mnv2.onnx mnv2.int8.onnx --data digits_test.npz --labels digits_test_labels.npy

        edgecomp validate minilm.onnx minilm.int8.onnx --data sentences.npz --target arm64-dotprod --target arm64-sme

        edgecomp validate mnv2.onnx mnv2.int8.onnx --data digits_test.npz --remote ssh://pi@pi5.local
    """
    from edgecomp.paths import existing_file
    from edgecomp.targets import get_profile

    on_device = [p for p in (get_profile(n, targets_file) for n in dict.fromkeys(targets)) if p.remote]
    if len(on_device) > 1 or (on_device and remote["remote"]):
        raise click.UsageError("validate measures on one device at a time: give one --remote or one --target with "
                               "remote = ...")
    emulated = [n for n in targets if n not in {p.name for p in on_device}]
    profiles = _emulated_profiles(emulated, targets_file) if emulated else []  # a wrong target first
    for m in (reference, candidate):  # before loading any library
        existing_file(m, "ONNX model")
    from edgecomp.measure.validate import validate as run_validate

    device = _device(on_device[0] if on_device else None, **remote)
    if device:
        from edgecomp.remote.measure import validate_on_device

        info = device.probe()
        result = validate_on_device(device, reference, candidate, data, labels, threads=threads or 1, k=k)
        click.echo(info.describe() + "\n" + rpt.render_validation(result))
        _write_json(json_path, {"device": rpt.to_jsonable(info), **rpt.to_jsonable(result)})
        if not profiles:
            return
    if profiles:  # a missing or broken emulated runtime is refused before any work
        from edgecomp.emulate.setup import load_runtime

        runtime = load_runtime(cache_dir)
    result = run_validate(reference, candidate, data, labels, threads=threads or 1, k=k)
    click.echo(rpt.render_validation(result))
    if not profiles:
        _write_json(json_path, result)
        return
    from edgecomp.emulate.numerics import fidelity_rows, target_fidelity
    from edgecomp.emulate.runner import LATENCY_NOTE

    on_targets = target_fidelity(reference, candidate, data, profiles, max_samples=max_samples, timeout_s=timeout,
                                 runtime=runtime, k=k, threads=threads or 1)
    click.echo(rpt.table(fidelity_rows(on_targets), title="numerics on emulated targets (onnxruntime aarch64 "
                                                           "under qemu-user)"))
    click.echo(f"note: {LATENCY_NOTE}")
    _write_json(json_path, {**rpt.to_jsonable(result), "targets": rpt.to_jsonable(on_targets)})


def _emulated_profiles(names, targets_file):
    from edgecomp.emulate.runner import Emulation
    from edgecomp.targets import get_profile

    profiles = [get_profile(n, targets_file) for n in dict.fromkeys(names)]
    for p in profiles:
        Emulation.of(p)
    return profiles


@cli.command()
@click.argument("model", type=ModelPath())
@shape_option
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
@click.argument("model", type=ModelPath())
@_output_option
@_declared(EMBEDDING_OPTIONS)
@_data_option("--corpus", "text", "Text file, one text per line: its token counts weight the factorization / "
              "pick kept ids.")
@_data_option("--tokenizer", "tokenizer", "The model's tokenizer folder (tokenizer.json).")
@click.option("--keep-ids", type=click.Path(), help="File of token ids to keep (whitespace or comma separated).")
@click.option("--add-tokens", type=click.Path(), help="File of new words, one a line: appended rows = mean of their sub-tokens.")
@_json_option
def reduce_embeddings(model, output, text, tokenizer, keep_ids, add_tokens, json_path, **options):
    """Shrink embedding tables: row-wise int8/int4, low rank, vocabulary pruning, added tokens.

    Tables are float initializers read by Gather with run-time ids (also when tied to an
    output projection). With --add-tokens or --remap-tokenizer a tokenizer folder
    OUTPUT-STEM.tokenizer/ is written beside the model.

    Example:

        edgecomp reduce-embeddings minilm.onnx -o minilm.emb.onnx --rank 256 --bits 8 --corpus texts.txt --tokenizer model/
    """
    from edgecomp.data import StepData
    from edgecomp.embeddings import ReduceOptions, run
    from edgecomp.embeddings.tokenizer import read_ids, write_tokenizer
    from edgecomp.io import check_output_path, load_model, save_model
    from edgecomp.text import read_lines

    inputs = [model] + [p for p in (text, keep_ids, add_tokens, tokenizer) if p]
    check_output_path(output, inputs)
    opts = ReduceOptions(**fields_of(_values(EMBEDDING_OPTIONS, options)))
    tok_folder = Path(output).parent / (Path(output).stem + ".tokenizer")
    if tokenizer and (opts.remap_tokenizer or add_tokens) and tok_folder.resolve() == Path(tokenizer).resolve():
        from edgecomp.errors import OutputError

        raise OutputError(f"the tokenizer written beside {output} would replace --tokenizer {tokenizer}; choose another -o")
    result = run(load_model(model), opts, StepData(text=text, tokenizer=tokenizer),
                 keep_ids=read_ids(keep_ids) if keep_ids else None,
                 new_tokens=read_lines(add_tokens) if add_tokens else None)
    save_model(result.model, output, inputs=inputs)
    if result.files:
        write_tokenizer(result.files, tok_folder)
        click.echo(f"wrote {tok_folder}/")
    _finish(result, output, json_path)


@cli.command()
@click.argument("model", type=ModelPath())
@_output_option
@_data_option("--data", "calibration", "DATA to calibrate activation ranges on (static mode).",
              alias="--calibration")
@_declared(QUANTIZE_OPTIONS)
@_data_option("--eval", "eval", "Held-out DATA for --tolerance (the accuracy-aware fallback).", dest="eval_data")
@_data_option("--labels", "labels", "Labels for --eval (makes --metric top1 task accuracy).")
@target_option("its ISA decides weight bits (default: this host); one with an emulated CPU (arm64-*) also judges "
               "--tolerance and the fidelity floor on its numerics; one with remote = times the written model against "
               "the input on its device")
@targets_file_option()
@click.option("--target-samples", type=click.IntRange(1), default=16, show_default=True,
              help="Samples an emulated --target runs per candidate (~1.5-3 s each for a MiniLM int8).")
@click.option("--mode", type=click.Choice(["static", "dynamic"]), default="static", show_default=True,
              help="dynamic runs onnxruntime's quantize_dynamic, for comparison only.")
@_value_option
@_threads_option
@_json_option
def quantize(model, output, calibration, eval_data, labels, target, targets_file, target_samples, mode, values,
             threads, json_path, **options):
    """Static int8 quantization, calibrated and accuracy-aware, in onnxruntime's fast form
    (or, with --format qdq, the QuantizeLinear/DequantizeLinear form mobile EPs consume).

    Activation scales are fixed from calibration (no DynamicQuantizeLinear). With --eval and
    --tolerance, the most sensitive layers stay float until the metric is within tolerance;
    the best model found is always written, and the exit status is 3 when the tolerance
    could not be met. The written model is timed against the input on this host (on the
    --target profile's device when it has remote = ssh://...): with
    --families auto a model not faster beyond noise is replaced by the float model as given
    (with a warning); with forced families it is kept and the exit status is 5. --value NAME=V fixes a mode input first (see `edgecomp optimize`), so
    layers behind an If on it are quantized.

    Example:

        edgecomp quantize minilm.onnx -o minilm.int8.onnx --data calib/ --eval held/ --metric cosine --tolerance 0.003
        edgecomp quantize silero_vad.onnx -o vad.int8.onnx --data chunks/ --value sr=16000
    """
    from edgecomp.data import StepData
    from edgecomp.io import check_output_path, load_model, save_model
    from edgecomp.quantize import run
    from edgecomp.quantize.dynamic import quantize_dynamic_ort
    from edgecomp.quantize.options import for_target
    from edgecomp.targets import get_profile

    check_output_path(output, [p for p in (model, calibration, eval_data, labels, targets_file) if p])
    data = StepData(calibration=calibration, eval=eval_data, labels=labels)
    fixed, values = values, _values(QUANTIZE_OPTIONS, options)
    if eval_data and values["tolerance"] is None:
        raise click.UsageError("--eval is read by --tolerance X (the accuracy-aware fallback); give both")
    profile = get_profile(None if target == "host" else target, targets_file)
    table = _measured_table(targets_file, target, values["families"])
    if mode == "dynamic":
        if calibration or eval_data or values["tolerance"] is not None or fixed:
            raise click.UsageError("--mode dynamic takes no --data, --eval, --tolerance or --value (it is "
                                   "onnxruntime's quantize_dynamic, for comparison)")
        quantize_dynamic_ort(model, output, profile.isa if profile else None)
        click.echo(f"wrote {output} (onnxruntime quantize_dynamic, for comparison)")
        return
    from edgecomp.emulate.runner import target_runner

    opts = for_target(values, profile, threads=threads, progress=True, table=table)  # the target's rules, first
    runner, note = target_runner(profile, target_samples)
    if note:
        click.echo(f"warning: {note}", err=True)
    opts.target_runner, opts.device = runner, _device(profile)
    if opts.device is not None:  # an unreachable or unfit device is refused before any work
        click.echo(opts.device.probe().describe())
    m = load_model(model)
    spec = _specialize(m, fixed)
    result = run(m, opts, data)
    save_model(result.model, output, inputs=[model])
    click.echo(rpt.host_line(profile))
    where = table.describe() if table else "latency measured on this host"
    _finish(result, output, json_path, titles={"op families": f"op families ({where})"},
            extra={"specialize": spec.to_json() if spec else None})


def _measured_table(targets_file, target, families):
    """The measured table for --target (``host`` without one) in --targets-file, when families
    auto decides (None: no file, or no table there; quantize then times on this host)."""
    if families != "auto" or not targets_file:
        return None
    from edgecomp.quantize.measured import table_for

    table, note = table_for(targets_file, target)
    if note:
        click.echo(f"warning: {note}", err=True)
    return table


#: A refused prune's remedies in the command's flags (edgecomp.errors.BelowFloor).
_PRUNE_REMEDIES = {"calibration": "give --data DATA (importance, repair and a check on real inputs)",
                   "sparsity": "lower --sparsity", "protect": "--protect the sensitive layers",
                   "allow_degraded": "pass --allow-degraded to write it anyway (exit status 3)"}


@cli.command()
@click.argument("model", type=ModelPath())
@_output_option
@_declared(PRUNE_OPTIONS)
@_data_option("--data", "calibration", "DATA for activation-based importance, least-squares repair and the held-out "
              "fidelity of the result.")
@_data_option("--eval", "eval", "Held-out DATA that --tolerance measures the loss on.", dest="eval_data")
@_data_option("--labels", "labels", "Labels for --eval (makes --metric top1 task accuracy).")
@_value_option
@_threads_option
@_json_option
def prune(model, output, calibration, eval_data, labels, values, threads, json_path, **options):
    """Prune a model: physically remove channels, neurons and attention heads (structured, the
    default), or zero the smallest weights (--unstructured).

    Structured pruning finds the channels that must go together from the graph (residual
    Add/Concat, depthwise convs, Flatten into a Linear, FFN neurons, attention heads); a group
    reaching an op it cannot follow stays whole and the report names the op. With --data,
    consumer layers are re-fitted by least squares to the unpruned model's outputs, and the
    result's fidelity on held-out samples is reported. The result is checked with onnx.checker
    and onnxruntime before it is written.

    With --eval and --tolerance, the cut is fitted to the loss instead of --sparsity: each group
    is cut as far as the measured loss on --eval allows (uneven per group); the best model found is
    always written, and the exit status is 3 when no cut stays within the tolerance.
    --value NAME=V fixes a mode input first (see `edgecomp optimize`), so layers behind an If on
    it can be pruned.

    Otherwise the result must keep mean cosine and top-1 agreement >= 0.95 against the input, on
    the held-out samples of --data or, without --data, on 16 synthesized inputs (random, as
    `bench` feeds them; the report says so). Below that floor nothing is written and the command
    fails with one line; --allow-degraded writes it anyway, with a warning and exit status 3.

    Example:

        edgecomp prune mnv2.onnx -o mnv2.pruned.onnx --sparsity 0.3 --data calib.npz --max-samples 200
        edgecomp prune minilm.onnx -o minilm.p.onnx --data calib/ --eval held/ --metric cosine --tolerance 0.01
    """
    from edgecomp.data import StepData
    from edgecomp.io import check_output_path, load_model, save_model
    from edgecomp.prune import run
    from edgecomp.prune.options import PruneOptions
    from edgecomp.step import StepContext

    check_output_path(output, [p for p in (model, calibration, eval_data, labels) if p])
    opts = PruneOptions(**fields_of(_values(PRUNE_OPTIONS, options)), threads=threads or 1)
    if eval_data and opts.tolerance is None:
        raise click.UsageError("--eval is read by --tolerance X (the cut fitted to a loss); give both")
    m = load_model(model)
    spec = _specialize(m, values)
    try:
        result = run(m, opts, StepData(calibration=calibration, eval=eval_data, labels=labels),
                     StepContext(threads=opts.threads, progress=True))
    except BelowFloor as e:
        raise click.ClickException(e.render(_PRUNE_REMEDIES)) from None
    save_model(result.model, output, inputs=[model])
    _finish(result, output, json_path, extra={"specialize": spec.to_json() if spec else None})


@cli.command()
@click.argument("model", type=ModelPath())
@click.option("-o", "--output", "outdir", required=True, type=click.Path(file_okay=False),
              help="Output folder: model.ort, required_operators_and_types.config, package.json.")
@click.option("--data", type=click.Path(), help="DATA whose first sample checks the .ort against the .onnx (else synthesized).")
@shape_option
@_value_option
@click.option("--overwrite", is_flag=True, help="Replace an OUTDIR that `edgecomp package` wrote before.")
def package(model, outdir, data, shapes, values, overwrite):
    """Package a model for ORT Mobile: model.ort, the operator config of a reduced-size build,
    and onnxruntime's verdict on which mobile EPs (NNAPI, CoreML) can take it.

    The .ort file is loaded in onnxruntime and checked against the .onnx outputs first.

    Example:

        edgecomp package minilm.int8.onnx -o out/minilm-mobile
    """
    from edgecomp.io import OUTPUT_MARKER, check_output_dir, replace_dir, work_dir, write_json
    from edgecomp.paths import existing_file
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


@cli.group(invoke_without_command=True)
@targets_file_option()
@click.pass_context
def targets(ctx, targets_file):
    """List target CPU profiles and say which match this host's ISA; `targets setup arm64`
    prepares the emulated ARM runtime that checks numerics on arm64-* targets.

    Example:

        edgecomp targets --targets-file my_devices.toml
    """
    if ctx.invoked_subcommand:
        return
    from edgecomp.targets import host_isa, load_profiles

    profiles = load_profiles(targets_file)
    isa = host_isa()
    click.echo(rpt.host_line(isa=isa))
    rows = [{"name": p.name, "threads": p.threads, "ISA": p.isa.describe(), "EP": p.ep or "CPU",
             "int8 form": p.quant_format, "matches host": p.matches_host(isa),
             "emulate": (p.emulate or "") + ("" if p.kleidiai else " (no KleidiAI)"), "description": p.description}
            for p in profiles.values()]
    click.echo(rpt.table(rows))


@targets.command("measure")
@click.argument("profile")
@click.option("--model", "model_path", required=True, type=click.Path(), help="The float ONNX model whose layers "
              "are timed (its own shapes).")
@targets_file_option("table_file", required=True)
@_data_option("--data", "calibration", "DATA for the int8 scales (default: one synthesized feed; the scales "
              "do not change the speed).", alias="--calibration")
@_threads_option
def targets_measure(profile, model_path, table_file, calibration, threads):
    """Time each op family of MODEL (matmul, conv, depthwise conv, attention) alone in int8
    against float on this host, with enough interleaved rounds for a tight 95% interval, and
    store the ratios under [measured.PROFILE] in the targets file. PROFILE is `host` (this
    machine), a profile whose ISA is this host's, or a profile with remote = "ssh://..." (timed
    on that device). `quantize --families auto --target PROFILE
    --targets-file F` then decides from the table: the same command gives the same model.

    Example:

        edgecomp targets measure host --model digits.onnx --targets-file devices.toml
    """
    from edgecomp.io import check_output_path
    from edgecomp.quantize.measured import measure_table, write_table
    from edgecomp.targets import get_profile, host_isa

    check_output_path(table_file, [p for p in (model_path, calibration) if p])
    prof = None if profile == "host" else get_profile(profile, table_file if Path(table_file).exists() else None)
    device = _device(prof)  # a profile with remote = ssh://...: timed on its device
    if device is None and prof is not None and (not prof.matches_host() or prof.emulate or prof.ep):
        raise click.UsageError(f"profile {profile} is not this host ({prof.isa.describe()} vs "
                               f"{host_isa().describe()}): give it remote = \"ssh://...\" to measure on the device, "
                               "or measure `host`")
    table = measure_table(model_path, profile, threads=threads or (prof.threads if prof else 1),
                          calibration=calibration, device=device, isa=prof.isa.describe() if device else None)
    write_table(table_file, table)
    click.echo(device.probe().describe() if device else rpt.host_line(prof))
    click.echo(rpt.table([{"family": f, "latency ratio int8/float": r.text(), "layers": len(r.layers)}
                          for f, r in table.families.items()], title=f"{table.describe()}:"))
    click.echo(f"wrote [measured.{profile}] to {table_file}")


@targets.command("setup")
@click.argument("arch", type=click.Choice(["arm64"]))
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Where the runtime is kept (default ~/.cache/edgecomp/arm64 or $EDGECOMP_ARM64_CACHE).")
def targets_setup(arch, cache_dir):
    """Prepare the emulated ARM runtime: Debian's qemu-user, an aarch64 CPython and onnxruntime's
    aarch64 wheel of this host's version, cached outside the repo; then check it on a tiny model.
    Idempotent and offline once prepared.

    Example:

        edgecomp targets setup arm64
    """
    from edgecomp.emulate import prepare, self_check

    runtime = prepare(cache_dir, log=lambda line: click.echo(line, err=True))
    click.echo(self_check(runtime))


def _data_options(f):
    f = click.option("--tokenizer", type=click.Path(), help="Tokenizer folder for --text (default: the --hf folder).")(f)
    f = click.option("--text", type=click.Path(), help="Text, one per line: distillation data / embedding corpus.")(f)
    f = click.option("--labels", type=click.Path(), help="Labels (.npy) for --eval: task accuracy.")(f)
    f = _data_option("--eval", "eval", "Held-out DATA for validate/tolerance.", dest="eval_data")(f)
    f = _data_option("--data", "calibration", "DATA for calibration / repair.", alias="--calibration")(f)
    return f


def _convert_source(spec, hf):
    from edgecomp.errors import SpecError
    from edgecomp.pipeline.recipe import Source

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
@click.option("--train-labels", type=click.Path(), help="Labels (.npy) of the --data samples, for a finetune "
              "step: class ids or target vectors.")
@target_option("its threads, and its ISA for quantization")
@targets_file_option()
@click.option("--overwrite", is_flag=True, help="Replace an OUTDIR that edgecomp wrote before.")
@click.option("--ort-format", is_flag=True,
              help="Also write model.ort and required_operators_and_types.config for ORT Mobile (see `edgecomp package`).")
@_value_option
def convert(spec, recipe, outdir, hf_path, calibration, eval_data, labels, text, tokenizer, train_labels, target,
            targets_file, overwrite, ort_format, values):
    """Run a recipe from a torch model to a validated edge artifact, with a report.

    Exit status 4 when a gate of the recipe fails, else 3 when a step's model misses its floor or
    tolerance (written because the recipe allows it) and no later distill step heals it, else 5 when
    a quantize step with forced families wrote an int8 model not faster than its input here (after
    everything is written). A prune step below the fidelity floor stops the run unless it sets
    allow_degraded = true.
    --value NAME=V (or a recipe's [values] table) fixes inputs of every model after the export (see
    `edgecomp optimize`).

    Example:

        edgecomp convert models.mobilenet_v2:digits_classifier --recipe cnn-int8 -o out/digits \\
            --data out/demo/train.npz --eval out/demo/test.npz --labels out/demo/test_labels.npy
    """
    from edgecomp.pipeline.recipe import load_recipe
    from edgecomp.targets import get_profile

    source = _convert_source(spec, hf_path)
    r = load_recipe(recipe)
    profile = get_profile(target, targets_file)
    from edgecomp.pipeline.convert import convert as run_convert  # after the one-line refusals above
    table = _measured_table(targets_file, target, "auto") if "quantize" in r.step_names() else None
    res = run_convert(source, r, outdir, calibration=calibration, eval_data=eval_data, labels=labels, text=text,
                      tokenizer=tokenizer, train_labels=train_labels, target=profile, table=table,
                      overwrite=overwrite, progress=True, protect=[p for p in (targets_file,) if p], ort_format=ort_format,
                      values=_parse_values(values),
                      on_step=lambda rec: click.echo(f"step {rec.index:02d} {rec.step}: done in {rec.seconds:.1f}s", err=True))
    click.echo(rpt.host_line(profile))
    click.echo(rpt.table(rpt.step_rows(res.steps), title=f"recipe {r.name}:"))
    for g in res.gates:
        click.echo(f"gate {g['gate']}: {g['value'] if g['value'] is None else round(g['value'], 4)} "
                   f"(limit {g['limit']}) {'pass' if g['passed'] else 'FAIL'}")
    if res.package:
        click.echo(rpt.table(res.package.usability, title="onnxruntime mobile usability:"))
    click.echo(f"wrote {outdir}/model.onnx{', model.ort' if res.package else ''}, report.json, report.html")
    for rec in res.steps:
        for line in rec.warnings:
            click.echo(f"warning: step {rec.index:02d} {rec.step}: {line}", err=True)
    if not res.passed:
        raise click.exceptions.Exit(4)
    if res.degraded:
        raise click.exceptions.Exit(3)
    if res.not_faster:
        raise click.exceptions.Exit(5)


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
                 "default": o.default, "meaning": o.describe()} for step, opts in STEP_OPTIONS.items() for name, o in opts.items()]
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
@target_option("its threads, and its ISA for quantization")
@targets_file_option()
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
            --data out/demo/train.npz --eval out/demo/test.npz --labels out/demo/test_labels.npy
    """
    from edgecomp.pipeline.recipe import load_recipe
    from edgecomp.pipeline.sweep import parse_grid, run_sweep
    from edgecomp.targets import get_profile

    source = _convert_source(spec, hf_path)
    profile = get_profile(target, targets_file)
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
