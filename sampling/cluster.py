"""What a sampling run needs on a shared, preemptible cluster; used by :func:`sampling.run.generate`.

* :func:`hold_folder`: one run per output folder (:mod:`utils.lock`); rank 0
  takes the lock before anything is written, every rank stops with the same
  line when another live run holds it.
* :func:`set_aside_damaged`: damaged finished images are renamed away on rank 0
  so that their seeds are drawn again (:func:`sampling.writer.set_aside_damaged`).
* :func:`sample_batches`: the batch loop under :class:`utils.preempt.Preemption`.
  A signal drops the batch being sampled on the rank that got it (handing a
  batch to the outputs is never cut); after every batch the ranks agree (one
  tiny all-reduce) whether any of them was signalled, so all stop after the
  same batch, and a lost peer is noticed within a batch (or after
  ``SWG_DIST_TIMEOUT`` seconds when it went silent).
* :func:`stopped`: after the outputs are closed (complete images published,
  streaming state saved), the one line saying what was kept and how to resume.
"""

from __future__ import annotations

import pathlib
import sys
from typing import Optional, Sequence

import torch

from sampling.writer import finished_seeds
from utils import dist
from utils.lock import FolderBusy, FolderLock
from utils.preempt import Preempted, Preemption, Stopped

__all__ = ["RunGuard", "hold_folder", "set_aside_damaged", "sample_batches", "stopped", "kept_by"]


def hold_folder(outdir: pathlib.Path, what: str = "`outdir`") -> Optional[FolderLock]:
    """Create ``outdir`` and take its run lock on rank 0; raise :class:`FolderBusy` on every rank if held.

    Returns the lock on rank 0 (release it when the run ends), None elsewhere.
    """
    lock, refused = None, None
    if dist.get_rank() == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        try:
            lock = FolderLock(outdir, what).acquire()
        except FolderBusy as exc:
            refused = exc
    busy = int(dist.all_reduce_sum(torch.tensor([int(refused is not None)])).item())
    if busy:
        exc = refused or FolderBusy(f"{outdir} is in use by another run")
        exc.rank0_prints = True
        raise exc
    if lock is not None and lock.note:
        print(f"note: {lock.note}", file=sys.stderr, flush=True)
    return lock


def set_aside_damaged(outdir: pathlib.Path) -> Optional[set]:
    """Rank 0: rename damaged finished images to ``*.damaged`` and say so (their seeds become pending).

    Returns the seeds finished intact (rank 0; None elsewhere), for :func:`sampling.run_folder.pending_seeds`.
    """

    if dist.get_rank() != 0:
        return None
    done, moved = finished_seeds(outdir)
    if moved:
        shown = ", ".join(pathlib.Path(p).name for p in moved[:3]) + (" ..." if len(moved) > 3 else "")
        print(f"warning: {len(moved)} damaged image file(s) in {outdir} ({shown}) renamed to *.damaged; "
              f"their seeds are sampled again", file=sys.stderr, flush=True)
    return done


def sample_batches(backend, batches: Sequence[Sequence[int]], sinks: Sequence, device, preemption: Preemption,
                   bar=None) -> int:
    """Sample ``batches`` (this rank's) into ``sinks``; returns the number of images handed to them.

    Raises :class:`Preempted` (on every rank, after the same batch) when any rank got a signal.
    """
    try:
        return _sample_batches(backend, batches, sinks, device, preemption, bar)
    except BaseException:
        preemption.silence()  # stopping (a signal, a lost peer, an error): closing the outputs is not cut short
        raise


def _sample_batches(backend, batches, sinks, device, preemption: Preemption, bar) -> int:
    world = dist.get_world_size()
    rounds = len(batches)
    if world > 1:  # ranks may hold one batch fewer: they join the agreement with empty rounds
        rounds = int(dist.all_reduce_max(torch.tensor([rounds], dtype=torch.int64)).item())
    written = 0
    for i in range(rounds):
        seeds = list(batches[i]) if i < len(batches) else []
        try:
            if seeds:
                images = backend.images(seeds, device)
                with preemption.deferred():
                    for sink in sinks:
                        sink.write(seeds, images)
                    written += len(seeds)
                    if bar is not None:
                        bar.update(min(len(seeds) * world, bar.total - bar.n))
        except Preempted:
            pass  # the batch in flight is dropped whole; the others hear of it below
        if world > 1:
            with preemption.deferred(raise_after=False):
                signalled = torch.tensor([int(preemption.received is not None)], dtype=torch.int64)
                signalled = int(dist.all_reduce_sum(signalled).item())
        else:
            signalled = int(preemption.received is not None)
        if signalled:
            exc = Preempted(preemption.received or "a signal to another process of this job")
            exc.rank0_prints = True
            raise exc
    return written


def stopped(exc: Preempted, *, outdir: pathlib.Path, total: int, done_before: int, kept_here: int,
            streaming: bool) -> Stopped:
    """The one line for a run stopped by ``exc``, once the outputs are closed (every rank calls it)."""
    try:
        kept = done_before + int(dist.all_reduce_sum(torch.tensor([kept_here], dtype=torch.int64)).item())
        count = f"{kept} of {total} images"
    except Stopped:  # a peer left meanwhile: say what this rank knows
        count = f"at least {done_before + kept_here} of {total} images"
    if streaming:
        what = f"the statistics of {count} are saved in {outdir}"
    else:
        what = f"{count} are finished in {outdir}"
    out = Stopped(f"{exc.signal} received: {what}; nothing half-written is left; rerun the same command to "
                  f"resume (exit code {Stopped.exit_code}: stopped early, resumable)")
    out.rank0_prints = getattr(exc, "rank0_prints", False)
    return out


class RunGuard:
    """The run's signal handling and folder lock, released when the run ends (``with RunGuard() as guard``).

    ``guard.preemption``: the :class:`Preemption` of the run; :meth:`hold` takes the folder lock
    (:func:`hold_folder`).  A folder created only to hold the lock is removed again when the run
    stops before writing anything into it, so a refused run leaves nothing behind.
    """

    def __init__(self):
        self.preemption = Preemption()
        self.lock: Optional[FolderLock] = None
        self.created: Optional[pathlib.Path] = None

    def hold(self, outdir: pathlib.Path, what: str = "`outdir`") -> None:
        if dist.get_rank() == 0 and not outdir.exists():
            self.created = outdir
        self.lock = hold_folder(outdir, what)

    def __enter__(self) -> "RunGuard":
        self.preemption.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.lock is not None:
                self.lock.release()
                self.lock = None
            if self.created is not None:
                try:
                    self.created.rmdir()  # only when empty
                except OSError:
                    pass
        finally:
            self.preemption.__exit__(*exc)


def kept_by(sinks: Sequence) -> int:
    """Images this rank's first sink has made safe: published files, or seeds of saved streaming chunks."""
    if not sinks:
        return 0
    sink = sinks[0]
    if hasattr(sink, "covered") and hasattr(sink, "done_before"):
        return sum(len(sink.chunks[k]) for k in sink.covered - sink.done_before)
    return len(getattr(sink, "written", ()))
