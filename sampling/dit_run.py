"""Sampling DiT with guidance: configuration, run folders, the generation loop, ``.npz`` and metrics.

``sample_dit.py`` is a thin command line over this module:

    cfg = build_config(num_fid_samples=50000, crop=1, mask=1, g_scale=0.5, sample_dir="samples")
    summary = generate(cfg)      # or prefetch(cfg) to only download the weights

Pipeline: options -> resolved configuration (a JSON-able dict, saved as
``args.json``) -> DiT and VAE through the weights cache -> guided denoiser
(:mod:`guidance.dit`) -> DiT's ancestral sampler
(:mod:`sampling.gaussian_diffusion`) -> VAE decode ->
:class:`sampling.writer.ImageWriter` -> optional ``.npz`` and metrics.

Image ``i`` (``seeds`` or ``0 .. num_fid_samples - 1``) is drawn from its own
CPU generator seeded with ``global_seed * 2**32 + i``: its initial noise, its
class label and every step's noise.  The images therefore do not depend on the
number of processes, the batch size or the device type (the official DiT
script seeds one generator per rank and its images change with the GPU count).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional, Sequence

import numpy as np
import torch

from sampling.common import changed_setting, check_outdir, progress as progress_bar, run_metrics, write_json_atomic
from sampling.writer import ImageIndex
from utils.atomic import atomic_path
from utils.errors import UsageError
from utils.wandb_log import WandbLogger

LATENT_SCALE = 0.18215  # Stable Diffusion VAE latent scaling used by DiT.
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
ARGS_FILE = "args.json"
# Settings an existing output folder must share with a resumed run (the rest may change).
IDENTITY_KEYS = ("model", "model_kwargs", "ckpt", "image_size", "vae", "num_classes", "method", "g_scale",
                 "crop_scale", "mask", "window_size", "window_steps", "cfg_channels", "pos_embed",
                 "num_sampling_steps", "global_seed", "save_tar", "subdirs")

# Every option and its default: the command line's flags (underscore spelling) and build_config's keywords.
DEFAULTS = {
    "model": "DiT-XL/2", "model_kwargs": None, "ckpt": None, "vae": "ema", "vae_path": None,
    "sample_dir": "samples", "per_proc_batch_size": 50, "num_fid_samples": None, "seeds": None,
    "image_size": 256, "num_classes": 1000, "g_scale": 0.0, "crop_scale": 0.0,
    "crop": 0, "mask": 0, "cfg_crop": 0, "uncond": 0, "vanila_cfg": 0,
    "window_size": None, "window_steps": 2, "cfg_channels": "reference", "pos_embed": "resize",
    "num_sampling_steps": "250", "global_seed": 0, "tf32": True, "save_tar": False, "save_npz": False,
    "subdirs": False, "metrics": "fid,fd_dinov2", "ref_path": None, "max_window_batch": None,
    "device": None, "prefetch": False, "use_wandb": 0, "wandb_group": None, "wandb_runname": None,
}
# Python values are converted as the command line converts its flags (so 1 and 1.0 name the same folder).
_FLOATS = ("g_scale", "crop_scale")
_INTS = ("per_proc_batch_size", "num_fid_samples", "image_size", "num_classes", "crop", "mask", "cfg_crop",
         "uncond", "vanila_cfg", "window_size", "window_steps", "global_seed", "max_window_batch")
_BOOLS = ("tf32", "save_tar", "save_npz", "subdirs", "prefetch")

__all__ = ["DEFAULTS", "VAE_REPOS", "LATENT_SCALE", "build_config", "resolve_config", "folder_name", "run_dir",
           "ImageGenerators", "image_seeds", "sample_latents", "decode_latents", "load_model", "load_vae",
           "ImageIndex", "write_npz", "compute_metrics", "prefetch", "generate"]


# ----------------------------------------------------------------------------
# Configuration.

def _guidance_mode(crop: int, cfg_crop: int, vanila_cfg: int, uncond: int) -> str:
    chosen = [name for name, on in (("--crop", crop), ("--cfg-crop", cfg_crop), ("--vanila-cfg", vanila_cfg),
                                    ("--uncond", uncond)) if on]
    if len(chosen) > 1:
        raise UsageError(f"{' and '.join(chosen)} exclude each other; pick one guidance switch")
    return {"--crop": "swg", "--cfg-crop": "cfg-swg", "--vanila-cfg": "cfg", "--uncond": "uncond"}.get(
        chosen[0] if chosen else "", "none")


def _parse_metrics(text) -> list[str]:
    """``'fid,fd_dinov2'`` / ``'fid fd_dinov2'`` / a list -> metric names of :mod:`metrics.api`; ``none`` -> []."""
    from metrics.api import parse_metrics

    if isinstance(text, (list, tuple)):
        text = ",".join(str(m) for m in text)
    names = [m for m in str(text or "").replace(",", " ").split() if m]
    if not names or names == ["none"]:
        return []
    return parse_metrics(names)


def _needs_ref(metrics: Sequence[str]) -> bool:
    from metrics.api import needs_reference

    return needs_reference(metrics)


def resolve_config(opts: dict) -> dict:
    """Validate the command-line options and return the resolved configuration (JSON-able).

    Raises :class:`UsageError` with a one-line message naming the fix.
    """
    from guidance import WindowError, WindowGrid
    from networks.dit import DiT_models, PRETRAINED_DIT
    from guidance.dit import default_window_size
    from sampling.gaussian_diffusion import space_timesteps
    from sampling.seeds import parse_int_list

    cfg = dict(opts)
    if cfg["model"] not in DiT_models:
        raise UsageError(f"unknown model {cfg['model']!r}; use one of {', '.join(DiT_models)}")
    kwargs = cfg.get("model_kwargs") or {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--model-kwargs is not valid JSON ({exc.msg}); write e.g. "
                             f"'{{\"hidden_size\": 384, \"depth\": 12}}'") from None
    allowed = {"hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "learn_sigma",
               "in_channels", "patch_size"}
    if not isinstance(kwargs, dict) or set(kwargs) - allowed:
        extra = sorted(set(kwargs) - allowed) if isinstance(kwargs, dict) else kwargs
        raise UsageError(f"--model-kwargs accepts a JSON object with {', '.join(sorted(allowed))}; got {extra}")
    cfg["model_kwargs"] = kwargs

    if cfg["ckpt"] is None:
        if cfg["model"] != "DiT-XL/2" or cfg["image_size"] not in PRETRAINED_DIT or cfg["num_classes"] != 1000 \
                or kwargs:
            raise UsageError(f"pretrained weights exist only for DiT-XL/2 at --image-size 256 or 512 with 1000 "
                             f"classes; pass --ckpt for {cfg['model']} at {cfg['image_size']}")
        cfg["ckpt_source"] = PRETRAINED_DIT[cfg["image_size"]]
    else:
        cfg["ckpt_source"] = str(cfg["ckpt"])
    patch = kwargs.get("patch_size", DiT_models[cfg["model"]].keywords["patch_size"])
    if cfg["image_size"] <= 0 or cfg["image_size"] % (8 * patch):
        raise UsageError(f"--image-size {cfg['image_size']} must be a positive multiple of {8 * patch} "
                         f"(VAE factor 8 x patch size {patch}); DiT uses 256 or 512")
    latent = cfg["image_size"] // 8
    cfg["latent_size"] = latent
    if cfg["num_classes"] < 1:
        raise UsageError(f"--num-classes must be >= 1, got {cfg['num_classes']}")

    # Guidance.
    mode = _guidance_mode(cfg["crop"], cfg["cfg_crop"], cfg["vanila_cfg"], cfg["uncond"])
    g, c = cfg["g_scale"], cfg["crop_scale"]
    if g < 0 or c < 0:
        raise UsageError(f"guidance scales must be >= 0, got --g-scale {g} --crop-scale {c}")
    if c > 0 and mode != "cfg-swg":
        raise UsageError("--crop-scale is the SWG weight of --cfg-crop 1; with --crop 1 the weight is --g-scale")
    if cfg["mask"] and mode not in ("swg", "cfg-swg"):
        raise UsageError("--mask 1 (M-SWG) needs --crop 1 or --cfg-crop 1")
    if mode == "uncond" and g > 0:
        raise UsageError("--uncond 1 samples without guidance; drop --g-scale")
    if mode == "cfg" and g < 1:
        raise UsageError(f"--vanila-cfg 1 needs DiT's CFG scale --g-scale >= 1 (1 = no guidance, e.g. 1.5), got {g}")
    if mode == "swg" and g == 0:
        mode = "none"  # SWG with weight 0 is plain sampling, as in the reference.
    if mode == "cfg-swg" and g == 0 and c == 0:
        mode = "none"
    if mode == "none" and g > 0 and not (cfg["crop"] or cfg["cfg_crop"] or cfg["vanila_cfg"]):
        raise UsageError("--g-scale needs a guidance switch: --crop 1 (SWG), --cfg-crop 1 (CFG+SWG) "
                         "or --vanila-cfg 1 (CFG)")
    cfg["method"] = mode
    if mode in ("swg", "cfg-swg"):
        k = cfg["window_size"] or max(patch, default_window_size(latent) // patch * patch)
        cfg["window_size"] = k
        if k % patch:
            raise UsageError(f"--window-size {k} must be a multiple of the patch size {patch}")
        try:
            WindowGrid.create(latent, latent, k, cfg["window_steps"])
        except WindowError as exc:
            raise UsageError(f"{exc} (latent {latent}x{latent}; --window-size / --window-steps)") from None
    else:
        cfg["window_size"] = None

    # Steps and images.
    cfg["num_sampling_steps"] = str(cfg["num_sampling_steps"])
    cfg["timesteps"] = len(space_timesteps(1000, cfg["num_sampling_steps"]))
    if cfg["seeds"] is not None and cfg["num_fid_samples"] is not None:
        raise UsageError("--seeds and --num-fid-samples both choose the images; give one of them")
    if cfg["seeds"] is not None:
        seeds = parse_int_list(cfg["seeds"], what="--seeds")
        if not seeds or min(seeds) < 0:
            raise UsageError(f"--seeds must list image indices >= 0, got {cfg['seeds']!r}")
    else:
        n = 50000 if cfg["num_fid_samples"] is None else cfg["num_fid_samples"]
        if n < 1:
            raise UsageError(f"--num-fid-samples must be >= 1, got {n}")
        seeds = list(range(n))
    if len(set(seeds)) != len(seeds):
        raise UsageError("--seeds lists an image twice; give each index once")
    cfg["seed_list"] = seeds
    if cfg["per_proc_batch_size"] < 1:
        raise UsageError(f"--per-proc-batch-size must be >= 1, got {cfg['per_proc_batch_size']}")
    if cfg["global_seed"] < 0 or cfg["global_seed"] >= 2 ** 31:
        raise UsageError(f"--global-seed must lie in [0, 2^31), got {cfg['global_seed']}")
    cfg["metrics"] = _parse_metrics(cfg["metrics"])
    cfg["ref_path"] = _default_ref_path(cfg) if _needs_ref(cfg["metrics"]) else cfg["ref_path"]
    if cfg["metrics"] and (cfg["ref_path"] or not _needs_ref(cfg["metrics"])):
        from metrics.api import check_image_count
        check_image_count(cfg["metrics"], len(seeds))  # IS needs 10, P/R 4, FD 2: say so before sampling
    return cfg


def folder_name(cfg: dict) -> str:
    """Run folder named like the reference: model, ckpt, size, vae, scale, seed and method suffixes."""
    ckpt = os.path.basename(str(cfg["ckpt"])).replace(".pt", "") if cfg["ckpt"] else "pretrained"
    name = (f"{cfg['model'].replace('/', '-')}-{ckpt}-size-{cfg['image_size']}-vae-{cfg['vae']}-"
            f"g-{cfg['g_scale']}-seed-{cfg['global_seed']}")
    if cfg["crop"]:
        name += f"_swg_mask_{int(cfg['mask'])}"
    if cfg["cfg_crop"]:
        name += f"_cfg_swg_{cfg['crop_scale']}_mask_{int(cfg['mask'])}"
    if cfg["uncond"]:
        name += "_uncond"
    if cfg["vanila_cfg"]:
        name += "_vanila_cfg"
    return name.replace(", ", "_").replace("[", "").replace("]", "").replace(" ", "_")


def run_dir(cfg: dict) -> str:
    """Where the images go: ``<sample_dir>/<folder_name(cfg)>/samples`` (``.npz`` and metrics beside)."""
    return os.path.join(cfg["sample_dir"], folder_name(cfg), "samples")


def build_config(**opts) -> dict:
    """Resolved configuration from keyword options (the flags' underscore names; :data:`DEFAULTS` fill the rest).

    Values may be Python objects (``model_kwargs`` a dict, ``seeds`` a list,
    ``metrics`` a list); they are converted as the command line converts its
    flags, validated by :func:`resolve_config`, and ``cfg["outdir"]`` is set to
    :func:`run_dir`.  Unknown names raise ``TypeError``; bad values
    :class:`UsageError`.  Nothing is read or written.
    """
    unknown = sorted(set(opts) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"build_config() got unknown option(s) {', '.join(unknown)}; "
                        f"options are {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **opts}
    for key in _FLOATS:
        merged[key] = float(merged[key])
    for key in _INTS:
        if merged[key] is not None:
            merged[key] = int(merged[key])
    for key in _BOOLS:
        merged[key] = bool(merged[key])
    cfg = resolve_config(merged)
    cfg["outdir"] = run_dir(cfg)
    return cfg


def _identity(cfg: dict) -> dict:
    return {k: cfg.get(k) for k in IDENTITY_KEYS}


def _record(cfg: dict) -> dict:
    """The configuration as saved beside the images (the seed list is summarised by its length elsewhere)."""
    return {k: v for k, v in cfg.items() if k != "seed_list"}


def _prepare_outdir(cfg: dict) -> pathlib.Path:
    """Create the run folder and save the resolved arguments (rank 0); refuse a folder made differently."""
    from utils import dist

    outdir = check_outdir(cfg["outdir"], "--sample-dir")
    changed = changed_setting(outdir / ARGS_FILE, _identity(cfg), IDENTITY_KEYS)
    if changed:
        k, old = changed
        raise UsageError(f"{outdir} holds samples made with {k}={old!r}, not {cfg.get(k)!r}; "
                         f"resume with the same settings or choose another --sample-dir")
    dist.barrier()
    if dist.get_rank() == 0:
        outdir.mkdir(parents=True, exist_ok=True)
        record = _record(cfg)
        record["num_images"] = len(cfg["seed_list"])
        write_json_atomic(outdir / ARGS_FILE, record, indent=4)
    dist.barrier()
    return outdir


# ----------------------------------------------------------------------------
# Sampling.

class ImageGenerators:
    """One CPU ``torch.Generator`` per image, seeded with ``global_seed * 2**32 + index`` (64-bit, no collisions).

    Same interface as :class:`sampling.seeds.StackedRandomGenerator`; draws are
    stacked along the batch axis, each sample from its own generator, and moved
    to ``device``.  Drawing on the CPU makes the noise, and so the images up to
    floating-point rounding, the same on every device type.
    """

    def __init__(self, device, indices: Sequence[int], global_seed: int = 0):
        self.device = torch.device(device)
        self.seeds = image_seeds(indices, global_seed)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def randn(self, size: Sequence[int], dtype=torch.float32, device=None, **kwargs) -> torch.Tensor:
        assert size[0] == len(self.generators)
        draws = torch.stack([torch.randn(list(size[1:]), generator=g, dtype=dtype) for g in self.generators])
        return draws.to(device if device is not None else self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, dtype=x.dtype, device=x.device)

    def randint(self, high: int, size: Sequence[int], device=None) -> torch.Tensor:
        assert size[0] == len(self.generators)
        draws = torch.stack([torch.randint(high, list(size[1:]), generator=g) for g in self.generators])
        return draws.to(device if device is not None else self.device)


def image_seeds(indices: Sequence[int], global_seed: int = 0) -> list[int]:
    """Generator seed of each image: ``global_seed * 2**32 + index``."""
    return [int(global_seed) * (1 << 32) + int(i) for i in indices]


@torch.no_grad()
def sample_latents(diffusion, denoiser, gen: ImageGenerators, latent_size: int, in_channels: int,
                   num_classes: int, uncond: bool = False, progress: bool = False) -> torch.Tensor:
    """DiT latents for one batch. Per image: ``x_T``, then the label, then each step's noise."""
    n = len(gen.seeds)
    z = gen.randn([n, in_channels, latent_size, latent_size])
    if uncond:
        y = torch.full((n,), num_classes, dtype=torch.long, device=z.device)
    else:
        y = gen.randint(num_classes, size=[n])
    return diffusion.p_sample_loop(denoiser, z, y, randn_like=gen.randn_like, progress=progress)


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images: ``clamp(127.5 VAE(z / 0.18215) + 128, 0, 255)`` truncated like the reference."""
    images = vae.decode(latents / LATENT_SCALE).sample
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


def load_model(cfg: dict, device):
    """The DiT of ``cfg`` (checkpoint through the weights cache) on ``device``."""
    from networks.dit import load_dit
    from utils.cache import fetch

    path = fetch(cfg["ckpt_source"], desc=os.path.basename(cfg["ckpt_source"]))
    return load_dit(cfg["model"], path, input_size=cfg["latent_size"], num_classes=cfg["num_classes"],
                    pos_embed=cfg["pos_embed"], **cfg["model_kwargs"]).to(device)


def _vae_source(cfg: dict) -> str:
    return cfg["vae_path"] or VAE_REPOS[cfg["vae"]]


def load_vae(cfg: dict, device):
    """The AutoencoderKL of ``cfg`` (``vae_path`` or the Stability repo in the cache), checked against DiT."""
    from networks.encoders import load_vae as load_autoencoder

    if cfg["vae_path"] and not os.path.isdir(os.path.expanduser(cfg["vae_path"])):
        raise UsageError(f"--vae-path {cfg['vae_path']} is not a folder; pass a diffusers AutoencoderKL folder")
    vae = load_autoencoder(_vae_source(cfg), device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != 8 or vae.config.latent_channels != cfg["model_kwargs"].get("in_channels", 4):
        raise UsageError(f"the VAE maps {cfg['image_size']}px images to {vae.config.latent_channels} channels at "
                         f"1/{factor} size, DiT needs 4 channels at 1/8; use --vae ema or mse")
    return vae


def write_npz(outdir: pathlib.Path, seeds: Sequence[int], path: Optional[pathlib.Path] = None) -> pathlib.Path:
    """ADM evaluator input: ``arr_0`` = uint8 NHWC images in seed order, written atomically.

    Defaults to ``<outdir>.npz`` (``.../samples.npz`` beside the images folder), as the reference.
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


def _default_ref_path(cfg: dict) -> Optional[str]:
    """``--ref-path``, else ``dataset_refs/img{size}.pkl`` when present (the seed README's location)."""
    if cfg["ref_path"]:
        return cfg["ref_path"]
    local = pathlib.Path("dataset_refs") / f"img{cfg['image_size']}.pkl"
    return str(local) if local.is_file() else None


def compute_metrics(cfg: dict, outdir: pathlib.Path, ref: Optional[dict], device) -> dict:
    """Metrics of exactly this run's images (each rank reads its share), written beside them by rank 0."""
    return run_metrics(outdir, cfg["seed_list"], cfg["metrics"], ref=ref, device=device, record=_record(cfg))


def _sources(cfg: dict) -> list:
    """What ``cfg`` downloads: the DiT checkpoint, the VAE repo (unless a local folder), the reference statistics."""
    sources = [cfg["ckpt_source"], None if cfg["vae_path"] else f"hf-snapshot://{VAE_REPOS[cfg['vae']]}"]
    sources.append(cfg["ref_path"] if cfg["metrics"] and cfg["ref_path"] else None)
    return sources


def prefetch(cfg: dict) -> list[str]:
    """Download everything ``cfg`` needs into the weights cache (nothing is sampled); return the local paths."""
    from utils import dist
    from utils.cache import prefetch as cache_prefetch

    dist.init()
    return [str(p) for p in cache_prefetch(_sources(cfg))]


def generate(cfg: dict, *, progress: bool = True) -> dict:
    """Sample every image of ``cfg`` missing from ``cfg["outdir"]``, then the ``.npz`` and metrics it asks for.

    Returns ``{"outdir", "written" (by this rank), "npz" (path or None), "metrics" (dict or None)}``.
    With ``cfg["prefetch"]`` set it only downloads, as :func:`prefetch`, and
    returns ``{"prefetched": paths}``.  Runs under ``torchrun`` (each rank takes
    every world-size-th pending image); sets TF32 as ``cfg["tf32"]`` says.
    """
    from guidance.dit import dit_guidance
    from sampling.gaussian_diffusion import create_diffusion
    from sampling.writer import ImageWriter, done_seeds, remove_stale_temps
    from utils import dist

    if cfg["prefetch"]:
        return {"prefetched": prefetch(cfg)}
    dist.init()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(cfg["device"]) if cfg["device"] else dist.device()
    torch.backends.cuda.matmul.allow_tf32 = bool(cfg["tf32"])
    torch.backends.cudnn.allow_tf32 = bool(cfg["tf32"])

    ref = None
    if _needs_ref(cfg["metrics"]) and cfg["ref_path"]:
        from metrics.refs import load_ref
        ref = load_ref(cfg["ref_path"])  # fail early, before hours of sampling
    with torch.no_grad():
        model = load_model(cfg, device)
        vae = load_vae(cfg, device)
    diffusion = create_diffusion(cfg["num_sampling_steps"])
    denoiser = dit_guidance(model, cfg["method"], g_scale=cfg["g_scale"], crop_scale=cfg["crop_scale"],
                            mask=cfg["mask"], window_size=cfg["window_size"], window_steps=cfg["window_steps"],
                            cfg_channels=cfg["cfg_channels"], max_window_batch=cfg["max_window_batch"])
    outdir = _prepare_outdir(cfg)

    if rank == 0:
        remove_stale_temps(outdir)
    dist.barrier()
    done = done_seeds(outdir)
    dist.barrier()  # every rank listed the same finished images before anyone writes
    pending = [s for s in cfg["seed_list"] if s not in done]
    mine = pending[rank::world]
    batch = cfg["per_proc_batch_size"]
    batches = [mine[i:i + batch] for i in range(0, len(mine), batch)]
    dist.print0(f"{cfg['model']} {cfg['method']} ({cfg['timesteps']} steps): {len(pending)} of "
                f"{len(cfg['seed_list'])} images to sample on {world} process(es) -> {outdir}")
    with ImageWriter(outdir, subdirs=cfg["subdirs"], tar=cfg["save_tar"]) as writer, torch.no_grad():
        for indices in progress_bar(batches, progress and rank == 0 and bool(batches), unit="batch"):
            gen = ImageGenerators(device, indices, cfg["global_seed"])
            latents = sample_latents(diffusion, denoiser, gen, cfg["latent_size"], model.in_channels,
                                     model.num_classes, uncond=cfg["method"] == "uncond")
            writer.write(indices, decode_latents(vae, latents))
    written = len(writer.written)
    dist.barrier()

    summary = {"outdir": str(outdir), "written": written, "npz": None, "metrics": None}
    total = len(done_seeds(outdir) & set(cfg["seed_list"]))
    if cfg["save_npz"] and rank == 0:
        summary["npz"] = str(write_npz(outdir, cfg["seed_list"]))
        dist.print0(f"wrote {summary['npz']}")
    dist.barrier()
    if _needs_ref(cfg["metrics"]) and ref is None:
        dist.print0(f"metrics skipped: no reference statistics (pass --ref-path, or place them at "
                    f"dataset_refs/img{cfg['image_size']}.pkl)")
    elif cfg["metrics"]:
        if total < len(cfg["seed_list"]):
            raise UsageError(f"only {total} of {len(cfg['seed_list'])} images exist in {outdir}; "
                             f"rerun to finish them before computing metrics")
        with torch.no_grad():
            summary["metrics"] = compute_metrics(cfg, outdir, ref, device)
    logger = WandbLogger(bool(cfg["use_wandb"]), project="swg-dit", config=_record(cfg), group=cfg["wandb_group"],
                         name=cfg["wandb_runname"], rank=rank)
    logger.log_run(outdir, summary["metrics"])
    return summary
