"""Metrics while sampling: detector statistics accumulated batch by batch, resumable, no image files.

:class:`StreamingStats` receives the decoded uint8 images of a sampling run
together with their seeds, on the sampling device, and keeps per detector the
float64 sums ``N``, ``sum f`` and ``sum f f^T`` (:class:`metrics.stats.FeatureStats`),
for the Inception score the per-split sums of ``p(y|x)`` and of
``sum_y p log p`` (:func:`metrics.scores.inception_score_from_sums`), and the
saturation sum; for the metrics that need every image (precision/recall, KID,
density/coverage) each image's detector features, rounded to float16 and kept per chunk
(``rows/chunk-KKKKKK.pt`` in the state folder: 4 KiB per image for Inception's 2048
features, 2 KiB for DINOv2's 1024).  Nothing else of an image is kept.

Same numbers as write-then-score
    Detector features of an image can depend (at ~1e-7) on the other images
    of its batch, so images reach the detectors in fixed *chunks*: the run's
    seeds sorted, cut into consecutive groups of ``batch`` (64, the default
    ``--batch`` of ``python -m metrics calc``).  ``python -m metrics calc`` on
    the PNGs of the same seeds (named by seed, so sorted by seed) feeds the
    same chunks, and one process adds them in the same order, so the sums agree
    bit for bit; across ranks or resumes only the float64 summation order of
    whole chunks changes (~1e-16).  :meth:`StreamingStats.plan` deals whole
    chunks to the ranks (round robin), so no chunk is split between ranks.

Resumable
    Every ``save_every`` images each rank writes its sums and the chunks they
    cover, with the run's settings, atomically to ``state_dir/stream-gGGGG-rRRRR.pt``
    (generation ``G`` = one launch).  A new launch reads every file, skips
    the chunks they cover, and rank 0 starts from their summed statistics; its
    first file lists the files it absorbed (``supersedes``), which are then
    ignored and deleted, so a kill at any moment loses at most the unsaved
    chunks and never counts a chunk twice.  When a run finishes, rank 0 writes
    one ``complete`` file; a rerun then samples nothing and reports the same
    numbers.  Different settings (seeds, metrics, chunk size, detector options,
    the caller's image settings) are refused with one line.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
import torch

from utils.ranges import compact_ranges
from utils import dist
from utils.atomic import atomic_path
from utils.errors import UsageError

from .api import (IS_SPLITS, METRICS, PROB_KEYS, block_taps, blocks_for, detectors_for, metrics_need, minimum_images,
                  parse_metrics, row_blocks)
from .detectors import get_detector, output_dims
from .scores import saturation_sum
from .stats import FeatureStats

__all__ = ["StreamingStats", "check_streamable", "split_sums_key", "combine_stats", "STATE_DIR", "DEFAULT_SAVE_EVERY"]

STATE_DIR = "stream_state"
DEFAULT_SAVE_EVERY = 1000
_FORMAT = "swg-stream-2"  # 2: blocks by name (fid, sfid, ...), float16 rows per chunk, resolution
ROWS_DIR = "rows"
_FILE_RE = re.compile(r"^stream-g(\d+)-r(\d+)\.pt$")
_TEMP_RE = re.compile(r"^\.stream-g(\d+)-r\d+\.pt\..*\.tmp\.pt$")  # left by a save killed midway
# detector with class probabilities -> number of Inception-score splits of its metric, number of classes
_SPLITS = {"inception": IS_SPLITS, "digits": 1}
_CLASSES = {"inception": 1008, "digits": 10}


def split_sums_key(kind: str) -> str:
    """Name of a detector's per-split probability sums in a statistics dict (``'probs_splits'``, ...)."""
    return f"{PROB_KEYS[kind]}_splits"


def check_streamable(metrics: Sequence[str]) -> list[str]:
    """Validated metric names for streaming (every metric: the row metrics keep float16 rows per chunk)."""
    return parse_metrics(metrics)




def _plain_json(obj: Any) -> Any:
    """``obj`` as JSON would give it back (tuples -> lists, ...), for comparisons with saved settings."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


class StreamingStats:
    """Streaming detector statistics of one sampling run (see the module docstring).

    ``metrics``: names of :data:`metrics.api.METRICS` (no precision/recall);
    ``seeds``: every seed of the run; ``state_dir``: where partial statistics
    are kept (None: not resumable); ``settings``: the caller's run settings,
    which a resumed run must repeat; ``batch``: images per detector call
    (the chunk size); ``save_every``: images between saves of a rank
    (default :data:`DEFAULT_SAVE_EVERY`).

    Use: ``plan(sampler_batch)`` -> this rank's seed batches to sample;
    ``update(seeds, images)`` for each decoded batch (any order, uint8 NCHW);
    ``finish()`` -> the all-reduced statistics (same on every rank).
    """

    def __init__(self, metrics: Sequence[str], seeds: Sequence[int], *, state_dir=None,
                 settings: Optional[Mapping[str, Any]] = None, batch: int = 64,
                 save_every: Optional[int] = None, device=None,
                 detector_kwargs: Optional[Mapping[str, dict]] = None):
        self.metrics = check_streamable(metrics)
        self.seeds = sorted({int(s) for s in seeds})
        n = len(self.seeds)
        minimum = minimum_images(self.metrics)
        if n < minimum:
            raise UsageError(f"{metrics_need(self.metrics, f'at least {minimum} images')}, the run has {n}; "
                             f"give more --seeds")
        save_every = DEFAULT_SAVE_EVERY if save_every is None else save_every
        if batch < 1 or save_every < 1:
            raise UsageError(f"the detector batch and the save interval must be >= 1, got {batch} and {save_every}")
        self.batch = int(batch)
        self.save_every = int(save_every)
        self.device = torch.device(device) if device is not None else dist.device()
        self.position = {s: i for i, s in enumerate(self.seeds)}
        self.chunks = [self.seeds[i:i + self.batch] for i in range(0, n, self.batch)]
        self.kinds = detectors_for(self.metrics)
        self.prob_kinds = [METRICS[m].detector for m in self.metrics if METRICS[m].kind in ("is", "conf")]
        self.saturation = "saturation" in self.metrics
        kwargs = dict(detector_kwargs or {})
        self.settings = _plain_json({
            "format": _FORMAT, "metrics": self.metrics, "seeds": compact_ranges(self.seeds), "batch": self.batch,
            "detectors": {k: kwargs.get(k, {}) for k in self.kinds}, "run": dict(settings or {})})
        self.state_dir = pathlib.Path(state_dir).expanduser() if state_dir is not None else None

        self.detectors = {kind: get_detector(kind, self.device, **kwargs.get(kind, {})) for kind in self.kinds}
        self.taps = block_taps(blocks_for(self.metrics))  # block -> (detector, output)
        self.features = {b: FeatureStats(output_dims(self.detectors[k])[out], device=self.device)
                         for b, (k, out) in self.taps.items()}
        self.rows: Dict[str, Dict[int, torch.Tensor]] = {b: {} for b in row_blocks(self.metrics)}  # float16, CPU
        self._unsaved_rows: set = set()
        self.resolution: Optional[list] = None
        self.splits = {}
        for kind in self.prob_kinds:
            s = _SPLITS[kind]
            bounds = np.array([i * n // s for i in range(s + 1)])
            self.splits[kind] = {
                "of": torch.as_tensor(np.searchsorted(bounds, np.arange(n), side="right") - 1, device=self.device),
                "count": torch.zeros([s], dtype=torch.float64, device=self.device),
                "sum": torch.zeros([s, _CLASSES[kind]], dtype=torch.float64, device=self.device),
                "plogp": torch.zeros([s], dtype=torch.float64, device=self.device)}
        self.num = 0
        self.sat_sum = 0.0
        self._buffer: Dict[int, Dict[int, torch.Tensor]] = {}
        self.covered: set = set()  # chunk indices in these statistics (on rank 0: the absorbed files too)
        self.done_before: set = set()  # chunk indices covered by earlier launches (every rank)
        self._unsaved = 0
        self._gen = 1
        self._absorbed: list = []
        self._absorbed_complete = False
        self._saved_once = False
        if self.state_dir is not None:
            self._load()

    # ------------------------------------------------------------------ state files

    def _state_files(self) -> list:
        if self.state_dir is None or not self.state_dir.is_dir():
            return []
        return sorted(p for p in self.state_dir.iterdir() if _FILE_RE.match(p.name))

    def _read(self, path: pathlib.Path) -> dict:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise UsageError(f"cannot read streaming statistics {path} ({type(exc).__name__}); delete it "
                             f"(its images are sampled again)") from exc
        if not isinstance(state, dict) or state.get("format") != _FORMAT:
            raise UsageError(f"{path} is not a streaming-statistics file of this version; move it away")
        saved = json.loads(state["settings"])
        if saved != self.settings:
            key = next((k for k in self.settings if saved.get(k) != self.settings[k]), "format")
            if key == "run":
                key = next((f"run.{k}" for k in {**saved["run"], **self.settings["run"]}
                            if saved["run"].get(k) != self.settings["run"].get(k)), key)
                old = saved["run"].get(key[4:])
            else:
                old = saved.get(key)
            raise UsageError(f"{self.state_dir} holds streaming statistics made with other settings "
                             f"({key}: {old!r} there); repeat those settings or use another --outdir")
        return state

    def _load(self) -> None:
        """Read every state file (all ranks), skip superseded ones, absorb the rest on rank 0."""
        files = self._state_files()
        states = {p.name: self._read(p) for p in files}
        gone = {name for st in states.values() for name in st["supersedes"]}
        live = {name: st for name, st in states.items() if name not in gone}
        self._gen = 1 + max((int(_FILE_RE.match(n).group(1)) for n in states), default=0)
        for name, st in sorted(live.items()):
            chunks = set(st["chunks"])
            if chunks & self.done_before:
                raise UsageError(f"{self.state_dir}: {name} repeats chunks of another state file; "
                                 f"delete the folder to start the statistics afresh")
            self.done_before |= chunks
        self._absorbed = sorted(states)
        self._absorbed_complete = len(live) == 1 and all(st.get("complete") for st in live.values())
        if dist.get_rank() == 0:
            for st in live.values():
                self._absorb(st)
            self.covered = set(self.done_before)
            self._remove_killed_saves()
        dist.barrier()  # every rank has read the folder before anyone writes or deletes in it

    def _remove_killed_saves(self) -> None:
        """Delete the temporary files of saves killed midway (rank 0, before :meth:`_load`'s barrier).

        Before the barrier no rank of this launch writes, so every temporary file is a
        dead one; after it the other ranks save their rows (``rows/.chunk-*.tmp.pt``,
        which name no generation) and deleting those would fail their saves.
        """
        if not self.state_dir.is_dir():
            return
        for p in self.state_dir.iterdir():
            m = _TEMP_RE.match(p.name)
            if m and int(m.group(1)) < self._gen:
                p.unlink(missing_ok=True)
        rows_dir = self.state_dir / ROWS_DIR
        for p in rows_dir.iterdir() if rows_dir.is_dir() else ():
            if p.name.startswith("."):  # a rows file whose save was killed midway
                p.unlink(missing_ok=True)

    def _absorb(self, st: Mapping[str, Any]) -> None:
        self.num += int(st["num"])
        self.sat_sum += float(st["saturation"])
        self.resolution = self.resolution or st.get("resolution")
        for b, fs in self.features.items():
            fs.num += int(st["features"][b]["num"])
            fs.sum += st["features"][b]["sum"].to(self.device)
            fs.sum_outer += st["features"][b]["sum_outer"].to(self.device)
        for k in st["chunks"] if self.rows else ():
            path = self._rows_path(k)
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
                for b in self.rows:
                    self.rows[b][k] = saved[b]
            except Exception as exc:
                raise UsageError(f"cannot read the feature rows {path} ({type(exc).__name__}); delete "
                                 f"{self.state_dir} to start the statistics afresh") from exc
        for kind, sp in self.splits.items():
            block = st["splits"][kind]
            sp["count"] += block["count"].to(self.device)
            sp["plogp"] += block["plogp"].to(self.device)
            sp["sum"] += block["sum"].to(self.device)

    def _state(self, complete: bool = False) -> dict:
        return {
            "format": _FORMAT, "settings": json.dumps(self.settings, sort_keys=True),
            "chunks": sorted(self.covered), "seeds": compact_ranges([s for k in sorted(self.covered) for s in self.chunks[k]]),
            "num": self.num, "saturation": self.sat_sum, "complete": complete, "resolution": self.resolution,
            "supersedes": list(self._absorbed) if dist.get_rank() == 0 else [],
            "features": {b: {"num": fs.num, "sum": fs.sum.cpu(), "sum_outer": fs.sum_outer.cpu()}
                         for b, fs in self.features.items()},
            "splits": {k: {"count": sp["count"].cpu(), "plogp": sp["plogp"].cpu(),
                           "sum": sp["sum"].cpu()} for k, sp in self.splits.items()},
        }

    def _write(self, state: dict, name: str) -> None:
        with atomic_path(self.state_dir / name, suffix=".tmp.pt") as tmp:
            torch.save(state, tmp)

    def _drop_absorbed(self, keep: str) -> None:
        for name in self._absorbed:
            if name != keep:
                (self.state_dir / name).unlink(missing_ok=True)

    def _rows_path(self, k: int) -> pathlib.Path:
        return self.state_dir / ROWS_DIR / f"chunk-{k:06d}.pt"

    def save(self) -> None:
        """Write this rank's statistics (atomic); a no-op without ``state_dir`` or new chunks.

        The float16 feature rows of each new chunk go to their own file first
        (``rows/chunk-KKKKKK.pt``, written once), then the sums and the list of chunks.
        """
        if self.state_dir is None or self._unsaved == 0:
            return
        for k in sorted(self._unsaved_rows):
            self._rows_path(k).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._rows_path(k), suffix=".tmp.pt") as tmp:
                torch.save({b: rows[k] for b, rows in self.rows.items()}, tmp)
        self._unsaved_rows.clear()
        name = f"stream-g{self._gen:04d}-r{dist.get_rank():04d}.pt"
        self._write(self._state(), name)
        if dist.get_rank() == 0 and not self._saved_once:
            self._drop_absorbed(name)
        self._unsaved = 0
        self._saved_once = True

    # ------------------------------------------------------------------ sampling side

    @property
    def pending_chunks(self) -> list:
        """Chunk indices no earlier launch covered (the same list on every rank)."""
        return [k for k in range(len(self.chunks)) if k not in self.done_before]

    def pending_seeds(self) -> list:
        return [s for k in self.pending_chunks for s in self.chunks[k]]

    def plan(self, batch: int, rank: Optional[int] = None, world: Optional[int] = None) -> list:
        """This rank's seed batches (at most ``batch`` seeds each): whole pending chunks dealt round robin."""
        rank = dist.get_rank() if rank is None else rank
        world = dist.get_world_size() if world is None else world
        mine = [s for k in self.pending_chunks[rank::world] for s in self.chunks[k]]
        return [mine[i:i + batch] for i in range(0, len(mine), batch)]

    def update(self, seeds: Sequence[int], images: torch.Tensor) -> None:
        """Take a decoded batch (uint8 NCHW, RGB or grey) of ``seeds``; run the detectors on completed chunks."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[0] != len(seeds):
            raise ValueError(f"expected {len(seeds)} uint8 NCHW images, got {tuple(images.shape)} {images.dtype}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        for seed, image in zip(seeds, images):
            seed = int(seed)
            if seed not in self.position:
                raise ValueError(f"seed {seed} is not one of this run's seeds")
            k = self.position[seed] // self.batch
            if k in self.covered or k in self.done_before or seed in self._buffer.get(k, {}):
                raise ValueError(f"seed {seed} was already counted")
            self._buffer.setdefault(k, {})[seed] = image.to(self.device)
            if len(self._buffer[k]) == len(self.chunks[k]):
                self._add_chunk(k, self._buffer.pop(k))
        if self._unsaved >= self.save_every:
            self.save()

    # The sink interface of the sampling run (``write(seeds, uint8 NCHW)``, ``close()``, a context manager).
    write = update

    def close(self) -> None:
        """Save the completed chunks not saved yet (the statistics are finished by :meth:`finish`)."""
        self.save()

    def __enter__(self) -> "StreamingStats":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def _add_chunk(self, k: int, images: Dict[int, torch.Tensor]) -> None:
        x = torch.stack([images[s] for s in self.chunks[k]])
        if self.saturation:
            self.sat_sum += saturation_sum(x)
        positions = torch.tensor([self.position[s] for s in self.chunks[k]], device=self.device)
        self.resolution = self.resolution or [int(v) for v in x.shape[-2:]]
        for kind, det in self.detectors.items():
            out = det(x)
            for b, (tap_kind, name) in self.taps.items():
                if tap_kind == kind:
                    self.features[b].append(out[name])
                    if b in self.rows:
                        self.rows[b][k] = out[name].detach().to(torch.float16).cpu()
                        self._unsaved_rows.add(k)
            if kind in self.splits:
                self._add_probs(self.splits[kind], out["probs"], positions)
        self.num += x.shape[0]
        self.covered.add(k)
        self._unsaved += x.shape[0]

    @staticmethod
    def _add_probs(sp: dict, probs: torch.Tensor, positions: torch.Tensor) -> None:
        p = probs.detach().to(positions.device, torch.float64)
        split = sp["of"][positions]
        sp["sum"].index_add_(0, split, p)
        plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p))
        sp["plogp"].index_add_(0, split, plogp.sum(1))
        sp["count"].index_add_(0, split, torch.ones_like(split, dtype=torch.float64))

    # ------------------------------------------------------------------ the end

    def finish(self) -> Dict[str, Any]:
        """Sum over ranks; write the ``complete`` state; return statistics in EDM2's reference layout.

        The result holds ``num_images``, ``{'mu', 'sigma'}`` per detector block
        (``'fid'``, ``'fd_dinov2'``, ``'fd_digits'``), per-split probability sums
        (``'probs_splits'``: ``count``, ``sum``, ``plogp``) and ``'saturation'``
        (the mean), as :func:`metrics.api.calc_metrics_from_stats` reads them.
        """
        if self._buffer:
            k = min(self._buffer)
            raise RuntimeError(f"chunk {k} got {len(self._buffer[k])} of {len(self.chunks[k])} images; "
                               f"feed every seed of plan()")
        self.save()
        fresh = int(dist.all_reduce_sum(torch.tensor([len(self.covered - self.done_before)], dtype=torch.int64,
                                                     device=self.device)).item())
        num = int(dist.all_reduce_sum(torch.tensor([self.num], dtype=torch.int64, device=self.device)).item())
        if num != len(self.seeds):
            raise RuntimeError(f"the statistics cover {num} images but the run has {len(self.seeds)} seeds")
        sat = float(dist.all_reduce_sum(torch.tensor([self.sat_sum], dtype=torch.float64, device=self.device)).item())
        for fs in self.features.values():
            fs.reduce()
        for b, rows in self.rows.items():  # each chunk's rows live on one rank: a sum with zeros gathers them
            full = torch.zeros([len(self.seeds), self.features[b].dim], dtype=torch.float32)
            for k, r in rows.items():
                full[k * self.batch:k * self.batch + r.shape[0]] = r.float()
            full = dist.all_reduce_sum(full).to(torch.float16)
            self.rows[b] = {k: full[k * self.batch:(k + 1) * self.batch] for k in range(len(self.chunks))}
        # image size: known on the ranks that saw a chunk (all the same); [H, W, ranks that know it] summed
        res = dist.all_reduce_sum(torch.tensor([*(self.resolution or [0, 0]), int(self.resolution is not None)],
                                               dtype=torch.int64, device=self.device)).tolist()
        self.resolution = [res[0] // res[2], res[1] // res[2]] if res[2] else None
        for sp in self.splits.values():
            sp["count"] = dist.all_reduce_sum(sp["count"])
            sp["plogp"] = dist.all_reduce_sum(sp["plogp"])
            sp["sum"] = dist.all_reduce_sum(sp["sum"])
        self.num, self.sat_sum = num, sat
        self.covered = set(range(len(self.chunks)))
        if self.state_dir is not None and dist.get_rank() == 0 and (fresh or not self._absorbed_complete):
            self._absorbed = sorted(p.name for p in self._state_files())
            name = f"stream-g{self._gen + 1:04d}-r0000.pt"
            self._write(self._state(complete=True), name)
            self._drop_absorbed(name)
        dist.barrier()
        return self.stats()

    def stats(self) -> Dict[str, Any]:
        """The statistics so far (after :meth:`finish`: of the whole run)."""
        out: Dict[str, Any] = {"num_images": self.num}
        if self.resolution is not None:
            out["resolution"] = list(self.resolution)
        for b, fs in self.features.items():
            mu, sigma = fs.mean_cov()
            out[b] = {"mu": mu, "sigma": sigma}
            if b in self.rows:  # in seed order, as write-then-score reads the PNGs named by seed
                rows = [self.rows[b][k] for k in sorted(self.rows[b])]
                out[b]["features"] = (torch.cat(rows) if rows else torch.zeros([0, fs.dim], dtype=torch.float16)).numpy()
        for kind, sp in self.splits.items():
            out[split_sums_key(kind)] = {"count": sp["count"].cpu().numpy(), "sum": sp["sum"].cpu().numpy(),
                                         "plogp": sp["plogp"].cpu().numpy()}
        if self.saturation:
            out["saturation"] = self.sat_sum / self.num
        return out


def combine_stats(parts: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Statistics of the union of disjoint image sets from each set's statistics (EDM2 layout).

    For each Fréchet block present in every part, with ``N_i``, ``mu_i``,
    ``sigma_i``: ``s_i = N_i mu_i`` and ``Q_i = (N_i - 1) sigma_i + N_i mu_i mu_i^T``
    are summed and turned back into ``mu``, ``sigma`` of ``N = sum N_i``;
    saturation is the image-weighted mean.  Inception-score sums are dropped:
    the score's 10 splits are consecutive tenths of *one* image sequence, which
    the parts' own splits do not give.
    """
    if not parts:
        raise UsageError("nothing to combine; give at least one statistics file")
    counts = [int(p["num_images"]) for p in parts]
    n = sum(counts)
    out: Dict[str, Any] = {"num_images": n}
    keys = [k for k, v in parts[0].items() if isinstance(v, Mapping) and "mu" in v and "sigma" in v
            and all(isinstance(p.get(k), Mapping) and "mu" in p[k] for p in parts)]
    for key in keys:
        total = 0.0
        outer = 0.0
        for p, count in zip(parts, counts):
            mu = np.asarray(p[key]["mu"], dtype=np.float64).reshape(-1)
            sigma = np.asarray(p[key]["sigma"], dtype=np.float64)
            total = total + count * mu
            outer = outer + (count - 1) * sigma + count * np.outer(mu, mu)
        mu = total / n
        out[key] = {"mu": mu, "sigma": (outer - n * np.outer(mu, mu)) / (n - 1)}
    sizes = {tuple(p["resolution"]) for p in parts if p.get("resolution") is not None}
    if len(sizes) > 1:
        raise UsageError(f"the statistics are of images of different sizes ({sorted(sizes)}); combine statistics "
                         f"of one resolution")
    if sizes:
        out["resolution"] = list(sizes.pop())
    if all("saturation" in p for p in parts):
        out["saturation"] = float(sum(float(p["saturation"]) * c for p, c in zip(parts, counts)) / n)
    return out
