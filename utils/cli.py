"""The one wrapper every sampler command line runs through.

    SPELLING = flag_spelling(FLAGS)      # library parameter -> this command line's flag

    @click.command(context_settings=CONTEXT)
    @click.option(...)
    @exit_on_usage_error(spelling=SPELLING)
    def cli(**opts): ...                 # flags -> settings -> the Python API

    def main(argv=None) -> int:
        return run_command(cli, argv, "sample_x.py")

* A library :class:`utils.errors.UsageError` carries the parameters it is about
  (``exc.params``, in the library's names such as ``window_size``);
  :func:`utils.errors.exit_on_usage_error` writes its one line once, each
  parameter spelled by :func:`flag_spelling` as this command line's flag
  (``--window-size`` for DiT, ``--swg_sizes`` for EDM2), and exits 2.
* :func:`run_command` turns click's own usage errors (unknown flag, bad value)
  into the same one line and exit 2 (once for a torchrun job), and returns the exit status.
* :func:`offline_advice` (a decorator or ``with`` block) gives a failed download's
  :class:`utils.cache.OfflineError` this command's own last advice, e.g. the
  samplers' :data:`PREFETCH_FIX` (the cache's default names no flag).
* :func:`option` declares a flag with both spellings of a multi-word name
  (``--g-weight`` and ``--g_weight``); :func:`int_range` is the click type of an
  integer setting whose bounds its dataclass declares (:mod:`utils.bounds`).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Callable, Iterator, Mapping, Optional, Sequence

import click

from utils.bounds import bounds
from utils.cache import OfflineError
from utils.errors import UsageError, report_once

__all__ = ["CONTEXT", "PREFETCH_FIX", "option", "int_range", "flag_spelling", "offline_advice", "run_command"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 110}
PREFETCH_FIX = "or run with --prefetch where there is internet"  # the samplers' flag


@contextlib.contextmanager
def offline_advice(fix: str) -> Iterator[None]:
    """A failed download inside (:class:`utils.cache.OfflineError`) ends with this command's remedy ``fix``."""
    try:
        yield
    except OfflineError as exc:
        raise exc.advise(fix) from None


def option(name: str, *more: str, **kwargs):
    """``click.option`` with both spellings of ``name`` (``--g_weight`` and ``--g-weight``); the
    parameter is ``name``'s underscore form.  ``more`` are extra spellings (aliases)."""
    flag = name.lstrip("-")
    spellings = dict.fromkeys([f"--{flag}", f"--{flag.replace('_', '-')}", f"--{flag.replace('-', '_')}", *more])
    return click.option(*spellings, flag.replace("-", "_"), **kwargs)


def int_range(cls, name: str) -> click.IntRange:
    """The click type of the integer field ``name`` of the settings dataclass ``cls``, with its declared bounds."""
    lo, hi = bounds(cls, name)
    kind = click.IntRange(min=lo, max=hi)
    kind.name = "integer"  # "'abc' is not a valid integer." (click's own name reads "integer range")
    return kind


def flag_spelling(flags: Mapping[str, str], dashes: bool = False) -> Callable[[str], str]:
    """``name -> flag`` of a command line: ``flags[name]``, else ``--name`` (``-`` between words when
    ``dashes``): what :meth:`utils.errors.UsageError.format` writes for each parameter."""
    def spell(name: str) -> str:
        if name in flags:
            return flags[name]
        return "--" + (name.replace("_", "-") if dashes else name)

    return spell


def run_command(command: click.Command, argv: Optional[Sequence[str]], prog_name: str,
                hints: Optional[Mapping[str, str]] = None) -> int:
    """Run a click command as its script would; return the exit status.

    Click's usage errors become ``error: <one line>; see <prog_name> --help`` and status 2; Ctrl-C status 130;
    a :class:`UsageError` is printed by the command's own ``exit_on_usage_error``.  ``hints`` maps flags of
    other commands (the other sampler's ``--g-scale``) to this command's way of saying it, offered instead of
    click's guesses when such a flag is given.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except click.ClickException as exc:  # every rank of a torchrun job parses the same flags: printed once
        if isinstance(exc, click.NoSuchOption) and (hints or {}).get(exc.option_name):
            report_once(f"no such option {exc.option_name} in {prog_name}: use {hints[exc.option_name]}")
            return 2
        message = " ".join(exc.format_message().split()).rstrip(".")
        report_once(f"{message}; see {prog_name} --help" if isinstance(exc, click.UsageError) else message)
        return 2
    except UsageError as exc:  # raised outside the decorated function (should not happen)
        report_once(" ".join(str(exc).split()))
        return 2
    except SystemExit as exc:  # exit_on_usage_error, or the command's own exit
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
