"""Preemption: SIGTERM and SIGUSR1 stop a run cleanly, and the exit code tells a requeue script to resume.

Clusters stop jobs with ``SIGTERM`` (then ``SIGKILL`` after a grace period) or,
asked with ``sbatch --signal``, with a chosen signal some minutes before the
end (``SIGUSR1`` here).  Inside :class:`Preemption` either signal

* at once drops the work in flight (a batch being sampled is dropped whole) by
  raising :class:`Preempted` in the main thread, except inside
  :meth:`Preemption.deferred` blocks (handing a batch to the outputs, saving
  state), which finish first and raise on leaving;
* is raised only once: later signals are noted and ignored, so the clean stop
  itself (closing the outputs, saving state) is never cut short by a repeat.

The caller then closes its outputs (everything complete is published, nothing
half-written is left under a final name) and exits with
:data:`EXIT_RESUMABLE` through :func:`utils.errors.exit_on_usage_error`, after
one line that says what was kept and how to resume.

Exit codes of the samplers: 0 done; 2 bad input (nothing written); 75
(:data:`EXIT_RESUMABLE`, ``EX_TEMPFAIL`` of ``sysexits.h``) stopped before the
end by a signal or by a lost peer, everything finished is kept and the same
command resumes; 130 Ctrl-C.  Under torchrun the launcher reports any worker's
non-zero code as its own exit 1, so a requeue script decides from the signal
it received (``bash/slurm_example.sbatch``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

from utils.errors import UsageError

__all__ = ["EXIT_RESUMABLE", "SIGNALS", "Stopped", "Preempted", "Preemption"]

EXIT_RESUMABLE = 75
SIGNALS = ("SIGTERM", "SIGUSR1")


class Stopped(UsageError):
    """The run stopped before its end; what is finished is kept and the same command resumes (exit 75)."""

    exit_code = EXIT_RESUMABLE
    prefix = "stopped"


class Preempted(Stopped):
    """A preemption signal arrived (``signal``: its name); raised in the main thread."""

    def __init__(self, signal_name: str, message: Optional[str] = None):
        self.signal = signal_name
        super().__init__(message or f"{signal_name} received before the run finished; finished outputs are kept "
                                    f"and nothing half-written is left; rerun the same command to resume "
                                    f"(exit code {EXIT_RESUMABLE}: stopped early, resumable)")


class Preemption:
    """Handle :data:`SIGNALS` while the block runs (main thread only; elsewhere a do-nothing stand-in).

    ``received``: the name of the first signal, or None.  :meth:`deferred` marks a
    block that must not be cut in the middle.  The previous handlers come back
    on exit.
    """

    def __init__(self, signals=SIGNALS):
        self.names = [n for n in signals if hasattr(signal, n)]
        self.received: Optional[str] = None
        self._depth = 0
        self._raised = False
        self._old: dict = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for name in self.names:
                sig = getattr(signal, name)
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
        if self._depth == 0:
            self._raise()

    def _raise(self) -> None:
        if not self._raised and self.received is not None:
            self._raised = True
            raise Preempted(self.received)

    @contextlib.contextmanager
    def deferred(self, raise_after: bool = True) -> Iterator[None]:
        """A block a signal does not interrupt; a signal that arrived meanwhile is raised on leaving it
        (``raise_after=False``: only noted in :attr:`received`)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
        if self._depth == 0 and raise_after:
            self._raise()

    def silence(self) -> None:
        """The run is stopping anyway: from now on signals are only noted, so nothing cuts the clean-up short."""
        self._raised = True

    def check(self) -> None:
        """Raise :class:`Preempted` now if a signal arrived and was not raised yet."""
        self._raise()
