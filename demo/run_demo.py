"""The offline demo: every guidance method on the shipped digits models, scored, tabulated and plotted.

    python demo/run_demo.py --outdir out/demo            # 128 images per method, 16 Heun steps
    python demo/run_demo.py --outdir out/demo-full --full  # 256 images, 32 steps: the table of demo/README.md

For each method below the demo runs the project's EDM2 sampling pipeline
(:func:`sampling.edm2_run.build_config` + :func:`sampling.edm2_run.generate` with
a ``demo-digits*`` preset of :mod:`sampling.presets`, i.e. exactly what
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
run (Ctrl-C: one line, exit 130) resumes, reusing the finished images, also
the finished batches of the row it was drawing (:func:`demo.common.sample_row`).
Each row's seconds are the sampling time its images took, summed over
attempts (``OUTDIR/timings.json``).  Besides the table the demo writes
``samples.png``: one row of images per method, the same seeds in every row.
``results.md`` is written last and marks a finished run; nothing finished is
ever overwritten.
"""

from __future__ import annotations

import dataclasses
import pathlib
import sys
import time
from typing import Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import click  # noqa: E402
import numpy as np  # noqa: E402

from demo.common import (Timings, check_outdir, counted_evals, csv_text, exit_on_interrupt, read_csv, read_images,  # noqa: E402
                         requested_classes, network_shape, sample_grid, sample_row, save_figure, write_settings)
from guidance.perturb import KINDS as PERTURBED  # noqa: E402
from sampling.presets import ZOO_PARAMS  # noqa: E402
from utils.atomic import write_text_atomic  # noqa: E402
from utils.cli import CONTEXT, run_command  # noqa: E402
from utils.errors import UsageError, exit_on_usage_error  # noqa: E402

WINDOW, WINDOW_STEPS = 12, 2     # what the demo-digits presets use (checked in run_demo)
SETTINGS = "demo_settings.json"
RESULTS = ("results.csv", "results.png", "samples.png", "results.md")  # in this order; results.md marks a finished run
SCORES = ("fd_digits", "conf_digits")                    # metrics.api metrics behind the FD / confidence columns
DEFAULT = {"num": 128, "steps": 16}                      # make demo: under 10 minutes on two CPU cores
FULL = {"num": 256, "steps": 32}                         # --full: the table of demo/README.md
GRID_SEEDS = 12                                          # images per row of samples.png

__all__ = ["Method", "METHODS", "run_method", "requested_classes", "read_images", "score_folder", "demo_settings",
           "run_demo", "main"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table: a ``sampling.presets`` preset plus the options it overrides."""

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
    # The guidance zoo at its presets' default weights (sampling.presets.ZOO_PARAMS), alone and with M-SWG.
    *(Method(f"{m}{pair}", f"demo-digits-{m}{pair}", negative="uncond")
      for m in ZOO_PARAMS for pair in ("", "-mswg")),
    # The positive network's own perturbed passes (guidance.perturb: default blocks), published weights.
    *(Method(f"{m}{pair}", f"demo-digits-{m}{pair}") for m in PERTURBED for pair in ("", "-mswg")),
]


def method_config(m: Method, outdir: pathlib.Path, seeds, steps: int, batch: int):
    """The :class:`sampling.edm2_run.GenerateConfig` of row ``m`` (metrics are computed by the demo itself)."""
    from sampling import edm2_run
    from sampling.run_settings import compact_seeds

    seeds = compact_seeds(seeds) if not isinstance(seeds, str) else seeds
    return edm2_run.build_config(preset=m.preset, outdir=str(outdir / m.name), seeds=seeds,
                                 g_weight=m.weight or None, scale_window_guide=m.masked, steps=steps,
                                 batch=batch, metrics="none")


def run_method(m: Method, outdir: pathlib.Path, seeds: Sequence[int], steps: int, batch: int, desc: str = "",
               timings: Optional[Timings] = None, progress: bool = True) -> float:
    """Sample ``m`` into ``outdir/m.name`` batch by batch (finished seeds are skipped); returns the row's seconds."""
    timings = timings if timings is not None else Timings(outdir)
    return sample_row(lambda chunk: method_config(m, outdir, chunk, steps, batch), outdir / m.name, seeds, batch,
                      desc or m.name, timings, m.name, progress)


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


def write_table(rows: list[dict], outdir: pathlib.Path, num: int, steps: int, chosen: Sequence[Method] = ()
                ) -> tuple[str, pathlib.Path]:
    """``results.csv``, ``results.png``, ``samples.png`` and, last, ``results.md`` (atomic); returns the Markdown.

    ``chosen``: the methods that ran.  The heading names the command (``default command``, ``--full``) only
    when every method ran with its counts, else the ``--methods``; ΔFD is against the ``none`` row, ``-``
    when it did not run.
    """
    base = _unguided(rows)
    names = [m.name for m in chosen] or [r["method"] for r in rows]
    if names != [m.name for m in METHODS]:
        which = f" (--methods {','.join(names)})"
    else:
        which = {(DEFAULT["num"], DEFAULT["steps"]): " (default command)",
                 (FULL["num"], FULL["steps"]): " (--full)"}.get((num, steps), "")
    lines = [f"Digits demo{which}: {num} images per method, {steps} Heun steps, windows {WINDOW}x{WINDOW} "
             f"({WINDOW_STEPS} per axis) on 16x16.", "",
             "| method | g_method | weight | negative | FD (lower better) | ΔFD vs none | confidence (higher better) "
             "| class match | evals/step | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = "-" if r["seconds"] != r["seconds"] else f"{r['seconds']:.0f}"
        evals = "-" if r.get("evals_per_step") is None else f"{r['evals_per_step']:.2f}"
        lines.append(f"| {r['method']} | {r['g_method']} | {r['weight'] or '-'} | {r['negative'] or '-'} "
                     f"| {r['fd']:.2f} | {_delta(r, base)} | {r['confidence']:.3f} "
                     f"| {r['class_match']:.3f} | {evals} | {secs} |")
    md = "\n".join(lines) + "\n"
    write_text_atomic(outdir / "results.csv", csv_text(rows))
    plot(rows, outdir / "results.png")
    sample_grid([(r["method"], outdir / r["method"]) for r in rows], list(range(min(GRID_SEEDS, num))),
                outdir / "samples.png", title=f"Digits demo samples: one row per method, the same seeds in each "
                f"({steps} Heun steps)")
    write_text_atomic(outdir / "results.md", md)  # last: marks the run as finished
    return md, outdir / "results.md"


def _unguided(rows: list[dict]) -> Optional[dict]:
    """The row without guidance (method ``none``), or None when it did not run."""
    return next((r for r in rows if r["g_method"] == "none"), None)


def _delta(row: dict, base: Optional[dict]) -> str:
    return f"{row['fd'] - base['fd']:+.2f}" if base is not None else "-"


def _kind(g_method: str) -> str:
    return "unguided" if g_method == "none" else "with windows (SWG)" if "swg" in g_method else "other guidance"


def plot(rows: list[dict], path: pathlib.Path) -> None:
    """Bar charts of FD and confidence per method over their whole ranges (FD from 0, confidence 1..10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"unguided": "tab:gray", "other guidance": "tab:blue", "with windows (SWG)": "tab:orange"}
    names = [r["method"] for r in rows]
    base = _unguided(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for ax, key, title, ylim in ((axes[0], "fd", "demo FD (lower is better)", None),
                                 (axes[1], "confidence", "confidence score (higher is better, range 1-10)",
                                  (1, 10))):
        vals = [r[key] for r in rows]
        ax.bar(range(len(vals)), vals, color=[colors[_kind(r["g_method"])] for r in rows])
        if base is not None:
            ax.axhline(base[key], color="k", linestyle="--", linewidth=1)
        ax.set_xticks(range(len(vals)), names, rotation=45, ha="right")
        ax.set_title(title)
        ax.set_ylim(*(ylim or (0, max(vals) * 1.08)))
    kinds = {_kind(r["g_method"]) for r in rows}
    handles = [Patch(color=c, label=k) for k, c in colors.items() if k in kinds]  # only the kinds shown
    if base is not None:
        handles.append(plt.Line2D([], [], color="k", linestyle="--", linewidth=1, label="unguided value"))
    axes[0].legend(handles=handles, fontsize=8, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


def demo_settings(num: int, steps: int, chosen: Sequence[Method]) -> dict:
    """What determines the table (the batch size does not: every image depends only on its seed)."""
    return {"num": num, "steps": steps, "methods": [dataclasses.asdict(m) for m in chosen]}


def run_demo(outdir: str | pathlib.Path, num: int = DEFAULT["num"], steps: int = DEFAULT["steps"], batch: int = 64,
             methods: Optional[Sequence[str]] = None, log=print, progress: bool = True) -> list[dict]:
    """Sample every method, score it, write ``results.{csv,png,md}`` and ``samples.png``; returns the table rows.

    A finished run with the same settings is printed and returned as read from
    ``results.csv`` (strings); an interrupted one resumes.  ``batch`` images are
    drawn (and kept) at a time.
    """
    from metrics.refs import load_ref
    from networks.zoo import DEMO_REF
    from sampling.presets import get_preset

    t_start = time.perf_counter()
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
    if check_outdir(outdir, settings, RESULTS):
        md = (outdir / "results.md").read_text()
        log(md)
        log(f"{outdir} already holds this run's results (results.md, results.csv, results.png, samples.png); "
            f"nothing to do")
        return read_csv(outdir / "results.csv")
    # Everything the run needs, before the first image: every row's settings, the networks, the reference.
    for m in chosen:
        method_config(m, outdir, "0", steps, batch)
    pos = get_preset("demo-digits")
    assert pos.swg_sizes == (WINDOW,) and pos.swg_steps == (WINDOW_STEPS,), "presets and table header disagree"
    label_dim, shape = network_shape(pos.net_pos_pkl)
    ref = load_ref(DEMO_REF)
    write_settings(outdir, settings)

    seeds = list(range(num))
    classes = requested_classes(seeds, label_dim, shape)
    timings = Timings(outdir)
    rows = []
    for i, m in enumerate(chosen):
        seconds = run_method(m, outdir, seeds, steps, batch, f"method {i + 1}/{len(chosen)} {m.name}", timings,
                             progress)
        res = score_folder(outdir / m.name, seeds, ref, classes)
        p = get_preset(m.preset)
        weight = m.weight or ",".join(f"{w:g}" for w in (p.g_weight or ()))
        rows.append({"method": m.name, "g_method": p.g_method, "weight": weight, "negative": m.negative,
                     "masked": m.masked if "swg" in p.g_method else "", **res,
                     "evals_per_step": counted_evals(outdir / m.name), "seconds": seconds})
        log(f"{m.name:12s} FD {res['fd']:7.2f}  confidence {res['confidence']:.3f}  "
            f"class match {res['class_match']:.3f}  ({seconds:.0f}s sampling)")
    md, _ = write_table(rows, outdir, num, steps, chosen)
    log("")
    log(md)
    log(f"wrote {outdir / 'results.md'}, results.csv, results.png, samples.png")
    log(f"wall time {_clock(time.perf_counter() - t_start)}")
    return rows


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


@click.command(context_settings=CONTEXT)
@click.option("--outdir", required=True, help="Folder for the images (one subfolder per method) and results.")
@click.option("--full", is_flag=True, help=f"The table of demo/README.md: --num {FULL['num']} --steps {FULL['steps']} "
              f"(about four times the default's time).")
@click.option("--num", type=int, default=None, help=f"Images per method (seeds 0..num-1) [default: {DEFAULT['num']}].")
@click.option("--steps", type=int, default=None, help=f"Heun sampler steps [default: {DEFAULT['steps']}].")
@click.option("--batch", type=int, default=64, show_default=True,
              help="Images drawn at a time; an interrupted row keeps its finished batches.")
@click.option("--methods", default=None, help="Comma list of rows to run [default: all].")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@exit_on_usage_error
@exit_on_interrupt(lambda **kw: kw["outdir"])
def main(outdir, full, num, steps, batch, methods, no_progress):
    """Run every guidance method on the shipped digits models and tabulate demo FD / confidence."""
    base = FULL if full else DEFAULT
    run_demo(outdir, num if num is not None else base["num"], steps if steps is not None else base["steps"], batch,
             methods.split(",") if methods else None, progress=not no_progress)


if __name__ == "__main__":  # click's usage errors as one line, exit 2 (utils.cli.run_command)
    sys.exit(run_command(main, None, "demo/run_demo.py"))
