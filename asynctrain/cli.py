"""Argument types and checks shared by the recipes' command lines.

Every value is checked by argparse itself (``type=``), so a bad one ends the program
with a usage line naming the option and the value, before any data is loaded:

    ap.add_argument("--lr", type=cli.positive(float), default=5e-4, help="Adam learning rate")

`explicit` tells which options were given on the command line (so a stored
checkpoint can supply the rest), `conflicts` compares them with stored values,
`apply_quick` sets the smoke-run values of ``--quick`` that were not given, and
`deprecated` keeps an old option name working with a FutureWarning. `guarded` runs an
entry point's body: Ctrl-C ends it with one line saying how to resume (exit 130), a
file that cannot be written or read with one line naming it (exit 2), and warnings
print as one line each.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["positive", "at_least", "probability", "finite", "execution", "device", "threads", "out_folder",
           "explicit", "conflicts", "HelpFormatter", "apply_quick", "deprecated", "guarded",
           "EXIT_DONE", "EXIT_DIVERGED", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED"]

EXIT_DONE, EXIT_DIVERGED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
"""Exit status of every entry point: done; training diverged; bad arguments, data,
checkpoints or paths (a file that cannot be read or written, an output folder in use
by another run); interrupted (Ctrl-C)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default (``(default: ...)``) and keeps the description's layout;
    never breaks a line inside a hyphenated word (``audit-out``, ``--max-train``)."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _number(kind: type, text: str, what: str) -> Any:
    try:
        v = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def positive(kind: type = float) -> Callable[[str], Any]:
    """A finite number (`kind` int or float) > 0."""
    what = f"{'an integer' if kind is int else 'a number'} > 0"

    def parse(text: str) -> Any:
        v = _number(kind, text, what)
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    parse.__name__ = f"{kind.__name__} > 0"  # argparse names the type in its message
    return parse


def at_least(lo: float, kind: type = int) -> Callable[[str], Any]:
    """A finite number >= `lo`."""
    what = f"{'an integer' if kind is int else 'a number'} >= {lo:g}"

    def parse(text: str) -> Any:
        v = _number(kind, text, what)
        if v < lo:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v
    parse.__name__ = f"{kind.__name__} >= {lo:g}"
    return parse


def execution(text: str) -> str:
    """An execution of `asynctrain.evaluate` ("layered", "RS", "MS:K=4", "RS:drain", ...)."""
    from .evaluate import Execution

    try:
        Execution.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def finite(text: str) -> float:
    """Any finite float."""
    return _number(float, text, "a finite number")


def probability(text: str) -> float:
    """A number in [0, 1]."""
    v = _number(float, text, "a probability in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return v


def device(text: str) -> str:
    """``cpu``, ``cuda``, ``cuda:N`` (checked to exist) or ``auto``."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is available here")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA "
                                             f"device(s)")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def threads(text: str) -> int:
    """Torch CPU threads: an integer >= 1 (at most the CPUs there are, x 4)."""
    v = _number(int, text, "an integer >= 1")
    cpus = os.cpu_count() or 1
    if not 1 <= v <= 4 * cpus:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, {4 * cpus}] "
                                         f"({cpus} CPUs here), got {text!r}")
    return v


def out_folder(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Raise ValueError unless `folder` can hold output files (exists as a writable
    folder or can be made); nothing is created."""
    from .checkpoint import check_folder_writable

    return check_folder_writable(folder, what)


def explicit(ap: argparse.ArgumentParser, argv: Sequence[str] | None) -> set[str]:
    """Destinations of the options given on the command line `argv` (not defaulted)."""
    seen = set()
    opts = {s: a.dest for a in ap._actions for s in a.option_strings}  # noqa: SLF001
    for tok in (list(argv) if argv is not None else sys.argv[1:]):
        if not tok.startswith("-"):
            continue
        name = tok.split("=", 1)[0]
        if name in opts:
            seen.add(opts[name])
        else:  # an unambiguous prefix, as argparse allows
            hits = {d for s, d in opts.items() if s.startswith(name)}
            if len(hits) == 1:
                seen |= hits
    return seen


def conflicts(args: argparse.Namespace, given: set[str], stored: Mapping[str, Any],
              names: Sequence[str]) -> list[str]:
    """``--name value`` given here that differs from the value a checkpoint stored:
    ``["--width 0.5 (the checkpoint has 0.25)", ...]``."""
    out = []
    for name in names:
        if name in given and name in stored and _norm(getattr(args, name)) != _norm(stored[name]):
            out.append(f"--{name.replace('_', '-')} {_text(getattr(args, name))} (the checkpoint "
                       f"has {_text(stored[name])})")
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    return v


def _text(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return str(v)


def apply_quick(args: argparse.Namespace, given: set[str], values: Mapping[str, Any]) -> list[str]:
    """``--quick``: set `values` (dest -> smoke-run value) on `args` for the options not
    given on the command line (given ones win); returns ``["--epochs 1", ...]``, what
    was set, for the run to print."""
    changed = []
    for dest, value in values.items():
        if dest in given:
            continue
        setattr(args, dest, value)
        changed.append(f"--{dest.replace('_', '-')} {_text(value)}")
    return changed


def deprecated(new: str, convert: Callable[[Any], Any] | None = None) -> type[argparse.Action]:
    """An argparse action for an old option name: stores into the new option's `dest`
    (after `convert`) and warns (FutureWarning, shown by default) naming `new`."""

    class _Deprecated(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            warnings.warn(f"{option_string} is deprecated and will be removed: use {new}",
                          FutureWarning, stacklevel=2)
            setattr(namespace, self.dest, convert(values) if convert is not None else values)

    return _Deprecated


def _one_line(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001
    return f"warning: {message} ({category.__name__}, {os.path.basename(filename)}:{lineno})\n"


def guarded(body: Callable[[], int], resume: str) -> int:
    """Run an entry point's `body` and return its exit status; Ctrl-C prints one line
    ending in `resume` (how to continue) and returns `EXIT_INTERRUPTED`; a file or
    folder that cannot be used (`OSError`, incl. `outdir.OutputError`) prints one line
    and returns `EXIT_BAD_INPUT`. Warnings print as one line each while it runs."""
    old = warnings.formatwarning
    warnings.formatwarning = _one_line
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\ninterrupted (Ctrl-C); {resume}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        warnings.formatwarning = old
