"""The settings every sampling run has, whatever its model, and their checks (no I/O, no network).

The backends' configurations (:class:`sampling.edm2_run.GenerateConfig`,
:class:`sampling.dit_run.DiTConfig`) extend :class:`RunSettings`;
:func:`check_run_settings` checks the common fields once.  Its errors name the
*parameters* they are about (`` `seeds` ``, :attr:`utils.errors.UsageError.params`);
each command line writes them once in its own flag spelling (:func:`utils.cli.flag_spelling`).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Optional, Sequence

import torch

from metrics.api import check_image_count, metrics_need, needs_reference, reference_metrics
from metrics.api import parse_metrics as parse
from metrics.stream import check_streamable
from networks.zoo import DEMO_REF, REFS
from sampling.run_folder import check_outdir, json_value
from sampling.seeds import parse_int_list
from utils import dist
from utils.bounds import bounded, check_bounds
from utils.device import resolve_device as checked_device
from utils.errors import UsageError, spell
from utils.ranges import compact_ranges

__all__ = ["MAX_SEED", "SAVE_MODES", "save_mode", "RunSettings", "compact_seeds", "parse_seeds", "parse_metrics",
           "reference_hint", "check_reference", "effective_metrics", "warn_unused", "resolve_device",
           "check_run_settings"]

MAX_SEED = 9_999_999  # image files are named by a 7-digit seed


@dataclasses.dataclass
class RunSettings:
    """What any sampling run needs besides its model: where, which seeds, how to write and score.

    The backends' configurations (:class:`sampling.edm2_run.GenerateConfig`,
    :class:`sampling.dit_run.DiTConfig`) extend this class with their own fields.
    """
    outdir: Optional[str] = None          # folder of the images (created)
    seeds: list = dataclasses.field(default_factory=list)
    batch: int = bounded(32, lo=1)        # images per batch on each process
    subdirs: bool = False                 # PNGs in per-1000 folders
    save_tar: bool = False                # tar shards of PNGs instead of loose PNGs
    save_npz: bool = False                # also <outdir>.npz (arr_0, uint8 NHWC) for the ADM evaluator
    save: str = "png"                     # png | tar | none (none: metrics while sampling, no image files)
    keep: int = bounded(0, lo=0)          # with save none: still write the first `keep` seeds' PNGs
    save_stats: Optional[str] = None      # with save none: the run's feature statistics (EDM2 pickle layout)
    shard_size: int = bounded(1000, lo=1)  # PNGs per tar shard
    metrics: tuple = ()                   # names of metrics.api.METRICS
    ref_path: Optional[str] = None        # reference statistics (path or URL)
    require_reference: bool = True        # False: metrics needing a missing reference are skipped with a note
    use_wandb: int = 0
    wandb_group: Optional[str] = None
    wandb_runname: Optional[str] = None
    device: Optional[str] = None          # None: cuda:<LOCAL_RANK> when available, else cpu

    def to_json(self) -> dict:
        """The settings as saved beside the images (seeds compacted to ranges, tuples as lists)."""
        record = {k: json_value(v) for k, v in dataclasses.asdict(self).items()}
        record["seeds"] = compact_seeds(self.seeds)
        record["num_images"] = len(self.seeds)
        return record


def compact_seeds(seeds: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2,5'`` (order kept)."""
    return compact_ranges(seeds)


def parse_seeds(text) -> list[int]:
    """The one seed rule: ``'0-49999'``, ``'1,2,5-10'`` or a list, each in ``0..MAX_SEED``.

    Bounds are checked before a range is expanded; a seed listed twice is made once (with a warning).
    """
    seeds = parse_int_list(text, "`seeds`", lo=0, hi=MAX_SEED)
    if not seeds:
        raise UsageError("`seeds` is empty; give e.g. 0-49999")
    unique = list(dict.fromkeys(seeds))
    if len(unique) != len(seeds):
        print(spell(f"warning: `seeds` lists {len(seeds) - len(unique)} seed(s) more than once; each image is "
                    f"made once"), file=sys.stderr)
    return unique


def parse_metrics(metrics) -> tuple:
    """``'fid,fd_dinov2'``, ``'fid fd_dinov2'`` or a list -> names of :data:`metrics.api.METRICS`; none -> ()."""
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


def reference_hint(metrics: Sequence[str]) -> str:
    """An example reference for ``metrics`` (the digits demo's or ImageNet 512's)."""
    return DEMO_REF if any(m.endswith("_digits") for m in metrics) else REFS["img512"]


def check_reference(settings: RunSettings) -> None:
    """Metrics that compare against a reference need `ref_path` (unless the sampler skips them).  No I/O."""
    need = reference_metrics(settings.metrics or ())
    if need and not settings.ref_path and settings.require_reference:
        raise UsageError(f"`metrics`: {metrics_need(need, 'reference statistics')}; pass `ref_path` "
                         f"(e.g. {reference_hint(need)})")


def effective_metrics(settings: RunSettings) -> tuple:
    """The metrics the run computes: all asked for, or none when they need a reference that the sampler
    may skip (``require_reference=False``) and none was given."""
    if settings.metrics and needs_reference(settings.metrics) and not settings.ref_path \
            and not settings.require_reference:
        return ()
    return tuple(settings.metrics)


def warn_unused(names: Sequence[str], by: str) -> None:
    """Say once (rank 0, stderr, in the running command's flags) that the options ``names`` are not used by ``by``
    and are ignored: the references ignore them silently, and a script may pass them by mistake."""
    if names:
        one = len(names) == 1
        dist.print0(spell(f"warning: {' and '.join(f'`{n}`' for n in names)} {'is' if one else 'are'} not used by "
                          f"{by}; ignoring {'it' if one else 'them'}"), file=sys.stderr)


def resolve_device(device) -> torch.device:
    """`device` as given (checked by :func:`utils.device.resolve_device`), else the torchrun-local default."""
    if device is None or str(device).strip() == "":
        return dist.device()
    return checked_device(device, "`device`")


def check_run_settings(settings: RunSettings, *, require_outdir: bool = True) -> None:
    """Checks of the common settings that need no network (one place per parameter)."""
    if require_outdir and not settings.outdir:
        raise UsageError("no output folder; pass `outdir`")
    check_bounds(type(settings), vars(settings))  # batch, keep, shard_size and the backend's bounded fields
    _check_save(settings)
    if settings.save_tar and settings.subdirs:
        raise UsageError("`subdirs` applies to PNG folders; drop it when using `save_tar`")
    if settings.use_wandb not in (0, 1):
        raise UsageError(f"`use_wandb` must be 0 or 1, got {settings.use_wandb}")
    if settings.device is not None:
        resolve_device(settings.device)
    if effective_metrics(settings):  # FD needs 2 images, P/R 4, IS 10: said before sampling

        check_image_count(effective_metrics(settings), len(settings.seeds))
    check_reference(settings)
    if settings.outdir:
        check_outdir(settings.outdir)


SAVE_MODES = ("png", "tar", "none")


def save_mode(save: Optional[str], save_tar: bool = False) -> str:
    """The output mode of the options `save` (png | tar | none; None: png) and `save_tar` (a synonym of tar).

    The samplers' ``build_config`` store it as ``save`` (and ``save_tar = save == "tar"``).
    """
    mode = str(save or "png").strip().lower()
    if mode not in SAVE_MODES:
        raise UsageError(f"`save` {save!r} is not one of {', '.join(SAVE_MODES)}")
    if save_tar and mode == "none":
        raise UsageError("`save_tar` and `save` none contradict each other; drop one")
    return "tar" if save_tar else mode


def _check_save(settings: RunSettings) -> None:
    """What `save` none (streaming) needs and excludes; `save` as :func:`save_mode` gives it.  Changes nothing."""
    if settings.save not in SAVE_MODES or settings.save_tar != (settings.save == "tar"):
        raise UsageError(f"`save` {settings.save!r} with `save_tar` {settings.save_tar} is not an output mode; "
                         f"build the settings with sampling.run_settings.save_mode")
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

    try:
        check_streamable(settings.metrics)
    except UsageError as exc:
        raise UsageError(f"`metrics`: {exc}".replace("--metrics", "`metrics`").replace("--save png", "`save` png")) from None
