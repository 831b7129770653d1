"""The offline demo: every guidance method on the shipped digits models, scored, tabulated and plotted.

    python demo/run_demo.py --outdir out/demo            # 256 images per method, 32 Heun steps

For each method below the demo runs the project's EDM2 sampling pipeline
(:func:`sampling.edm2_run.build_config` + :func:`sampling.edm2_run.generate` with
a ``demo-digits*`` preset of :mod:`networks.presets`, i.e. exactly what
``sample_edm2.py --preset ...`` does) into ``OUTDIR/<method>/``, reads the PNGs
back and scores them through :mod:`metrics.api` with the shipped digit
classifier (detector ``digits``):

* ``FD`` (metric ``fd_digits``): Fréchet distance of the classifier's 128-d
  features to the statistics of the 1497 training digits
  (``demo/refs/digits-ref.pkl``), lower is better;
* ``confidence`` (metric ``conf_digits``): ``exp(E_x KL(p(y|x) || p(y)))`` of the
  classifier's probabilities (an Inception-score analogue in ``[1, 10]``),
  higher is better;
* ``class match``: fraction of images classified as the class they were
  generated for (labels are recovered per seed, as ``sample_edm2.py`` draws
  them, with generators on the sampling device).

The weights are the paper's EDM2-S settings (not tuned on digits); windows are
12x12 of the 16x16 images with 2 windows per axis (k/H = 0.75).  The same seeds
are used by every method.

Reruns are safe: the settings are recorded in ``OUTDIR/demo_settings.json``.  If
``OUTDIR`` holds a finished table made with the same settings it is printed and
nothing is computed; different settings are an error (exit 2); an interrupted
run resumes, reusing the finished images.  ``results.md`` is written last and
marks a finished run; nothing finished is ever overwritten.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
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

from utils.atomic import atomic_path, write_text_atomic  # noqa: E402
from utils.errors import UsageError, exit_on_usage_error  # noqa: E402

WINDOW, WINDOW_STEPS = 12, 2     # what the demo-digits presets use (checked in run_demo)
SETTINGS = "demo_settings.json"
RESULTS = ("results.csv", "results.png", "results.md")  # written in this order; results.md marks a finished run
SCORES = ("fd_digits", "conf_digits")                    # metrics.api metrics behind the FD / confidence columns

__all__ = ["Method", "METHODS", "run_method", "requested_classes", "score_folder", "demo_settings", "run_demo",
           "main"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table: a ``networks.presets`` preset plus the options it overrides."""

    name: str                   # Row / folder name.
    preset: str                 # demo-digits* preset (networks, method, weights, windows)
    weight: str = ""            # --g_weight override ('' = the preset's)
    masked: int = 1             # --scale_window_guide (1 = M-SWG)
    negative: str = ""          # label of the negative network, for the table


METHODS = [
    Method("none", "demo-digits-none"),
    Method("cfg", "demo-digits-uncond", negative="uncond"),
    Method("wmg-RT", "demo-digits-rt", negative="RT"),
    Method("wmg-RCT", "demo-digits-rct", negative="RCT"),
    Method("swg", "demo-digits", masked=0),
    Method("m-swg", "demo-digits"),
    Method("m-swg-1.1", "demo-digits", weight="1.1"),
    Method("wmg-swg-RT", "demo-digits-rt-mswg", negative="RT"),
    Method("wmg-swg-RCT", "demo-digits-rct-mswg", negative="RCT"),
    Method("cfg-swg", "demo-digits-cfg-mswg", negative="uncond"),
]


def method_config(m: Method, outdir: pathlib.Path, seeds: str, steps: int, batch: int):
    """The :class:`sampling.edm2_run.GenerateConfig` of row ``m`` (metrics are computed by the demo itself)."""
    from sampling import edm2_run

    return edm2_run.build_config(preset=m.preset, outdir=str(outdir / m.name), seeds=seeds,
                                 g_weight=m.weight or None, scale_window_guide=m.masked, steps=steps,
                                 batch=batch, metrics="none")


def run_method(m: Method, outdir: pathlib.Path, seeds: str, steps: int, batch: int) -> float:
    """Sample ``m`` into ``outdir/m.name`` with the EDM2 pipeline (finished seeds are skipped); returns seconds."""
    from sampling import edm2_run

    cfg = method_config(m, outdir, seeds, steps, batch)
    t0 = time.perf_counter()
    edm2_run.generate(cfg, progress=False)
    return time.perf_counter() - t0


def requested_classes(seeds: Sequence[int], label_dim: int = 10, shape: Sequence[int] = (1, 16, 16),
                      device=None) -> np.ndarray:
    """The class ``sample_edm2.py`` draws for each seed (per-seed generator: noise first, then the label).

    ``device`` defaults to the sampling device :func:`utils.dist.device` that
    :func:`sampling.edm2_run.generate` uses: the generators live there, and CUDA
    and CPU generators give different draws.  ``shape`` is the noise of one image
    (channels, height, width); it must match the network, since it sets how far
    the noise draw advances each generator.
    """
    from sampling.seeds import StackedRandomGenerator
    from utils import dist

    device = torch.device(device) if device is not None else dist.device()
    rnd = StackedRandomGenerator(device, seeds)
    rnd.randn([len(seeds), *shape], device=device)
    return rnd.randint(label_dim, size=[len(seeds)], device=device).cpu().numpy()


def _network_shape(path: str) -> tuple[int, tuple]:
    """``(label_dim, (channels, resolution, resolution))`` of a checkpoint, as the sampler sees it."""
    from networks.edm2_pickle import load_checkpoint

    net = load_checkpoint(path).net
    r = int(net.img_resolution)
    return int(net.label_dim), (int(net.img_channels), r, r)


def read_images(folder: pathlib.Path, seeds: Sequence[int]) -> np.ndarray:
    """uint8 ``[N, 1, H, W]`` images of ``seeds`` from a run folder."""
    from sampling.writer import ImageIndex

    images = np.asarray(ImageIndex(folder).read(seeds))
    if images.ndim == 3:
        images = images[..., None]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def score_folder(folder: pathlib.Path, seeds: Sequence[int], ref, classes: Optional[np.ndarray] = None,
                 device=None) -> dict:
    """FD, confidence score (via :mod:`metrics.api`) and class match of the images of ``seeds`` in ``folder``.

    ``ref``: the loaded reference (``demo/refs/digits-ref.pkl``); ``classes``: the
    requested class of each seed (from :func:`requested_classes`), for the class match.
    """
    from metrics import api

    images = read_images(folder, seeds).transpose(0, 2, 3, 1)        # NHWC, as metrics.api takes batches
    stats = api.compute_stats([images], ["digits"], probs=["digits"], device=device, progress=False)
    res = api.calc_metrics_from_stats(stats, ref, SCORES, device=device)
    out = {"fd": res["fd_digits"], "confidence": res["conf_digits"]}
    if classes is not None:
        predicted = np.asarray(stats[api.PROB_KEYS["digits"]]).argmax(axis=1)
        out["class_match"] = float((predicted == np.asarray(classes)).mean())
    return out


def write_table(rows: list[dict], outdir: pathlib.Path, num: int, steps: int) -> tuple[str, pathlib.Path]:
    """``results.csv`` and ``results.md`` (atomic); returns the Markdown text."""
    base = rows[0]
    lines = [f"Digits demo: {num} images per method, {steps} Heun steps, windows {WINDOW}x{WINDOW} "
             f"({WINDOW_STEPS} per axis) on 16x16.", "",
             "| method | g_method | weight | negative | FD (lower better) | ΔFD vs none | confidence (higher better) "
             "| class match | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['g_method']} | {r['weight'] or '-'} | {r['negative'] or '-'} "
                     f"| {r['fd']:.2f} | {r['fd'] - base['fd']:+.2f} | {r['confidence']:.3f} "
                     f"| {r['class_match']:.3f} | {r['seconds']:.0f} |")
    md = "\n".join(lines) + "\n"
    _atomic_text(outdir / "results.csv", _csv(rows))
    plot(rows, outdir / "results.png")
    _atomic_text(outdir / "results.md", md)  # last: marks the run as finished
    return md, outdir / "results.md"


def _atomic_text(path: pathlib.Path, text: str) -> None:
    write_text_atomic(path, text)


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
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def demo_settings(num: int, steps: int, chosen: Sequence[Method]) -> dict:
    """What determines the table (the batch size does not: every image depends only on its seed)."""
    return {"num": num, "steps": steps, "methods": [dataclasses.asdict(m) for m in chosen]}


def _settings_differ(old: dict, new: dict) -> Optional[str]:
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            if key == "methods":
                names = lambda d: ",".join(m.get("name", "?") for m in d.get("methods") or [])  # noqa: E731
                if names(old) != names(new):
                    return f"methods: {names(old)} there, {names(new)} now"
            return f"{key}: {json.dumps(old.get(key))} there, {json.dumps(new.get(key))} now"
    return None


def _check_outdir(outdir: pathlib.Path, settings: dict) -> bool:
    """True when ``outdir`` holds a finished run of ``settings``; UsageError when it holds another run."""
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
        return (outdir / "results.md").is_file()
    stale = [name for name in RESULTS if (outdir / name).exists()]
    if stale:
        raise UsageError(f"{outdir / stale[0]} exists but {SETTINGS} does not (not a run of this demo "
                         f"version); choose another --outdir")
    return False


def _read_rows(outdir: pathlib.Path) -> list[dict]:
    with open(outdir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def run_demo(outdir: str | pathlib.Path, num: int = 256, steps: int = 32, batch: int = 256,
             methods: Optional[Sequence[str]] = None, log=print) -> list[dict]:
    """Sample every method, score it, write ``results.{csv,png,md}``; returns the table rows.

    A finished run with the same settings is printed and returned as read from
    ``results.csv`` (strings); an interrupted one resumes.
    """
    from metrics.refs import load_ref
    from networks.presets import DEMO_REF, get_preset

    outdir = pathlib.Path(outdir).expanduser()
    unknown = set(methods or ()) - {m.name for m in METHODS}
    if unknown:
        raise UsageError(f"unknown --methods {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(m.name for m in METHODS)}")
    chosen = METHODS if not methods else [m for m in METHODS if m.name in methods]
    if num < 2:
        raise UsageError("--num must be at least 2 (the Fréchet distance needs a covariance)")
    if steps < 1 or batch < 1:
        raise UsageError("--steps and --batch must be at least 1")
    settings = demo_settings(num, steps, chosen)
    if _check_outdir(outdir, settings):
        md = (outdir / "results.md").read_text()
        log(md)
        log(f"{outdir} already holds this run's results (results.md, results.csv, results.png); nothing to do")
        return _read_rows(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if not (outdir / SETTINGS).is_file():
        _atomic_text(outdir / SETTINGS, json.dumps(settings, indent=2) + "\n")

    pos = get_preset("demo-digits")
    assert pos.swg_sizes == (WINDOW,) and pos.swg_steps == (WINDOW_STEPS,), "presets and table header disagree"
    label_dim, shape = _network_shape(pos.net_pos_pkl)
    seeds = list(range(num))
    classes = requested_classes(seeds, label_dim, shape)
    ref = load_ref(DEMO_REF)
    rows = []
    for m in chosen:
        seconds = run_method(m, outdir, f"0-{num - 1}", steps, batch)
        res = score_folder(outdir / m.name, seeds, ref, classes)
        p = get_preset(m.preset)
        weight = m.weight or ",".join(f"{w:g}" for w in (p.g_weight or ()))
        rows.append({"method": m.name, "g_method": p.g_method, "weight": weight, "negative": m.negative,
                     "masked": m.masked if "swg" in p.g_method else "", **res, "seconds": seconds})
        log(f"{m.name:12s} FD {res['fd']:7.2f}  confidence {res['confidence']:.3f}  "
            f"class match {res['class_match']:.3f}  ({seconds:.0f}s)")
    md, _ = write_table(rows, outdir, num, steps)
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
