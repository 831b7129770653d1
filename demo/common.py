"""What the offline demos share: run-folder settings, per-method sampling with progress and resume,
timings, reading and scoring images, tables, the sample grid and Ctrl-C.

Both demos (``demo/run_demo.py``, ``demo/long_range.py``) sample every row of
their table with the project's EDM2 run lifecycle (:func:`sampling.edm2_run.generate`)
into ``OUTDIR/<row>/``; the run writes each batch as it finishes, so an
interrupted row keeps the batches it finished and a rerun draws only the
missing seeds.  The sampling
seconds of each row are kept in ``OUTDIR/timings.json`` (summed over
interrupted attempts), so a resumed or reused row reports the time its images
really took, not the time of the rerun.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import pathlib
import sys
import time
from typing import Callable, Optional, Sequence

import numpy as np
from sampling.run_folder import EVALS_FILE
from utils.atomic import atomic_path, write_text_atomic
from utils.errors import UsageError

__all__ = ["SETTINGS", "TIMINGS", "check_outdir", "write_settings", "Timings", "sample_row", "read_images",
           "requested_classes", "network_shape", "csv_text", "read_csv", "sample_grid", "exit_on_interrupt",
           "save_figure"]

SETTINGS = "demo_settings.json"
TIMINGS = "timings.json"


# ----------------------------------------------------------------------------
# Run folder: settings recorded once, compared on every rerun.

def _settings_differ(old: dict, new: dict) -> Optional[str]:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key in ("methods", "rows"):
                names = lambda d: ",".join(m.get("name", "?") for m in d.get(key) or [])  # noqa: E731
                if names(old) != names(new):
                    return f"{key}: {names(old)} there, {names(new)} now"
            return f"{key}: {json.dumps(old.get(key))} there, {json.dumps(new.get(key))} now"
    return None


def check_outdir(outdir: pathlib.Path, settings: dict, results: Sequence[str], done: str = "results.md") -> bool:
    """True when ``outdir`` holds a finished run of ``settings``; UsageError when it holds another run.

    ``results`` are the files a finished run writes (``done`` last); one of them
    without :data:`SETTINGS` beside it is a folder of something else.
    """
    path = outdir / SETTINGS
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"--outdir {outdir} is a file; choose a folder")
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise UsageError(f"{path} is unreadable; choose another --outdir") from None
        diff = _settings_differ(old, settings)
        if diff:
            raise UsageError(f"{outdir} holds a demo run with different settings ({diff}); "
                             f"choose another --outdir or rerun with the same settings")
        return (outdir / done).is_file()
    stale = [name for name in results if (outdir / name).exists()]
    if stale:
        raise UsageError(f"{outdir / stale[0]} exists but {SETTINGS} does not (not a run of this demo "
                         f"version); choose another --outdir")
    return False


def write_settings(outdir: pathlib.Path, settings: dict) -> None:
    """Create ``outdir`` and record ``settings`` there (once; an existing record was checked to be equal)."""
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        if not (outdir / SETTINGS).is_file():
            write_text_atomic(outdir / SETTINGS, json.dumps(settings, indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write to --outdir {outdir}: {exc.strerror or exc}; choose a writable folder") \
            from None


# ----------------------------------------------------------------------------
# Sampling one row, with a progress bar, resume and recorded seconds.

class Timings:
    """``OUTDIR/timings.json``: sampling seconds and images drawn per row, summed over attempts."""

    def __init__(self, outdir: pathlib.Path):
        self.path = outdir / TIMINGS
        try:
            self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except ValueError:
            self.data = {}

    def add(self, name: str, seconds: float, images: int) -> None:
        entry = self.data.setdefault(name, {"seconds": 0.0, "images": 0})
        entry["seconds"] = round(entry["seconds"] + seconds, 3)
        entry["images"] += images
        write_text_atomic(self.path, json.dumps(self.data, indent=2) + "\n")

    def seconds(self, name: str) -> float:
        """Seconds the row's images took (NaN when they were made before timings were recorded)."""
        entry = self.data.get(name)
        return float(entry["seconds"]) if entry and entry["images"] else float("nan")


def sample_row(make_config: Callable, folder: pathlib.Path, seeds: Sequence[int], batch: int, desc: str,
               timings: Timings, name: str, progress: bool = True) -> float:
    """Draw the seeds missing in ``folder`` with the EDM2 run lifecycle; returns the row's sampling seconds.

    ``make_config(seeds)`` builds the :class:`sampling.edm2_run.GenerateConfig`
    of the row (``batch`` images per batch).  The run writes each batch as it
    finishes, so an interrupted row keeps its finished batches and a rerun draws
    only the rest; the seconds spent (also when interrupted) are added to
    ``timings``.  ``desc`` labels the progress bar.
    """
    from sampling import edm2_run
    from sampling.writer import done_seeds

    done = done_seeds(folder)
    pending = [s for s in seeds if s not in done]
    if not pending:
        return timings.seconds(name)
    t0 = time.perf_counter()
    try:
        edm2_run.generate(make_config(seeds), progress=progress, desc=desc)
    finally:
        drawn = len(set(pending) & done_seeds(folder))
        timings.add(name, time.perf_counter() - t0, drawn)
    return timings.seconds(name)


# ----------------------------------------------------------------------------
# Images and labels.

def read_images(folder: pathlib.Path, seeds: Sequence[int]) -> np.ndarray:
    """uint8 ``[N, C, H, W]`` images of ``seeds`` from a run folder."""
    from sampling.writer import ImageIndex

    images = np.asarray(ImageIndex(folder).read(seeds))
    if images.ndim == 3:
        images = images[..., None]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def requested_classes(seeds: Sequence[int], label_dim: int = 10, shape: Sequence[int] = (1, 16, 16),
                      device=None) -> np.ndarray:
    """The class the EDM2 pipeline draws for each seed (:func:`sampling.seeds.draw_edm2`, the sampler's own draw).

    ``device`` defaults to the sampling device of :func:`sampling.run_settings.resolve_device`
    (what :func:`sampling.edm2_run.generate` uses): the generators live there, and
    CUDA and CPU generators give different draws.  ``shape`` is the noise of one
    image (channels, height, width); it must match the network, since it sets how
    far the noise draw advances each generator.
    """
    from sampling.run_settings import resolve_device
    from sampling.seeds import draw_edm2

    draw = draw_edm2(seeds, shape, label_dim, resolve_device(device))
    return draw.classes.cpu().numpy()


def network_shape(path: str) -> tuple[int, tuple]:
    """``(label_dim, (channels, resolution, resolution))`` of a checkpoint, as the sampler sees it."""
    from networks.edm2_pickle import load_checkpoint

    net = load_checkpoint(path).net
    r = int(net.img_resolution)
    return int(net.label_dim), (int(net.img_channels), r, r)


# ----------------------------------------------------------------------------
# Tables and figures.

def csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def read_csv(path: pathlib.Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def save_figure(fig, path: pathlib.Path, dpi: int = 100) -> None:
    """Save a matplotlib figure atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=dpi)
    plt.close(fig)


def sample_grid(rows: Sequence[tuple[str, pathlib.Path]], seeds: Sequence[int], path: pathlib.Path,
                scale: float = 1.0, title: str = "") -> None:
    """One row of images per ``(label, folder)``, the same ``seeds`` in every row, labels on the left.

    ``title`` goes above the grid; the layout makes room for the row labels, the seed numbers, the
    ``seed`` axis label and the title, so that nothing is cut off at the figure's edges.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tiles = [read_images(folder, seeds) for _, folder in rows]
    c, h, w = tiles[0].shape[1:]
    pad = max(1, h // 16)
    canvas = np.full((len(rows) * (h + pad) + pad, len(seeds) * (w + pad) + pad), 128, dtype=np.uint8)
    for i, images in enumerate(tiles):
        grey = images.mean(axis=1).round().astype(np.uint8)      # the demos' images are grey
        for j, image in enumerate(grey):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = image
    fig = plt.figure(figsize=(4, 4))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 for i in range(len(rows))], [name for name, _ in rows],
                  fontsize=8)
    ax.set_xticks([pad + j * (w + pad) + w / 2 for j in range(len(seeds))], [str(s) for s in seeds], fontsize=7)
    ax.set_xlabel("seed", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    # Margins from the drawn sizes of the labels (points: independent of the figure size), so that the
    # longest row label, the seed numbers, "seed" and the title all lie inside the figure.
    fig.canvas.draw()
    renderer, dpi = fig.canvas.get_renderer(), fig.dpi
    size = lambda texts, dim: max([getattr(t.get_window_extent(renderer), dim) / dpi for t in texts] or [0])  # noqa: E731
    left = size(ax.get_yticklabels(), "width") + 0.2
    bottom = size(ax.get_xticklabels(), "height") + size([ax.xaxis.label], "height") + 0.3
    top = (size([ax.title], "height") + 0.25) if title else 0.1
    img_w, img_h = canvas.shape[1] / 40 * scale, canvas.shape[0] / 40 * scale
    half_title = size([ax.title], "width") / 2 + 0.15   # the title is centred over the images
    x0 = max(left, half_title - img_w / 2)
    width = max(x0 + img_w + 0.15, x0 + img_w / 2 + half_title)
    height = bottom + img_h + top
    fig.set_size_inches(width, height)
    ax.set_position((x0 / width, bottom / height, img_w / width, img_h / height))
    save_figure(fig, path)


# ----------------------------------------------------------------------------
# Ctrl-C.

def exit_on_interrupt(outdir_of: Callable[..., str]):
    """Decorator for a demo's entry point: Ctrl-C prints one line and exits 130; finished images stay."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except KeyboardInterrupt:
                print(f"interrupted: finished images are kept in {outdir_of(*args, **kwargs)}; "
                      f"rerun the same command to resume", file=sys.stderr)
                sys.exit(130)
        return wrapper
    return wrap


def counted_evals(folder: pathlib.Path) -> Optional[float]:
    """Network evaluations per image per sampler step, counted while the row sampled (its ``evals.json``)."""
    try:
        return float(json.loads((folder / EVALS_FILE).read_text())["evals_per_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
