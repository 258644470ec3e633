"""Every option of every capability, declared once.

An :class:`Option` says its name, type, default, description, allowed values and whether it needs
data. The recipe schema (``edgecomp recipes --options``) and the click options of each command are
generated from the same declarations (``edgecomp.cli`` and :mod:`edgecomp.pipeline.recipe`), so a
default or a range cannot differ between ``edgecomp quantize --max-samples`` and a recipe's
``max_samples``. Library code names options neutrally (:class:`~edgecomp.errors.OptionError`:
"sparsity must be in (0, 1)"); the CLI says ``--sparsity``, a recipe ``step 2 (prune): sparsity``.

A default of ``None`` means "unset" (all samples, no tolerance): the CLI leaves the flag out, a
recipe leaves the key out.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from typing import Any, Callable, Mapping, Sequence

from edgecomp.errors import ConfigError, DataNeeded, OptionError

__all__ = ["Option", "Check", "in_range", "regexes", "compile_patterns", "check_values", "coerce", "defaults", "fields_of", "need_data", "by_name",
           "THREADS", "DEFAULT_MAX_SAMPLES"]

#: A value check: what is wrong with the value (the text after the option's name, e.g.
#: "must be in (0, 1), got 7.5"), or None when it is fine.
Check = Callable[[Any], "str | None"]


@dataclasses.dataclass(frozen=True)
class Option:
    """One option: ``name`` (``max_samples``; the CLI flag is ``--max-samples``), its type(s) and
    default, a one-line description, and what values it takes.

    ``choices`` lists the only values allowed (compared as text, so ``weight_bits = 7`` and ``"7"``
    are the same); ``check`` refuses values out of range; ``needs`` maps a value to the data it
    needs (``"calibration"``, ``"eval"``) or None. The CLI spelling can be set with ``flag``
    (``"--per-channel/--per-tensor"``); list options are repeatable flags, or one comma list with
    ``split=","``; ``parse`` turns the repeated CLI strings into the value (a dict for ``dynamic``);
    ``unset_ok`` lets Python callers pass None for an option whose default is a value (``min_cosine``).
    """

    name: str
    type: type | tuple[type, ...]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    check: Check | None = None
    needs: Callable[[Any], str | None] | None = None
    flag: str | None = None
    split: str | None = None
    parse: Callable[[Sequence[str]], Any] | None = None
    metavar: str | None = None
    unset_ok: bool = False  # None is allowed from Python (it switches the feature off) though the default is not None

    def problem(self, value: Any) -> str | None:
        """What is wrong with an (already type-checked) value, or None."""
        if value is None:
            return None if self.default is None or self.unset_ok else "must be set"
        if self.choices is not None and str(value) not in {str(c) for c in self.choices}:
            return f"must be one of {', '.join(str(c) for c in self.choices)}, got {value!r}"
        return self.check(value) if self.check else None

    def describe(self, choices: bool = True) -> str:
        """The description with the choices (unless ``choices`` is False: click lists them) and the
        range, for listings and --help."""
        parts = [" | ".join(str(c) for c in self.choices)] if (self.choices and choices) else []
        if self.help:
            parts.append(f"({self.help})" if parts else self.help)
        text = " ".join(parts)
        rng = getattr(self.check, "text", None)
        return f"{text}; {rng}" if rng else text

    def data_needed(self, value: Any) -> str | None:
        return self.needs(value) if self.needs and value is not None else None


def by_name(options: Sequence[Option]) -> dict[str, Option]:
    return {o.name: o for o in options}


def fields_of(values: Mapping[str, Any]) -> dict[str, Any]:
    """Option values as dataclass fields: lists become tuples."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def defaults(options: Sequence[Option]) -> dict[str, Any]:
    return {o.name: copy.deepcopy(o.default) for o in options}


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def in_range(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False, open_hi: bool = False) -> Check:
    """A check for ``lo <(=) value <(=) hi`` (either bound may be left out); also refuses NaN."""
    if lo is not None and hi is not None:
        text = f"must be in {'(' if open_lo else '['}{_num(lo)}, {_num(hi)}{')' if open_hi else ']'}"
    elif lo is not None:
        text = f"must be {'>' if open_lo else '>='} {_num(lo)}"
    elif hi is not None:
        text = f"must be {'<' if open_hi else '<='} {_num(hi)}"
    else:
        text = "must be a finite number"

    def check(v: Any) -> str | None:
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be a finite number, got {v!r}"
        ok = ((lo is None or (v > lo if open_lo else v >= lo)) and (hi is None or (v < hi if open_hi else v <= hi)))
        return None if ok else f"{text}, got {v!r}"

    check.text = text
    return check


def compile_patterns(patterns: Sequence[str], what: str) -> list[re.Pattern]:
    """``patterns`` compiled, or one line naming the first that is not a valid regular expression
    (here, not in :mod:`edgecomp.graph`, so a bad pattern is refused at parse time without onnx-ir)."""
    compiled = []
    for p in patterns:
        if not isinstance(p, str):
            raise ConfigError(f"{what} {p!r} is not a string; give regular expressions as text")
        try:
            compiled.append(re.compile(p))
        except re.error as e:
            raise ConfigError(f"{what} {p!r} is not a valid regular expression ({e})") from None
    return compiled


def regexes(v: Sequence[str]) -> str | None:
    """A check for a list of node-name regular expressions."""
    try:
        compile_patterns(v, "pattern")
    except ConfigError as e:
        return str(e)
    return None


def coerce(opt: Option, value: Any) -> Any:
    """``value`` of the option's type (an int where a float is expected becomes a float), checked;
    raises :class:`OptionError` naming the option."""
    types = opt.type if isinstance(opt.type, tuple) else (opt.type,)
    expected = "/".join(t.__name__ for t in types)
    if float in types and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, bool) and bool not in types:
        raise OptionError(opt.name, f"expected {expected}, got a boolean ({str(value).lower()})")
    if not isinstance(value, types):
        raise OptionError(opt.name, f"expected {expected}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionError(opt.name, f"must be a finite number, got {value!r}")
    problem = opt.problem(value)
    if problem:
        raise OptionError(opt.name, problem)
    return value


def check_values(options: Sequence[Option], values: Mapping[str, Any]) -> None:
    """Refuse the first value (of those declared) that its option does not allow."""
    for opt in options:
        if opt.name in values:
            problem = opt.problem(values[opt.name])
            if problem:
                raise OptionError(opt.name, problem)


def need_data(options: Sequence[Option], values: Mapping[str, Any], available: Mapping[str, Any],
              always: Mapping[str, str] | None = None) -> None:
    """Refuse a run whose data is missing: ``always`` (data key -> what reads it, the data a
    capability reads whatever its options, e.g. quantize's calibration) first, then option values
    that need data (``importance = obs`` needs calibration). The one statement of what a step
    needs: the CLI's commands, ``convert`` (before any step runs) and each ``run`` call it."""
    for key, what in (always or {}).items():
        if not available.get(key):
            raise DataNeeded(key, what)
    for opt in options:
        key = opt.data_needed(values.get(opt.name))
        if key and not available.get(key):
            raise DataNeeded(key, f"{opt.name} {values[opt.name]}", option=opt.name)


#: Samples calibration and fitting use unless ``--max-samples`` says otherwise (NNCF's default
#: subset size is 300 as well): activation ranges and Gram matrices settle well before that,
#: and a 2 GiB DATA of 33 M samples is then read in seconds, not hours. (Here, not in
#: :mod:`edgecomp.data`, so the options modules import without numpy.)
DEFAULT_MAX_SAMPLES = 300

#: onnxruntime's intra-op threads: one declaration for bench, a recipe's bench step and every
#: command's --threads (the target profile's threads when unset, else 1).
THREADS = Option("threads", int, None, "intra-op threads of onnxruntime (inter-op is 1); default: the target profile's, "
                 "else 1", check=in_range(1))
