"""Public entry points: image statistics, metrics against a reference, result files.

Metric names (``METRICS``):

========================  ===============  ==================================================
name                      detector         result keys
========================  ===============  ==================================================
``fid``                   Inception pool3  ``fid``
``fd_dinov2``             DINOv2 CLS       ``fd_dinov2``
``is``                    Inception probs  ``is``, ``is_std`` (10 splits)
``saturation``            none             ``saturation`` (mean HSV S in [0, 1])
``pr_inception``          Inception pool3  ``precision_inception``, ``recall_inception``
``pr_dinov2``             DINOv2 CLS       ``precision_dinov2``, ``recall_dinov2``
``fd_digits``             digits features  ``fd_digits`` (offline demo, 128-d)
``conf_digits``           digits probs     ``conf_digits`` = exp(E_x KL(p(y|x) || p(y))), 1 split
``sfid``                  Inception tap    ``sfid`` (ADM: mixed_6/conv, 7 channels, 2023-d)
``fd_clip``               CLIP CLS         ``fd_clip`` (CLIP ViT-L/14, as dgm-eval)
``kid_<detector>``        features         ``kid_<detector>``, ``kid_<detector>_std``
``dc_<detector>``         features         ``density_<detector>``, ``coverage_<detector>``
``pr_clip``               CLIP CLS         ``precision_clip``, ``recall_clip``
========================  ===============  ==================================================

Short names (:data:`ALIASES`): ``pr``, ``kid``, ``dc`` are the Inception ones; ``adm`` is
``fid,sfid,is,pr_inception``, the five numbers of ADM's evaluator and DiT's table.
Precision/recall, KID and density/coverage need the reference's feature *rows*: a reference
built with ``python -m metrics ref --features N``, an image folder, or an ADM reference batch
(its ``arr_0`` images; their rows are computed once and cached, :func:`reference_rows`).

FID and FD-DINOv2 compare ``N(mu, sigma)`` of the generated images with the
reference's block ``'fid'`` / ``'fd_dinov2'`` (EDM2's pickles).  Precision and
recall need reference *features*: a reference built with
``python -m metrics ref --features N`` or a reference given as an image folder.
``fd_digits`` and ``conf_digits`` use the offline demo's digit classifier
(detector ``digits``) and its reference ``demo/refs/digits-ref.pkl`` (block
``'fd_digits'``); ``conf_digits`` is the Inception score formula on the
classifier's 10 class probabilities over all images at once (in ``[1, 10]``).

Under torchrun every rank calls the same function; images are split as
``indices[rank::world]``, sums are all-reduced, and every rank gets the same
results.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import io
import json
import os
import pathlib
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import tqdm

from utils.atomic import atomic_path, ensure_dir, write_text_atomic
from utils.cache import cache_dir
from utils.errors import UsageError

from utils import dist
from .detectors import get_detector, output_dims
from .frechet import frechet_distance
from .images import ImageSource, is_image_source, iterate_batches, open_images, select_indices
from .refs import ADM_LAYOUT, NPZ_BLOCKS, load_ref
from .scores import (density_coverage, inception_score, inception_score_from_sums, kernel_distance, precision_recall,
                     saturation_sum)
from .stats import FeatureStats

__all__ = [
    "MetricSpec",
    "METRICS",
    "DETECTOR_ORDER",
    "IS_SPLITS",
    "detectors_for",
    "blocks_for",
    "row_blocks",
    "ALIASES",
    "BLOCKS",
    "STAT_KEYS",
    "PROB_KEYS",
    "parse_metrics",
    "metrics_need",
    "minimum_images",
    "check_image_count",
    "needs_reference",
    "reference_metrics",
    "compute_stats",
    "calc_metrics_from_stats",
    "check_stats_cover",
    "check_resolution",
    "check_ref_covers",
    "block_taps",
    "prepare_reference",
    "reference_rows",
    "is_stats_file",
    "calc_metrics",
    "write_metrics",
]

@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """What one metric reads and computes.

    ``detector``: the detector it runs (a name of :data:`metrics.detectors.LOADERS`), None for pixel
    statistics; ``output``: which output of the detector it reads (``'features'``, ``'spatial'``,
    ``'probs'``); ``kind``: what is computed from it (``'fd'`` Fréchet distance, ``'is'`` Inception
    score, ``'conf'`` one-split score, ``'saturation'``, ``'pr'`` precision/recall, ``'kid'`` kernel
    distance, ``'dc'`` density/coverage); ``min_images``: the fewest images it can be computed from.
    """

    detector: Optional[str]
    output: Optional[str]
    kind: str
    min_images: int

    @property
    def needs_reference(self) -> bool:
        """Compares against a reference (FD, precision/recall, KID, density/coverage)."""
        return self.kind in ("fd",) + ROW_KINDS

    @property
    def block(self) -> Optional[str]:
        """Name of the statistics block it reads in a reference or statistics dict (``'fid'``, ...)."""
        return BLOCKS.get((self.detector, self.output))

    @property
    def needs_rows(self) -> bool:
        """Needs every feature row (float16), not only running sums (P/R, KID, density/coverage)."""
        return self.kind in ROW_KINDS


IS_SPLITS = 10
ROW_KINDS = ("pr", "kid", "dc")
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 2020  # torch-fidelity's defaults
DC_K = 5  # density/coverage neighbourhood (Naeem et al. 2020)
METRICS: Dict[str, MetricSpec] = {
    "fid": MetricSpec("inception", "features", "fd", 2),
    "fd_dinov2": MetricSpec("dinov2", "features", "fd", 2),
    "is": MetricSpec("inception", "probs", "is", IS_SPLITS),
    "saturation": MetricSpec(None, None, "saturation", 2),
    "pr_inception": MetricSpec("inception", "features", "pr", 4),
    "pr_dinov2": MetricSpec("dinov2", "features", "pr", 4),
    "fd_digits": MetricSpec("digits", "features", "fd", 2),
    "conf_digits": MetricSpec("digits", "probs", "conf", 2),
    "sfid": MetricSpec("inception", "spatial", "fd", 2),
    "kid_inception": MetricSpec("inception", "features", "kid", 2),
    "kid_dinov2": MetricSpec("dinov2", "features", "kid", 2),
    "dc_inception": MetricSpec("inception", "features", "dc", DC_K + 1),
    "dc_dinov2": MetricSpec("dinov2", "features", "dc", DC_K + 1),
    "fd_clip": MetricSpec("clip", "features", "fd", 2),
    "pr_clip": MetricSpec("clip", "features", "pr", 4),
    "kid_clip": MetricSpec("clip", "features", "kid", 2),
    "dc_clip": MetricSpec("clip", "features", "dc", DC_K + 1),
}
# short names -> metric names; 'adm' is the ADM evaluator's five numbers (DiT's table)
ALIASES = {"pr": ("pr_inception",), "kid": ("kid_inception",), "dc": ("dc_inception",),
           "adm": ("fid", "sfid", "is", "pr_inception")}
# detector -> name of its statistics block in a reference (EDM2's names; 'fd_digits' for the demo)
STAT_KEYS = {"inception": "fid", "dinov2": "fd_dinov2", "digits": "fd_digits", "clip": "fd_clip"}
# (detector, output) -> statistics block; 'sfid' is ADM's mu_s / sigma_s
BLOCKS = {**{(kind, "features"): key for kind, key in STAT_KEYS.items()}, ("inception", "spatial"): "sfid"}
# detector -> key of its class probabilities in compute_stats' result
PROB_KEYS = {"inception": "probs", "digits": "probs_digits"}
# the order detectors run in (and are listed in)
DETECTOR_ORDER = tuple(STAT_KEYS)

Images = Union[str, os.PathLike, ImageSource, Iterable]


def detectors_for(metrics: Sequence[str], *, reference_only: bool = False) -> list[str]:
    """The detectors the metrics ``metrics`` run, in :data:`DETECTOR_ORDER`, each once.

    ``reference_only``: only those of the metrics that compare against a reference
    (what a reference's statistics must hold).
    """
    kinds = {METRICS[m].detector for m in metrics
             if METRICS[m].detector and (not reference_only or METRICS[m].needs_reference)}
    return sorted(kinds, key=DETECTOR_ORDER.index)


def blocks_for(metrics: Sequence[str], *, reference_only: bool = False) -> list[str]:
    """The statistics blocks (``'fid'``, ``'sfid'``, ...) the metrics ``metrics`` read, each once."""
    out = []
    for m in metrics:
        spec = METRICS[m]
        if spec.block and (not reference_only or spec.needs_reference) and spec.block not in out:
            out.append(spec.block)
    return out


def row_blocks(metrics: Sequence[str]) -> list[str]:
    """The blocks whose feature rows the metrics ``metrics`` need (P/R, KID, density/coverage)."""
    return [b for b in blocks_for([m for m in metrics if METRICS[m].needs_rows])]


def metrics_need(names: Sequence[str], what: str) -> str:
    """``metric 'is' needs <what>`` / ``metrics 'fid', 'is' need <what>``: the names quoted (``is`` is
    also a verb), the verb agreeing with their number."""
    quoted = ", ".join(f"'{n}'" for n in names)
    return f"metric {quoted} needs {what}" if len(names) == 1 else f"metrics {quoted} need {what}"


def _asked(metric: str) -> str:
    """``metric`` with the short name that stands for it alone (``kid_inception (kid)``)."""
    short = [a for a, names in ALIASES.items() if names == (metric,)]
    return f"{metric} ({short[0]})" if short else metric


DETECTOR_TITLES = {"inception": "Inception", "dinov2": "DINOv2", "digits": "digits-classifier", "clip": "CLIP"}


def _needs_text(metric: str) -> str:
    """What ``metric`` reads in a reference or statistics file, in words, with its block's name."""
    spec = METRICS[metric]
    if spec.needs_rows:
        return f"{DETECTOR_TITLES[spec.detector]} feature rows (block '{spec.block}' with 'features')"
    return f"'{spec.block}' statistics"


def _fd_metric(block: str) -> str:
    """The Fréchet metric whose statistics are ``block`` (what 'python -m metrics ref --metrics' takes)."""
    return next(m for m, spec in METRICS.items() if spec.kind == "fd" and spec.block == block)


def _has_blocks(ref: Mapping[str, Any]) -> str:
    """What a reference or statistics file holds: ``it has 'fid' (mu, sigma), 'fd_dinov2' (mu, sigma, features)``."""
    blocks = [f"'{k}' ({', '.join(f for f in ('mu', 'sigma', 'features') if v.get(f) is not None)})"
              for k, v in ref.items() if isinstance(v, Mapping) and ("mu" in v or "features" in v)]
    return f"it has {', '.join(blocks)}" if blocks else "it has no statistics blocks"


def minimum_images(names: Sequence[str]) -> int:
    """Fewest images the metrics ``names`` can be computed from (IS: one per split; P/R: 4; FD: 2)."""
    return max([METRICS[m].min_images for m in names] or [0])


def check_image_count(names: Sequence[str], n: int) -> None:
    """Raise :class:`UsageError` before sampling when ``n`` images are too few for the metrics ``names``."""
    need = minimum_images(names)
    if n < need:
        raise UsageError(f"`metrics`: {_too_few(names, n)}, the run makes {n}; sample at least {need} images or "
                         f"drop {', '.join(m for m in names if METRICS[m].min_images > n)}")


def _too_few(names: Sequence[str], n: int) -> str:
    """``metric 'is' needs at least 10 images``: only the metrics that ``n`` images are too few for."""
    short = [m for m in names if METRICS[m].min_images > n]
    needs = {m: METRICS[m].min_images for m in short}
    if len(set(needs.values())) == 1:
        return metrics_need(short, f"at least {minimum_images(short)} images")
    return metrics_need(short, "more images (" + ", ".join(f"{m}: {k}" for m, k in needs.items()) + ")")


def parse_metrics(metrics: Union[str, Sequence[str]]) -> list[str]:
    """``'fid,fd_dinov2'`` or a sequence -> validated list of metric names (order kept, no duplicates)."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out = []
    for name in (n.strip().lower() for n in names):
        for name in ALIASES.get(name, (name,)):
            if not name or name in out:
                continue
            if name not in METRICS:
                raise UsageError(f"unknown metric '{name}'; choose from {','.join([*METRICS, *ALIASES])}")
            out.append(name)
    if not out:
        raise UsageError(f"no metrics given; choose from {','.join(METRICS)}")
    return out


def reference_metrics(metrics: Sequence[str]) -> list[str]:
    """Those of ``metrics`` that compare against reference statistics (FD, precision/recall, KID,
    density/coverage; not IS, confidence or saturation), in the order given."""
    return [m for m in metrics if METRICS[m].needs_reference]


def needs_reference(metrics: Sequence[str]) -> bool:
    """Whether any of ``metrics`` compares against reference statistics (FD, precision/recall)."""
    return bool(reference_metrics(metrics))


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _to_nchw_uint8(batch) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(batch) if not isinstance(batch, torch.Tensor) else batch)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or x.dtype != torch.uint8:
        raise UsageError(f"image batches must be uint8 NHWC with 1 or 3 channels, got {tuple(x.shape)} {x.dtype}")
    x = x.permute(0, 3, 1, 2)
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x.contiguous()


def _local_batches(images: Images, num: Optional[int], batch: int, seed: int):
    """(uint8 NCHW batch iterator for this rank, number of batches or None, global image count)."""
    if isinstance(images, (str, os.PathLike, ImageSource)):
        source = images if isinstance(images, ImageSource) else open_images(images)
        indices = select_indices(len(source), num, seed)
        local = indices[dist.get_rank()::dist.get_world_size()]
        return iterate_batches(source, local, batch), -(-len(local) // batch), len(indices)

    def gen():
        seen = 0
        for b in images:
            x = _to_nchw_uint8(b)
            if num is not None:
                x = x[: max(num - seen, 0)]
            if x.shape[0]:
                seen += x.shape[0]
                yield x
            if num is not None and seen >= num:
                break
    sized = num is None and hasattr(images, "__len__")  # a list of batches, or an iterable that knows its length
    return gen(), (len(images) if sized else None), None


def block_taps(blocks: Sequence[str]) -> Dict[str, tuple]:
    """block name -> (detector, output)."""
    inverse = {key: tap for tap, key in BLOCKS.items()}
    unknown = [b for b in blocks if b not in inverse]
    if unknown:
        raise ValueError(f"unknown statistics block(s) {unknown}; known: {sorted(inverse)}")
    return {b: inverse[b] for b in blocks}


def check_resolution(expected, got, where: str, what: str = "these images") -> None:
    """Refuse images whose size ``got`` (H, W) differs from the reference's ``expected`` (when known)."""
    if expected is None or got is None:
        return
    expected, got = [int(v) for v in expected], [int(v) for v in got]
    if expected != got:
        raise UsageError(f"{where} was made from {expected[1]}x{expected[0]} images but {what} are "
                         f"{got[1]}x{got[0]}; use a reference of the same resolution "
                         f"('python -m metrics ref' on {got[1]}x{got[0]} images)")


def compute_stats(images: Images, detectors: Sequence[str] = ("inception", "dinov2"), *,
                  blocks: Optional[Sequence[str]] = None,
                  probs: Union[bool, Sequence[str]] = False, saturation: bool = False,
                  keep_features: Union[bool, Sequence[str]] = False,
                  num: Optional[int] = None, batch: int = 64, seed: int = 0, device=None,
                  detector_kwargs: Optional[Mapping[str, dict]] = None, resolution=None,
                  progress: bool = True, desc: str = "images") -> Dict[str, Any]:
    """Statistics of ``images`` for the given detectors, in EDM2's reference layout.

    Returns ``{'num_images': N, 'resolution': [H, W], 'fid': {'mu', 'sigma'[, 'features']},
    'fd_dinov2': {...}}`` plus class probabilities and ``'saturation'`` when asked: ``probs=True``
    keeps the Inception ``'probs'`` [N, 1008]; a list of detectors keeps each one's rows under
    :data:`PROB_KEYS` (``'probs'`` for inception, ``'probs_digits'`` [N, 10] for digits).
    ``blocks``: the statistics blocks to accumulate (default: the ``features`` block of each
    detector; ``'sfid'`` adds Inception's spatial tap).  ``keep_features``: keep the feature
    rows (float16) of every ``features`` block (True) or of the named blocks.
    ``resolution``: the reference's (H, W), checked against the first batch.
    ``images``: a folder/zip/tar/npz path, an :class:`ImageSource`, or an
    iterable of uint8 NHWC batches (under torchrun: this rank's share; its ``len()``, when it has one, is
    the number of batches the progress bar counts to).  The bar (rank 0, ``progress``) is not shown when
    there is no batch to read, and its last state drawn is the finished count, before it is cleared.
    """
    device = torch.device(device) if device is not None else _default_device()
    blocks = [STAT_KEYS[k] for k in detectors] if blocks is None else list(blocks)
    taps = block_taps(blocks)
    kinds = sorted({*detectors, *(k for k, _ in taps.values())}, key=DETECTOR_ORDER.index)
    batches, num_batches, total = _local_batches(images, num, batch, seed)
    kwargs = dict(detector_kwargs or {})
    dets = {kind: get_detector(kind, device, **kwargs.get(kind, {})) for kind in kinds}
    prob_kinds = (["inception"] if probs else []) if isinstance(probs, bool) else list(probs)
    for kind in prob_kinds:
        if kind not in dets or kind not in PROB_KEYS:
            raise ValueError(f"probs of {kind!r} need the {kind} detector in detectors (and one with probs)")
    keep = ([b for b, (_, out) in taps.items() if out == "features"] if keep_features is True
            else list(keep_features or []))
    stats = {b: FeatureStats(output_dims(dets[k])[out], keep_rows=b in keep, device=device)
             for b, (k, out) in taps.items()}
    prob_rows: Dict[str, list] = {kind: [] for kind in prob_kinds}
    sat = 0.0
    count = 0
    size = None
    bar = tqdm.tqdm(total=num_batches, desc=desc, unit="batch", leave=False,
                    disable=not progress or dist.get_rank() != 0 or num_batches == 0)
    try:
        for x in batches:
            if size is None:
                size = list(x.shape[-2:])
                check_resolution(resolution, size, "the reference")
            elif list(x.shape[-2:]) != size:
                raise UsageError(f"images of {x.shape[-1]}x{x.shape[-2]} and {size[1]}x{size[0]} pixels are mixed; "
                                 f"all images must have the same size")
            count += x.shape[0]
            if saturation:
                sat += saturation_sum(x)
            x = x.to(device)
            for kind, det in dets.items():
                out = det(x)
                for b, (k, name) in taps.items():
                    if k == kind:
                        stats[b].append(out[name])
                if kind in prob_rows:
                    prob_rows[kind].append(out["probs"].double().cpu())
            bar.update(1)
        bar.refresh()  # the finished count is the last state drawn (a log file keeps it, not 0%)
    finally:
        bar.close()
    if total is None and num is not None and count < num:
        raise UsageError(f"asked for {num} images but the batches held only {count}; lower --num or generate more")
    result: Dict[str, Any] = {}
    n = int(dist.all_reduce_sum(torch.tensor([count], dtype=torch.int64)).item())
    if total is not None and n != total:
        raise RuntimeError(f"read {n} images, expected {total}")
    if n < 2:
        raise UsageError(f"found {n} image(s); statistics need at least 2, give more images")
    result["num_images"] = n
    if size is not None:
        result["resolution"] = size
    for b, st in stats.items():
        mu, sigma = st.reduce().mean_cov()
        block = {"mu": mu, "sigma": sigma}
        if b in keep:
            block["features"] = st.features()
        result[b] = block
    for kind, rows in prob_rows.items():
        width = 1008 if kind == "inception" else 10
        local = torch.cat(rows) if rows else torch.zeros([0, width], dtype=torch.float64)
        result[PROB_KEYS[kind]] = dist.gather_rows(local).numpy()
    if saturation:
        result["saturation"] = float(dist.all_reduce_sum(torch.tensor([sat], dtype=torch.float64)).item()) / n
    return result


def _class_score(stats: Mapping[str, Any], kind: str, splits: int) -> tuple[float, float]:
    """Inception-score formula from probability rows or, for streamed statistics, per-split sums."""
    key = PROB_KEYS[kind]
    if key in stats:
        return inception_score(stats[key], splits)
    sums = stats[f"{key}_splits"]
    if np.asarray(sums["count"]).size != splits:
        raise UsageError(f"the statistics hold {np.asarray(sums['count']).size} split(s) of '{key}', "
                         f"the score needs {splits}")
    return inception_score_from_sums(sums["count"], sums["sum"], sums["plogp"])


def _needed_block(stats: Mapping[str, Any], metric: str) -> tuple[str, bool]:
    """(what ``metric`` reads in statistics, whether ``stats`` has it)."""
    spec = METRICS[metric]
    if spec.kind in ("is", "conf"):
        key = PROB_KEYS[spec.detector]
        return f"{key}_splits", key in stats or f"{key}_splits" in stats
    if spec.kind == "saturation":
        return "saturation", "saturation" in stats
    ok = spec.block in stats and (not spec.needs_rows or stats[spec.block].get("features") is not None)
    return spec.block, ok


def check_stats_cover(stats: Mapping[str, Any], metrics: Sequence[str], where: str) -> None:
    """Refuse statistics (a ``--save_stats`` file) that lack what ``metrics`` need."""
    for metric in parse_metrics(metrics):
        need, ok = _needed_block(stats, metric)
        if not ok:
            what = _needs_text(metric) if METRICS[metric].block else f"'{need}' statistics"
            raise UsageError(f"{where} has no {what}, which {_asked(metric)} needs ({_has_blocks(stats)}); drop "
                             f"{metric} from --metrics or compute the statistics with it")


def _rows(block: Mapping[str, Any]) -> np.ndarray:
    """A block's feature rows as the row metrics see them: rounded to float16 (as stored while streaming)."""
    return np.asarray(block["features"]).astype(np.float16)


def calc_metrics_from_stats(stats: Mapping[str, Any], ref: Optional[Mapping[str, Any]],
                            metrics: Sequence[str], device=None) -> Dict[str, float]:
    """Turn statistics (from :func:`compute_stats`) and a reference into metric values.

    Result keys: the metric's name for FD-type scores and ``conf_digits``; ``is``/``is_std``;
    ``precision_<detector>``/``recall_<detector>``; ``kid_<detector>``/``kid_<detector>_std``;
    ``density_<detector>``/``coverage_<detector>``; ``saturation``; and ``num_images``.
    """
    names = parse_metrics(metrics)
    if ref is not None and any(METRICS[m].needs_reference for m in names):
        check_resolution(ref.get("resolution"), stats.get("resolution"), "the reference",
                         "the scored images")
    results: Dict[str, float] = {}
    for metric in names:
        spec = METRICS[metric]
        kind, what, key = spec.detector, spec.kind, spec.block
        if what == "fd":
            a, b = stats[key], ref[key]
            results[metric] = frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
        elif what == "is":
            results["is"], results["is_std"] = _class_score(stats, kind, IS_SPLITS)
        elif what == "conf":
            results[metric] = _class_score(stats, kind, 1)[0]
        elif what == "saturation":
            results["saturation"] = stats["saturation"]
        elif what == "pr":
            p, r = precision_recall(_rows(ref[key]), _rows(stats[key]), k=3, device=device)
            results[f"precision_{kind}"], results[f"recall_{kind}"] = p, r
        elif what == "kid":
            results[f"kid_{kind}"], results[f"kid_{kind}_std"] = kernel_distance(
                _rows(stats[key]), _rows(ref[key]), KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED, device=device)
        elif what == "dc":
            results[f"density_{kind}"], results[f"coverage_{kind}"] = density_coverage(
                _rows(ref[key]), _rows(stats[key]), k=DC_K, device=device)
    results["num_images"] = int(stats["num_images"])
    return results


def check_ref_covers(ref: Mapping[str, Any], metrics: Sequence[str], where: str) -> None:
    """Refuse a reference that lacks what ``metrics`` need: one line naming what it has and what is needed."""

    keys = ref.get("npz_keys")
    for metric in metrics:
        spec = METRICS[metric]
        if not spec.needs_reference:
            continue
        key = spec.block
        if keys is not None:  # an .npz: name its keys
            if spec.needs_rows and not (key in ref and ref[key].get("features") is not None) and "images" in ref:
                continue  # the rows come from arr_0
            need = ("arr_0",) if spec.needs_rows else NPZ_BLOCKS.get(key)
            if need is None:
                raise UsageError(f"{where} is an .npz (keys {', '.join(keys)}); {metric} needs '{key}' statistics, "
                                 f"which only a reference pickle holds ('python -m metrics ref')")
            if not all(k in keys for k in need):
                raise UsageError(f"{where} has keys {', '.join(keys)}; {metric} needs {', '.join(need)} "
                                 f"(ADM reference batch layout: {ADM_LAYOUT})")
            continue
        if spec.needs_rows and (key not in ref or ref[key].get("features") is None):
            raise UsageError(f"{where} has no {_needs_text(metric)}, which {_asked(metric)} needs "
                             f"({_has_blocks(ref)}); rebuild it with 'python -m metrics ref --metrics "
                             f"{_fd_metric(key)} --features 50000', pass an image folder as --ref, or drop "
                             f"{metric} from --metrics")
        if key not in ref:
            raise UsageError(f"{where} has no {_needs_text(metric)}, which {_asked(metric)} needs "
                             f"({_has_blocks(ref)}); use a reference that has them or drop {metric} from --metrics")


def _sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def reference_rows(ref: Dict[str, Any], blocks: Sequence[str], *, batch: int = 64, device=None,
                   detector_kwargs: Optional[Mapping[str, dict]] = None, progress: bool = True) -> Dict[str, Any]:
    """Fill in the feature rows of ``blocks`` from an ADM reference batch's ``arr_0`` images.

    Rows are computed once and cached as ``<cache>/ref-features/<sha256 of the .npz>-<block>[-<options>].npy``
    (float16), beside the weights cache (:func:`utils.cache.cache_dir`).  Blocks that already have rows
    are left alone.  Returns ``ref``.
    """

    todo = [b for b in blocks if not (b in ref and ref[b].get("features") is not None)]
    if not todo or "images" not in ref:
        return ref
    path = ref["images"]["path"]
    sha = _sha256(path)
    kwargs = dict(detector_kwargs or {})
    for block in todo:
        kind = block_taps([block])[block][0]
        options = kwargs.get(kind) or {}
        tag = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:8]
        cached = cache_dir() / "ref-features" / f"{sha}-{block}{'-' + tag if options else ''}.npy"
        rows = None
        if cached.is_file():
            try:
                rows = np.load(cached, allow_pickle=False)
            except (ValueError, OSError):
                rows = None  # a damaged cache file: computed again
        if rows is None or rows.ndim != 2 or rows.shape[0] != ref["images"]["count"]:
            stats = compute_stats(path, [kind], blocks=[block], keep_features=[block], batch=batch, device=device,
                                  detector_kwargs=detector_kwargs, progress=progress, desc="reference images")
            rows = stats[block]["features"]
            if dist.get_rank() == 0:
                ensure_dir(cached.parent)
                with atomic_path(cached, suffix=".tmp.npy") as tmp:
                    np.save(tmp, rows)
        ref.setdefault(block, {})["features"] = rows
    return ref


def is_stats_file(path: Union[str, os.PathLike]) -> bool:
    """True for a statistics pickle (``--save_stats`` / ``python -m metrics ref`` output) given as images."""
    p = pathlib.Path(path)
    return p.is_file() and p.name.lower().endswith(".pkl")


def _reference(ref_path, need_ref: Sequence[str], *, batch, device, detector_kwargs, progress):
    """The reference of ``need_ref``: statistics of an image folder, or a loaded file (checked, no rows yet)."""
    if ref_path is None:
        raise UsageError(f"{metrics_need(need_ref, 'reference statistics')}; pass `ref_path`")
    if is_image_source(ref_path):
        return compute_stats(ref_path, detectors_for(need_ref), blocks=blocks_for(need_ref),
                             keep_features=row_blocks(need_ref), batch=batch, device=device,
                             detector_kwargs=detector_kwargs, progress=progress, desc="reference images")
    ref = load_ref(ref_path)
    check_ref_covers(ref, need_ref, str(ref_path))
    return ref


def prepare_reference(ref_path: Optional[Union[str, os.PathLike]], metrics: Sequence[str], *,
                      ref: Optional[Mapping[str, Any]] = None, batch: int = 64, device=None,
                      detector_kwargs: Optional[Mapping[str, dict]] = None, progress: bool = True):
    """The reference for scoring statistics with :func:`calc_metrics_from_stats` (None if no metric needs one).

    ``ref`` (already loaded) or ``ref_path`` (a file, URL or image folder) is checked to cover
    ``metrics`` and given the feature rows the row metrics need (an ADM batch's ``arr_0``: computed
    once, then cached; see :func:`reference_rows`).
    """
    need_ref = [m for m in parse_metrics(metrics) if METRICS[m].needs_reference]
    if not need_ref:
        return ref
    opts = dict(batch=batch, device=device, detector_kwargs=detector_kwargs, progress=progress)
    if ref is None:
        ref = _reference(ref_path, need_ref, **opts)
    check_ref_covers(ref, need_ref, str(ref_path) if ref_path is not None else "the reference")
    return reference_rows(dict(ref), row_blocks(need_ref), **opts)


def _first_resolution(source: ImageSource, indices) -> Optional[list]:
    if len(indices) == 0:
        return None
    return list(source.load(int(indices[0])).shape[:2])


def calc_metrics(images: Images, metrics: Union[str, Sequence[str]] = ("fid", "fd_dinov2"),
                 ref_path: Optional[Union[str, os.PathLike]] = None, num: Optional[int] = None,
                 batch: int = 64, device=None, *, seed: int = 0, ref: Optional[Mapping[str, Any]] = None,
                 detector_kwargs: Optional[Mapping[str, dict]] = None,
                 progress: bool = True) -> Dict[str, float]:
    """Compute ``metrics`` of ``images`` against the reference at ``ref_path`` (or a loaded ``ref``).

    ``ref_path``: an EDM2-format ``.pkl``, an ADM reference batch ``.npz`` (``mu``/``sigma`` for
    FID, ``mu_s``/``sigma_s`` for sFID, ``arr_0`` images for the row metrics; pytorch-fid's
    ``mu``/``sigma`` alone for FID), a URL (fetched into the cache), or an image
    folder/zip/tar/npz whose statistics are computed.  A reference that lacks what the metrics
    need is refused before any image is read.
    ``num`` images are drawn with ``seed`` (all when None); fewer present is an error.
    ``images`` may also be a statistics ``.pkl`` (``--save_stats``, :mod:`metrics.stream`):
    then no detector runs and the metrics come from its sums.
    Returns ``{metric: value, ..., 'num_images': N}``; identical on every torchrun rank.
    """
    names = parse_metrics(metrics)
    device = torch.device(device) if device is not None else _default_device()
    need_ref = [m for m in names if METRICS[m].needs_reference]
    detectors = detectors_for(names)
    where = str(ref_path) if ref_path is not None else "the reference"
    opts = dict(batch=batch, device=device, detector_kwargs=detector_kwargs, progress=progress)

    if isinstance(images, (str, os.PathLike)) and is_stats_file(images):
        if num is not None:
            raise UsageError(f"{images} holds statistics, not images; --num cannot pick images from it, drop --num")
        stats = load_ref(images)  # a --save_stats file: no detector runs
        check_stats_cover(stats, names, str(images))
        if need_ref and ref is None:
            ref = _reference(ref_path, need_ref, **opts)
        if need_ref:
            check_ref_covers(ref, need_ref, where)
            ref = reference_rows(dict(ref), row_blocks(need_ref), **opts)
        return calc_metrics_from_stats(stats, ref, names, device=device)

    # Validate cheap things (reference, image count, resolution) before loading any network.
    if isinstance(images, (str, os.PathLike)):
        images = open_images(images)
    if need_ref and ref is None and (ref_path is None or not is_image_source(ref_path)):
        ref = _reference(ref_path, need_ref, **opts)
    if need_ref and ref is not None:
        check_ref_covers(ref, need_ref, where)
    if isinstance(images, ImageSource):
        indices = select_indices(len(images), num, seed)
        minimum = minimum_images(names)
        if (num or len(images)) < minimum:
            raise UsageError(f"{_too_few(names, num or len(images))}, found {num or len(images)}; "
                             + ("raise --num" if num is not None and num < len(images) else "give more images"))
        if need_ref and ref is not None:
            check_resolution(ref.get("resolution"), _first_resolution(images, indices), where)
    if need_ref and ref is None:
        ref = _reference(ref_path, need_ref, **opts)  # an image folder: its statistics now
    kwargs = dict(detector_kwargs or {})
    for kind in detectors:  # loads (and caches) the networks
        det = get_detector(kind, device, **kwargs.get(kind, {}))
        for block in blocks_for([m for m in need_ref if METRICS[m].detector == kind]):
            if ref is None or block not in ref or "mu" not in ref[block]:
                continue
            dim = np.asarray(ref[block]["mu"]).reshape(-1).shape[0]
            want = output_dims(det)[block_taps([block])[block][1]]
            if dim != want:
                raise UsageError(f"{where}: '{block}' statistics have {dim} features but the {kind} detector "
                                 f"gives {want}; use a reference made with this detector "
                                 f"('python -m metrics ref')")
    if need_ref:
        ref = reference_rows(dict(ref), row_blocks(need_ref), **opts)

    prob_kinds = [METRICS[m].detector for m in names if METRICS[m].kind in ("is", "conf")]
    stats = compute_stats(images, detectors, blocks=blocks_for(names), probs=prob_kinds,
                          saturation="saturation" in names, keep_features=row_blocks(names), num=num, seed=seed,
                          resolution=ref.get("resolution") if need_ref else None, **opts)
    return calc_metrics_from_stats(stats, ref, names, device=device)


# ----------------------------------------------------------------------------
# Result files.


def _free_name(run_dir: pathlib.Path, stem: str) -> str:
    """``stem`` or ``stem-1``, ``stem-2``, ... so that neither .json nor .csv exists yet."""
    k = 0
    while True:
        name = stem if k == 0 else f"{stem}-{k}"
        if not (run_dir / f"{name}.json").exists() and not (run_dir / f"{name}.csv").exists():
            return name
        k += 1


def _plain(value):
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_metrics(run_dir: Union[str, os.PathLike], results: Mapping[str, Any], args: Mapping[str, Any],
                  wandb_log: bool = False) -> tuple[pathlib.Path, pathlib.Path]:
    """Write ``metrics.json`` and a one-row ``metrics.csv`` (run arguments, then results) in ``run_dir``.

    Earlier result files are never overwritten: a second call writes
    ``metrics-1.json``/``.csv`` and so on.  With ``wandb_log`` the results are
    also logged to the active wandb run, if any.  Returns the two paths.
    """
    run_dir = ensure_dir(run_dir)
    name = _free_name(run_dir, "metrics")
    args = {k: _plain(v) for k, v in args.items()}
    results = {k: _plain(v) for k, v in results.items()}
    doc = {"results": results, "args": args,
           "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    json_path, csv_path = run_dir / f"{name}.json", run_dir / f"{name}.csv"
    write_text_atomic(json_path, json.dumps(doc, indent=2) + "\n")
    row = {**{k: json.dumps(v) if isinstance(v, list) else v for k, v in args.items()}, **results}
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(row))
    writer.writeheader()
    writer.writerow(row)
    write_text_atomic(csv_path, buf.getvalue())
    if wandb_log:
        try:
            import wandb
        except ImportError:
            wandb = None
        if wandb is not None and wandb.run is not None:
            wandb.log({f"metrics/{k}": v for k, v in results.items()})
    return json_path, csv_path
