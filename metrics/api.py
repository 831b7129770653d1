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
========================  ===============  ==================================================

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
import io
import json
import os
import pathlib
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
import tqdm

from utils.atomic import ensure_dir, write_text_atomic
from utils.errors import UsageError

from utils import dist
from .detectors import get_detector
from .frechet import frechet_distance
from .images import ImageSource, is_image_source, iterate_batches, open_images, select_indices
from .refs import load_ref
from .scores import inception_score, inception_score_from_sums, precision_recall, saturation_sum
from .stats import FeatureStats

__all__ = [
    "MetricSpec",
    "METRICS",
    "DETECTOR_ORDER",
    "IS_SPLITS",
    "detectors_for",
    "STAT_KEYS",
    "PROB_KEYS",
    "parse_metrics",
    "minimum_images",
    "check_image_count",
    "needs_reference",
    "compute_stats",
    "calc_metrics_from_stats",
    "check_stats_cover",
    "is_stats_file",
    "calc_metrics",
    "write_metrics",
]

@dataclasses.dataclass(frozen=True)
class MetricSpec:
    """What one metric reads and computes.

    ``detector``: the detector it runs (a name of :data:`metrics.detectors.LOADERS`), None for pixel
    statistics; ``output``: which output of the detector it reads (``'features'``, ``'probs'``);
    ``kind``: what is computed from it (``'fd'`` Fréchet distance, ``'is'`` Inception score,
    ``'conf'`` one-split score, ``'saturation'``, ``'pr'`` precision/recall); ``min_images``:
    the fewest images it can be computed from.
    """

    detector: Optional[str]
    output: Optional[str]
    kind: str
    min_images: int

    @property
    def needs_reference(self) -> bool:
        """Compares against reference statistics (FD, precision/recall)."""
        return self.kind in ("fd", "pr")

    @property
    def block(self) -> Optional[str]:
        """Name of the statistics block it reads in a reference or statistics dict (``'fid'``, ...)."""
        return STAT_KEYS.get(self.detector) if self.output == "features" else None

    @property
    def needs_rows(self) -> bool:
        """Needs every feature row, not only running sums (precision/recall)."""
        return self.kind == "pr"


IS_SPLITS = 10
METRICS: Dict[str, MetricSpec] = {
    "fid": MetricSpec("inception", "features", "fd", 2),
    "fd_dinov2": MetricSpec("dinov2", "features", "fd", 2),
    "is": MetricSpec("inception", "probs", "is", IS_SPLITS),
    "saturation": MetricSpec(None, None, "saturation", 2),
    "pr_inception": MetricSpec("inception", "features", "pr", 4),
    "pr_dinov2": MetricSpec("dinov2", "features", "pr", 4),
    "fd_digits": MetricSpec("digits", "features", "fd", 2),
    "conf_digits": MetricSpec("digits", "probs", "conf", 2),
}
# detector -> name of its statistics block in a reference (EDM2's names; 'fd_digits' for the demo)
STAT_KEYS = {"inception": "fid", "dinov2": "fd_dinov2", "digits": "fd_digits"}
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


def minimum_images(names: Sequence[str]) -> int:
    """Fewest images the metrics ``names`` can be computed from (IS: one per split; P/R: 4; FD: 2)."""
    return max([METRICS[m].min_images for m in names] or [0])


def check_image_count(names: Sequence[str], n: int) -> None:
    """Raise :class:`UsageError` before sampling when ``n`` images are too few for the metrics ``names``."""
    need = minimum_images(names)
    if n < need:
        raise UsageError(f"`metrics` {','.join(names)} needs at least {need} images, the run makes {n}; "
                         f"sample more seeds or drop {'is' if 'is' in names and need == IS_SPLITS else 'the metrics'}")


def parse_metrics(metrics: Union[str, Sequence[str]]) -> list[str]:
    """``'fid,fd_dinov2'`` or a sequence -> validated list of metric names (order kept, no duplicates)."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    out = []
    for name in (n.strip().lower() for n in names):
        if not name or name in out:
            continue
        if name not in METRICS:
            raise UsageError(f"unknown metric '{name}'; choose from {','.join(METRICS)}")
        out.append(name)
    if not out:
        raise UsageError(f"no metrics given; choose from {','.join(METRICS)}")
    return out


def needs_reference(metrics: Sequence[str]) -> bool:
    """Whether any of ``metrics`` compares against reference statistics (FD, precision/recall)."""
    return any(METRICS[m].needs_reference for m in metrics)


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
    return gen(), None, None


def compute_stats(images: Images, detectors: Sequence[str] = ("inception", "dinov2"), *,
                  probs: Union[bool, Sequence[str]] = False, saturation: bool = False, keep_features: bool = False,
                  num: Optional[int] = None, batch: int = 64, seed: int = 0, device=None,
                  detector_kwargs: Optional[Mapping[str, dict]] = None,
                  progress: bool = True, desc: str = "images") -> Dict[str, Any]:
    """Statistics of ``images`` for the given detectors, in EDM2's reference layout.

    Returns ``{'num_images': N, 'fid': {'mu', 'sigma'[, 'features']}, 'fd_dinov2': {...}}``
    plus class probabilities and ``'saturation'`` when asked: ``probs=True`` keeps the
    Inception ``'probs'`` [N, 1008]; a list of detectors keeps each one's rows under
    :data:`PROB_KEYS` (``'probs'`` for inception, ``'probs_digits'`` [N, 10] for digits).
    ``images``: a folder/zip/tar/npz path, an :class:`ImageSource`, or an
    iterable of uint8 NHWC batches (under torchrun: this rank's share).
    """
    device = torch.device(device) if device is not None else _default_device()
    batches, num_batches, total = _local_batches(images, num, batch, seed)
    kwargs = dict(detector_kwargs or {})
    dets = {kind: get_detector(kind, device, **kwargs.get(kind, {})) for kind in detectors}
    prob_kinds = (["inception"] if probs else []) if isinstance(probs, bool) else list(probs)
    for kind in prob_kinds:
        if kind not in dets or kind not in PROB_KEYS:
            raise ValueError(f"probs of {kind!r} need the {kind} detector in detectors (and one with probs)")
    stats = {kind: FeatureStats(det.feature_dim, keep_rows=keep_features, device=device)
             for kind, det in dets.items()}
    prob_rows: Dict[str, list] = {kind: [] for kind in prob_kinds}
    sat = 0.0
    count = 0
    bar = tqdm.tqdm(batches, total=num_batches, desc=desc, unit="batch",
                    disable=not progress or dist.get_rank() != 0, leave=False)
    for x in bar:
        count += x.shape[0]
        if saturation:
            sat += saturation_sum(x)
        x = x.to(device)
        for kind, det in dets.items():
            out = det(x)
            stats[kind].append(out["features"])
            if kind in prob_rows:
                prob_rows[kind].append(out["probs"].double().cpu())
    if total is None and num is not None and count < num:
        raise UsageError(f"asked for {num} images but the batches held only {count}; lower --num or generate more")
    result: Dict[str, Any] = {}
    n = int(dist.all_reduce_sum(torch.tensor([count], dtype=torch.int64)).item())
    if total is not None and n != total:
        raise RuntimeError(f"read {n} images, expected {total}")
    if n < 2:
        raise UsageError(f"found {n} image(s); statistics need at least 2, point --images at more")
    result["num_images"] = n
    for kind, st in stats.items():
        mu, sigma = st.reduce().mean_cov()
        block = {"mu": mu, "sigma": sigma}
        if keep_features:
            block["features"] = st.features()
        result[STAT_KEYS[kind]] = block
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


def check_stats_cover(stats: Mapping[str, Any], metrics: Sequence[str], where: str) -> None:
    """Refuse statistics (a ``--save_stats`` file) that lack what ``metrics`` need."""
    for metric in parse_metrics(metrics):
        kind, what = METRICS[metric].detector, METRICS[metric].kind
        need = {"fd": STAT_KEYS.get(kind), "pr": STAT_KEYS.get(kind), "saturation": "saturation"}.get(what)
        if what in ("is", "conf"):
            ok = PROB_KEYS[kind] in stats or f"{PROB_KEYS[kind]}_splits" in stats
            need = f"{PROB_KEYS[kind]}_splits"
        else:
            ok = need in stats and (what != "pr" or stats[need].get("features") is not None)
        if not ok:
            raise UsageError(f"{where} has no '{need}' statistics needed for {metric}; drop {metric} from "
                             f"--metrics or compute the statistics with it")


def calc_metrics_from_stats(stats: Mapping[str, Any], ref: Optional[Mapping[str, Any]],
                            metrics: Sequence[str], device=None) -> Dict[str, float]:
    """Turn statistics (from :func:`compute_stats`) and a reference into metric values."""
    results: Dict[str, float] = {}
    for metric in parse_metrics(metrics):
        kind, what = METRICS[metric].detector, METRICS[metric].kind
        if what == "fd":
            key = STAT_KEYS[kind]
            a, b = stats[key], ref[key]
            results[metric] = frechet_distance(a["mu"], a["sigma"], b["mu"], b["sigma"])
        elif what == "is":
            results["is"], results["is_std"] = _class_score(stats, kind, IS_SPLITS)
        elif what == "conf":
            results[metric] = _class_score(stats, kind, 1)[0]
        elif what == "saturation":
            results["saturation"] = stats["saturation"]
        elif what == "pr":
            key = STAT_KEYS[kind]
            p, r = precision_recall(ref[key]["features"], stats[key]["features"], k=3, device=device)
            results[f"precision_{kind}"], results[f"recall_{kind}"] = p, r
    results["num_images"] = int(stats["num_images"])
    return results


def _check_ref_covers(ref: Mapping[str, Any], metrics: Sequence[str], where: str) -> None:
    for metric in metrics:
        kind, what = METRICS[metric].detector, METRICS[metric].kind
        if not METRICS[metric].needs_reference:
            continue
        key = STAT_KEYS[kind]
        if key not in ref:
            raise UsageError(f"{where} has no '{key}' statistics needed for {metric}; "
                             f"use a reference that has them or drop {metric} from --metrics")
        if what == "pr" and ref[key].get("features") is None:
            raise UsageError(f"{where} has no '{key}' features needed for {metric}; rebuild it with "
                             f"'python -m metrics ref --features 50000' or pass an image folder as --ref")


def is_stats_file(path: Union[str, os.PathLike]) -> bool:
    """True for a statistics pickle (``--save_stats`` / ``python -m metrics ref`` output) given as images."""
    p = pathlib.Path(path)
    return p.is_file() and p.name.lower().endswith(".pkl")


def calc_metrics(images: Images, metrics: Union[str, Sequence[str]] = ("fid", "fd_dinov2"),
                 ref_path: Optional[Union[str, os.PathLike]] = None, num: Optional[int] = None,
                 batch: int = 64, device=None, *, seed: int = 0, ref: Optional[Mapping[str, Any]] = None,
                 detector_kwargs: Optional[Mapping[str, dict]] = None,
                 progress: bool = True) -> Dict[str, float]:
    """Compute ``metrics`` of ``images`` against the reference at ``ref_path`` (or a loaded ``ref``).

    ``ref_path``: an EDM2-format ``.pkl``, an FID-only ``.npz`` (``mu``/``sigma``), a URL
    (fetched into the cache), or an image folder/zip/tar/npz whose statistics are computed.
    ``num`` images are drawn with ``seed`` (all when None); fewer present is an error.
    ``images`` may also be a statistics ``.pkl`` (``--save_stats``, :mod:`metrics.stream`):
    then no detector runs and the metrics come from its sums.
    Returns ``{metric: value, ..., 'num_images': N}``; identical on every torchrun rank.
    """
    names = parse_metrics(metrics)
    device = torch.device(device) if device is not None else _default_device()
    need_ref = [m for m in names if METRICS[m].needs_reference]
    detectors = detectors_for(names)
    need_feats = any(METRICS[m].needs_rows for m in names)

    if isinstance(images, (str, os.PathLike)) and is_stats_file(images):
        if num is not None:
            raise UsageError(f"{images} holds statistics, not images; --num cannot pick images from it, drop --num")
        stats = load_ref(images)  # a --save_stats file: no detector runs
        check_stats_cover(stats, names, str(images))
        if need_ref and ref is None:
            if ref_path is None:
                raise UsageError(f"metrics {','.join(need_ref)} need reference statistics; pass --ref / ref_path")
            ref = load_ref(ref_path) if not is_image_source(ref_path) else compute_stats(
                ref_path, detectors_for(need_ref), batch=batch,
                device=device, detector_kwargs=detector_kwargs, progress=progress, desc="reference images")
        if need_ref:
            _check_ref_covers(ref, need_ref, str(ref_path) if ref_path is not None else "the reference")
        return calc_metrics_from_stats(stats, ref, names, device=device)

    # Validate cheap things (reference, image count) before loading any network.
    if isinstance(images, (str, os.PathLike)):
        images = open_images(images)
    if isinstance(images, ImageSource):
        select_indices(len(images), num, seed)
        minimum = minimum_images(names)
        if (num or len(images)) < minimum:
            raise UsageError(f"{','.join(names)} need at least {minimum} images, found {num or len(images)}; "
                             f"point --images at more")
    if need_ref and ref is None:
        if ref_path is None:
            raise UsageError(f"metrics {','.join(need_ref)} need reference statistics; pass --ref / ref_path")
        if is_image_source(ref_path):
            ref = compute_stats(ref_path, detectors_for(need_ref), keep_features=need_feats, batch=batch, device=device,
                                detector_kwargs=detector_kwargs, progress=progress, desc="reference images")
        else:
            ref = load_ref(ref_path)
    where = str(ref_path) if ref_path is not None else "the reference"
    if need_ref:
        _check_ref_covers(ref, need_ref, where)
    kwargs = dict(detector_kwargs or {})
    for kind in detectors:  # loads (and caches) the networks
        det = get_detector(kind, device, **kwargs.get(kind, {}))
        key = STAT_KEYS[kind]
        if ref is not None and key in ref and kind in detectors_for(need_ref):
            dim = np.asarray(ref[key]["mu"]).reshape(-1).shape[0]
            if dim != det.feature_dim:
                raise UsageError(f"{where}: '{key}' statistics have {dim} features but the {kind} detector "
                                 f"gives {det.feature_dim}; use a reference made with this detector "
                                 f"('python -m metrics ref')")

    prob_kinds = [METRICS[m].detector for m in names if METRICS[m].kind in ("is", "conf")]
    stats = compute_stats(images, detectors, probs=prob_kinds, saturation="saturation" in names,
                          keep_features=need_feats, num=num, batch=batch, seed=seed, device=device,
                          detector_kwargs=detector_kwargs, progress=progress)
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
