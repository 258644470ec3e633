"""The command classes: :class:`Group` renders every failure as one line, :class:`Command`
makes its deferred parameters when first needed and quiets onnxruntime when its own code starts.
"""

from __future__ import annotations

from typing import Callable

import click

from edgecomp.cli.errors import UsageLine, in_flags, library_logging, one_line, quiet_onnxruntime
from edgecomp.errors import DataNeeded, OptionError

__all__ = ["Group", "Command", "deferred"]


class _Deferred:
    """Stands in a command's parameter list for the click parameters ``make()`` returns."""

    def __init__(self, make: Callable[[], list[click.Parameter]]):
        self.make = make


def deferred(make: Callable[[], list[click.Parameter]]):
    """Decorate a command with the parameters ``make()`` returns (in its order), made on first use."""

    def decorate(f):
        if not hasattr(f, "__click_params__"):
            f.__click_params__ = []
        f.__click_params__.append(_Deferred(make))
        return f

    return decorate


class Command(click.Command):
    """A command whose deferred parameters are made when first needed (parsing, help), and which
    quiets onnxruntime's log when its own code starts (:func:`edgecomp.cli.errors.quiet_onnxruntime`)."""

    @property
    def params(self) -> list[click.Parameter]:
        if any(isinstance(p, _Deferred) for p in self._params):
            self._params[:] = [q for p in self._params for q in (p.make() if isinstance(p, _Deferred) else [p])]
        return self._params

    @params.setter
    def params(self, value: list) -> None:
        self._params = value

    def invoke(self, ctx: click.Context):
        quiet_onnxruntime(bool(ctx.find_root().params.get("debug")))
        return super().invoke(ctx)


class Group(click.Group):
    """One line per failure unless --debug (accepted before or after the subcommand).

    EdgecompError is the library's own one-line message; OS errors (disk full, read-only,
    permissions, long names) name the path and what to do; anything else is reported as an
    internal error with its first line. Library warnings and onnxruntime's log lines are
    silenced outside --debug, so the error is the only line on stderr.
    Its commands are :class:`Command`s, its subgroups Groups.
    """

    command_class = Command
    group_class = type

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        end = args.index("--") if "--" in args else len(args)
        if "--debug" in args[1:end]:
            args = ["--debug", *(a for i, a in enumerate(args) if i >= end or a != "--debug")]
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        with library_logging(debug):
            try:
                return super().invoke(ctx)
            except click.exceptions.NoArgsIsHelpError:
                raise
            except click.UsageError as e:
                raise UsageLine(e) from None
            except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort):
                raise
            except (OptionError, DataNeeded) as e:
                if debug:
                    raise
                sub = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
                raise click.ClickException(in_flags(e, sub)) from None
            except Exception as e:
                if debug:
                    raise
                raise click.ClickException(one_line(e)) from None
