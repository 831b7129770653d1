"""Where a run's images go and what is computed from them: sinks, streaming statistics, ``.npz``, metrics.

Everything here is loaded or checked before the first image (:func:`load_reference`,
:func:`load_detectors`, :func:`open_stream`) or runs after the last one
(:func:`finish_stream`, :func:`write_npz`, :func:`run_metrics`).  A new output is a
sink with ``write(seeds, uint8 NCHW)`` and ``close()`` returned by :func:`open_sinks`.
"""

from __future__ import annotations

import os
import pathlib
import sys
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from metrics.api import (calc_metrics, calc_metrics_from_stats, check_ref_covers, detectors_for, needs_reference,
                         prepare_reference, write_metrics)
from metrics.detectors import get_detector
from metrics.images import is_image_source
from metrics.refs import load_ref, save_ref
from metrics.stream import STATE_DIR, StreamingStats
from sampling.run_folder import comparable
from sampling.run_settings import RunSettings, effective_metrics, reference_hint
from sampling.writer import ImageIndex, ImageWriter
from utils import dist
from utils.atomic import atomic_path
from utils.errors import UsageError

__all__ = ["load_reference", "load_detectors", "open_sinks", "open_stream", "reference_stats", "finish_stream",
           "write_npz", "run_metrics"]


def load_reference(settings: RunSettings) -> Optional[dict]:
    """The reference statistics the metrics need (loaded now, so a bad reference fails before sampling)."""
    if not settings.metrics or not needs_reference(settings.metrics) or not settings.ref_path:
        return None
    if "://" not in str(settings.ref_path):
        path = pathlib.Path(settings.ref_path).expanduser()
        if is_image_source(path):
            return None  # statistics of a folder of reference images are computed with the metrics
        if not path.is_file():
            raise UsageError(f"`ref_path` {path} not found; pass an existing .pkl/.npz (e.g. "
                             f"{reference_hint(settings.metrics)}) or build one with 'python -m metrics ref'")
    ref = load_ref(settings.ref_path)
    check_ref_covers(ref, settings.metrics, f"`ref_path` {settings.ref_path}")
    return ref


def load_detectors(metrics: Sequence[str], device) -> list:
    """Load (and cache) the feature detectors ``metrics`` use, so missing weights fail before sampling."""
    return [get_detector(kind, device) for kind in detectors_for(metrics)]


def open_sinks(settings: RunSettings, outdir: pathlib.Path, stream=None) -> list:
    """Where decoded batches go: objects with ``write(seeds, uint8 NCHW)`` and ``close()`` (context managers).

    `save` png/tar: one :class:`sampling.writer.ImageWriter`.  `save` none: the streaming
    accumulator ``stream`` (:class:`metrics.stream.StreamingStats`), plus a writer of the
    first `keep` seeds' PNGs when asked.
    """
    if stream is None:
        return [ImageWriter(outdir, subdirs=settings.subdirs, tar=settings.save_tar, shard_size=settings.shard_size)]
    sinks = [stream]
    if settings.keep:
        sinks.append(_KeepFirst(ImageWriter(outdir, subdirs=settings.subdirs), settings.seeds[:settings.keep]))
    return sinks


class _KeepFirst:
    """A sink that passes on only the images of ``seeds`` (`keep`: a few images to look at)."""
    def __init__(self, writer, seeds: Sequence[int]):
        self.writer, self.seeds = writer, set(int(s) for s in seeds)

    def write(self, seeds: Sequence[int], images: torch.Tensor) -> None:
        idx = [i for i, s in enumerate(seeds) if int(s) in self.seeds]
        if idx:
            self.writer.write([seeds[i] for i in idx], images[idx])

    def close(self) -> None:
        self.writer.close()

    def __enter__(self):
        self.writer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.writer.__exit__(*exc)


def open_stream(settings: RunSettings, outdir: pathlib.Path, record: Mapping[str, Any], keys: Sequence[str],
                device) -> Any:
    """The streaming accumulator of a `save` none run (None otherwise): detectors loaded, saved state read.

    Its state lives in ``outdir/stream_state``, keyed by the settings ``keys`` of ``record``
    (those that decide the pixels), so a resumed run with other settings is refused.
    A `save_stats` file that already exists is refused unless the run is already finished.
    """
    if settings.save != "none":
        return None

    identity = {k: comparable(record.get(k)) for k in keys}
    stream = StreamingStats(effective_metrics(settings), settings.seeds, state_dir=outdir / STATE_DIR,
                            settings=identity, device=device)
    if settings.save_stats and stream.pending_seeds() and pathlib.Path(settings.save_stats).expanduser().exists():
        raise UsageError(f"`save_stats` {settings.save_stats} already exists; choose another path (finished "
                         f"outputs are never overwritten)")
    return stream


def reference_stats(settings: RunSettings, ref: Optional[dict], metrics: Sequence[str], device) -> Optional[dict]:
    """The reference statistics for scoring streamed statistics (a reference image folder is read now)."""
    return prepare_reference(settings.ref_path, metrics, ref=ref, device=device, progress=False)


def finish_stream(stream, settings: RunSettings, outdir: pathlib.Path, ref: Optional[dict], metrics: Sequence[str],
                  record: Mapping[str, Any], device) -> dict:
    """All-reduce the streamed statistics, score them, write metrics (once) and `save_stats` on rank 0."""
    fresh = bool(stream.pending_seeds())
    stats = stream.finish()
    results = calc_metrics_from_stats(stats, ref, list(metrics), device=device)
    if dist.get_rank() == 0:
        if fresh or not (outdir / "metrics.json").exists():
            write_metrics(outdir, results, dict(record))
        if settings.save_stats and not pathlib.Path(settings.save_stats).expanduser().exists():
            save_ref(stats, pathlib.Path(settings.save_stats).expanduser())
            print(f"wrote {settings.save_stats}", file=sys.stderr)
    dist.barrier()
    return dict(results)


def write_npz(outdir: os.PathLike | str, seeds: Sequence[int], path: Optional[os.PathLike] = None) -> pathlib.Path:
    """ADM evaluator input: ``arr_0`` = uint8 NHWC images in seed order, written atomically.

    Defaults to ``<outdir>.npz`` (``.../samples.npz`` beside the images folder).
    """
    outdir = pathlib.Path(outdir)
    path = pathlib.Path(path) if path else outdir.with_suffix(".npz")
    index = ImageIndex(outdir)
    try:
        images = index.read(seeds)
    finally:
        index.close()
    with atomic_path(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, arr_0=images)
    return path


class _Batches:
    """``index.batches(seeds, batch)`` that knows its length, so the metrics' progress bar counts to it."""

    def __init__(self, index: ImageIndex, seeds: Sequence[int], batch: int):
        self.index, self.seeds, self.batch = index, seeds, batch

    def __len__(self) -> int:
        return -(-len(self.seeds) // self.batch)

    def __iter__(self):
        return self.index.batches(self.seeds, self.batch)


def run_metrics(outdir, seeds: Sequence[int], metrics: Sequence[str], *, ref_path: Optional[str] = None,
                ref: Optional[dict] = None, device=None, record: Optional[Mapping[str, Any]] = None,
                wandb_log: bool = False) -> dict:
    """Metrics of exactly ``seeds`` of the run folder ``outdir`` (PNGs or tar shards), against a reference.

    Under torchrun each rank reads its share of the seeds and the statistics are
    summed across ranks (:func:`metrics.api.calc_metrics`); rank 0 writes
    ``metrics.json`` and a one-row CSV beside the images with ``record``
    (the run's settings).  Returns the results on every rank.
    """
    seeds = sorted(int(s) for s in seeds)
    index = ImageIndex(outdir)
    try:
        share = seeds[dist.get_rank()::dist.get_world_size()]
        results = calc_metrics(_Batches(index, share, 64), list(metrics), ref_path=ref_path, ref=ref, device=device,
                               progress=dist.get_rank() == 0)
    finally:
        index.close()
    if dist.get_rank() == 0:
        write_metrics(outdir, results, dict(record or {}), wandb_log=wandb_log)
    return dict(results)
