"""A small Weights & Biases logger for the samplers: run arguments, metrics and a grid of samples.

Both CLIs need two lines (``use_wandb`` is their ``--use_wandb`` 0/1)::

    logger = WandbLogger(use_wandb, project="swg-edm2", config=cfg_dict, group=..., name=...)
    ...                                    # sampling, metrics
    logger.log_run(outdir, metrics)        # metrics + grid of the run's first images, then finish

Only rank 0 logs (other ranks get a disabled logger), so the lines can run on every rank.
``WANDB_MODE=offline`` writes the run under ``$WANDB_DIR/wandb/offline-run-*`` for a later
``wandb sync``; ``WANDB_MODE=disabled`` turns everything into no-ops.  A missing ``wandb``
package or a failing login is a one-line :class:`UsageError` when logging was asked for.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from metrics.images import open_images
from utils import dist
from utils.errors import UsageError

__all__ = ["WandbLogger", "image_grid", "first_images"]


def image_grid(images, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 images (NCHW or NHWC tensor/array, or a list of HWC arrays) -> one HWC grid, ``nrow`` per row."""
    if isinstance(images, (list, tuple)):
        arr = np.stack([np.asarray(x) for x in images])
    else:
        arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"expected a batch of images, got shape {arr.shape}")
    if arr.shape[1] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(0, 2, 3, 1)  # NCHW -> NHWC
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 images, got {arr.dtype}")
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.zeros((rows * h + (rows - 1) * pad, nrow * w + (nrow - 1) * pad, c), dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[r * (h + pad):r * (h + pad) + h, k * (w + pad):k * (w + pad) + w] = arr[i]
    return grid


def first_images(outdir: os.PathLike | str, count: int = 16) -> list[np.ndarray]:
    """The first ``count`` images of a run folder (PNGs, per-1000 subfolders or tar shards), by name."""
    source = open_images(outdir)
    return [source.load(i) for i in range(min(count, len(source)))]


class WandbLogger:
    """Log a sampling run to wandb; every method is a no-op when the logger is disabled."""

    def __init__(self, enabled, *, project: str = "swg", config: Optional[Mapping[str, Any]] = None,
                 group: Optional[str] = None, name: Optional[str] = None, dir: Optional[os.PathLike] = None,
                 rank: Optional[int] = None, **init_kwargs):
        if rank is None:
            rank = dist.get_rank()
        self.run = None
        if not enabled or rank != 0 or os.environ.get("WANDB_MODE", "").lower() == "disabled":
            return
        try:
            import wandb
        except ImportError:
            raise UsageError("--use_wandb 1 needs the wandb package; pip install wandb, or pass --use_wandb 0") from None
        kwargs = dict(project=project, group=group, name=name, config=dict(config or {}), **init_kwargs)
        if dir is not None:
            pathlib.Path(dir).mkdir(parents=True, exist_ok=True)
            kwargs["dir"] = str(dir)
        try:
            self.run = wandb.init(**kwargs)
        except Exception as exc:  # login / network problems: say what to do instead of a traceback
            msg = " ".join(str(exc).split())[:200]
            raise UsageError(f"wandb could not start ({msg}); run 'wandb login', set WANDB_MODE=offline, "
                             f"or pass --use_wandb 0") from None

    @property
    def enabled(self) -> bool:
        return self.run is not None

    def log_config(self, config: Mapping[str, Any]) -> None:
        if self.run is not None:
            self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, metrics: Optional[Mapping[str, Any]], prefix: str = "metrics/") -> None:
        """Numbers go to the run's history and summary as ``metrics/<name>``."""
        if self.run is None or not metrics:
            return
        values = {f"{prefix}{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if values:
            self.run.log(values)
            self.run.summary.update(values)

    def log_images(self, images, key: str = "samples", caption: Optional[str] = None,
                   nrow: Optional[int] = None) -> None:
        """One grid image made of ``images`` (uint8 batch or list of HWC arrays)."""
        if self.run is None or images is None or len(images) == 0:
            return
        import wandb

        self.run.log({key: wandb.Image(image_grid(images, nrow), caption=caption)})

    def log_run(self, outdir: Optional[os.PathLike] = None, metrics: Optional[Mapping[str, Any]] = None,
                max_images: int = 16, finish: bool = True) -> None:
        """Metrics, then a grid of the first ``max_images`` images in ``outdir``; then finish the run."""
        if self.run is None:
            return
        self.log_metrics(metrics)
        if outdir is not None and max_images > 0 and pathlib.Path(outdir).exists():
            try:
                images: Sequence = first_images(outdir, max_images)
            except UsageError:
                images = []  # no images (e.g. all were sampled earlier elsewhere): nothing to show
            self.log_images(images, caption=str(outdir))
        if finish:
            self.finish()

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> "WandbLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()
