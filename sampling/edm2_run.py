"""The EDM2 backend: settings, validation, networks, per-seed draw, sampler and decoder.

``sample_edm2.py`` is a thin command line over this module:

    cfg = build_config(net_pos_pkl=..., outdir=..., seeds="0-49999", g_method="swg", g_weight="0.2", ...)
    summary = generate(cfg)          # prefetch(cfg) only downloads

The lifecycle (folder, saved settings, pending seeds, ranks, writing, metrics,
logging) is :mod:`sampling.run`'s; this module says what is EDM2's own:
:class:`GenerateConfig` (the common :class:`sampling.run_settings.RunSettings` plus the
sampler, guidance and network settings), :func:`build_config` (preset applied,
every check that needs no network), :class:`EDM2Backend` (load and check the
networks, draw, sample with :func:`sampling.edm.edm_sampler`, decode).

Per-seed randomness follows EDM2's ``generate_images.py``
(:func:`sampling.seeds.draw_edm2`): each seed owns a generator on the sampling
device that draws, in order, the initial noise, the random class label and the
churn noise, so an image depends only on its seed and the settings.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional, Sequence

import torch

from guidance import method_spec
from guidance.settings import GuidanceSettings
from guidance.table import NEGATIVES, method_param_names, parse_sigma_interval
from guidance.windows import WindowError
from networks import zoo
from networks.edm2_pickle import EDM2Checkpoint, load_checkpoint
from networks.encoders import StabilityVAEEncoder
from sampling import presets as PR
from sampling import run, run_folder, run_settings
from sampling.edm import edm_sampler
from sampling.seeds import draw_edm2
from utils import cache
from utils.bounds import bounded, check_bounds
from utils.errors import UsageError

__all__ = ["GenerateConfig", "EDM2Backend", "build_config", "load_networks", "check_networks",
           "make_guided", "prefetch", "generate"]

# Settings that determine the pixels of an image; a resumed run must agree on them.
IDENTITY_KEYS = ("net_pos_pkl", "net_neg_pkl", "class_idx", "steps", "sigma_min", "sigma_max", "rho", "S_churn",
                 "S_min", "S_max", "S_noise", "g_method", "g_weight", "swg_sizes", "swg_steps",
                 "scale_window_guide", "g_interval", "clean_combos", "g_params", "g_sigma_interval",
                 "swg_sigma_interval", "perturb_blocks", "seg_sigma")
# The names of this API (and of sample_edm2.py's flags) for the fields of GuidanceSettings.
GUIDANCE_NAMES = {"method": "g_method", "weight": "g_weight", "window_size": "swg_sizes", "window_steps": "swg_steps",
                  "masked": "scale_window_guide", "step_interval": "g_interval", "sigma_interval": "g_sigma_interval",
                  "window_sigma_interval": "swg_sigma_interval"}
# The window options' defaults (given with a method without windows, another value is said and ignored).
_WINDOW_DEFAULTS = {"swg_sizes": None, "swg_steps": GuidanceSettings.window_steps[0],
                    "scale_window_guide": int(GuidanceSettings.masked)}
# Every method parameter of the table (APG's eta ...): a keyword of build_config and a flag.
METHOD_PARAMS = method_param_names()


def _is_default(key: str, value) -> bool:
    """Whether the window option ``key`` given as ``value`` (text, number or tuple) is its default."""
    default = _WINDOW_DEFAULTS[key]
    try:
        return default is not None and set(_ints(value, key, lo=0)) == {default}
    except UsageError:
        return False


@dataclasses.dataclass
class GenerateConfig(run_settings.RunSettings):
    """Resolved, validated EDM2 sampling settings (what ``settings.json`` records)."""

    net_pos_pkl: Optional[str] = None
    net_neg_pkl: Optional[str] = None
    preset: Optional[str] = None
    class_idx: Optional[int] = bounded(None, lo=0)
    steps: int = bounded(32, lo=1)
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0
    guidance: GuidanceSettings = dataclasses.field(default_factory=GuidanceSettings)

    def to_json(self) -> dict:
        """The settings as saved beside the images; the guidance under the names of the EDM2 reference's flags,
        so that folders written by earlier versions resume (:data:`IDENTITY_KEYS`)."""
        record = super().to_json()
        del record["guidance"]
        num_images = record.pop("num_images")
        g = self.guidance
        record.update({k: run_folder.json_value(v) for k, v in (
            ("g_method", g.method), ("g_weight", g.weights), ("swg_sizes", g.window_size),
            ("swg_steps", g.window_steps), ("scale_window_guide", int(g.masked)), ("g_interval", g.step_interval),
            ("clean_combos", not g.reference_quirks), ("max_window_batch", g.max_window_batch),
            ("g_params", dict(g.params)), ("g_sigma_interval", g.sigma_interval),
            ("swg_sigma_interval", g.window_sigma_interval))})
        if g.spec.perturbation:  # PAG / SEG / SLG only: records of other methods keep their keys
            record.update(perturb_blocks=run_folder.json_value(g.perturb_blocks), seg_sigma=g.seg_sigma)
        record["num_images"] = num_images
        return record


# ----------------------------------------------------------------------------
# Parsing and validation (no network, no files written).

def _floats(text, what: str) -> tuple:
    if isinstance(text, (int, float)):
        vals: tuple = (float(text),)
    elif isinstance(text, (list, tuple)):
        vals = tuple(float(v) for v in text)
    else:
        try:
            vals = tuple(float(v) for v in str(text).split(","))
        except ValueError:
            raise UsageError(f"`{what}`: cannot parse {text!r}; give numbers separated by a comma, e.g. 1.2,0.25") \
                from None
    if not all(math.isfinite(v) for v in vals):
        raise UsageError(f"`{what}`: {text!r} is not finite; give ordinary numbers")
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
            raise UsageError(f"`{what}`: cannot parse {text!r}; give one integer or two (height,width), "
                             f"e.g. 40 or 40,32") from None
    if len(vals) not in (1, 2):
        raise UsageError(f"`{what}`: give one integer or two (height,width), got {text!r}")
    if any(v < lo for v in vals):
        raise UsageError(f"`{what}`: values must be >= {lo}, got {text!r}")
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
        raise UsageError(f"`g_interval`: expected 'none' or two step indices 'first,last' with "
                         f"0 <= first <= last, got {text!r}")
    return vals


def build_config(*, preset: Optional[str] = None, net_pos_pkl: Optional[str] = None,
                 net_neg_pkl: Optional[str] = None, outdir: Optional[str] = None, seeds="0-63",
                 g_method: Optional[str] = None, g_weight=None, swg_sizes=None, swg_steps=None,
                 scale_window_guide=None, g_interval="none", metrics=None, ref_path: Optional[str] = None,
                 require_outdir: bool = True, **kwargs) -> GenerateConfig:
    """Apply the preset to options left unset (``None``), parse and validate everything checkable without I/O.

    Other keywords are :class:`GenerateConfig` fields (``batch``, ``steps``, ``class_idx``, ``device`` ...);
    ``None`` keeps the default.
    """
    given = dict(net_pos_pkl=net_pos_pkl, net_neg_pkl=net_neg_pkl, g_method=g_method, g_weight=g_weight,
                 swg_sizes=swg_sizes, swg_steps=swg_steps, scale_window_guide=scale_window_guide,
                 ref_path=ref_path, metrics=metrics)
    explicit = {k: given[k] for k in ("swg_sizes", "swg_steps", "scale_window_guide") if given[k] is not None}
    params = {k: kwargs.pop(k) for k in list(kwargs) if k in METHOD_PARAMS}
    params = {**(kwargs.pop("g_params", None) or {}), **{k: v for k, v in params.items() if v is not None}}
    preset_params, preset_method = {}, None
    if preset is not None:
        preset_method = PR.get_preset(preset).g_method
        # Another method than the preset's takes its own weights, not the preset's.
        other = g_method is not None and method_spec(g_method, "g_method").name != method_spec(preset_method).name
        for key, value in PR.get_preset(preset).settings().items():
            if key == "g_params":
                preset_params = dict(value)
            elif given.get(key) is None and not (other and key == "g_weight"):
                given[key] = value
    pos = zoo.resolve_model(given["net_pos_pkl"], "net_pos_pkl")
    neg = zoo.resolve_model(given["net_neg_pkl"], "net_neg_pkl")
    if not pos:
        raise UsageError("no positive network; pass `net_pos_pkl` (path, URL or model name) or `preset`")

    spec = method_spec(given["g_method"] or "none", "g_method")
    method = spec.name
    if preset_params and method_spec(preset_method).name == method:  # the preset's own parameters
        params = {**preset_params, **params}
    if preset is not None and other and given["g_weight"] is None and spec.num_weights:
        raise UsageError(f"`g_method` {method} is not the method of `preset` {preset} ({preset_method}), whose weights "
                         f"do not carry over; give `g_weight` (e.g. {spec.example_text()})")
    # What a method does not use takes its default (the settings say what runs; a resume compares them).
    unused = {k: v for k, v in explicit.items() if not spec.windows and not _is_default(k, v)}
    if not spec.windows:
        given.update(swg_sizes=None, swg_steps=None, scale_window_guide=None)
    clean = bool(kwargs.pop("clean_combos", False))
    if clean and "reference_quirks" not in spec.options:
        unused["clean_combos"], clean = True, False
    sw = given["scale_window_guide"]
    sw = int(GuidanceSettings.masked) if sw is None else sw
    if str(sw) not in ("0", "1"):
        raise UsageError(f"`scale_window_guide` must be 0 (SWG) or 1 (masked M-SWG), got {sw!r}")
    guidance = GuidanceSettings(
        method=method, weights=() if given["g_weight"] is None else _floats(given["g_weight"], "g_weight"),
        window_size=None if given["swg_sizes"] is None else _ints(given["swg_sizes"], "swg_sizes"),
        window_steps=GuidanceSettings.window_steps if given["swg_steps"] is None else _ints(given["swg_steps"],
                                                                                             "swg_steps"),
        masked=bool(int(sw)), step_interval=_interval(g_interval),
        reference_quirks=not clean, params=params,
        sigma_interval=parse_sigma_interval(kwargs.pop("g_sigma_interval", None), "g_sigma_interval"),
        window_sigma_interval=parse_sigma_interval(kwargs.pop("swg_sigma_interval", None), "swg_sigma_interval"),
        max_window_batch=kwargs.pop("max_window_batch", None), perturb_blocks=kwargs.pop("perturb_blocks", None),
        seg_sigma=kwargs.pop("seg_sigma", None))
    try:
        guidance = guidance.checked()
    except UsageError as exc:  # about this API's keywords (g_method, swg_sizes ...), not the description's fields
        raise exc.renamed(GUIDANCE_NAMES)
    if spec.needs_neg and not neg:
        raise UsageError(f"`g_method` {method} needs a negative network ({NEGATIVES[spec.negative]}); "
                         f"pass `net_neg_pkl`")
    if neg and not spec.needs_neg:
        run_settings.warn_unused(["net_neg_pkl"], f"`g_method` {method}")
        neg = None
    run_settings.warn_unused(list(unused), f"`g_method` {method}")

    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # unset options keep the defaults
    unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(GenerateConfig)})
    if unknown:
        raise TypeError(f"build_config() got unknown option(s) {', '.join(unknown)}")
    kwargs["save"] = run_settings.save_mode(kwargs.get("save"), kwargs.get("save_tar", False))
    kwargs["save_tar"] = kwargs["save"] == "tar"
    cfg = GenerateConfig(net_pos_pkl=pos, net_neg_pkl=neg, outdir=outdir, seeds=run_settings.parse_seeds(seeds),
                         preset=preset, guidance=guidance, ref_path=given["ref_path"],
                         metrics=run_settings.parse_metrics(given["metrics"]), **kwargs)
    _check_numbers(cfg)
    guidance.check_sampler_steps(cfg.steps)
    run_settings.check_run_settings(cfg, require_outdir=require_outdir)
    return cfg


def _check_numbers(cfg: GenerateConfig) -> None:
    check_bounds(GenerateConfig, vars(cfg))  # steps and class_idx first: the checks below use them
    for name in ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise"):
        value = getattr(cfg, name)
        if math.isnan(value) or (math.isinf(value) and not (name == "S_max" and value > 0)):  # S_max inf: no bound
            raise UsageError(f"`{name}`: '{value}' is not finite; give ordinary numbers")
    if not (0 < cfg.sigma_min < cfg.sigma_max) or math.isinf(cfg.sigma_max):
        raise UsageError(f"need 0 < `sigma_min` < `sigma_max` < inf, got {cfg.sigma_min} and {cfg.sigma_max}")
    if cfg.rho <= 0:
        raise UsageError(f"`rho` must be positive, got {cfg.rho}")
    if cfg.S_churn < 0 or cfg.S_noise < 0 or cfg.S_min < 0 or cfg.S_max < cfg.S_min:
        raise UsageError("need `S_churn` >= 0, `S_noise` >= 0 and 0 <= `S_min` <= `S_max`")
    interval = cfg.guidance.step_interval
    if interval is not None and interval[1] >= cfg.steps:
        raise UsageError(f"`g_interval` {interval[0]},{interval[1]} goes past the last step "
                         f"{cfg.steps - 1}; step indices run from 0 to `steps` - 1")


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
    """Checks that need the networks: shapes, labels, window geometry, perturbed blocks."""
    c, h, w = _latent_shape(pos)
    label_dim = int(pos.net.label_dim)
    if neg is not None:
        if _latent_shape(neg) != (c, h, w):
            raise UsageError(f"the negative network works on {_latent_shape(neg)} inputs but the positive on "
                             f"{(c, h, w)}; pick networks of the same resolution")
        if int(neg.net.label_dim) not in (0, label_dim):
            raise UsageError(f"the negative network has {neg.net.label_dim} classes, the positive {label_dim}")
    if cfg.class_idx is not None and not (0 <= cfg.class_idx < max(label_dim, 0)):
        raise UsageError(f"`class_idx` {cfg.class_idx} is out of range: the network has {label_dim} classes"
                         + (f"; use `class_idx` 0..{label_dim - 1}" if label_dim > 0
                            else " (it is unconditional; drop `class_idx`)"))
    g = cfg.guidance
    g.check_network(pos.net)  # PAG / SEG / SLG: blocks that take the perturbation
    if g.spec.windows:
        try:
            g.check_input(h, w)
        except WindowError as exc:
            raise UsageError(f"{exc} (the network works on {h}x{w} latents)") from None
        levels = len(pos.init_kwargs.get("channel_mult", (1, 2, 3, 4)))
        factor = 2 ** (levels - 1)
        if any(k % factor for k in g.window_size):
            raise UsageError(f"`window_size` {','.join(map(str, g.window_size))} must be divisible by {factor} "
                             f"(the U-Net halves the resolution {levels - 1} times)")


def _denoiser(net: torch.nn.Module):
    def denoise(x, sigma, labels=None, edit=None):
        return net(x, sigma, labels) if edit is None else net(x, sigma, labels, edit=edit)
    return denoise


def make_guided(cfg: GenerateConfig, pos_net, neg_net):
    """The guided denoiser ``D(x, sigma, labels)`` for ``cfg`` (PAG / SEG / SLG: blocks checked against ``pos_net``)."""
    pos = _denoiser(pos_net)
    return cfg.guidance.guide(pos, neg_denoiser=_denoiser(neg_net) if neg_net is not None else None,
                              perturb=cfg.guidance.perturber(pos, pos_net))


# ----------------------------------------------------------------------------
# The backend.

class EDM2Backend(run.Backend):
    """EDM2 networks from official pickles (or converted files), guided, EDM's Heun sampler, the checkpoint's encoder."""

    name = "edm2"
    wandb_project = "swg-edm2"

    @property
    def identity_keys(self) -> tuple:
        """:data:`IDENTITY_KEYS` less the options this run's method does not use (a folder written with an ignored
        ``--swg_steps`` resumes without it, and the other way round)."""
        spec = self.settings.guidance.spec
        skip = set() if spec.windows else {"swg_sizes", "swg_steps", "scale_window_guide", "swg_sigma_interval"}
        skip |= set() if "reference_quirks" in spec.options else {"clean_combos"}
        return tuple(k for k in IDENTITY_KEYS if k not in skip)

    def __init__(self, settings: GenerateConfig):
        super().__init__(settings)
        self.pos = self.neg = self.guided = None

    def fetch(self) -> list:
        cfg = self.settings
        paths = [cache.fetch(cfg.net_pos_pkl, desc="positive network")]
        if cfg.net_neg_pkl:
            paths.append(cache.fetch(cfg.net_neg_pkl, desc="negative network"))
        pos = load_checkpoint(paths[0], source=cfg.net_pos_pkl)
        if isinstance(pos.encoder, StabilityVAEEncoder) and not os.path.isdir(pos.encoder.vae_name):
            paths.append(cache.hf_snapshot(pos.encoder.vae_name))
        return paths

    def load(self, device) -> None:
        pos, neg = load_networks(self.settings)
        self.use(pos, neg, device)

    def use(self, pos: EDM2Checkpoint, neg: Optional[EDM2Checkpoint], device) -> "EDM2Backend":
        """Sample with already loaded checkpoints (e.g. one network for several guidance settings)."""
        cfg = self.settings
        check_networks(cfg, pos, neg)
        self.pos, self.neg = pos, neg
        pos_net = pos.net.to(device)
        neg_net = neg.net.to(device) if neg is not None else None
        pos.encoder.init(device)
        self.guided = make_guided(cfg, pos_net, neg_net)
        return self

    def resolution(self) -> tuple:
        side = int(self.pos.net.img_resolution) * int(self.pos.encoder.spatial_factor)
        return side, side

    def describe(self) -> str:
        cfg = self.settings
        return f"EDM2 {cfg.guidance.method} ({cfg.steps} steps)"

    def cost(self) -> Optional[dict]:
        return self.guided.cost() if self.guided is not None else None

    def draw(self, seeds: Sequence[int], device, classes=None) -> run.Draw:
        """Per-seed noise and labels; ``classes`` (one or one per seed) overrides `class_idx`."""
        classes = self.settings.class_idx if classes is None else classes
        return draw_edm2(seeds, _latent_shape(self.pos), int(self.pos.net.label_dim), device, classes=classes)

    def sample(self, draw: run.Draw) -> torch.Tensor:
        cfg = self.settings
        return edm_sampler(self.guided, draw.noise, draw.labels, num_steps=cfg.steps, sigma_min=cfg.sigma_min,
                           sigma_max=cfg.sigma_max, rho=cfg.rho, S_churn=cfg.S_churn, S_min=cfg.S_min,
                           S_max=cfg.S_max, S_noise=cfg.S_noise, randn_like=draw.rnd.randn_like)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos.encoder.decode(x)


def prefetch(cfg: GenerateConfig) -> list:
    """Download everything ``cfg`` needs (networks, VAE, reference statistics, detectors); return paths."""
    return run.prefetch(EDM2Backend(cfg))


def generate(cfg: GenerateConfig, *, progress: bool = True, desc: str = "sampling") -> dict:
    """Generate every missing image of ``cfg`` into ``cfg.outdir``; return the run summary (see :func:`sampling.run.generate`).

    ``desc`` labels the progress bar (the demos name their row there)."""
    return run.generate(EDM2Backend(cfg), progress_bar=progress, desc=desc)
