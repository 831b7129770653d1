"""Side-by-side samples of the guidance methods: same seeds and classes, one column per method and weight.

    from results.grid import parse_columns, edm2_grid, dit_grid, draw_grid
    cols = parse_columns(["none", "cfg:0.9", "m-swg:0.2", "m-swg:1.1", "cfg-m-swg:0.3,0.3"])
    grid = edm2_grid("raw-img512-s", cols, seeds=[0, 1], classes=[88, 207],
                     net_uncond="raw-img512-xs-uncond", swg_sizes=40)
    draw_grid(grid, "edm2_grid.png")

A column is written ``method[:w[,w2]]`` with any method of :data:`guidance.table.METHODS`:
``none``, ``cfg:w``, ``wmg:w``, ``apg:w``, ``pag:w`` ...; the window methods plain or masked,
``swg:w`` / ``m-swg:w``, ``cfg-swg:w1,w2`` / ``cfg-m-swg:w1,w2``, ``apg-m-swg:w1,w2`` ...
Weights use the table's convention ``D = D_pos + w rule(D_pos, D_neg)`` for both models (DiT's
CFG scale is ``s = 1 + w``); method parameters keep their defaults.  The methods with an
unconditional negative use the unconditional network, ``wmg`` the weaker one.

Every image is drawn exactly as the samplers draw it (:func:`sampling.seeds.draw_edm2`,
:func:`sampling.seeds.draw_dit`): the seed's generator gives the initial noise, then the
random class (replaced by the row's class when one is given), then the per-step noise.  With ``classes=None`` a cell therefore equals the image
``sample_edm2.py`` / ``sample_dit.py`` write for that seed.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from guidance import method_spec
from guidance.dit import REFERENCE_MODES
from guidance.table import NEGATIVES
from networks.edm2_pickle import load_checkpoint
from sampling import dit_run, edm2_run
from utils import cache
from utils.atomic import atomic_path
from utils.errors import UsageError

__all__ = ["Column", "Grid", "parse_columns", "edm2_grid", "dit_grid", "draw_grid", "save_mosaic", "default_device"]

_SPEC = re.compile(r"^([a-z0-9*_-]+)(?::([^:]+))?$")


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a grid: a guidance method, its weight(s) and whether M-SWG's mask is used."""

    method: str
    weights: tuple = ()
    masked: bool = True

    @property
    def label(self) -> str:
        name = method_spec(self.method).display(self.masked)
        return name if not self.weights else f"{name}\nw={','.join(f'{w:g}' for w in self.weights)}"


@dataclasses.dataclass
class Grid:
    """``images[r, c]`` is uint8 HWC (rows = samples, columns = methods) with their labels."""

    images: np.ndarray
    row_labels: list
    col_labels: list
    title: str = ""


def parse_columns(specs: Sequence) -> list[Column]:
    """``["none", "m-swg:0.2", "cfg-m-swg:0.3,0.3"]`` -> :class:`Column` list (Columns pass through)."""
    out = []
    for spec in specs:
        if isinstance(spec, Column):
            out.append(spec)
            continue
        m = _SPEC.match(str(spec).strip().lower())
        if not m:
            raise UsageError(f"column {spec!r} is not 'method[:w[,w2]]' (a method of the table, its window "
                             f"methods as X-swg or masked X-m-swg); e.g. 'm-swg:0.2' or 'cfg-m-swg:0.3,0.3'")
        name, text = m.group(1), m.group(2)
        masked = "m-swg" in name or name.endswith("-mswg")  # apg-m-swg, or the demo rows' apg-mswg
        method = method_spec(name.replace("m-swg", "swg").replace("-mswg", "-swg"), "column").name
        try:
            weights = tuple(float(w) for w in text.split(",")) if text else ()
        except ValueError:
            raise UsageError(f"column {spec!r}: weights must be numbers, e.g. 'cfg-m-swg:0.3,0.3'") from None
        n = method_spec(method).num_weights
        if len(weights) != n:
            raise UsageError(f"column {spec!r}: {method} takes {n} weight(s), "
                             f"got {len(weights)}")
        out.append(Column(method, weights, masked))
    if not out:
        raise UsageError("no columns given; e.g. ['none', 'm-swg:0.2']")
    return out


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rows(seeds: Sequence[int], classes: Optional[Sequence[int]]) -> list:
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise UsageError("no seeds given; pass e.g. seeds=[0, 1, 2, 3]")
    if classes is not None and len(classes) not in (1, len(seeds)):
        raise UsageError(f"{len(classes)} classes for {len(seeds)} seeds; give one class per seed, one for all, "
                         f"or None for the seeds' random classes")
    if classes is not None and len(classes) == 1:
        classes = list(classes) * len(seeds)
    return seeds, (None if classes is None else [int(c) for c in classes])


# ----------------------------------------------------------------------------
# EDM2.

def edm2_grid(net_pos: str, columns: Sequence, seeds: Sequence[int], classes: Optional[Sequence[int]] = None, *,
              net_neg: Optional[str] = None, net_uncond: Optional[str] = None, swg_sizes=40, swg_steps=2,
              steps: int = 32, clean_combos: bool = False, device=None,
              progress: Optional[Callable[[str], None]] = None) -> Grid:
    """Sample an EDM2 grid.  Networks are paths, URLs or model names of ``networks.zoo.MODELS``.

    ``cfg`` / ``cfg-swg`` columns use ``net_uncond``; ``wmg`` / ``wmg-swg`` use ``net_neg``.
    Each network is loaded once.  Each column is a :func:`sampling.edm2_run.build_config`
    sampled by :class:`sampling.edm2_run.EDM2Backend`, the code ``sample_edm2.py`` runs.
    """

    # The EDM2 reference's wmg-swg / cfg-swg never apply the mask unless clean_combos: label what is drawn.
    cols = [dataclasses.replace(c, masked=c.masked and (clean_combos or "reference_quirks"
                                                        not in method_spec(c.method).options))
            for c in parse_columns(columns)]
    seeds, classes = _rows(seeds, classes)
    device = torch.device(device) if device is not None else default_device()
    loaded: dict = {}

    def load(source):
        if source not in loaded:
            ckpt = load_checkpoint(cache.fetch(source, desc=pathlib.PurePosixPath(source).name), source=source)
            ckpt.net.eval().requires_grad_(False).to(device)
            loaded[source] = ckpt
        return loaded[source]

    images, drawn = [], None
    for col in cols:
        negative = method_spec(col.method).negative
        neg = {"uncond": net_uncond, "weak": net_neg}.get(negative)
        if negative and not neg:
            flag = "net_uncond" if negative == "uncond" else "net_neg"
            raise UsageError(f"column {col.label.splitlines()[0]} needs {flag} ({NEGATIVES[negative]})")
        cfg = edm2_run.build_config(
            net_pos_pkl=net_pos, net_neg_pkl=neg, outdir=None, require_outdir=False, seeds="0",
            g_method=col.method, g_weight=",".join(map(str, col.weights)) or None,
            **(dict(swg_sizes=swg_sizes, swg_steps=swg_steps, scale_window_guide=int(col.masked))
               if method_spec(col.method).windows else {}),
            steps=steps, clean_combos=clean_combos and "reference_quirks" in method_spec(col.method).options)
        backend = edm2_run.EDM2Backend(cfg).use(load(cfg.net_pos_pkl),
                                                load(cfg.net_neg_pkl) if cfg.net_neg_pkl else None, device)
        if progress:
            progress(f"EDM2 {col.label.replace(chr(10), ' ')}")
        with torch.no_grad():
            draw = backend.draw(seeds, device, classes=classes)
            pixels = backend.decode(backend.sample(draw))
        drawn = draw.classes.tolist() if draw.classes is not None else None
        images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    shown = classes if classes is not None and drawn is not None else drawn or [None] * len(seeds)
    rows = [f"seed {s}" + (f"\nclass {k}" if k is not None else "") for s, k in zip(seeds, shown)]
    name = pathlib.PurePosixPath(str(net_pos)).name
    return Grid(np.stack(images, axis=1), rows, [c.label for c in cols], title=f"EDM2 {name}")


# ----------------------------------------------------------------------------
# DiT.

def _dit_options(col: Column) -> dict:
    """The :func:`sampling.dit_run.build_config` options of a column: the reference's switch for its modes (table
    weights -> DiT's scales, CFG's ``s = 1 + w``), else ``method`` / ``weights``."""
    spec = method_spec(col.method)
    if spec.negative == "weak":
        raise UsageError(f"DiT has no weaker model: column {col.method} is EDM2-only; use a method with the "
                         f"unconditional negative (cfg, apg ...) or none")
    mode = next((m for m in REFERENCE_MODES if m.mode == spec.name), None)
    if spec.num_weights == 0:
        return {}
    mask = {"mask": int(col.masked)} if spec.windows else {}
    if mode is None:
        return {"method": spec.name, "weights": list(col.weights), **mask}
    scales = [1.0 + w if meaning == "S" else w for w, meaning in zip(col.weights, mode.meaning)]
    return {mode.switch: 1, **dict(zip(mode.scales, scales)), **mask}


def dit_grid(columns: Sequence, seeds: Sequence[int], classes: Optional[Sequence[int]] = None, *,
             model: str = "DiT-XL/2", ckpt: Optional[str] = None, image_size: int = 256,
             model_kwargs: Optional[dict] = None, num_classes: int = 1000, vae: str = "ema",
             vae_path: Optional[str] = None, num_sampling_steps="250", window_size: Optional[int] = None,
             window_steps: int = 2, global_seed: int = 0, device=None,
             progress: Optional[Callable[[str], None]] = None) -> Grid:
    """Sample a DiT grid; options as :func:`sampling.dit_run.build_config`, sampled by its backend."""

    cols = parse_columns(columns)
    seeds, classes = _rows(seeds, classes)
    device = torch.device(device) if device is not None else default_device()
    base = dict(model=model, model_kwargs=model_kwargs, ckpt=ckpt, image_size=image_size, num_classes=num_classes,
                vae=vae, vae_path=vae_path, num_sampling_steps=num_sampling_steps, window_size=window_size,
                window_steps=window_steps, global_seed=global_seed, metrics="none", seeds=[0])
    cfgs = [dit_run.build_config(require_outdir=False, **base, **_dit_options(col)) for col in cols]
    if classes is not None and (max(classes) >= num_classes or min(classes) < 0):
        raise UsageError(f"classes must lie in 0..{num_classes - 1}, got {classes}")
    net = dit_run.load_model(cfgs[0], device).eval().requires_grad_(False)
    vae_model = dit_run.load_vae(cfgs[0], device)

    images, drawn = [], None
    for col, cfg in zip(cols, cfgs):
        if progress:
            progress(f"DiT {col.label.replace(chr(10), ' ')}")
        backend = dit_run.DiTBackend(cfg).use(net, vae_model)
        with torch.no_grad():
            draw = backend.draw(seeds, device, classes=classes)
            pixels = backend.decode(backend.sample(draw))
        drawn = draw.classes.tolist()
        images.append(pixels.permute(0, 2, 3, 1).cpu().numpy())
    shown = classes if classes is not None else drawn
    rows = [f"seed {s}\nclass {k}" for s, k in zip(seeds, shown)]
    return Grid(np.stack(images, axis=1), rows, [c.label for c in cols], title=f"{model} {image_size}px")


# ----------------------------------------------------------------------------
# Figures.

def _atomic_save(path: pathlib.Path, save: Callable[[str], None]) -> pathlib.Path:
    with atomic_path(path) as tmp:
        save(tmp)
    return pathlib.Path(path)


def save_mosaic(grid: Grid, path: os.PathLike | str, pad: int = 2) -> pathlib.Path:
    """The images alone, pixel-exact, ``pad`` white pixels between cells (PNG)."""
    import PIL.Image

    r, c, h, w, ch = grid.images.shape
    canvas = np.full((r * h + (r - 1) * pad, c * w + (c - 1) * pad, ch), 255, dtype=np.uint8)
    for i in range(r):
        for j in range(c):
            canvas[i * (h + pad):i * (h + pad) + h, j * (w + pad):j * (w + pad) + w] = grid.images[i, j]
    image = PIL.Image.fromarray(canvas[..., 0] if ch == 1 else canvas)
    return _atomic_save(pathlib.Path(path), lambda tmp: image.save(tmp, format="PNG"))


def draw_grid(grid: Grid, path: Optional[os.PathLike | str] = None, cell_inches: float = 1.6, dpi: int = 100):
    """A labelled figure (rows: samples, columns: method and weight); saved as PNG when ``path`` is given.

    Returns the matplotlib figure (shown inline in a notebook).
    """
    import matplotlib.pyplot as plt

    r, c = grid.images.shape[:2]
    fig, axes = plt.subplots(r, c, figsize=(cell_inches * c + 0.9, cell_inches * r + 0.7), squeeze=False)
    for i in range(r):
        for j in range(c):
            ax = axes[i][j]
            img = grid.images[i, j]
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(grid.col_labels[j], fontsize=9)
            if j == 0:
                ax.set_ylabel(grid.row_labels[i], fontsize=8)
    if grid.title:
        fig.suptitle(grid.title, fontsize=11)
    fig.tight_layout()
    if path is not None:
        _atomic_save(pathlib.Path(path), lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    return fig
