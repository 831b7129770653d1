"""Sampling EDM2 models with guidance: configuration, validation and the generation loop.

``sample_edm2.py`` is a thin command line over this module:

    cfg = build_config(net_pos_pkl=..., outdir=..., seeds="0-49999", g_method="swg", g_weight="0.2", ...)
    summary = generate(cfg)

Data flow: options -> :class:`GenerateConfig` (validated, preset applied) ->
checkpoints (:mod:`utils.cache`, :mod:`networks.edm2_pickle`) -> guided denoiser
(:func:`guidance.guide`) -> :func:`sampling.edm.edm_sampler` -> encoder decode ->
:class:`sampling.writer.ImageWriter`.

Per-seed randomness follows EDM2's ``generate_images.py``: each seed owns a
generator that draws, in order, the initial noise, the random class label and
the churn noise, so an image depends only on its seed and the settings, not on
the batch or the number of ranks.  Seeds already present in ``outdir`` are
skipped; the remaining ones are split into ``ceil(n / (batch * world)) * world``
batches dealt round-robin to the ranks (EDM2's rule).
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
import time
from typing import Optional, Sequence

import numpy as np
import torch

from guidance import guide
from metrics import api as metrics_api
from guidance.windows import WindowError, WindowGrid
from networks import presets as PR
from networks.edm2_pickle import EDM2Checkpoint, load_checkpoint
from networks.encoders import StabilityVAEEncoder
from sampling.common import changed_setting, check_outdir, write_json_atomic
from sampling.edm import edm_sampler
from sampling.seeds import StackedRandomGenerator, parse_int_list
from sampling.writer import ImageWriter, done_seeds, remove_stale_temps
from utils import cache, dist
from utils.errors import UsageError
from utils.wandb_log import WandbLogger

__all__ = ["METHODS", "GenerateConfig", "build_config", "load_networks", "check_networks",
           "prefetch", "generate", "split_batches"]

METHODS = ("none", "cfg", "wmg", "swg", "wmg-swg", "cfg-swg")
_ALIASES = {"cfg_swg": "cfg-swg", "wmg_swg": "wmg-swg"}
_NUM_WEIGHTS = {"none": 0, "cfg": 1, "wmg": 1, "swg": 1, "wmg-swg": 2, "cfg-swg": 2}
_NEEDS_NEG = {"cfg", "wmg", "wmg-swg", "cfg-swg"}
_USES_WINDOWS = {"swg", "wmg-swg", "cfg-swg"}
# Settings that determine the pixels of an image; a resumed run must agree on them.
_IMAGE_KEYS = ("net_pos_pkl", "net_neg_pkl", "class_idx", "steps", "sigma_min", "sigma_max", "rho", "S_churn",
               "S_min", "S_max", "S_noise", "g_method", "g_weight", "swg_sizes", "swg_steps",
               "scale_window_guide", "g_interval", "clean_combos", "subdirs", "save_tar")


@dataclasses.dataclass
class GenerateConfig:
    """Resolved, validated sampling settings (what ``generate_args.json`` records)."""

    net_pos_pkl: str
    outdir: Optional[str]
    seeds: list
    net_neg_pkl: Optional[str] = None
    preset: Optional[str] = None
    subdirs: bool = False
    save_tar: bool = False
    class_idx: Optional[int] = None
    batch: int = 32
    steps: int = 32
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0
    g_method: str = "none"
    g_weight: tuple = ()
    swg_sizes: Optional[tuple] = None
    swg_steps: tuple = (2,)
    scale_window_guide: int = 1
    g_interval: Optional[tuple] = None
    clean_combos: bool = False
    max_window_batch: Optional[int] = None
    metrics: tuple = ()
    ref_path: Optional[str] = None
    use_wandb: int = 0
    wandb_group: Optional[str] = None
    wandb_runname: Optional[str] = None
    shard_size: int = 1000

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["seeds"] = _compact_ranges(self.seeds)
        d["S_max"] = "inf" if math.isinf(self.S_max) else self.S_max
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _compact_ranges(seeds: Sequence[int]) -> str:
    parts, start, prev = [], None, None
    for s in seeds:
        if start is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        start = prev = s
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)


# ----------------------------------------------------------------------------
# Parsing and validation (no network, no files written).

def _floats(text, what: str) -> tuple:
    if isinstance(text, (int, float)):
        return (float(text),)
    if isinstance(text, (list, tuple)):
        return tuple(float(v) for v in text)
    try:
        vals = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise UsageError(f"{what}: cannot parse {text!r}; give numbers separated by a comma, e.g. 1.2,0.25") from None
    if not all(math.isfinite(v) for v in vals):
        raise UsageError(f"{what}: {text!r} is not finite; give ordinary numbers")
    return vals


def _ints(text, what: str, lo: int = 1) -> tuple:
    if isinstance(text, int):
        vals: tuple = (text,)
    elif isinstance(text, (list, tuple)):
        vals = tuple(int(v) for v in text)
    else:
        try:
            vals = tuple(int(v) for v in str(text).split(","))
        except ValueError:
            raise UsageError(f"{what}: cannot parse {text!r}; give one integer or two (height,width), "
                             f"e.g. 40 or 40,32") from None
    if len(vals) not in (1, 2):
        raise UsageError(f"{what}: give one integer or two (height,width), got {text!r}")
    if any(v < lo for v in vals):
        raise UsageError(f"{what}: values must be >= {lo}, got {text!r}")
    return vals


def _interval(text) -> Optional[tuple]:
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "")):
        return None
    if isinstance(text, (list, tuple)):
        vals = tuple(int(v) for v in text)
    else:
        try:
            vals = tuple(int(v) for v in str(text).split(","))
        except ValueError:
            vals = ()
    if len(vals) != 2 or vals[0] > vals[1] or vals[0] < 0:
        raise UsageError(f"--g_interval: expected 'none' or two step indices 'first,last' with "
                         f"0 <= first <= last, got {text!r}")
    return vals


def _check_outdir(outdir: str) -> None:
    check_outdir(outdir, "--outdir")


def build_config(*, preset: Optional[str] = None, net_pos_pkl: Optional[str] = None,
                 net_neg_pkl: Optional[str] = None, outdir: Optional[str] = None, seeds="0-63",
                 g_method: Optional[str] = None, g_weight=None, swg_sizes=None, swg_steps=None,
                 scale_window_guide=None, g_interval="none", metrics=None, ref_path: Optional[str] = None,
                 require_outdir: bool = True, **kwargs) -> GenerateConfig:
    """Apply the preset to options left unset (``None``), parse and validate everything checkable without I/O."""
    given = dict(net_pos_pkl=net_pos_pkl, net_neg_pkl=net_neg_pkl, g_method=g_method, g_weight=g_weight,
                 swg_sizes=swg_sizes, swg_steps=swg_steps, scale_window_guide=scale_window_guide,
                 ref_path=ref_path, metrics=metrics)
    if preset is not None:
        for key, value in PR.get_preset(preset).settings().items():
            if given.get(key) is None:
                given[key] = value
    pos = PR.resolve_model(given["net_pos_pkl"])
    neg = PR.resolve_model(given["net_neg_pkl"])
    if not pos:
        raise UsageError("no positive network; pass --net_pos_pkl (path, URL or model name) or --preset")
    if require_outdir and not outdir:
        raise UsageError("no output folder; pass --outdir")

    method = str(given["g_method"] or "none").strip().lower()
    method = _ALIASES.get(method, method)
    if method not in METHODS:
        raise UsageError(f"unknown --g_method {given['g_method']!r}; choose one of {', '.join(METHODS)} "
                         f"(cfg_swg is accepted for cfg-swg)")
    n = _NUM_WEIGHTS[method]
    weights = () if given["g_weight"] is None else _floats(given["g_weight"], "--g_weight")
    if n == 0 and weights:
        raise UsageError("--g_weight was given but --g_method is none; choose a guidance method, "
                         "e.g. --g_method swg")
    if n and len(weights) != n:
        example = "--g_weight 1.2,0.14" if n == 2 else "--g_weight 0.2"
        raise UsageError(f"--g_method {method} takes {n} weight(s), got {len(weights)} "
                         f"({given['g_weight']!r}); e.g. {example}")
    if method in _NEEDS_NEG and not neg:
        what = "an unconditional network" if method.startswith("cfg") else "a weaker network"
        raise UsageError(f"--g_method {method} needs a negative network ({what}); pass --net_neg_pkl")
    if neg and method not in _NEEDS_NEG:
        print(f"warning: --net_neg_pkl is not used by --g_method {method}; ignoring it", file=sys.stderr)
        neg = None
    sizes = None if given["swg_sizes"] is None else _ints(given["swg_sizes"], "--swg_sizes")
    steps_win = _ints(given["swg_steps"] if given["swg_steps"] is not None else 2, "--swg_steps")
    if method in _USES_WINDOWS and sizes is None:
        raise UsageError(f"--g_method {method} needs a window size; pass --swg_sizes (e.g. 40 for 512px EDM2)")
    sw = given["scale_window_guide"]
    sw = 1 if sw is None else sw
    if str(sw) not in ("0", "1"):
        raise UsageError(f"--scale_window_guide must be 0 (SWG) or 1 (masked M-SWG), got {sw!r}")

    seed_list = parse_int_list(seeds, "--seeds")
    if not seed_list:
        raise UsageError("--seeds is empty; give e.g. 0-49999")
    if min(seed_list) < 0 or max(seed_list) > 9_999_999:
        raise UsageError("--seeds must lie in 0..9999999 (image files are named by a 7-digit seed)")
    if len(set(seed_list)) != len(seed_list):
        seed_list = list(dict.fromkeys(seed_list))

    num = {k: kwargs.pop(k) for k in list(kwargs) if kwargs[k] is None}
    del num  # unset numeric options keep the dataclass defaults
    cfg = GenerateConfig(net_pos_pkl=pos, net_neg_pkl=neg, outdir=outdir, seeds=seed_list, preset=preset,
                         g_method=method, g_weight=weights, swg_sizes=sizes, swg_steps=steps_win,
                         scale_window_guide=int(sw), g_interval=_interval(g_interval),
                         ref_path=given["ref_path"], **kwargs)
    cfg.metrics = _parse_metrics(given["metrics"])
    metrics_api.check_image_count(cfg.metrics, len(seed_list))  # e.g. IS needs 10 images: say so before sampling
    _check_numbers(cfg)
    if metrics_api.needs_reference(cfg.metrics) and not cfg.ref_path:
        raise UsageError("--metrics needs reference statistics; pass --ref_path (e.g. "
                         f"{PR.REFS['img512']})")
    if cfg.save_tar and cfg.subdirs:
        raise UsageError("--subdirs applies to PNG folders; drop it when using --save_tar")
    if outdir:
        _check_outdir(outdir)
    return cfg


def _parse_metrics(metrics) -> tuple:
    """``'fid,fd_dinov2'`` (or a list) -> metric names of :data:`metrics.api.METRICS`; ``none`` -> ()."""
    if metrics is None or (isinstance(metrics, str) and metrics.strip().lower() in ("", "none")):
        return ()
    return tuple(metrics_api.parse_metrics(metrics))


def _check_numbers(cfg: GenerateConfig) -> None:
    if cfg.batch < 1:
        raise UsageError(f"--batch must be >= 1, got {cfg.batch}")
    if cfg.steps < 1:
        raise UsageError(f"--steps must be >= 1, got {cfg.steps}")
    if not (0 < cfg.sigma_min < cfg.sigma_max) or math.isinf(cfg.sigma_max):
        raise UsageError(f"need 0 < --sigma_min < --sigma_max < inf, got {cfg.sigma_min} and {cfg.sigma_max}")
    if cfg.rho <= 0:
        raise UsageError(f"--rho must be positive, got {cfg.rho}")
    if cfg.S_churn < 0 or cfg.S_noise < 0 or cfg.S_min < 0 or cfg.S_max < cfg.S_min:
        raise UsageError("need --S_churn >= 0, --S_noise >= 0 and 0 <= --S_min <= --S_max")
    if cfg.g_interval is not None and cfg.g_interval[1] >= cfg.steps:
        raise UsageError(f"--g_interval {cfg.g_interval[0]},{cfg.g_interval[1]} goes past the last step "
                         f"{cfg.steps - 1}; step indices run from 0 to --steps - 1")
    if cfg.class_idx is not None and cfg.class_idx < 0:
        raise UsageError(f"--class must be >= 0, got {cfg.class_idx}")
    if cfg.use_wandb not in (0, 1):
        raise UsageError(f"--use_wandb must be 0 or 1, got {cfg.use_wandb}")
    if cfg.max_window_batch is not None and cfg.max_window_batch < 1:
        raise UsageError("--max_window_batch must be >= 1")


# ----------------------------------------------------------------------------
# Networks.

def _load(source: str, what: str) -> EDM2Checkpoint:
    return load_checkpoint(cache.fetch(source, desc=what), source=source)


def load_networks(cfg: GenerateConfig):
    """``(pos, neg)`` checkpoints (``neg`` None when the method needs none); rank 0 downloads first."""
    pos = _load(cfg.net_pos_pkl, "positive network")
    neg = _load(cfg.net_neg_pkl, "negative network") if cfg.net_neg_pkl else None
    return pos, neg


def _latent_shape(ckpt: EDM2Checkpoint) -> tuple:
    net = ckpt.net
    return int(net.img_channels), int(net.img_resolution), int(net.img_resolution)


def check_networks(cfg: GenerateConfig, pos: EDM2Checkpoint, neg: Optional[EDM2Checkpoint]) -> None:
    """Checks that need the networks: shapes, labels, window geometry."""
    c, h, w = _latent_shape(pos)
    label_dim = int(pos.net.label_dim)
    if neg is not None:
        if _latent_shape(neg) != (c, h, w):
            raise UsageError(f"the negative network works on {_latent_shape(neg)} inputs but the positive on "
                             f"{(c, h, w)}; pick networks of the same resolution")
        if int(neg.net.label_dim) not in (0, label_dim):
            raise UsageError(f"the negative network has {neg.net.label_dim} classes, the positive {label_dim}")
    if cfg.class_idx is not None and not (0 <= cfg.class_idx < max(label_dim, 0)):
        raise UsageError(f"--class {cfg.class_idx} is out of range: the network has {label_dim} classes"
                         + ("" if label_dim else " (it is unconditional; drop --class)"))
    if cfg.g_method in _USES_WINDOWS:
        try:
            WindowGrid.create(h, w, cfg.swg_sizes, cfg.swg_steps)
        except WindowError as exc:
            raise UsageError(f"{exc} (the network works on {h}x{w} latents)") from None
        levels = len(pos.init_kwargs.get("channel_mult", (1, 2, 3, 4)))
        factor = 2 ** (levels - 1)
        if any(k % factor for k in cfg.swg_sizes):
            raise UsageError(f"--swg_sizes {','.join(map(str, cfg.swg_sizes))} must be divisible by {factor} "
                             f"(the U-Net halves the resolution {levels - 1} times)")


def _denoiser(net: torch.nn.Module):
    def denoise(x, sigma, labels=None):
        return net(x, sigma, labels)
    return denoise


def make_guided(cfg: GenerateConfig, pos_net, neg_net):
    """The guided denoiser ``D(x, sigma, labels)`` for ``cfg``."""
    swg = cfg.g_method in _USES_WINDOWS
    return guide(_denoiser(pos_net), method=cfg.g_method, weight=cfg.g_weight or None,
                 neg_denoiser=_denoiser(neg_net) if neg_net is not None else None,
                 window_size=cfg.swg_sizes if swg else None, window_steps=cfg.swg_steps,
                 masked=bool(cfg.scale_window_guide), steps=cfg.g_interval,
                 reference_quirks=not cfg.clean_combos, max_window_batch=cfg.max_window_batch)


# ----------------------------------------------------------------------------
# Prefetch.

def prefetch(cfg: GenerateConfig) -> list:
    """Download everything ``cfg`` needs (networks, VAE, reference statistics, detectors); return paths.

    Joins the torchrun group first, so that rank 0 downloads while the other ranks wait.
    """
    dist.init()
    paths = [cache.fetch(cfg.net_pos_pkl, desc="positive network")]
    if cfg.net_neg_pkl:
        paths.append(cache.fetch(cfg.net_neg_pkl, desc="negative network"))
    pos = load_checkpoint(paths[0], source=cfg.net_pos_pkl)
    if isinstance(pos.encoder, StabilityVAEEncoder) and not os.path.isdir(pos.encoder.vae_name):
        paths.append(cache.hf_snapshot(pos.encoder.vae_name))
    if cfg.ref_path:
        paths.append(cache.fetch(cfg.ref_path, desc="reference statistics"))
    if cfg.metrics:
        try:
            from metrics import api as metrics_api
        except ImportError:
            metrics_api = None
        hook = getattr(metrics_api, "prefetch", None)
        if hook is not None:
            paths.extend(hook(list(cfg.metrics)) or [])
    return paths


# ----------------------------------------------------------------------------
# Generation.

def split_batches(pending: Sequence[int], batch: int, world: int, rank: int) -> list:
    """EDM2's rule: ``ceil(n / (batch * world)) * world`` near-equal batches, dealt round-robin."""
    if not pending:
        return []
    num_batches = max((len(pending) - 1) // (batch * world) + 1, 1) * world
    chunks = np.array_split(np.asarray(pending, dtype=np.int64), num_batches)
    return [c.tolist() for c in chunks[rank::world] if len(c)]


def _check_args(cfg: GenerateConfig, outdir: pathlib.Path) -> None:
    """Refuse a folder whose images were made with other pixel-defining settings (read-only; every rank)."""
    new = cfg.to_json()
    changed = changed_setting(outdir / "generate_args.json", new, _IMAGE_KEYS)
    if changed:
        key, old = changed
        raise UsageError(f"{outdir} holds images made with different settings ({key}: {old!r} there, "
                         f"{new[key]!r} now); use another --outdir so they do not mix")


def _write_args(cfg: GenerateConfig, outdir: pathlib.Path) -> None:
    """Record the settings beside the images (rank 0, after :func:`_check_args`)."""
    write_json_atomic(outdir / "generate_args.json", cfg.to_json(), indent=2)


def _pending_mask(cfg: GenerateConfig, outdir: pathlib.Path, device) -> list:
    """Seeds still to do, decided on rank 0 and shared so every rank splits the same list."""
    mask = torch.zeros(len(cfg.seeds), dtype=torch.int32, device=device)
    if dist.get_rank() == 0:
        done = done_seeds(outdir)
        mask = torch.tensor([s not in done for s in cfg.seeds], dtype=torch.int32, device=device)
    mask = dist.all_reduce_sum(mask)
    return [s for s, m in zip(cfg.seeds, mask.tolist()) if m]


def _make_labels(rnd: StackedRandomGenerator, label_dim: int, class_idx: Optional[int], n: int, device):
    if label_dim <= 0:
        return None
    labels = torch.eye(label_dim, device=device)[rnd.randint(label_dim, size=[n], device=device)]
    if class_idx is not None:
        labels[:, :] = 0
        labels[:, class_idx] = 1
    return labels


def _validate_early(cfg: GenerateConfig) -> None:
    if dist.get_rank() == 0 and cfg.outdir:
        _check_outdir(cfg.outdir)


def generate(cfg: GenerateConfig, *, progress: bool = True) -> dict:
    """Generate every missing image of ``cfg`` into ``cfg.outdir``; return a summary (rank-local counts)."""
    dist.init()
    rank, world, device = dist.get_rank(), dist.get_world_size(), dist.device()
    _validate_early(cfg)
    pos, neg = load_networks(cfg)
    check_networks(cfg, pos, neg)
    outdir = pathlib.Path(cfg.outdir).expanduser()
    _check_args(cfg, outdir)  # every rank reads the same file, so every rank stops with the same line
    if rank == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        _write_args(cfg, outdir)
        remove_stale_temps(outdir)
    dist.barrier()

    pending = _pending_mask(cfg, outdir, device)
    batches = split_batches(pending, cfg.batch, world, rank)
    pos_net = pos.net.to(device)
    neg_net = neg.net.to(device) if neg is not None else None
    encoder = pos.encoder
    encoder.init(device)
    guided = make_guided(cfg, pos_net, neg_net)
    c, h, w = _latent_shape(pos)
    label_dim = int(pos_net.label_dim)

    logger = WandbLogger(bool(cfg.use_wandb), project="swg-edm2", config=cfg.to_json(), group=cfg.wandb_group,
                         name=cfg.wandb_runname, rank=rank)
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(pending), unit="img", desc="sampling", dynamic_ncols=True, file=sys.stderr)
        if not pending:
            bar.write(f"all {len(cfg.seeds)} images already exist in {outdir}", file=sys.stderr)
    t0 = time.perf_counter()
    written = 0
    with ImageWriter(outdir, subdirs=cfg.subdirs, tar=cfg.save_tar, shard_size=cfg.shard_size) as writer:
        for batch_seeds in batches:
            rnd = StackedRandomGenerator(device, batch_seeds)
            noise = rnd.randn([len(batch_seeds), c, h, w], device=device)
            labels = _make_labels(rnd, label_dim, cfg.class_idx, len(batch_seeds), device)
            with torch.no_grad():
                x = edm_sampler(guided, noise, labels, num_steps=cfg.steps, sigma_min=cfg.sigma_min,
                                sigma_max=cfg.sigma_max, rho=cfg.rho, S_churn=cfg.S_churn, S_min=cfg.S_min,
                                S_max=cfg.S_max, S_noise=cfg.S_noise, randn_like=rnd.randn_like)
                images = encoder.decode(x)
            writer.write(batch_seeds, images)
            written += len(batch_seeds)
            if bar is not None:
                bar.update(min(len(batch_seeds) * world, bar.total - bar.n))
    if bar is not None:
        bar.close()
    dist.barrier()
    elapsed = time.perf_counter() - t0
    summary = {"requested": len(cfg.seeds), "pending": len(pending), "written_by_rank": written,
               "seconds": elapsed, "outdir": str(outdir)}
    if cfg.metrics:
        summary["metrics"] = _run_metrics(cfg, outdir)
    logger.log_metrics({"images": len(cfg.seeds), "seconds": elapsed}, prefix="run/")
    logger.log_run(outdir, summary.get("metrics"))
    return summary


def _run_metrics(cfg: GenerateConfig, outdir: pathlib.Path) -> dict:
    """FID / FD-DINOv2 of exactly this run's seeds against ``ref_path``, saved beside the images."""
    from sampling.common import run_metrics

    return run_metrics(outdir, cfg.seeds, cfg.metrics, ref_path=cfg.ref_path, record=cfg.to_json())
