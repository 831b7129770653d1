"""The output folder of a run and the settings file saved in it.

A run folder holds the images and ``settings.json`` (the run's settings, as
:meth:`sampling.run_settings.RunSettings.to_json` records them).  A folder is
checked before anything is loaded (:func:`check_outdir`, :func:`probe_outdir`),
its saved settings are compared with the new run's (:func:`check_saved_settings`:
a resumed run must agree on the settings that decide the pixels), and rank 0
lists its finished seeds (:func:`pending_seeds`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import stat
from typing import Any, Mapping, Optional, Sequence

import torch

from sampling.writer import done_seeds
from utils import dist
from utils.atomic import check_output_dir, write_json_atomic
from utils.errors import UsageError

__all__ = ["SETTINGS_FILE", "LEGACY_SETTINGS_FILES", "json_value", "comparable", "check_outdir", "probe_outdir",
           "read_json", "read_saved_settings", "changed_setting", "check_saved_settings", "write_settings",
           "pending_seeds", "EVALS_FILE", "write_evals"]

SETTINGS_FILE = "settings.json"
# Names earlier versions used (sample_edm2.py, sample_dit.py); read so that existing folders resume.
LEGACY_SETTINGS_FILES = ("generate_args.json", "args.json")
EVALS_FILE = "evals.json"  # network evaluations per image per step / call, counted while sampling


def json_value(value):
    """``value`` as saved in the settings file: tuples as lists, infinities as ``"inf"`` / ``"-inf"``."""
    if isinstance(value, tuple):
        return [json_value(v) for v in value]
    if isinstance(value, list):
        return [json_value(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def check_outdir(path: os.PathLike | str, option: str = "`outdir`") -> pathlib.Path:
    """Refuse an output folder that cannot be used; ``option`` names the parameter that chooses it.

    The folder may not exist yet; then its nearest existing ancestor must be a
    writable folder.  Returns the expanded path.  Creates nothing.
    """
    path = pathlib.Path(path).expanduser()
    try:  # one stat: under torchrun rank 0 may create and remove the folder between two calls (probe_outdir)
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    if mode is not None and not stat.S_ISDIR(mode):
        raise UsageError(f"{path} is a file, not a folder; choose another {option}")
    for _ in range(100):  # under torchrun, rank 0 may be creating and removing the folder meanwhile (probe_outdir)
        probe = path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            is_dir = stat.S_ISDIR(os.stat(probe).st_mode)
        except FileNotFoundError:
            continue
        if not is_dir:
            raise UsageError(f"{path} cannot be created because {probe} is a file; choose another {option}")
        if os.access(probe, os.W_OK | os.X_OK):
            return path
        if probe.exists():
            raise UsageError(f"{path} cannot be written ({probe} is read-only); choose another {option}")
    return path


def probe_outdir(path: os.PathLike | str, option: str = "`outdir`") -> pathlib.Path:
    """:func:`check_outdir`, then (rank 0 only) prove the folder can really be created and written.

    Pseudo and read-only file systems (``/proc/x``) pass the permission checks and
    refuse only on ``mkdir``; :func:`utils.atomic.check_output_dir` tries it and
    leaves nothing behind.
    """
    path = check_outdir(path, option)
    if dist.get_rank() == 0:
        check_output_dir(path, option)
    return path


def read_json(path: os.PathLike | str) -> Optional[dict]:
    """The JSON object stored at ``path``, or ``None`` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_saved_settings(outdir: os.PathLike | str) -> Optional[tuple[pathlib.Path, dict]]:
    """``(path, settings)`` saved in ``outdir``: ``settings.json``, else an older name; None when none is readable.

    A ``settings.json`` that exists but is not a readable JSON object (truncated, empty, binary, a list)
    gives None: the older names are not read in its place.
    """
    outdir = pathlib.Path(outdir)
    if (outdir / SETTINGS_FILE).exists():
        data = read_json(outdir / SETTINGS_FILE)
        return None if data is None else (outdir / SETTINGS_FILE, data)
    for name in LEGACY_SETTINGS_FILES:
        data = read_json(outdir / name)
        if data is not None:
            return outdir / name, data
    return None


def comparable(value):
    """``value`` as it reads back from the settings file (for comparisons)."""
    return json.loads(json.dumps(json_value(value)))


def changed_setting(saved: Mapping[str, Any], new: Mapping[str, Any],
                    keys: Sequence[str]) -> Optional[tuple[str, Any]]:
    """``(key, saved value)`` for the first of ``keys`` whose saved value differs from ``new``; None when all agree.

    Keys absent from ``saved`` are not compared, so folders written by older versions resume.
    Values are compared as JSON (a tuple equals the list it was saved as).
    """
    for key in keys:
        if key in saved and saved[key] != comparable(new.get(key)):
            return key, saved[key]
    return None


def check_saved_settings(outdir: os.PathLike | str, record: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Refuse a folder whose images were made with other pixel-deciding settings, or whose images have no
    readable settings to compare with (read-only; every rank)."""
    found = read_saved_settings(outdir)
    if found is None:
        if done_seeds(outdir):
            raise UsageError(f"{outdir} holds finished images but its {SETTINGS_FILE} is missing or damaged, so "
                             f"they cannot be checked against this run; choose another `outdir` (or restore "
                             f"{SETTINGS_FILE})")
        return
    changed = changed_setting(found[1], record, keys)
    if changed:
        key, old = changed
        raise UsageError(f"{outdir} holds images made with different settings ({key}: {old!r} there, "
                         f"{comparable(record.get(key))!r} now); resume with the same settings or choose another "
                         f"`outdir` so they do not mix")


def write_settings(outdir: os.PathLike | str, record: Mapping[str, Any]) -> pathlib.Path:
    """Save ``record`` as ``outdir/settings.json`` (atomic).  Older settings files are left as they are."""
    path = pathlib.Path(outdir) / SETTINGS_FILE
    write_json_atomic(path, dict(record), indent=2)
    return path


def write_evals(outdir: os.PathLike | str, evals: Mapping[str, Any]) -> pathlib.Path:
    """Save the counted network evaluations as ``outdir/evals.json`` (atomic); ``results.collect`` reads it."""
    path = pathlib.Path(outdir) / EVALS_FILE
    write_json_atomic(path, dict(evals), indent=2)
    return path


def pending_seeds(seeds: Sequence[int], outdir: os.PathLike | str, device=None, done=None) -> list[int]:
    """Seeds of ``seeds`` without a finished image in ``outdir``, in order.

    Rank 0 lists the folder (unless ``done``, the finished seeds it listed already, is given) and shares
    the answer, so every rank splits the same list even while another rank is already writing.
    """
    device = device if device is not None else torch.device("cpu")
    mask = torch.zeros(len(seeds), dtype=torch.int32)
    if dist.get_rank() == 0:
        done = done_seeds(outdir) if done is None else done
        mask = torch.tensor([s not in done for s in seeds], dtype=torch.int32)
    mask = dist.all_reduce_sum(mask.to(device)).cpu()
    return [s for s, m in zip(seeds, mask.tolist()) if m]
