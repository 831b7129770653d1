"""Errors the user can fix, and how every CLI reports them: one line on stderr, no traceback.

* :class:`UsageError` (bad input)            -> ``error: <message>``, exit 2 (its parameters in the
  command line's own spelling, see :meth:`UsageError.format`);
* :class:`OutputError` / :class:`OSError`     -> ``error: cannot write <path>: <cause> (errno N); <fix>``, exit 2;
* :class:`utils.preempt.Stopped` (SIGTERM / SIGUSR1, a lost peer) -> ``stopped: <what was kept; how to resume>``,
  exit 75;
* ``KeyboardInterrupt`` (Ctrl-C)              -> ``interrupted; rerun the same command to resume``, exit 130
  (commands that cannot resume, such as training, say so instead).

Under ``torchrun`` (``WORLD_SIZE`` > 1) a usage or output error is printed once
for the whole job: by rank 0 when it fails too, else by the failing rank, whose
number the line names (``error: rank 3: ...``).  The ranks agree through
torchrun's own key-value store (``MASTER_ADDR:MASTER_PORT``), which needs no
process group, so this works before ``init_process_group`` and after a rank
has left it.  torchrun then prints its own ``ChildFailedError`` report and
exits 1; the README's troubleshooting section shows what that looks like.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import os
import re
import sys
import time
from typing import Callable, Mapping, Optional

from utils.threads import apply_default_threads

__all__ = ["UsageError", "OutputError", "exit_on_usage_error", "spell", "spelling_of", "describe_os_error",
           "report_once", "INTERRUPTED"]

INTERRUPTED = "interrupted; rerun the same command to resume"
RANK_WAIT_S = 5.0  # how long a failing rank other than 0 waits to see whether rank 0 reports the error


_PARAM = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
# The spelling of the command line running now (set by exit_on_usage_error): warnings and notes use it too.
_SPELLING: contextvars.ContextVar = contextvars.ContextVar("swg_spelling", default=None)


@contextlib.contextmanager
def spelling_of(spelling: Optional[Callable[[str], str]]):
    """Inside the block, :func:`spell` (warnings, notes) writes parameters with ``spelling`` (a command line's)."""
    token = _SPELLING.set(spelling)
    try:
        yield
    finally:
        _SPELLING.reset(token)


def spell(message: str, spelling: Optional[Callable[[str], str]] = None) -> str:
    """``message`` with each parameter named as a code span (`` `ref_path` ``) written as ``spelling(name)``,
    else as the flag of the command line running now, else left as the code span (a Python caller's names).

    For warnings and notes; a :class:`UsageError` formats itself the same way (:meth:`UsageError.format`)."""
    spelling = spelling or _SPELLING.get()
    return _PARAM.sub(lambda m: spelling(m.group(1)), message) if spelling else message


class UsageError(Exception):
    """Bad input from the user: one line naming the problem and the fix.

    The message names the parameters it is about as code spans, in the library's names
    (``UsageError("`window_size` 90 exceeds the 64-pixel input; choose <= 64")``); they are
    data, not text: :attr:`params` lists them (:attr:`param` is the first, the one to change),
    :meth:`renamed` gives them another API's names (``sampling.edm2_run`` calls ``method`` and
    ``window_size`` ``g_method`` and ``swg_sizes``) and :meth:`format` writes the line with a
    command line's own spelling of each, once, where the CLI reports it
    (:func:`exit_on_usage_error` ``spelling=``).  ``str()`` keeps the code spans.
    """

    exit_code = 2
    names: Mapping[str, str] = {}        # library name -> this API's name (renamed())
    spelling: Optional[Callable[[str], str]] = None  # set by a tool that reports another command's errors

    @property
    def template(self) -> str:
        return str(self.args[0]) if self.args else ""

    @property
    def params(self) -> tuple:
        """The parameters the message names, in order (this API's names)."""
        return tuple(self.names.get(n, n) for n in _PARAM.findall(self.template))

    @property
    def param(self) -> Optional[str]:
        """The parameter to change (the first one named), or None."""
        return next(iter(self.params), None)

    def renamed(self, names: Mapping[str, str]) -> "UsageError":
        """This error with the parameters of ``names`` called by their values; returns ``self``."""
        self.names = {**self.names, **names}
        return self

    def format(self, spelling: Optional[Callable[[str], str]] = None) -> str:
        """The message with each parameter written as ``spelling(name)`` (default: the code span)."""
        write = spelling or (lambda name: f"`{name}`")
        return _PARAM.sub(lambda m: write(self.names.get(m.group(1), m.group(1))), self.template)

    def __str__(self) -> str:
        return self.format()


_FULL = (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC))
_DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def _fix(code: Optional[int], where: str) -> str:
    """The usual remedy for an OS error ``code`` on an output; ``where`` names the flag or folder to change."""
    if code in _FULL:
        return f"free space or choose another {where}"
    if code in _DENIED:
        return f"choose another {where} you can write to"
    if code in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"a file or folder of that name is in the way; move it or choose another {where}"
    if code == errno.ENAMETOOLONG:
        return f"choose a shorter {where}"
    return f"choose another {where}"


def _cause(exc: OSError) -> str:
    if exc.errno is None:
        return str(exc)
    return f"{exc.strerror or os.strerror(exc.errno)} (errno {exc.errno})"


class OutputError(UsageError):
    """An output could not be written; raised where the path is known, from the :class:`OSError`.

    ``OutputError(path, exc, flag="--out")`` reads
    ``cannot write <path>: No space left on device (errno 28); free space or choose another --out``.
    """

    def __init__(self, path, cause: OSError, flag: str = "output folder"):
        self.path, self.cause = os.fspath(path), cause
        fix = _fix(cause.errno, flag)
        super().__init__(f"cannot write {self.path}: {_cause(cause)}" + (f"; {fix}" if fix else ""))


def describe_os_error(exc: OSError) -> str:
    """One line for an :class:`OSError` that reached a CLI: the file, the cause, and the usual fix."""
    names = [n for n in (exc.filename, exc.filename2) if n is not None]
    where = " -> ".join(os.fsdecode(n) if isinstance(n, bytes) else str(n) for n in names)
    fix = _fix(exc.errno, "output folder") if exc.errno in _FULL else ""  # the others may be reads too
    return (f"{where}: " if where else "") + _cause(exc) + (f"; {fix}" if fix else "")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _torchrun_store():
    """A client of torchrun's key-value store, or None (not under torchrun, or unreachable)."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        import datetime

        from torch.distributed import TCPStore

        return TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=5),
                        wait_for_workers=False)
    except Exception:  # noqa: BLE001 - any failure means: report without coordination
        return None


def _close_progress_bars() -> None:
    """End open tqdm bars so that the message starts on a line of its own (not after a half-drawn bar)."""
    tqdm = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot be closed must not hide the error
            pass


def report_once(line: str, wait_s: Optional[float] = None, prefix: str = "error") -> None:
    """Print ``<prefix>: <line>`` (``error: ...``) once for the job (see the module docstring)."""
    _close_progress_bars()
    wait_s = RANK_WAIT_S if wait_s is None else wait_s
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    if world <= 1:
        print(f"{prefix}: {line}", file=sys.stderr, flush=True)
        return
    store = _torchrun_store()
    key = f"swg_error/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    def ask(op, *args, default=None):  # the store may be going away while torchrun stops the job
        try:
            return getattr(store, op)(*args) if store is not None else default
        except Exception:  # noqa: BLE001
            return default

    if rank == 0:
        ask("set", f"{key}/rank0", "1")
        if ask("add", f"{key}/printed", 1, default=1) != 1:
            return  # a rank that failed long before rank 0 has reported it already
        print(f"{prefix}: {line}", file=sys.stderr, flush=True)
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if ask("check", [f"{key}/rank0"], default=False):
            return  # rank 0 failed too and prints the line
        time.sleep(0.05)
    if ask("add", f"{key}/printed", 1, default=1) != 1:
        return
    print(f"{prefix}: rank {rank}: {line}", file=sys.stderr, flush=True)


def _ignore_sigint() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _stop_signals_ignored(active: bool = True):
    """SIGTERM and SIGUSR1 ignored inside the block (main thread only), the old handlers back after it."""
    import signal
    import threading

    old = {}
    if active and threading.current_thread() is threading.main_thread():
        for name in ("SIGTERM", "SIGUSR1"):
            if hasattr(signal, name):
                old[name] = signal.signal(getattr(signal, name), signal.SIG_IGN)
    try:
        yield
    finally:
        for name, handler in old.items():
            signal.signal(getattr(signal, name), handler)


INTERRUPTED_RESTART = "interrupted; this command does not resume: rerun it to start over"


def exit_on_usage_error(fn=None, *, interrupted: str = INTERRUPTED,
                        spelling: Optional[Callable[[str], str]] = None):
    """Decorator for CLI entry points: user-fixable errors become one line on stderr (see the module docstring).

    ``spelling(name)`` writes a parameter of a :class:`UsageError` as this command line's flag
    (:func:`utils.cli.flag_spelling`); an error that carries its own :attr:`UsageError.spelling`
    (another command's flags, e.g. the sampler a search runs) is written with that one.

    :class:`UsageError` and :class:`OSError` exit 2, Ctrl-C exits 130 with the
    line ``interrupted`` (printed by rank 0 only, as every rank receives it;
    commands that cannot resume pass :data:`INTERRUPTED_RESTART`).  Other
    exceptions are bugs and keep their traceback.  Before the command runs, torch's CPU
    thread count gets this project's default unless the user chose one
    (:func:`utils.threads.apply_default_threads`).
    """
    if fn is None:
        return functools.partial(exit_on_usage_error, interrupted=interrupted, spelling=spelling)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        apply_default_threads()  # every CLI passes here first: torch's CPU threads (utils/threads.py)
        token = _SPELLING.set(spelling)  # warnings and notes printed meanwhile name this command line's flags
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:  # also utils.preempt.Stopped: 'stopped: ...', exit 75
            # stopping anyway (exit 75): a repeated TERM (torchrun's) must not cut the line short
            with _stop_signals_ignored(exc.exit_code == 75):
                if not (getattr(exc, "rank0_prints", False) and _env_int("RANK", 0) != 0):  # every rank agreed
                    line = exc.format(exc.spelling or spelling)
                    report_once(_one_line(line), prefix=getattr(exc, "prefix", "error"))
            sys.exit(exc.exit_code)
        except OSError as exc:
            report_once(_one_line(describe_os_error(exc)))
            sys.exit(UsageError.exit_code)
        except KeyboardInterrupt:
            _ignore_sigint()  # torchrun forwards the terminal's Ctrl-C: a second one must not print a traceback
            _close_progress_bars()
            if _env_int("RANK", 0) == 0:
                print(interrupted, file=sys.stderr, flush=True)
            sys.exit(130)
        finally:
            _SPELLING.reset(token)

    return wrapper
