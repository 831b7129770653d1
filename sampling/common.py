"""Run-folder helpers shared by the samplers (:mod:`sampling.edm2_run`, :mod:`sampling.dit_run`).

A sampling run owns one output folder.  It records its resolved settings in a
JSON file there; a later run into the same folder may resume only when the
settings that decide the pixels agree.  These helpers check the folder before
anything is written, compare the saved settings, write JSON atomically and
draw the rank-0 progress bar.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional, Sequence

from utils.atomic import write_json_atomic
from utils.errors import UsageError

__all__ = ["check_outdir", "read_json", "changed_setting", "write_json_atomic", "progress", "run_metrics"]


def check_outdir(path: os.PathLike | str, option: str) -> pathlib.Path:
    """Refuse an output folder that cannot be used; ``option`` names the flag that chooses it.

    The folder may not exist yet; then its nearest existing ancestor must be a
    writable folder.  Returns the expanded path.
    """
    path = pathlib.Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file, not a folder; choose another {option}")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{path} cannot be created because {probe} is a file; choose another {option}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"{path} cannot be written ({probe} is read-only); choose another {option}")
    return path


def read_json(path: os.PathLike | str) -> Optional[dict]:
    """The JSON object stored at ``path``, or ``None`` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def changed_setting(path: os.PathLike | str, new: Mapping[str, Any],
                    keys: Sequence[str]) -> Optional[tuple[str, Any]]:
    """``(key, saved value)`` for the first of ``keys`` whose value in the JSON file ``path`` differs from ``new``.

    ``None`` when all agree.  Keys absent from the saved file are not compared (files from older versions
    resume), nor is anything when no readable file exists.
    """
    old = read_json(path)
    if old is None:
        return None
    for key in keys:
        if key in old and old[key] != new.get(key):
            return key, old[key]
    return None


def progress(iterable: Iterable, enabled: bool, **kwargs) -> Iterable:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` (rank 0), shown only on a terminal; else unchanged."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None, **kwargs)


def run_metrics(outdir, seeds: Sequence[int], metrics: Sequence[str], *, ref_path: Optional[str] = None,
                ref: Optional[dict] = None, device=None, record: Optional[Mapping[str, Any]] = None,
                wandb_log: bool = False) -> dict:
    """Metrics of exactly ``seeds`` of the run folder ``outdir`` (PNGs or tar shards), against a reference.

    Under torchrun each rank reads its share of the seeds and the statistics are
    summed across ranks (:func:`metrics.api.calc_metrics`); rank 0 writes
    ``metrics.json`` and a one-row CSV beside the images with ``record``
    (the run's settings).  Returns the results on every rank.
    """
    from metrics.api import calc_metrics, write_metrics
    from sampling.writer import ImageIndex
    from utils import dist

    seeds = sorted(int(s) for s in seeds)
    index = ImageIndex(outdir)
    try:
        share = seeds[dist.get_rank()::dist.get_world_size()]
        results = calc_metrics(index.batches(share, 64), list(metrics), ref_path=ref_path, ref=ref, device=device,
                               progress=dist.get_rank() == 0)
    finally:
        index.close()
    if dist.get_rank() == 0:
        write_metrics(outdir, results, dict(record or {}), wandb_log=wandb_log)
    return dict(results)
