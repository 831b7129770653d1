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

Library errors name *parameters* in backticks (`` `seeds` ``); each command
line turns them into its own flag spelling (:func:`utils.cli.flag_names`).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import sys
import time
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch

from sampling.seeds import Draw
from utils.atomic import atomic_path, write_json_atomic
from utils.errors import UsageError
from utils.ranges import compact_ranges

__all__ = ["SETTINGS_FILE", "LEGACY_SETTINGS_FILES", "MAX_SEED", "RunSettings", "Backend", "Draw",
           "parse_seeds", "compact_seeds", "parse_metrics", "effective_metrics", "check_outdir", "probe_outdir", "check_reference", "check_run_settings",
           "resolve_device", "read_json", "read_saved_settings", "changed_setting", "check_saved_settings",
           "write_settings", "pending_seeds", "split_batches", "open_sinks", "open_stream", "finish_stream", "progress", "load_reference",
           "load_detectors", "prefetch", "generate", "run_metrics", "write_npz"]

SETTINGS_FILE = "settings.json"
# Names earlier versions used (sample_edm2.py, sample_dit.py); read so that existing folders resume.
LEGACY_SETTINGS_FILES = ("generate_args.json", "args.json")
MAX_SEED = 9_999_999  # image files are named by a 7-digit seed


# ----------------------------------------------------------------------------
# Settings common to every sampler.

@dataclasses.dataclass
class RunSettings:
    """What any sampling run needs besides its model: where, which seeds, how to write and score.

    The backends' configurations (:class:`sampling.edm2_run.GenerateConfig`,
    :class:`sampling.dit_run.DiTConfig`) extend this class with their own fields.
    """

    outdir: Optional[str] = None          # folder of the images (created)
    seeds: list = dataclasses.field(default_factory=list)
    batch: int = 32                       # images per batch on each process
    subdirs: bool = False                 # PNGs in per-1000 folders
    save_tar: bool = False                # tar shards of PNGs instead of loose PNGs
    save_npz: bool = False                # also <outdir>.npz (arr_0, uint8 NHWC) for the ADM evaluator
    save: str = "png"                     # png | tar | none (none: metrics while sampling, no image files)
    keep: int = 0                         # with save none: still write the first `keep` seeds' PNGs
    save_stats: Optional[str] = None      # with save none: the run's feature statistics (EDM2 pickle layout)
    shard_size: int = 1000
    metrics: tuple = ()                   # names of metrics.api.METRICS
    ref_path: Optional[str] = None        # reference statistics (path or URL)
    require_reference: bool = True        # False: metrics needing a missing reference are skipped with a note
    use_wandb: int = 0
    wandb_group: Optional[str] = None
    wandb_runname: Optional[str] = None
    device: Optional[str] = None          # None: cuda:<LOCAL_RANK> when available, else cpu

    def to_json(self) -> dict:
        """The settings as saved beside the images (seeds compacted to ranges, tuples as lists)."""
        record = {k: _plain(v) for k, v in dataclasses.asdict(self).items()}
        record["seeds"] = compact_seeds(self.seeds)
        record["num_images"] = len(self.seeds)
        return record


def _plain(value):
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def compact_seeds(seeds: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'`` (order kept)."""
    return compact_ranges(seeds)


def parse_seeds(text) -> list[int]:
    """The one seed rule: ``'0-49999'``, ``'1,2,5-10'`` or a list, each in ``0..MAX_SEED``.

    Bounds are checked before a range is expanded; a seed listed twice is made once (with a warning).
    """
    from sampling.seeds import parse_int_list

    seeds = parse_int_list(text, "`seeds`", lo=0, hi=MAX_SEED)
    if not seeds:
        raise UsageError("`seeds` is empty; give e.g. 0-49999")
    unique = list(dict.fromkeys(seeds))
    if len(unique) != len(seeds):
        print(f"warning: `seeds` lists {len(seeds) - len(unique)} seed(s) more than once; each image is made once"
              .replace("`", ""), file=sys.stderr)
    return unique


def parse_metrics(metrics) -> tuple:
    """``'fid,fd_dinov2'``, ``'fid fd_dinov2'`` or a list -> names of :data:`metrics.api.METRICS`; none -> ()."""
    from metrics.api import parse_metrics as parse

    if metrics is None:
        return ()
    if isinstance(metrics, (list, tuple)):
        metrics = ",".join(str(m) for m in metrics)
    names = [m for m in str(metrics).replace(",", " ").split() if m]
    if not names or [n.lower() for n in names] == ["none"]:
        return ()
    try:
        return tuple(parse(names))
    except UsageError as exc:
        raise UsageError(f"`metrics`: {exc}") from None


def _reference_hint(metrics: Sequence[str]) -> str:
    from networks.zoo import DEMO_REF, REFS

    return DEMO_REF if any(m.endswith("_digits") for m in metrics) else REFS["img512"]


def check_reference(settings: RunSettings) -> None:
    """Metrics that compare against a reference need `ref_path` (unless the sampler skips them).  No I/O."""
    from metrics.api import needs_reference

    if settings.metrics and needs_reference(settings.metrics) and not settings.ref_path and settings.require_reference:
        raise UsageError(f"`metrics` {','.join(settings.metrics)} need reference statistics; pass `ref_path` "
                         f"(e.g. {_reference_hint(settings.metrics)})")


def effective_metrics(settings: RunSettings) -> tuple:
    """The metrics the run computes: all asked for, or none when they need a reference that the sampler
    may skip (``require_reference=False``) and none was given."""
    from metrics.api import needs_reference

    if settings.metrics and needs_reference(settings.metrics) and not settings.ref_path \
            and not settings.require_reference:
        return ()
    return tuple(settings.metrics)


def check_outdir(path: os.PathLike | str, option: str = "`outdir`") -> pathlib.Path:
    """Refuse an output folder that cannot be used; ``option`` names the parameter that chooses it.

    The folder may not exist yet; then its nearest existing ancestor must be a
    writable folder.  Returns the expanded path.  Creates nothing.
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


def probe_outdir(path: os.PathLike | str, option: str = "`outdir`") -> pathlib.Path:
    """:func:`check_outdir`, then (rank 0 only) prove the folder can really be created and written.

    Pseudo and read-only file systems (``/proc/x``) pass the permission checks and
    refuse only on ``mkdir``; :func:`utils.atomic.check_output_dir` tries it and
    leaves nothing behind.
    """
    from utils import dist
    from utils.atomic import check_output_dir

    path = check_outdir(path, option)
    if dist.get_rank() == 0:
        check_output_dir(path, option)
    return path


def resolve_device(device) -> torch.device:
    """`device` as given (checked by :func:`utils.device.resolve_device`), else the torchrun-local default."""
    from utils import dist
    from utils.device import resolve_device as checked_device

    if device is None or str(device).strip() == "":
        return dist.device()
    return checked_device(device, "`device`")


def check_run_settings(settings: RunSettings, *, require_outdir: bool = True) -> None:
    """Checks of the common settings that need no network (one place per parameter)."""
    if require_outdir and not settings.outdir:
        raise UsageError("no output folder; pass `outdir`")
    if settings.batch < 1:
        raise UsageError(f"`batch` must be >= 1, got {settings.batch}")
    if settings.shard_size < 1:
        raise UsageError(f"`shard_size` must be >= 1, got {settings.shard_size}")
    _check_save(settings)
    if settings.save_tar and settings.subdirs:
        raise UsageError("`subdirs` applies to PNG folders; drop it when using `save_tar`")
    if settings.use_wandb not in (0, 1):
        raise UsageError(f"`use_wandb` must be 0 or 1, got {settings.use_wandb}")
    if settings.device is not None:
        resolve_device(settings.device)
    if effective_metrics(settings):  # FD needs 2 images, P/R 4, IS 10: said before sampling
        from metrics.api import check_image_count

        check_image_count(effective_metrics(settings), len(settings.seeds))
    check_reference(settings)
    if settings.outdir:
        check_outdir(settings.outdir)


SAVE_MODES = ("png", "tar", "none")


def _check_save(settings: RunSettings) -> None:
    """`save` png | tar | none, with `save_tar` as a synonym of tar; what streaming (none) needs and excludes."""
    save = str(settings.save or "png").strip().lower()
    if save not in SAVE_MODES:
        raise UsageError(f"`save` {settings.save!r} is not one of {', '.join(SAVE_MODES)}")
    if settings.save_tar and save == "none":
        raise UsageError("`save_tar` and `save` none contradict each other; drop one")
    settings.save = "tar" if settings.save_tar else save
    settings.save_tar = settings.save == "tar"
    if settings.keep < 0:
        raise UsageError(f"`keep` must be >= 0, got {settings.keep}")
    if settings.save != "none":
        for name in ("keep", "save_stats"):
            if getattr(settings, name):
                raise UsageError(f"`{name}` applies to `save` none (metrics while sampling); drop it or pass "
                                 f"`save` none")
        return
    if not effective_metrics(settings):
        raise UsageError("`save` none writes no image, so it needs `metrics` (e.g. fid,fd_dinov2 with "
                         "`ref_path`); or save png")
    if settings.save_npz:
        raise UsageError("`save_npz` needs the images; drop it or save png")
    from metrics.stream import check_streamable

    try:
        check_streamable(settings.metrics)
    except UsageError as exc:
        raise UsageError(f"`metrics`: {exc}".replace("--metrics", "`metrics`").replace("--save png", "`save` png")) from None


# ----------------------------------------------------------------------------
# The settings file and its comparison rule.

def read_json(path: os.PathLike | str) -> Optional[dict]:
    """The JSON object stored at ``path``, or ``None`` when it is missing, unreadable or not an object."""
    try:
        data = json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_saved_settings(outdir: os.PathLike | str) -> Optional[tuple[pathlib.Path, dict]]:
    """``(path, settings)`` saved in ``outdir``: ``settings.json``, else an older name; None when none."""
    outdir = pathlib.Path(outdir)
    for name in (SETTINGS_FILE, *LEGACY_SETTINGS_FILES):
        data = read_json(outdir / name)
        if data is not None:
            return outdir / name, data
    return None


def _comparable(value):
    return json.loads(json.dumps(_plain(value)))


def changed_setting(saved: Mapping[str, Any], new: Mapping[str, Any],
                    keys: Sequence[str]) -> Optional[tuple[str, Any]]:
    """``(key, saved value)`` for the first of ``keys`` whose saved value differs from ``new``; None when all agree.

    Keys absent from ``saved`` are not compared, so folders written by older versions resume.
    Values are compared as JSON (a tuple equals the list it was saved as).
    """
    for key in keys:
        if key in saved and saved[key] != _comparable(new.get(key)):
            return key, saved[key]
    return None


def check_saved_settings(outdir: os.PathLike | str, record: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Refuse a folder whose images were made with other pixel-deciding settings (read-only; every rank)."""
    found = read_saved_settings(outdir)
    if found is None:
        return
    changed = changed_setting(found[1], record, keys)
    if changed:
        key, old = changed
        raise UsageError(f"{outdir} holds images made with different settings ({key}: {old!r} there, "
                         f"{_comparable(record.get(key))!r} now); resume with the same settings or choose another "
                         f"`outdir` so they do not mix")


def write_settings(outdir: os.PathLike | str, record: Mapping[str, Any]) -> pathlib.Path:
    """Save ``record`` as ``outdir/settings.json`` (atomic).  Older settings files are left as they are."""
    path = pathlib.Path(outdir) / SETTINGS_FILE
    write_json_atomic(path, dict(record), indent=2)
    return path


# ----------------------------------------------------------------------------
# Pending seeds and their split over the ranks.

def pending_seeds(seeds: Sequence[int], outdir: os.PathLike | str, device=None) -> list[int]:
    """Seeds of ``seeds`` without a finished image in ``outdir``, in order.

    Rank 0 lists the folder and shares the answer, so every rank splits the same list
    even while another rank is already writing.
    """
    from sampling.writer import done_seeds
    from utils import dist

    device = device if device is not None else torch.device("cpu")
    mask = torch.zeros(len(seeds), dtype=torch.int32)
    if dist.get_rank() == 0:
        done = done_seeds(outdir)
        mask = torch.tensor([s not in done for s in seeds], dtype=torch.int32)
    mask = dist.all_reduce_sum(mask.to(device)).cpu()
    return [s for s, m in zip(seeds, mask.tolist()) if m]


def split_batches(pending: Sequence[int], batch: int, world: int, rank: int) -> list[list[int]]:
    """EDM2's rule: ``ceil(n / (batch * world)) * world`` near-equal batches, dealt round-robin to the ranks."""
    if not pending:
        return []
    num_batches = max((len(pending) - 1) // (batch * world) + 1, 1) * world
    chunks = np.array_split(np.asarray(pending, dtype=np.int64), num_batches)
    return [c.tolist() for c in chunks[rank::world] if len(c)]


# ----------------------------------------------------------------------------
# Backends.

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


# ----------------------------------------------------------------------------
# Loading what the run needs, before the first image.

def load_reference(settings: RunSettings) -> Optional[dict]:
    """The reference statistics the metrics need (loaded now, so a bad reference fails before sampling)."""
    from metrics.api import METRICS, needs_reference
    from metrics.images import is_image_source
    from metrics.refs import load_ref

    if not settings.metrics or not needs_reference(settings.metrics) or not settings.ref_path:
        return None
    if "://" not in str(settings.ref_path):
        path = pathlib.Path(settings.ref_path).expanduser()
        if is_image_source(path):
            return None  # statistics of a folder of reference images are computed with the metrics
        if not path.is_file():
            raise UsageError(f"`ref_path` {path} not found; pass an existing .pkl/.npz (e.g. "
                             f"{_reference_hint(settings.metrics)}) or build one with 'python -m metrics ref'")
    ref = load_ref(settings.ref_path)
    for m in settings.metrics:
        if METRICS[m].needs_reference and METRICS[m].block not in ref:
            raise UsageError(f"`ref_path` {settings.ref_path} has no '{METRICS[m].block}' statistics for {m}; "
                             f"use a reference with them (e.g. {_reference_hint([m])}) or drop {m} from `metrics`")
    return ref


def _detector_kinds(metrics: Sequence[str]) -> list[str]:
    from metrics.api import detectors_for

    return detectors_for(metrics)


def load_detectors(metrics: Sequence[str], device) -> list:
    """Load (and cache) the feature detectors ``metrics`` use, so missing weights fail before sampling."""
    from metrics.detectors import get_detector

    return [get_detector(kind, device) for kind in _detector_kinds(metrics)]


def prefetch(backend: Backend) -> list[str]:
    """Download everything the run needs (networks, VAE, reference statistics, detector weights); sample nothing.

    Joins the torchrun group first, so that rank 0 downloads while the others wait.
    """
    from metrics.detectors import prefetch as fetch_detectors
    from utils import cache, dist

    dist.init()
    settings = backend.settings
    paths = [str(p) for p in backend.fetch()]
    if settings.ref_path:
        local = pathlib.Path(settings.ref_path).expanduser()
        paths.append(str(local) if local.is_dir() else str(cache.fetch(str(settings.ref_path),
                                                                       desc="reference statistics")))
    paths.extend(str(p) for p in fetch_detectors(_detector_kinds(settings.metrics)))
    return paths


# ----------------------------------------------------------------------------
# Outputs.

def open_sinks(settings: RunSettings, outdir: pathlib.Path, stream=None) -> list:
    """Where decoded batches go: objects with ``write(seeds, uint8 NCHW)`` and ``close()`` (context managers).

    `save` png/tar: one :class:`sampling.writer.ImageWriter`.  `save` none: the streaming
    accumulator ``stream`` (:class:`metrics.stream.StreamingStats`), plus a writer of the
    first `keep` seeds' PNGs when asked.
    """
    from sampling.writer import ImageWriter

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
    from metrics.stream import STATE_DIR, StreamingStats

    identity = {k: _comparable(record.get(k)) for k in keys}
    stream = StreamingStats(effective_metrics(settings), settings.seeds, state_dir=outdir / STATE_DIR,
                            settings=identity, device=device)
    if settings.save_stats and stream.pending_seeds() and pathlib.Path(settings.save_stats).expanduser().exists():
        raise UsageError(f"`save_stats` {settings.save_stats} already exists; choose another path (finished "
                         f"outputs are never overwritten)")
    return stream


def _reference_stats(settings: RunSettings, ref: Optional[dict], metrics: Sequence[str], device) -> Optional[dict]:
    """The reference statistics for scoring streamed statistics (a reference image folder is read now)."""
    from metrics.api import compute_stats, detectors_for, needs_reference

    if ref is not None or not needs_reference(metrics):
        return ref
    kinds = detectors_for(metrics, reference_only=True)
    return compute_stats(settings.ref_path, kinds, device=device, progress=False, desc="reference images")


def finish_stream(stream, settings: RunSettings, outdir: pathlib.Path, ref: Optional[dict], metrics: Sequence[str],
                  record: Mapping[str, Any], device) -> dict:
    """All-reduce the streamed statistics, score them, write metrics (once) and `save_stats` on rank 0."""
    from metrics.api import calc_metrics_from_stats, write_metrics
    from metrics.refs import save_ref
    from utils import dist

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


def progress(total: int, enabled: bool, desc: str = "sampling"):
    """The run's progress bar in images (rank 0, on stderr); a do-nothing stand-in when disabled."""
    if not enabled:
        return contextlib.nullcontext(_NoBar())
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True, file=sys.stderr)


class _NoBar:
    n = 0
    total = 0

    def update(self, n: int = 1) -> None:
        pass


def write_npz(outdir: os.PathLike | str, seeds: Sequence[int], path: Optional[os.PathLike] = None) -> pathlib.Path:
    """ADM evaluator input: ``arr_0`` = uint8 NHWC images in seed order, written atomically.

    Defaults to ``<outdir>.npz`` (``.../samples.npz`` beside the images folder).
    """
    from sampling.writer import ImageIndex

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


# ----------------------------------------------------------------------------
# The run.

def generate(backend: Backend, *, progress_bar: bool = True, desc: str = "sampling") -> dict:
    """Make every missing image of ``backend.settings`` in its folder, then the outputs and metrics it asks for.

    Returns the summary ``{"outdir", "requested", "pending", "written" (by this rank), "seconds",
    "metrics" (dict or None), "npz" (path or None)}``.  Runs under torchrun: rank 0 lists
    the finished seeds, the pending ones are dealt to the ranks (:func:`split_batches`).
    """
    from sampling.writer import done_seeds, remove_stale_temps
    from sampling.wandb_log import WandbLogger
    from utils import dist

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
    keys = ("sampler", *backend.identity_keys, "subdirs", "save_tar")
    check_saved_settings(outdir, record, keys)
    stream = open_stream(settings, outdir, record, keys, device)  # save none: reads (and checks) its saved state
    if stream is not None:
        ref = _reference_stats(settings, ref, metrics, device)
    logger = WandbLogger(bool(settings.use_wandb), project=backend.wandb_project, config=record,
                         group=settings.wandb_group, name=settings.wandb_runname, rank=rank)

    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        write_settings(outdir, record)
        remove_stale_temps(outdir)
    dist.barrier()
    if stream is None:
        pending = pending_seeds(settings.seeds, outdir, device)
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

    t0 = time.perf_counter()
    written = 0
    with contextlib.ExitStack() as stack:
        sinks = [stack.enter_context(s) for s in open_sinks(settings, outdir, stream)]
        bar = stack.enter_context(progress(len(pending), progress_bar and rank == 0 and bool(pending), desc))
        for seeds in batches:
            images = backend.images(seeds, device)
            for sink in sinks:
                sink.write(seeds, images)
            written += len(seeds)
            bar.update(min(len(seeds) * world, bar.total - bar.n))
    dist.barrier()
    summary = {"outdir": str(outdir), "requested": len(settings.seeds), "pending": len(pending),
               "written": written, "seconds": time.perf_counter() - t0, "metrics": None, "npz": None}

    if settings.save_npz and rank == 0:
        summary["npz"] = str(write_npz(outdir, settings.seeds))
        print(f"wrote {summary['npz']}", file=sys.stderr)
    dist.barrier()
    if skip_metrics:
        dist.print0(f"metrics skipped: no reference statistics (pass `ref_path`)".replace("`", ""))
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
