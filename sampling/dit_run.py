"""The DiT backend: settings, validation, DiT + VAE, per-image draw, DiT's diffusion and the VAE decoder.

``sample_dit.py`` is a thin command line over this module:

    cfg = build_config(num_fid_samples=50000, crop=1, mask=1, g_scale=0.5, sample_dir="samples")
    summary = generate(cfg)      # or prefetch(cfg) to only download the weights

The lifecycle (folder, saved settings, pending seeds, ranks, writing, ``.npz``,
metrics, logging) is :mod:`sampling.run`'s; this module says what is DiT's own:
:class:`DiTConfig` (the common :class:`sampling.run_settings.RunSettings` plus the
model, guidance switches and diffusion), :func:`build_config` (every check that
needs no network; the run folder named like the reference's), :class:`DiTBackend`
(DiT and VAE through the weights cache, guided by :mod:`guidance.dit`, sampled
by :mod:`sampling.gaussian_diffusion`, decoded by the VAE).

Image ``i`` (``seeds`` or ``0 .. num_fid_samples - 1``) is drawn from its own
CPU generator seeded with ``global_seed * 2**32 + i`` (:func:`sampling.seeds.draw_dit`):
its initial noise, its class label and every step's noise.  The images therefore
do not depend on the number of processes, the batch size or the device type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import sys
import typing
from typing import Optional, Sequence

import torch

from guidance import WindowError
from guidance.dit import (DIT_MODES, REFERENCE_MODES, default_window_size, dit_settings, guide_dit, idle_scales,
                          reference_mode, table_methods)
from guidance.settings import GuidanceSettings
from guidance.table import METHODS, method_param_names, method_params, method_spec, parse_sigma_interval
from metrics.api import needs_reference
from networks.dit import PRETRAINED_DIT, DiT_models, create_dit
from networks.dit_diffusers import load_dit_weights, snapshot_source
from networks.encoders import load_vae as load_autoencoder
from networks.zoo import close_names
from sampling import run, run_folder, run_settings
from sampling.gaussian_diffusion import create_diffusion, space_timesteps
from sampling.seeds import draw_dit
from utils import dist
from utils.bounds import bounded, check_bounds
from utils.cache import prefetch as cache_prefetch
from utils.errors import UsageError, spell

LATENT_SCALE = 0.18215  # Stable Diffusion VAE latent scaling used by DiT.
# The reference's metrics when `metrics` is not given; skipped (with a note) when no reference statistics are
# found (`ref_path`, else dataset_refs/img{size}.pkl).  Metrics given explicitly need their reference.
DEFAULT_METRICS = "fid,fd_dinov2"
VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
# Settings an existing output folder must share with a resumed run (the rest may change).
IDENTITY_KEYS = ("model", "model_kwargs", "ckpt", "image_size", "vae", "num_classes", "method", "g_scale",
                 "crop_scale", "mask", "window_size", "window_steps", "cfg_channels", "pos_embed",
                 "num_sampling_steps", "global_seed", "weights", "g_params", "g_sigma_interval",
                 "swg_sigma_interval", "perturb_blocks", "seg_sigma")

__all__ = ["DiTOptions", "DEFAULT_METRICS", "VAE_REPOS", "LATENT_SCALE", "IDENTITY_KEYS", "DiTConfig", "DiTBackend", "build_config",
           "resolve_config", "folder_name", "run_dir", "decode_latents",
           "load_model", "load_vae", "prefetch", "generate"]


@dataclasses.dataclass
class DiTOptions:
    """Every option of :func:`build_config` (the command line's flags, underscore spelling) with its type and
    default: the one place of DiT's defaults (``sample_dit.py``'s flags take theirs from here)."""

    model: str = "DiT-XL/2"
    model_kwargs: Optional[str] = None     # JSON text or a dict
    ckpt: Optional[str] = None
    vae: str = "ema"
    vae_path: Optional[str] = None
    sample_dir: str = "samples"
    per_proc_batch_size: int = 50
    num_fid_samples: Optional[int] = None
    seeds: Optional[str] = None            # text or a list
    image_size: int = 256
    num_classes: int = 1000
    g_scale: float = 0.0
    crop_scale: float = 0.0
    crop: int = 0
    mask: int = 0
    cfg_crop: int = 0
    uncond: int = 0
    vanila_cfg: int = 0
    window_size: Optional[int] = None
    window_steps: int = 2
    cfg_channels: str = "reference"
    pos_embed: str = "resize"
    num_sampling_steps: str = "250"
    global_seed: int = 0
    tf32: bool = True
    save_tar: bool = False
    save_npz: bool = False
    save: Optional[str] = None
    keep: int = 0
    save_stats: Optional[str] = None
    subdirs: bool = False
    metrics: Optional[str] = None          # text or a list; None: DEFAULT_METRICS, skipped without a reference
    ref_path: Optional[str] = None
    max_window_batch: Optional[int] = None
    device: Optional[str] = None
    use_wandb: int = 0
    wandb_group: Optional[str] = None
    wandb_runname: Optional[str] = None
    # Any other method of guidance.table (apg, cfg-zero-swg, ...), its weights and sigma intervals; its
    # parameters (eta ...) are keywords too, named by guidance.table.method_param_names().
    method: Optional[str] = None
    weights: Optional[str] = None          # text or a list
    g_sigma_interval: Optional[str] = None
    swg_sigma_interval: Optional[str] = None
    perturb_blocks: Optional[str] = None   # pag / seg / slg: text or a list [default: guidance.perturb's]
    seg_sigma: Optional[str] = None        # seg: query blur width (text or a number) [default: inf]


def _scalar(tp):
    """``int`` for ``int`` and ``Optional[int]`` (likewise float, bool); None for other types (text, lists)."""
    inner = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is typing.Union else [tp]
    return inner[0] if len(inner) == 1 and inner[0] in (int, float, bool) else None


# Python values are converted as the command line converts its flags (so 1 and 1.0 name the same folder):
# by the type of each DiTOptions field.
_CONVERT = {name: _scalar(tp) for name, tp in typing.get_type_hints(DiTOptions).items() if _scalar(tp)}
# The reference's guidance switches, recorded in settings.json and named in the run folder as given.
SWITCHES = ("g_scale", "crop_scale", "crop", "mask", "cfg_crop", "uncond", "vanila_cfg")
# The constructor arguments model_kwargs may override.
_KWARGS = {"hidden_size", "depth", "num_heads", "mlp_ratio", "class_dropout_prob", "learn_sigma", "in_channels",
           "patch_size"}


@dataclasses.dataclass(kw_only=True)
class DiTConfig(run_settings.RunSettings):
    """Resolved, validated DiT sampling settings (what ``settings.json`` records)."""

    model: str
    model_kwargs: dict
    ckpt: Optional[str]
    ckpt_source: str                       # the checkpoint actually loaded (ckpt or the released weights)
    vae: str
    vae_path: Optional[str]
    sample_dir: str
    num_fid_samples: Optional[int] = bounded(lo=1, hi=run_settings.MAX_SEED + 1)  # images are named by 7 digits
    image_size: int
    latent_size: int
    num_classes: int = bounded(lo=1)
    switches: dict                         # SWITCHES as given (settings.json, the folder name); read by nothing else
    guidance: GuidanceSettings
    unconditional: bool                    # sample the null class
    cfg_channels: str
    pos_embed: str
    num_sampling_steps: str
    timesteps: int
    global_seed: int = bounded(lo=0, hi=2 ** 31 - 1)
    tf32: bool

    def to_json(self) -> dict:
        """The settings as saved beside the images, in the keys and order of earlier versions (they resume)."""
        record = super().to_json()
        g = self.guidance
        table = g.method not in DIT_MODES  # a table method (--method), not one of the switches
        legacy = {**self.switches, "method": "uncond" if self.unconditional else g.method,
                  "weights": g.weights if table else (), "g_params": dict(g.params),
                  "g_sigma_interval": g.sigma_interval, "swg_sigma_interval": g.window_sigma_interval,
                  "window_size": g.window_size[0] if g.window_size else None, "window_steps": g.window_steps[0]}
        if g.spec.perturbation:  # PAG / SEG / SLG only: records of other methods keep their keys
            legacy.update(perturb_blocks=g.perturb_blocks, seg_sigma=g.seg_sigma)
        legacy = {k: run_folder.json_value(v) for k, v in legacy.items()}
        out = {}
        for key, value in record.items():
            if key == "switches":
                out.update(legacy)
            elif key == "num_images":
                out["max_window_batch"] = g.max_window_batch
                out[key] = value
            elif key not in ("guidance", "unconditional"):
                out[key] = value
        return out


# ----------------------------------------------------------------------------
# Configuration.

def _model_kwargs(kwargs) -> dict:
    kwargs = kwargs or {}
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError as exc:
            raise UsageError(f"`model_kwargs` is not valid JSON ({exc.msg}); write e.g. "
                             f"'{{\"hidden_size\": 384, \"depth\": 12}}'") from None
    if not isinstance(kwargs, dict) or set(kwargs) - _KWARGS:
        extra = sorted(set(kwargs) - _KWARGS) if isinstance(kwargs, dict) else kwargs
        raise UsageError(f"`model_kwargs` accepts a JSON object with {', '.join(sorted(_KWARGS))}; got {extra}")
    return dict(kwargs)


def _default_ref_path(ref_path: Optional[str], image_size: int) -> Optional[str]:
    """`ref_path`, else ``dataset_refs/img{size}.pkl`` when present (the seed README's location)."""
    if ref_path:
        return ref_path
    local = pathlib.Path("dataset_refs") / f"img{image_size}.pkl"
    return str(local) if local.is_file() else None


def _seed_list(seeds, num_fid_samples) -> list[int]:
    if seeds is not None and num_fid_samples is not None:
        raise UsageError("`seeds` and `num_fid_samples` both choose the images; give one of them")
    if seeds is not None:
        return run_settings.parse_seeds(seeds)
    return list(range(50000 if num_fid_samples is None else num_fid_samples))


def _table_method(o: dict):
    """``(mode, weights, params, g_sigma, swg_sigma)`` of a `method` of the guidance table, checked; None without."""
    name = o["method"]
    params = {k: o[k] for k in method_param_names()}
    intervals = (o["g_sigma_interval"], o["swg_sigma_interval"])
    if name is None or str(name).strip().lower() in ("", "none"):
        if o["weights"] is not None or any(v is not None for v in (*params.values(), *intervals)):
            raise UsageError("`weights`, the method parameters and the sigma intervals belong to `method`; "
                             "choose one, e.g. `method` apg")
        return None
    spec = method_spec(name, "method", offered=table_methods())
    if spec.name in DIT_MODES:
        switch = {m.mode: m for m in REFERENCE_MODES}.get(spec.name)
        use = f"`{switch.switch}` 1 with {' and '.join(f'`{s}`' for s in switch.scales)}" if switch else "no switch"
        raise UsageError(f"`method` {spec.name} is one of DiT's reference modes: use {use} (see --help)")
    if any(o[m.switch] for m in REFERENCE_MODES) or o["g_scale"] or o["crop_scale"]:
        raise UsageError(f"`method` {spec.name} replaces the switches "
                         f"{', '.join(f'`{m.switch}`' for m in REFERENCE_MODES)} and `g_scale` / `crop_scale`; "
                         f"give its weights with `weights` (e.g. {spec.example_text()})")
    try:
        weights = tuple(float(w) for w in str(o["weights"] if o["weights"] is not None else "").replace(
            "(", "").replace(")", "").split(",") if str(w).strip()) if not isinstance(o["weights"], (list, tuple)) \
            else tuple(float(w) for w in o["weights"])
    except ValueError:
        raise UsageError(f"`weights`: cannot parse {o['weights']!r}; give numbers separated by a comma, "
                         f"e.g. {spec.example_text()}") from None
    if len(weights) != spec.num_weights:
        raise UsageError(f"`method` {spec.name} takes {spec.num_weights} weight(s) ({', '.join(spec.weights)}), "
                         f"got {len(weights)}; e.g. `weights` {spec.example_text()}")
    if spec.negative == "weak":
        raise UsageError(f"`method` {spec.name} needs a weaker network; DiT samples with one network "
                         f"(the null class is the unconditional negative: e.g. `method` cfg-zero)")
    g_sigma = parse_sigma_interval(o["g_sigma_interval"], "g_sigma_interval")
    swg_sigma = parse_sigma_interval(o["swg_sigma_interval"], "swg_sigma_interval")
    if swg_sigma is not None and not spec.windows:
        pair = f"{spec.name}-swg" if f"{spec.name}-swg" in METHODS else "an X-swg method"
        raise UsageError(f"`swg_sigma_interval` limits the window term, but `method` {spec.name} has no windows; "
                         f"drop it or use {pair}")
    return spec.name, weights, method_params(spec, params, "method"), g_sigma, swg_sigma


def build_config(*, require_outdir: bool = True, **opts) -> DiTConfig:
    """Resolved configuration from keyword options (the flags' underscore names; :data:`DEFAULTS` fill the rest).

    Values may be Python objects (``model_kwargs`` a dict, ``seeds`` a list,
    ``metrics`` a list); they are converted as the command line converts its
    flags and validated; ``outdir`` is :func:`run_dir` (None with
    ``require_outdir=False``, for callers that only sample in memory).  Unknown
    names raise ``TypeError``; bad values :class:`UsageError`.  Nothing is read or written.
    """
    fields = {f.name: f for f in dataclasses.fields(DiTOptions)}
    unknown = sorted(set(opts) - set(fields) - set(method_param_names()))
    if unknown:
        raise TypeError(f"build_config() got unknown option(s) {', '.join(unknown)}; "
                        f"options are {', '.join([*fields, *method_param_names()])}")
    params = {name: opts.pop(name, None) for name in method_param_names()}
    o = {**dataclasses.asdict(DiTOptions(**opts)), **params}
    for key, convert in _CONVERT.items():
        if o[key] is not None:
            o[key] = convert(o[key])
        if convert is float and not math.isfinite(o[key]):
            raise UsageError(f"`{key}`: '{o[key]}' is not finite; give ordinary numbers")

    check_bounds(DiTConfig, o)  # num_fid_samples, num_classes, global_seed, keep
    if o["model"] not in DiT_models:
        close = close_names(o["model"], DiT_models)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise UsageError(f"unknown model {o['model']!r}; {hint}use one of {', '.join(DiT_models)}")
    kwargs = _model_kwargs(o["model_kwargs"])
    if o["ckpt"] is None:
        if o["model"] != "DiT-XL/2" or o["image_size"] not in PRETRAINED_DIT or o["num_classes"] != 1000 or kwargs:
            raise UsageError(f"pretrained weights exist only for DiT-XL/2 at `image_size` 256 or 512 with 1000 "
                             f"classes; pass `ckpt` for {o['model']} at {o['image_size']}")
        ckpt_source = PRETRAINED_DIT[o["image_size"]]
    else:
        ckpt_source = str(o["ckpt"])
    patch = kwargs.get("patch_size", DiT_models[o["model"]].keywords["patch_size"])
    if o["image_size"] <= 0 or o["image_size"] % (8 * patch):
        raise UsageError(f"`image_size` {o['image_size']} must be a positive multiple of {8 * patch} "
                         f"(VAE factor 8 x patch size {patch}); DiT uses 256 or 512")
    latent = o["image_size"] // 8

    # Guidance: a method of the table (`method`), or the reference's switches and scales (guidance.dit).
    g, c = o["g_scale"], o["crop_scale"]
    table = _table_method(o)
    mode, weights, g_params, g_sigma, swg_sigma = table or (reference_mode(o, g, c), (), {}, None, None)
    idle = None if table else idle_scales(o, o)
    if idle:
        dist.print0(spell(f"warning: {idle}"), file=sys.stderr)
    windows = mode in METHODS and METHODS[mode].windows
    if o["mask"] and not windows:
        raise UsageError("`mask` 1 (M-SWG) needs " + " or ".join(f"`{m.switch}` 1" for m in REFERENCE_MODES if m.windows)
                         + " (or a `method` with windows, e.g. apg-swg)")
    run_settings.warn_unused([k for k in ("window_size", "window_steps") if not windows
                              and o[k] not in (None, getattr(DiTOptions, k))], f"{mode} (it has no windows)")
    window = None
    if windows:
        window = o["window_size"] or max(patch, default_window_size(latent) // patch * patch)
        if window % patch:
            raise UsageError(f"`window_size` {window} must be a multiple of the patch size {patch}")
    guidance = dit_settings(mode, g, c, o["mask"], window, o["window_steps"], o["cfg_channels"],
                            kwargs.get("in_channels", 4), o["max_window_batch"], weights, g_params, g_sigma,
                            swg_sigma, o["perturb_blocks"], o["seg_sigma"])
    if guidance.spec.perturbation:  # the blocks against the architecture, before anything is loaded
        with torch.device("meta"):
            guidance.check_network(create_dit(o["model"], input_size=latent, num_classes=o["num_classes"], **kwargs))
    try:
        guidance.check_input(latent, latent)
    except WindowError as exc:
        raise UsageError(f"{exc} (latent {latent}x{latent})") from None

    steps = str(o["num_sampling_steps"])
    timesteps = len(space_timesteps(1000, steps))
    guidance.check_sampler_steps(timesteps)
    metrics = run_settings.parse_metrics(DEFAULT_METRICS if o["metrics"] is None else o["metrics"])
    ref_path = _default_ref_path(o["ref_path"], o["image_size"]) if needs_reference(metrics) else o["ref_path"]

    save = run_settings.save_mode(o["save"], o["save_tar"])
    cfg = DiTConfig(
        outdir=None, seeds=_seed_list(o["seeds"], o["num_fid_samples"]), batch=o["per_proc_batch_size"],
        subdirs=o["subdirs"], save_tar=save == "tar", save_npz=o["save_npz"], save=save,
        keep=o["keep"], save_stats=o["save_stats"], metrics=metrics, ref_path=ref_path,
        require_reference=o["metrics"] is not None, use_wandb=o["use_wandb"], wandb_group=o["wandb_group"],
        wandb_runname=o["wandb_runname"], device=o["device"],
        model=o["model"], model_kwargs=kwargs, ckpt=o["ckpt"], ckpt_source=ckpt_source, vae=o["vae"],
        vae_path=o["vae_path"], sample_dir=str(o["sample_dir"]), num_fid_samples=o["num_fid_samples"],
        image_size=o["image_size"], latent_size=latent, num_classes=o["num_classes"],
        switches={k: o[k] for k in SWITCHES}, guidance=guidance, unconditional=mode == "uncond",
        cfg_channels=o["cfg_channels"], pos_embed=o["pos_embed"], num_sampling_steps=steps, timesteps=timesteps,
        global_seed=o["global_seed"], tf32=o["tf32"])
    cfg.outdir = run_dir(cfg) if require_outdir else None
    run_settings.check_run_settings(cfg, require_outdir=require_outdir)
    return cfg


def resolve_config(opts: dict) -> DiTConfig:
    """:func:`build_config` of a dict of options (e.g. a click context's ``params``)."""
    return build_config(**opts)


def folder_name(cfg: DiTConfig) -> str:
    """Run folder named like the reference: model, ckpt, size, vae, scale, seed and method suffixes."""
    ckpt = os.path.basename(str(cfg.ckpt)).replace(".pt", "") if cfg.ckpt else "pretrained"
    s = cfg.switches
    name = (f"{cfg.model.replace('/', '-')}-{ckpt}-size-{cfg.image_size}-vae-{cfg.vae}-"
            f"g-{s['g_scale']}-seed-{cfg.global_seed}")
    if s["crop"]:
        name += f"_swg_mask_{int(s['mask'])}"
    if s["cfg_crop"]:
        name += f"_cfg_swg_{s['crop_scale']}_mask_{int(s['mask'])}"
    if s["uncond"]:
        name += "_uncond"
    g = cfg.guidance
    if g.method not in DIT_MODES:  # a table method (--method)
        params = "".join(f"_{k}_{v:g}" for k, v in sorted(g.params.items()))
        name += f"_{g.method}_w_{','.join(f'{w:g}' for w in g.weights)}{params}_mask_{int(s['mask'])}"
        for key, lo_hi in (("g_sigma_interval", g.sigma_interval), ("swg_sigma_interval", g.window_sigma_interval)):
            if lo_hi:
                name += f"_{key.split('_')[0]}sig_{lo_hi[0]:g}-{lo_hi[1]:g}"
        if g.perturb_blocks is not None:
            name += f"_blocks_{','.join(map(str, g.perturb_blocks))}"
        if g.seg_sigma is not None:
            name += f"_segsigma_{g.seg_sigma:g}"
    if s["vanila_cfg"]:
        name += "_vanila_cfg"
    return name.replace(", ", "_").replace("[", "").replace("]", "").replace(" ", "_")


def run_dir(cfg: DiTConfig) -> str:
    """Where the images go: ``<sample_dir>/<folder_name(cfg)>/samples`` (``.npz`` and metrics beside)."""
    return os.path.join(cfg.sample_dir, folder_name(cfg), "samples")


# ----------------------------------------------------------------------------
# Networks.

@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW images: ``clamp(127.5 VAE(z / 0.18215) + 128, 0, 255)`` truncated like the reference."""
    images = vae.decode(latents / LATENT_SCALE).sample
    return torch.clamp(127.5 * images + 128.0, 0, 255).to(torch.uint8)


def load_model(cfg: DiTConfig, device):
    """The DiT of ``cfg`` (a ``.pt`` through the weights cache, or a diffusers folder / hub id) on ``device``."""
    net, _ = load_dit_weights(cfg.ckpt_source, cfg.model, pos_embed=cfg.pos_embed, input_size=cfg.latent_size,
                              num_classes=cfg.num_classes, **cfg.model_kwargs)
    return net.to(device)


def _vae_source(cfg: DiTConfig) -> str:
    return cfg.vae_path or VAE_REPOS[cfg.vae]


def load_vae(cfg: DiTConfig, device):
    """The AutoencoderKL of ``cfg`` (``vae_path`` or the Stability repo in the cache), checked against DiT."""
    if cfg.vae_path and not os.path.isdir(os.path.expanduser(cfg.vae_path)):
        raise UsageError(f"`vae_path` {cfg.vae_path} is not a folder; pass a diffusers AutoencoderKL folder")
    vae = load_autoencoder(_vae_source(cfg), device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    if factor != 8 or vae.config.latent_channels != cfg.model_kwargs.get("in_channels", 4):
        raise UsageError(f"the VAE maps {cfg.image_size}px images to {vae.config.latent_channels} channels at "
                         f"1/{factor} size, DiT needs 4 channels at 1/8; use `vae` ema or mse")
    return vae


class DiTBackend(run.Backend):
    """DiT from the released or a given checkpoint, guided by :mod:`guidance.dit`, DiT's diffusion, the SD VAE."""

    name = "dit"
    wandb_project = "swg-dit"

    @property
    def identity_keys(self) -> tuple:
        """:data:`IDENTITY_KEYS` less the window options when this run's method has no windows (a folder written
        with an ignored ``--window-steps`` resumes without it, and the other way round)."""
        if self.settings.guidance.spec.windows:
            return IDENTITY_KEYS
        return tuple(k for k in IDENTITY_KEYS if k not in ("mask", "window_size", "window_steps", "swg_sigma_interval"))

    def __init__(self, settings: DiTConfig):
        super().__init__(settings)
        self.model = self.vae = self.diffusion = self.denoiser = None

    def fetch(self) -> list:
        cfg = self.settings
        return cache_prefetch([snapshot_source(cfg.ckpt_source),
                               None if cfg.vae_path else f"hf-snapshot://{VAE_REPOS[cfg.vae]}"])

    def load(self, device) -> None:
        cfg = self.settings
        torch.backends.cuda.matmul.allow_tf32 = bool(cfg.tf32)
        torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
        with torch.no_grad():
            model = load_model(cfg, device)
            vae = load_vae(cfg, device)
        self.use(model, vae)

    def use(self, model, vae) -> "DiTBackend":
        """Sample with an already loaded DiT and VAE (e.g. one model for several guidance settings)."""
        cfg = self.settings
        self.model, self.vae = model, vae
        self.diffusion = create_diffusion(cfg.num_sampling_steps)
        self.denoiser = guide_dit(cfg.guidance, model, sigma_of=self.diffusion.sigma_of)
        return self

    def resolution(self) -> tuple:
        return self.settings.image_size, self.settings.image_size

    def cost(self) -> Optional[dict]:
        return self.denoiser.cost() if self.denoiser is not None else None

    def describe(self) -> str:
        cfg = self.settings
        return f"{cfg.model} {'uncond' if cfg.unconditional else cfg.guidance.method} ({cfg.timesteps} steps)"

    def draw(self, seeds: Sequence[int], device, classes=None) -> run.Draw:
        cfg = self.settings
        return draw_dit(seeds, [self.model.in_channels, cfg.latent_size, cfg.latent_size], self.model.num_classes,
                        device, cfg.global_seed, uncond=cfg.unconditional, classes=classes)

    def sample(self, draw: run.Draw) -> torch.Tensor:
        return self.diffusion.p_sample_loop(self.denoiser, draw.noise, draw.labels, randn_like=draw.rnd.randn_like)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return decode_latents(self.vae, x)


def prefetch(cfg: DiTConfig) -> list[str]:
    """Download everything ``cfg`` needs into the weights cache (nothing is sampled); return the local paths."""
    return run.prefetch(DiTBackend(cfg))


def generate(cfg: DiTConfig, *, progress: bool = True) -> dict:
    """Sample every image of ``cfg`` missing from ``cfg.outdir``, then the ``.npz`` and metrics it asks for.

    Returns the run summary (:func:`sampling.run.generate`).  Runs under ``torchrun``;
    sets TF32 as ``cfg.tf32`` says.
    """
    return run.generate(DiTBackend(cfg), progress_bar=progress)
