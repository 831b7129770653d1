"""The offline demo: every guidance method on the shipped digits models, scored, tabulated and plotted.

    python demo/run_demo.py --outdir out/demo            # 256 images per method, 32 Heun steps

For each method below the demo runs the project's EDM2 sampling pipeline
(:func:`sampling.edm2_run.build_config` + :func:`sampling.edm2_run.generate`, i.e.
exactly what ``sample_edm2.py`` does) into ``OUTDIR/<method>/``, reads the PNGs
back and scores them with the shipped digit classifier
(:mod:`training.digits_detector`):

* ``FD``: Fréchet distance of the classifier's 128-d features to the statistics
  of the 1497 training digits (``demo/refs/digits-ref.pkl``), lower is better;
* ``confidence``: ``exp(E_x KL(p(y|x) || p(y)))`` of the classifier's
  probabilities (an Inception-score analogue in ``[1, 10]``), higher is better;
* ``class match``: fraction of images classified as the class they were
  generated for (labels are drawn per seed, as ``sample_edm2.py`` draws them).

The weights are the paper's EDM2-S settings (not tuned on digits); windows are
12x12 of the 16x16 images with 2 windows per axis (k/H = 0.75).  The same seeds
are used by every method.  Results go to ``OUTDIR/results.{md,csv,png}``;
finished images are reused when the command is repeated with more seeds, but an
existing results table is never overwritten.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import pathlib
import sys
import time
from typing import Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import click  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from utils.errors import UsageError, exit_on_usage_error  # noqa: E402

MODELS = REPO / "demo" / "models"
POS = str(MODELS / "digits-cond.safetensors")
NEG = {"uncond": str(MODELS / "digits-uncond.safetensors"), "RT": str(MODELS / "digits-rt.safetensors"),
       "RCT": str(MODELS / "digits-rct.safetensors")}
WINDOW, WINDOW_STEPS = 12, 2

__all__ = ["Method", "METHODS", "run_method", "score_folder", "run_demo", "main"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table: a ``sample_edm2.py`` configuration."""

    name: str                   # Row / folder name.
    g_method: str               # none | cfg | wmg | swg | wmg-swg | cfg-swg
    weight: str = ""            # --g_weight
    neg: Optional[str] = None   # key of NEG
    masked: int = 1             # --scale_window_guide (1 = M-SWG)


METHODS = [
    Method("none", "none"),
    Method("cfg", "cfg", "0.4", "uncond"),
    Method("wmg-RT", "wmg", "1.2", "RT"),
    Method("wmg-RCT", "wmg", "1.2", "RCT"),
    Method("swg", "swg", "0.2", masked=0),
    Method("m-swg", "swg", "0.2"),
    Method("m-swg-1.1", "swg", "1.1"),
    Method("wmg-swg-RT", "wmg-swg", "1.2,0.25", "RT"),
    Method("wmg-swg-RCT", "wmg-swg", "1.2,0.14", "RCT"),
    Method("cfg-swg", "cfg-swg", "0.3,0.3", "uncond"),
]


def run_method(m: Method, outdir: pathlib.Path, seeds: str, steps: int, batch: int) -> float:
    """Sample ``m`` into ``outdir/m.name`` with the EDM2 pipeline; returns the seconds spent."""
    from sampling import edm2_run

    uses_windows = m.g_method in ("swg", "wmg-swg", "cfg-swg")
    cfg = edm2_run.build_config(
        net_pos_pkl=POS, net_neg_pkl=NEG[m.neg] if m.neg else None, outdir=str(outdir / m.name), seeds=seeds,
        g_method=m.g_method, g_weight=m.weight or None,
        swg_sizes=str(WINDOW) if uses_windows else None, swg_steps=str(WINDOW_STEPS) if uses_windows else None,
        scale_window_guide=m.masked, steps=steps, batch=batch)
    t0 = time.perf_counter()
    edm2_run.generate(cfg, progress=False)
    return time.perf_counter() - t0


def requested_classes(seeds: Sequence[int], label_dim: int = 10, resolution: int = 16) -> np.ndarray:
    """The class ``sample_edm2.py`` draws for each seed (per-seed generator: noise first, then the label).

    The generators live on the sampling device (CUDA and CPU generators give different draws).
    """
    from sampling.seeds import StackedRandomGenerator
    from utils import dist

    device = dist.device()
    rnd = StackedRandomGenerator(device, seeds)
    rnd.randn([len(seeds), 1, resolution, resolution], device=device)
    return rnd.randint(label_dim, size=[len(seeds)], device=device).cpu().numpy()


def read_images(folder: pathlib.Path, seeds: Sequence[int]) -> np.ndarray:
    """uint8 ``[N, 1, H, W]`` images of ``seeds`` from a run folder."""
    from sampling.writer import ImageIndex

    images = np.asarray(ImageIndex(folder).read(seeds))
    if images.ndim == 3:
        images = images[..., None]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def score_folder(folder: pathlib.Path, seeds: Sequence[int], detector, ref) -> dict:
    """FD, confidence score and class match of the images of ``seeds`` in ``folder``."""
    from training.eval_denoiser import evaluate

    images = torch.from_numpy(read_images(folder, seeds))
    return evaluate(images, torch.from_numpy(requested_classes(seeds)), detector, ref)


def write_table(rows: list[dict], outdir: pathlib.Path, num: int, steps: int) -> tuple[str, pathlib.Path]:
    """``results.csv`` and ``results.md`` (atomic); returns the Markdown text."""
    base = rows[0]
    lines = [f"Digits demo: {num} images per method, {steps} Heun steps, windows {WINDOW}x{WINDOW} "
             f"(2 per axis) on 16x16.", "",
             "| method | g_method | weight | negative | FD (lower better) | ΔFD vs none | confidence (higher better) "
             "| class match | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['g_method']} | {r['weight'] or '-'} | {r['negative'] or '-'} "
                     f"| {r['fd']:.2f} | {r['fd'] - base['fd']:+.2f} | {r['confidence']:.3f} "
                     f"| {r['class_match']:.3f} | {r['seconds']:.0f} |")
    md = "\n".join(lines) + "\n"
    for name, text in (("results.md", md), ("results.csv", _csv(rows))):
        tmp = outdir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(outdir / name)
    return md, outdir / "results.md"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Bar charts of FD and confidence per method, the unguided value as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "fd", "demo FD (lower is better)"),
                           (axes[1], "confidence", "confidence score (higher is better)")):
        vals = [r[key] for r in rows]
        colors = ["tab:gray" if r["g_method"] == "none" else
                  "tab:orange" if "swg" in r["g_method"] else "tab:blue" for r in rows]
        ax.bar(range(len(vals)), vals, color=colors)
        ax.axhline(vals[0], color="k", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(vals)), names, rotation=45, ha="right")
        ax.set_title(title)
        if key == "confidence":
            ax.set_ylim(min(vals) - 0.1 * (max(vals) - min(vals) + 1e-3), max(vals) + 0.05)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def run_demo(outdir: str | pathlib.Path, num: int = 256, steps: int = 32, batch: int = 256,
             methods: Optional[Sequence[str]] = None, log=print) -> list[dict]:
    """Sample every method, score it, write ``results.{md,csv,png}``; returns the table rows."""
    from training.digits_detector import DigitsDetector
    from training.eval_denoiser import load_ref_pickle

    outdir = pathlib.Path(outdir)
    chosen = METHODS if not methods else [m for m in METHODS if m.name in methods]
    unknown = set(methods or ()) - {m.name for m in METHODS}
    if unknown:
        raise UsageError(f"unknown --methods {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(m.name for m in METHODS)}")
    if num < 2:
        raise UsageError("--num must be at least 2 (the Fréchet distance needs a covariance)")
    for name in ("results.md", "results.csv", "results.png"):
        if (outdir / name).exists():
            raise UsageError(f"{outdir / name} already exists; choose another --outdir or move the old results")
    outdir.mkdir(parents=True, exist_ok=True)
    detector, ref = DigitsDetector(), load_ref_pickle()
    seeds = list(range(num))
    rows = []
    for m in chosen:
        seconds = run_method(m, outdir, f"0-{num - 1}", steps, batch)
        res = score_folder(outdir / m.name, seeds, detector, ref)
        rows.append({"method": m.name, "g_method": m.g_method, "weight": m.weight, "negative": m.neg or "",
                     "masked": m.masked if "swg" in m.g_method else "", **res, "seconds": seconds})
        log(f"{m.name:12s} FD {res['fd']:7.2f}  confidence {res['confidence']:.3f}  "
            f"class match {res['class_match']:.3f}  ({seconds:.0f}s)")
    md, _ = write_table(rows, outdir, num, steps)
    plot(rows, outdir / "results.png")
    log("")
    log(md)
    log(f"wrote {outdir / 'results.md'}, results.csv, results.png")
    return rows


@click.command()
@click.option("--outdir", required=True, help="Folder for the images (one subfolder per method) and results.")
@click.option("--num", type=int, default=256, show_default=True, help="Images per method (seeds 0..num-1).")
@click.option("--steps", type=int, default=32, show_default=True, help="Heun sampler steps.")
@click.option("--batch", type=int, default=256, show_default=True)
@click.option("--methods", default=None, help="Comma list of rows to run [default: all].")
@exit_on_usage_error
def main(outdir, num, steps, batch, methods):
    """Run every guidance method on the shipped digits models and tabulate demo FD / confidence."""
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 8)))
    run_demo(outdir, num, steps, batch, methods.split(",") if methods else None)


if __name__ == "__main__":
    main()
