"""Click options of the command line: generated from the declarations (:mod:`edgecomp.options`),
and the flags several commands share, each written once.

- :func:`declared` turns a capability's ``OPTIONS`` into click options. The declarations are named
  by module (:class:`Declared`) and imported only when a command is parsed or its help shown
  (:class:`edgecomp.cli.command.Command`), so ``edgecomp --help`` imports no capability.
- Shared flags: ``--target`` (:func:`target_option`, one text plus what the command uses the
  profile for), ``--targets-file``, ``--shape``, ``--value``, ``--threads`` (the declared
  :data:`edgecomp.options.THREADS`), ``--json``, ``-o``; data flags (:func:`data_option`) carry their
  data key (calibration, eval, labels, text, tokenizer) so a missing-data error names the flag.
  Calibration data is ``--data`` everywhere; ``--calibration`` stays as an alias where it was the name.
- :class:`ModelPath`: a model argument refused at parse time when the file is missing, before
  the command imports onnx or onnxruntime.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Sequence
from typing import Any

import click

from edgecomp.cli.command import deferred
from edgecomp.options import THREADS, Option

__all__ = ["Declared", "Number", "POSITIVE", "Checked", "ModelPath", "click_option", "declared",
           "option_values", "DataOption", "data_option", "output_option", "json_option", "write_json", "target_option",
           "targets_file_option", "shape_option", "value_option", "threads_option", "training_threads_option",
           "TARGETS_FILE_HELP", "SHAPE_HELP"]


class Declared(Sequence):
    """A capability's option declarations named by ``module:attribute``, imported on first use."""

    def __init__(self, module: str, attribute: str = "OPTIONS"):
        self.module, self.attribute = module, attribute

    @functools.cached_property
    def options(self) -> tuple[Option, ...]:
        return tuple(getattr(importlib.import_module(self.module), self.attribute))

    def __getitem__(self, i):
        return self.options[i]

    def __len__(self) -> int:
        return len(self.options)


class Number(click.ParamType):
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


POSITIVE = Number(0, low_open=True)


class Checked(click.ParamType):
    """A declared option's value: text turned into its type, then refused with the option's own
    check (the same one a recipe value passes)."""

    def __init__(self, opt: Option):
        self.opt = opt
        types = self.types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
        self.name = "text" if str in types else types[0].__name__
        self.to = next((t for t in types if t in (int, float)), None) if str not in types else None

    def convert(self, value, param, ctx):
        import math

        if self.to is not None and isinstance(value, str):
            try:
                value = self.to(value)
            except ValueError:
                self.fail(f"{value!r} is not {'an integer' if self.to is int else 'a number'}", param, ctx)
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(f"{value!r} is not a finite number", param, ctx)
        elif int in self.types and isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)  # text or a number (int4_block: auto or 64)
        problem = self.opt.problem(value)
        if problem:
            self.fail(problem, param, ctx)
        return value


class ModelPath(click.ParamType):
    """An existing ONNX file, checked at parse time (the same one-line error as loading it)."""

    name = "model"

    def convert(self, value, param, ctx):
        from edgecomp.paths import existing_file

        existing_file(value, "ONNX model")
        return value


def click_option(opt: Option):
    """The click option generated from one declaration (edgecomp.options.Option)."""
    flag = opt.flag or f"--{opt.name.replace('_', '-')}"
    text = opt.describe(choices=False)
    kw = dict(help=text[:1].upper() + text[1:] + ".")
    if opt.type is bool:
        if "/" not in flag:
            flag = f"{flag}/--no-{opt.name.replace('_', '-')}"
        return click.option(flag, opt.name, default=opt.default, show_default=True, **kw)
    if opt.type is list and opt.split:
        def split(ctx, param, value):
            parts = [v.strip() for v in value.split(opt.split) if v.strip()]
            problem = opt.problem(parts)
            if problem:
                raise click.BadParameter(problem, ctx, param)
            return parts
        return click.option(flag, opt.name, default=opt.split.join(opt.default), show_default=True, callback=split,
                            metavar=opt.metavar or "A,B", **kw)
    if opt.type is list or opt.type is dict:
        def collect(ctx, param, value):
            result = opt.parse(value) if opt.parse else list(value)
            problem = opt.problem(result)
            if problem:
                raise click.BadParameter(problem, ctx, param)
            return result
        return click.option(flag, opt.name, multiple=True, callback=collect, metavar=opt.metavar, **kw)
    if opt.choices:
        def typed(ctx, param, value):  # the declared choice itself: 4, not "4"
            return next((c for c in opt.choices if str(c) == value), value)
        return click.option(flag, opt.name, type=click.Choice([str(c) for c in opt.choices]), callback=typed,
                            default=None if opt.default is None else str(opt.default),
                            show_default=opt.default is not None, **kw)
    return click.option(flag, opt.name, type=Checked(opt), default=opt.default, show_default=opt.default is not None,
                        metavar=opt.metavar, **kw)


def _params_of(decorators) -> list[click.Parameter]:
    """The parameters that click option decorators would add, in their order."""

    def target():
        pass

    for d in reversed(decorators):
        target = d(target)
    return list(reversed(target.__click_params__))


def declared(options: Sequence[Option]):
    """Decorate a command with the click options generated from ``options`` (in their order),
    made when the command is first parsed (a :class:`Declared` is imported only then)."""
    return deferred(lambda: _params_of([click_option(o) for o in options]))


def option_values(options: Sequence[Option], params: dict) -> dict:
    """Take the declared options' values out of a command's parameters."""
    return {o.name: params.pop(o.name) for o in options}


class DataOption(click.Option):
    """A path option that gives a step its data (``key``: calibration, eval, labels, text, tokenizer);
    errors about missing data name the flag through it."""

    def __init__(self, *args, data_key: str, **kw):
        super().__init__(*args, **kw)
        self.data_key = data_key


def data_option(flag: str, key: str, help: str, dest: str | None = None, alias: str | None = None):
    """A data flag; ``alias``: a second name it keeps (``--calibration`` beside ``--data``)."""
    flags = [flag, alias] if alias else [flag]
    return click.option(*flags, dest or key, cls=DataOption, data_key=key, type=click.Path(), help=help,
                        metavar="DATA" if key in ("calibration", "eval") else None)


def output_option(f):
    return click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False),
                        help="Output file (written atomically; never one of the inputs).")(f)


def json_option(f):
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


def write_json(path: str | None, obj: Any) -> None:
    """Write --json (its path was checked before the command ran)."""
    if path:
        from edgecomp.io import write_json as write
        from edgecomp.render.text import to_jsonable

        write(path, to_jsonable(obj))
        click.echo(f"wrote {path}")


def target_option(uses: str, *, multiple: bool = False):
    """--target NAME: one text, plus what this command uses the profile for."""
    return click.option("--target", "targets" if multiple else "target", multiple=multiple, metavar="NAME",
                        help=f"Target profile (`edgecomp targets` lists them): {uses}.")


TARGETS_FILE_HELP = ("TOML file of extra target profiles ([profile.NAME] tables) and measured tables "
                     "([measured.PROFILE], written by `edgecomp targets measure`; read by quantize --families auto).")


def targets_file_option(dest: str = "targets_file", required: bool = False):
    return click.option("--targets-file", dest, type=click.Path(), required=required, help=TARGETS_FILE_HELP)


SHAPE_HELP = ("Shape for symbolic dims, e.g. input_ids=1x128 (repeatable; default: batch 1, sequence 128, "
              "images 224).")


def shape_option(f):
    return click.option("--shape", "shapes", multiple=True, metavar="NAME=SHAPE", help=SHAPE_HELP)(f)


def value_option(f):
    return click.option("--value", "values", multiple=True, metavar="NAME=V[,V...]",
                        help="Fix an input's value, e.g. sr=16000 (one value fills the input; repeatable).")(f)


def threads_option(f):
    """--threads from its declaration (:data:`edgecomp.options.THREADS`, also bench's and a recipe's)."""
    return click_option(THREADS)(f)


def training_threads_option(f):
    """distill's --threads: torch's threads for training, a different budget from onnxruntime's."""
    return click.option("--threads", type=click.IntRange(1), default=None,
                        help="torch threads for training (default: all cores); onnxruntime checks use 1.")(f)
