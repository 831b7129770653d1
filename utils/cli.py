"""The one wrapper every sampler command line runs through.

    @click.command(context_settings=CONTEXT)
    @click.option(...)
    @exit_on_usage_error
    @flag_names(FLAGS)
    def cli(**opts): ...                 # flags -> settings -> the Python API

    def main(argv=None) -> int:
        return run_command(cli, argv, "sample_x.py")

* Library errors name *parameters* in backticks (`` `window_size` ``);
  :func:`flag_names` rewrites them into this command line's flags
  (``--window-size`` for DiT, ``--swg_sizes`` for EDM2) before
  :func:`utils.errors.exit_on_usage_error` prints the one line and exits 2.
* :func:`run_command` turns click's own usage errors (unknown flag, bad value)
  into the same one line and exit 2 (once for a torchrun job), and returns the exit status.
* :func:`option` declares a flag with both spellings of a multi-word name
  (``--g-weight`` and ``--g_weight``).
"""

from __future__ import annotations

import functools
import re
import sys
from typing import Callable, Mapping, Optional, Sequence

import click

from utils.errors import UsageError, report_once

__all__ = ["CONTEXT", "option", "flag_names", "to_flags", "run_command"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


def option(name: str, *more: str, **kwargs):
    """``click.option`` with both spellings of ``name`` (``--g_weight`` and ``--g-weight``); the
    parameter is ``name``'s underscore form.  ``more`` are extra spellings (aliases)."""
    flag = name.lstrip("-")
    spellings = dict.fromkeys([f"--{flag}", f"--{flag.replace('_', '-')}", f"--{flag.replace('-', '_')}", *more])
    return click.option(*spellings, flag.replace("-", "_"), **kwargs)


def to_flags(message: str, flags: Mapping[str, str], dashes: bool) -> str:
    """Replace each `` `param` `` in ``message`` by its flag: ``flags[param]``, else ``--param``
    (with ``-`` between words when ``dashes``)."""
    def flag(m: re.Match) -> str:
        name = m.group(1)
        if name in flags:
            return flags[name]
        return "--" + (name.replace("_", "-") if dashes else name)

    return _PARAM.sub(flag, message)


def flag_names(flags: Mapping[str, str], dashes: bool = False) -> Callable:
    """Decorator: :class:`UsageError` messages raised inside name this command line's flags."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except UsageError as exc:
                exc.args = (to_flags(str(exc), flags, dashes),)
                raise
        return wrapper
    return decorate


def run_command(command: click.Command, argv: Optional[Sequence[str]], prog_name: str) -> int:
    """Run a click command as its script would; return the exit status.

    Click's usage errors become ``error: <one line>`` and status 2; Ctrl-C status 130;
    a :class:`UsageError` is printed by the command's own ``exit_on_usage_error``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except click.ClickException as exc:  # every rank of a torchrun job parses the same flags: printed once
        report_once(" ".join(exc.format_message().split()))
        return 2
    except UsageError as exc:  # raised outside the decorated function (should not happen)
        report_once(" ".join(str(exc).split()))
        return 2
    except SystemExit as exc:  # exit_on_usage_error, or the command's own exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
