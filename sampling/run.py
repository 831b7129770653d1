"""One sampling run, whatever the model: the lifecycle both samplers share.

    settings = edm2_run.build_config(...)          # or dit_run.build_config(...): validated, no I/O
    summary = run.generate(backend(settings))      # what sample_edm2.py / sample_dit.py do

The flow, once for both models::

    RunSettings (+ the backend's own fields)
      -> check the output folder and the settings saved there (read-only, every rank)
      -> resolve and load everything the run needs: reference statistics, detectors, networks
      -> create the folder, save the settings, list the pending seeds, split them over the ranks
      -> per batch: backend.draw -> backend.sample -> backend.decode -> sinks (uint8 NCHW + seeds)
      -> metrics of exactly the run's seeds -> run log (wandb) -> summary

A *backend* (:class:`Backend`; :class:`sampling.edm2_run.EDM2Backend`,
:class:`sampling.dit_run.DiTBackend`) owns what differs between models: what to
download, loading and checking the networks, each batch's per-seed draw
(noise, labels), the sampler and the decoder.  Everything else lives here,
once: the settings file and its comparison rule, the pending-seed and rank
split rule, the progress bar, the summary, prefetch.

The rest lives beside it: the common settings and their checks in
:mod:`sampling.run_settings`, the output folder and its settings file in
:mod:`sampling.run_folder`, the sinks, streaming statistics, ``.npz`` and metrics in
:mod:`sampling.outputs`.
"""

from __future__ import annotations

import abc
import contextlib
import pathlib
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from metrics.api import check_resolution, detectors_for
from metrics.detectors import prefetch as fetch_detectors
from sampling.cluster import RunGuard, kept_by, sample_batches, set_aside_damaged, stopped
from sampling.outputs import (finish_stream, load_detectors, load_reference, open_sinks, open_stream, reference_stats,
                              run_metrics, write_npz)
from sampling.run_folder import check_saved_settings, pending_seeds, probe_outdir, write_evals, write_settings
from sampling.run_settings import RunSettings, effective_metrics, resolve_device
from sampling.seeds import Draw
from sampling.wandb_log import WandbLogger
from sampling.writer import done_seeds, remove_stale_temps
from utils import cache, dist
from utils.preempt import Preempted
from utils.errors import UsageError, spell

__all__ = ["Backend", "Draw", "split_batches", "prefetch", "progress", "generate"]


def split_batches(pending: Sequence[int], batch: int, world: int, rank: int) -> list[list[int]]:
    """EDM2's rule: ``ceil(n / (batch * world)) * world`` near-equal batches, dealt round-robin to the ranks."""
    if not pending:
        return []
    num_batches = max((len(pending) - 1) // (batch * world) + 1, 1) * world
    chunks = np.array_split(np.asarray(pending, dtype=np.int64), num_batches)
    return [c.tolist() for c in chunks[rank::world] if len(c)]


class Backend(abc.ABC):
    """What a model family adds to the lifecycle.  Subclasses set the attributes and implement the methods.

    ``settings`` is the backend's configuration (a :class:`RunSettings` subclass).
    """
    name = "model"                      # 'edm2' | 'dit' (saved as 'sampler')
    wandb_project = "swg"
    identity_keys: tuple = ()           # settings that decide the pixels; a resumed run must agree on them

    def __init__(self, settings: RunSettings):
        self.settings = settings

    def record(self) -> dict:
        """The settings saved beside the images and logged."""
        return {"sampler": self.name, **self.settings.to_json()}

    @abc.abstractmethod
    def fetch(self) -> list:
        """Download the networks (and VAE) into the cache; return local paths."""
    @abc.abstractmethod
    def load(self, device: torch.device) -> None:
        """Load the networks onto ``device`` and check them against the settings (:class:`UsageError`)."""
    def describe(self) -> str:
        return self.name

    def resolution(self) -> Optional[tuple]:
        """``(H, W)`` of the images, known once :meth:`load` ran (None: unknown until the first image)."""
        return None

    def cost(self) -> Optional[dict]:
        """Counted network evaluations per image (``evals_per_step`` ...), when the guided denoiser counts them."""
        return None

    @abc.abstractmethod
    def draw(self, seeds: Sequence[int], device: torch.device, classes=None) -> Draw:
        """The per-seed draw of a batch (:mod:`sampling.seeds`); ``classes`` replaces the drawn classes."""
    @abc.abstractmethod
    def sample(self, draw: Draw) -> torch.Tensor:
        """The sampled latents (or pixels) of ``draw``."""
    @abc.abstractmethod
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 NCHW images."""
    def images(self, seeds: Sequence[int], device: torch.device) -> torch.Tensor:
        """uint8 NCHW images of ``seeds`` (draw, sample, decode) without autograd."""
        with torch.no_grad():
            return self.decode(self.sample(self.draw(seeds, device)))


def prefetch(backend: Backend) -> list[str]:
    """Download everything the run needs (networks, VAE, reference statistics, detector weights); sample nothing.

    Joins the torchrun group first, so that rank 0 downloads while the others wait.
    """
    dist.init()
    settings = backend.settings
    paths = [str(p) for p in backend.fetch()]
    if settings.ref_path:
        local = pathlib.Path(settings.ref_path).expanduser()
        paths.append(str(local) if local.is_dir() else str(cache.fetch(str(settings.ref_path),
                                                                       desc="reference statistics")))
    paths.extend(str(p) for p in fetch_detectors(detectors_for(settings.metrics)))
    return paths


def progress(total: int, enabled: bool, desc: str = "sampling"):
    """The run's progress bar in images (rank 0, on stderr); a do-nothing stand-in when disabled."""
    if not enabled:
        return contextlib.nullcontext(_NoBar())

    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    n = 0
    total = 0

    def update(self, n: int = 1) -> None:
        pass


def generate(backend: Backend, *, progress_bar: bool = True, desc: str = "sampling") -> dict:
    """Make every missing image of ``backend.settings`` in its folder, then the outputs and metrics it asks for.

    Returns the summary ``{"outdir", "requested", "pending", "written" (by this rank), "seconds",
    "metrics" (dict or None), "npz" (path or None)}``.  Runs under torchrun: rank 0 lists
    the finished seeds, the pending ones are dealt to the ranks (:func:`split_batches`).
    One run per folder (a second is refused); SIGTERM / SIGUSR1 stop it cleanly with
    :class:`utils.preempt.Stopped` (exit 75): see :mod:`sampling.cluster`.
    """
    with RunGuard() as guard:
        return _generate(backend, guard, progress_bar=progress_bar, desc=desc)


def _generate(backend: Backend, guard: RunGuard, *, progress_bar: bool, desc: str) -> dict:
    settings = backend.settings
    dist.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = resolve_device(settings.device)
    outdir = probe_outdir(settings.outdir)
    record = backend.record()

    # Everything the run needs, before the first image: reference, detectors, networks; then the folder's
    # saved settings (read-only, on every rank, so every rank stops with the same line).
    ref = load_reference(settings)
    metrics = effective_metrics(settings)
    skip_metrics = bool(settings.metrics) and not metrics
    load_detectors(metrics, device)
    backend.load(device)
    if ref is not None and metrics:  # a reference of another resolution is refused now, not after the last image
        check_resolution(ref.get("resolution"), backend.resolution(), spell(f"`ref_path` {settings.ref_path}"),
                         "this run's images")
    keys = ("sampler", *backend.identity_keys, "subdirs", "save_tar")
    check_saved_settings(outdir, record, keys)
    guard.hold(outdir)  # one run per folder, before anything in it is read for resuming or written
    stream = open_stream(settings, outdir, record, keys, device)  # save none: reads (and checks) its saved state
    if stream is not None:
        ref = reference_stats(settings, ref, metrics, device)
    logger = WandbLogger(bool(settings.use_wandb), project=backend.wandb_project, config=record,
                         group=settings.wandb_group, name=settings.wandb_runname, rank=rank)

    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        write_settings(outdir, record)
        remove_stale_temps(outdir)
    guard.created = None  # the folder is the run's now
    dist.barrier()
    if stream is None:
        done = set_aside_damaged(outdir)  # rank 0: damaged finished images are drawn again
        pending = pending_seeds(settings.seeds, outdir, device, done=done)
        batches = split_batches(pending, settings.batch, world, rank)
    else:  # whole detector chunks per rank, so streamed statistics equal write-then-score
        pending = stream.pending_seeds()
        batches = stream.plan(settings.batch)
    if rank == 0:
        if pending:
            print(f"{backend.describe()}: {len(pending)} of {len(settings.seeds)} images to sample on {world} "
                  f"process(es) -> {outdir}" + (" (metrics while sampling, no image files)" if stream else ""),
                  file=sys.stderr)
        elif stream is not None:
            print(f"the statistics of all {len(settings.seeds)} images are in {outdir}; nothing to sample",
                  file=sys.stderr)
        else:
            print(f"all {len(settings.seeds)} images already exist in {outdir}", file=sys.stderr)
        if skip_metrics:  # said before the first image, not only after the last
            print(spell(f"note: no reference statistics, so {', '.join(settings.metrics)} will be skipped; pass "
                        f"`ref_path` to compute them"), file=sys.stderr)

    t0 = time.perf_counter()
    sinks = []
    try:
        with contextlib.ExitStack() as stack:
            sinks = [stack.enter_context(s) for s in open_sinks(settings, outdir, stream)]
            bar = stack.enter_context(progress(len(pending), progress_bar and rank == 0 and bool(pending), desc))
            written = sample_batches(backend, batches, sinks, device, guard.preemption, bar)
    except Preempted as exc:  # the outputs are closed: complete images published, streaming state saved
        raise stopped(exc, outdir=outdir, total=len(settings.seeds), done_before=len(settings.seeds) - len(pending),
                      kept_here=kept_by(sinks), streaming=stream is not None) from None
    dist.barrier()
    summary = {"outdir": str(outdir), "requested": len(settings.seeds), "pending": len(pending),
               "written": written, "seconds": time.perf_counter() - t0, "metrics": None, "npz": None,
               "evals": backend.cost() if written else None}
    if summary["evals"] and rank == 0:  # counted, not declared: results.collect shows it
        write_evals(outdir, summary["evals"])
        e = summary["evals"]
        if e.get("evals_per_step") is not None:
            print(f"network evaluations per image: {e['evals_per_step']:g} per sampler step, {e['evals_per_call']:g} "
                  f"per guided call (counted; {outdir / 'evals.json'})", file=sys.stderr)

    if settings.save_npz and rank == 0:
        summary["npz"] = str(write_npz(outdir, settings.seeds))
        print(f"wrote {summary['npz']}", file=sys.stderr)
    dist.barrier()
    if skip_metrics:
        dist.print0(spell("metrics skipped: no reference statistics (pass `ref_path`)"), file=sys.stderr)
    elif stream is not None:
        with torch.no_grad():
            summary["metrics"] = finish_stream(stream, settings, outdir, ref, metrics, record, device)
    elif metrics:
        total = len(done_seeds(outdir) & set(settings.seeds))
        if total < len(settings.seeds):
            raise UsageError(f"only {total} of {len(settings.seeds)} images exist in {outdir}; "
                             f"rerun to finish them before computing metrics")
        with torch.no_grad():
            summary["metrics"] = run_metrics(outdir, settings.seeds, metrics, ref=ref, ref_path=settings.ref_path,
                                             device=device, record=record)
    logger.log_metrics({"images": len(settings.seeds), "seconds": summary["seconds"]}, prefix="run/")
    logger.log_run(outdir, summary["metrics"])
    return summary
