"""How the command line fails: one line per failure unless ``--debug``
(:class:`edgecomp.cli.command.Group` applies these).

Cases handled: a library error (:class:`~edgecomp.errors.EdgecompError`) is its own
one-line message; an :class:`~edgecomp.errors.OptionError` or :class:`~edgecomp.errors.DataNeeded`,
which name options and data neutrally ("sparsity", "calibration"), is rewritten in the command's own
flags (``--sparsity``, ``--data DATA``); a usage error is one line naming ``--help``; an OS error
(disk full, read-only, permissions, long names) names the path and what to do; anything else is an
internal error with its first line. Library warnings and onnxruntime's log lines stay off stderr
outside ``--debug``, so the error is the only line there.

Nothing here imports a capability or onnxruntime at import time: ``edgecomp --help`` stays fast.
"""

from __future__ import annotations

import contextlib

import click

from edgecomp.errors import DataNeeded, EdgecompError, OptionError

__all__ = ["UsageLine", "in_flags", "one_line", "library_logging", "quiet_onnxruntime"]


class UsageLine(click.ClickException):
    """A usage error as one line (click prints usage and a hint around it otherwise)."""

    exit_code = 2

    def __init__(self, e: click.UsageError):
        cmd = e.ctx.command_path if e.ctx else "edgecomp"
        super().__init__(f"{e.format_message()} (see '{cmd} --help')")


_DATA_METAVARS = {"calibration": "DATA", "eval": "DATA", "labels": "LABELS.npy", "text": "TEXT_FILE",
                  "tokenizer": "TOKENIZER_DIR", "train_labels": "LABELS.npy"}


def in_flags(e: OptionError | DataNeeded, command: click.Command | None) -> str:
    """A library message about an option or data key, in the command's own flags."""
    params = command.params if command else []

    def flag(name: str) -> str:
        return next((p.opts[0] for p in params if p.name == name), f"--{name.replace('_', '-')}")

    def data_flag(key: str) -> str:
        return next((p.opts[0] for p in params if getattr(p, "data_key", None) == key), f"--{key}")

    if isinstance(e, OptionError):
        return f"{flag(e.option)} {e.problem}"
    what = e.what.replace(e.option, flag(e.option), 1) if e.option else (
        data_flag(e.what) if e.what in _DATA_METAVARS else e.what)
    return f"{what} needs {data_flag(e.key)} {_DATA_METAVARS.get(e.key, 'PATH')}"


def one_line(e: Exception) -> str:
    if isinstance(e, EdgecompError):
        return str(e)
    if isinstance(e, OSError):
        return _os_error_line(e)
    if isinstance(e, MemoryError):
        return "out of memory; use smaller inputs (--shape, --max-samples) or a machine with more memory"
    first = next((line for line in str(e).splitlines() if line.strip()), "").strip()
    return f"internal error ({type(e).__name__}: {first}); rerun with --debug for the traceback and report it"


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
def library_logging(debug: bool):
    """Keep library warnings and log lines off stderr unless --debug (onnxruntime's own:
    :func:`quiet_onnxruntime`)."""
    import logging
    import warnings

    if debug:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export", "transformers")]
    loggers.append(logging.getLogger())  # the root logger: onnxruntime.quantization's "WARNING:root:" advice
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


def quiet_onnxruntime(debug: bool) -> None:
    """Set onnxruntime's default log severity (before any session is made).

    Called when a command's own code starts (:class:`edgecomp.cli.command.Command`), not at
    start-up: importing onnxruntime costs ~0.3 s that ``--help`` and a refusal at parse time skip.
    """
    import onnxruntime as ort

    ort.set_default_logger_severity(3 if debug else 4)
