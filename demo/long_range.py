"""The long-range experiment: does M-SWG help a model keep a rule that spans the whole image?

    python demo/long_range.py --outdir out/demo-long-range          # make demo-long-range
    python demo/long_range.py --outdir out/demo-long-range-full --full

Data (:func:`training.data.load_quad_digits`): 32x32 images made of a 2x2 grid
of 16x16 digits, all four of the *same class*.  A window of k < 32 pixels never
sees the whole grid, so the rule "four quadrants agree" is exactly the kind of
long-range dependency that sliding window guidance is said to upweight.  Small
EDM2 networks trained on it ship in ``demo/models/quad-*`` (see
``training/train_long_range.sh``): class-conditional and unconditional, and
their less-trained EMA snapshots (``-early``).

Every row samples the same seeds with the project's EDM2 pipeline
(:func:`sampling.edm2_run.build_config` / :func:`~sampling.edm2_run.generate`)
into ``OUTDIR/<row>/`` and is scored with the shipped digit classifier
(detector ``digits``) applied to each quadrant:

* **consistency**: share of images whose four quadrants get the same label
  (:func:`consistency`); training images score 1.0 (the ``training data`` row),
  four independent digits would score about 0.001;
* **FD** (``fd_digits``): Fréchet distance of the 4N quadrants' classifier
  features to the training digits' statistics (``demo/refs/digits-ref.pkl``);
* **confidence** (``conf_digits``) of the quadrants, 1..10;
* **class match** (conditional rows): share of quadrants classified as the
  class the image was generated for.

Rows (:func:`rows`): per positive network unguided, CFG (conditional), autoguidance
(the less-trained snapshot of the same run as the weak model), and SWG / M-SWG
for each window size and weight.  Windows of ``k`` pixels advance by at most ``k/2`` (``window_steps``),
so neighbouring windows overlap and M-SWG's mask (pixels covered by more than
one window) is not empty.

Outputs: ``results.csv``, ``results.md`` (last), ``results.png`` (consistency and
FD against the weight, one line per window size), ``samples.png`` (one row per
method, the same seeds).  Reruns, resume and Ctrl-C behave as in
``demo/run_demo.py`` (:mod:`demo.common`).
"""

from __future__ import annotations

import dataclasses
import math
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
                         requested_classes, sample_grid, sample_row, save_figure, write_settings)
from sampling.presets import ZOO_PARAMS  # noqa: E402
from utils.atomic import write_text_atomic  # noqa: E402
from utils.cli import CONTEXT, run_command  # noqa: E402
from utils.errors import UsageError, exit_on_usage_error  # noqa: E402

__all__ = ["MODELS", "Row", "rows", "window_steps", "consistency", "quadrant_labels", "score_images",
           "run_long_range", "main"]

MODEL_DIR = REPO / "demo" / "models"
MODELS = {name: str(MODEL_DIR / f"quad-{name}.safetensors")
          for name in ("cond", "uncond", "cond-early", "uncond-early")}
RESOLUTION = 32
RESULTS = ("results.csv", "results.png", "samples.png", "results.md")
GRID_SEEDS = 10

# What the default command runs (under 10 minutes on two cores) and what --full runs.  ``sweep``: positives
# that get the whole M-SWG grid (windows x weights, plain SWG at ``swg_windows``); ``probe``: positives
# that get unguided, CFG / autoguidance and M-SWG at ``probe`` = (window, weight) only.
DEFAULT = dict(num=128, steps=8, windows=(8, 16, 24, 28), weights=(0.5, 1.0), swg_windows=(16,),
               sweep=("cond",), probe=("uncond", "cond-early"), probe_at=(16, 1.0))
FULL = dict(num=256, steps=16, windows=(8, 12, 16, 20, 24, 28), weights=(0.25, 0.5, 1.0, 2.0),
            swg_windows=(16, 28), sweep=("cond", "uncond"), probe=("cond-early", "uncond-early"), probe_at=(16, 1.0))
OTHER_WEIGHT = 1.0          # CFG, autoguidance, APG, CFG-Zero* and SLG weight
ZOO_ROWS = ("apg", "cfg-zero")   # CFG variants of the guidance zoo (sampling.presets.ZOO_PARAMS) on "cond"
WEAK = {"cond": "cond-early", "uncond": "uncond-early"}   # autoguidance: the same run, less trained


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: a positive network, a guidance method and its settings."""

    name: str
    pos: str                        # key of MODELS
    g_method: str = "none"
    weight: float = 0.0
    neg: str = ""                   # key of MODELS (cfg / wmg)
    window: int = 0                 # window size k (swg)
    masked: int = 1                 # 1 = M-SWG, 0 = plain SWG
    params: str = ""                # the method's parameters, "name=value,..." (guidance.table)


def window_steps(k: int, size: int = RESOLUTION) -> int:
    """Windows per axis so that consecutive windows of ``k`` pixels start at most ``k // 2`` apart."""
    if k >= size:
        return 1
    return -(-(size - k) // max(k // 2, 1)) + 1


def rows(sweep: Sequence[str], windows: Sequence[int], weights: Sequence[float], swg_windows: Sequence[int] = (),
         probe: Sequence[str] = (), probe_at: tuple = (16, 1.0)) -> list[Row]:
    """Per positive network: unguided, CFG (conditional), autoguidance (fully trained ones), then M-SWG.

    Positives in ``sweep`` get M-SWG for every window size and weight (plain SWG
    too at ``swg_windows``); those in ``probe`` M-SWG at ``probe_at`` only.
    """
    out = []
    for pos in dict.fromkeys([*sweep, *probe]):
        out.append(Row(f"{pos}/none", pos))
        if pos == "cond":
            out.append(Row(f"{pos}/cfg-{OTHER_WEIGHT:g}", pos, "cfg", OTHER_WEIGHT, "uncond"))
            for method in ZOO_ROWS:   # the zoo's CFG variants, same negative and weight, presets' parameters
                params = ",".join(f"{k}={v:g}" for k, v in sorted(ZOO_PARAMS[method][1].items()))
                out.append(Row(f"{pos}/{method}-{OTHER_WEIGHT:g}", pos, method, OTHER_WEIGHT, "uncond", params=params))
            # The positive network's own perturbed pass: SLG (default block). The quad models have no
            # self-attention, so PAG and SEG (which perturb it) are refused on them.
            out.append(Row(f"{pos}/slg-{OTHER_WEIGHT:g}", pos, "slg", OTHER_WEIGHT))
        if pos in WEAK:
            out.append(Row(f"{pos}/autoguidance-{OTHER_WEIGHT:g}", pos, "wmg", OTHER_WEIGHT, WEAK[pos]))
        grid = [(k, w) for k in windows for w in weights] if pos in sweep else [tuple(probe_at)]
        for k, w in grid:
            out.append(Row(f"{pos}/m-swg-k{k}-w{w:g}", pos, "swg", w, window=k, masked=1))
            if pos in sweep and k in swg_windows:
                out.append(Row(f"{pos}/swg-k{k}-w{w:g}", pos, "swg", w, window=k, masked=0))
    return out


def default_rows(spec: dict) -> list[Row]:
    """The rows of ``DEFAULT`` or ``FULL``."""
    return rows(spec["sweep"], spec["windows"], spec["weights"], spec["swg_windows"], spec["probe"], spec["probe_at"])


def folder_name(row: Row) -> str:
    return row.name.replace("/", "_")


# ----------------------------------------------------------------------------
# The long-range metric.

def quadrant_labels(probs: np.ndarray) -> np.ndarray:
    """``[4N, 10]`` class probabilities of the quadrants (image by image, reading order) -> labels ``[N, 4]``."""
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[0] % 4:
        raise ValueError(f"expected [4N, classes] probabilities, got shape {probs.shape}")
    return probs.argmax(axis=1).reshape(-1, 4)


def consistency(labels: np.ndarray) -> float:
    """Share of images whose four quadrant labels ``[N, 4]`` are all equal."""
    labels = np.asarray(labels)
    return float((labels == labels[:, :1]).all(axis=1).mean())


def score_images(images: np.ndarray, ref, classes: Optional[np.ndarray] = None, device=None) -> dict:
    """Consistency, FD, confidence (and class match) of uint8 ``[N, C, 32, 32]`` images, quadrant by quadrant."""
    from metrics import api
    from training.data import quadrants

    q = quadrants(np.asarray(images))                               # [N, 4, C, 16, 16]
    digits = q.reshape(-1, *q.shape[2:]).transpose(0, 2, 3, 1)      # [4N, 16, 16, C], NHWC for metrics.api
    stats = api.compute_stats([np.ascontiguousarray(digits)], ["digits"], probs=["digits"], device=device,
                              progress=False)
    res = api.calc_metrics_from_stats(stats, ref, ("fd_digits", "conf_digits"), device=device)
    labels = quadrant_labels(stats[api.PROB_KEYS["digits"]])
    out = {"consistency": consistency(labels), "fd": float(res["fd_digits"]),
           "confidence": float(res["conf_digits"])}
    out["class_match"] = float((labels == np.asarray(classes)[:, None]).mean()) if classes is not None \
        else float("nan")
    return out


def data_row(num: int, ref) -> dict:
    """The same scores for ``num`` training images: what a perfect model would get at this sample size."""
    from training.data import load_quad_digits, to_uint8

    x, labels = load_quad_digits(num, seed=12345, split="train")
    res = score_images(to_uint8(x).numpy(), ref, labels.numpy())
    return {"method": "training data", "positive": "-", "g_method": "-", "weight": "", "window": "",
            "masked": "", "negative": "", **res, "evals_per_step": None, "seconds": 0.0}


# ----------------------------------------------------------------------------
# Sampling.

def row_config(row: Row, outdir: pathlib.Path, seeds, steps: int, batch: int):
    """The :class:`sampling.edm2_run.GenerateConfig` of ``row`` for ``seeds`` (a list or a seed string)."""
    from sampling import edm2_run
    from sampling.run_settings import compact_seeds

    seeds = compact_seeds(seeds) if not isinstance(seeds, str) else seeds
    swg = row.g_method == "swg"
    return edm2_run.build_config(
        net_pos_pkl=MODELS[row.pos], net_neg_pkl=MODELS[row.neg] if row.neg else None, outdir=str(outdir /
        folder_name(row)), seeds=seeds, g_method=row.g_method, g_weight=row.weight if row.g_method != "none"
        else None, swg_sizes=row.window if swg else None, swg_steps=window_steps(row.window) if swg else None,
        scale_window_guide=row.masked if swg else None, steps=steps, batch=batch, metrics="none",
        **{k: float(v) for k, v in (p.split("=") for p in row.params.split(",") if p)})


def _check_models(chosen: Sequence[Row]) -> None:
    for key in sorted({r.pos for r in chosen} | {r.neg for r in chosen if r.neg}):
        path = pathlib.Path(MODELS[key])
        if not path.is_file() or not path.with_suffix(".json").is_file():
            raise UsageError(f"{path} (+ .json) is missing; restore demo/models from the repository or "
                             f"train it with bash training/train_long_range.sh")


def settings_of(num: int, steps: int, chosen: Sequence[Row]) -> dict:
    return {"experiment": "long-range", "num": num, "steps": steps,
            "rows": [dataclasses.asdict(r) for r in chosen]}


def run_long_range(outdir, num: int = DEFAULT["num"], steps: int = DEFAULT["steps"], batch: int = 64,
                   chosen: Optional[Sequence[Row]] = None, log=print, progress: bool = True) -> list[dict]:
    """Sample and score every row, write the table, the plot and the sample grid; returns the table rows."""
    from metrics.refs import load_ref
    from networks.zoo import DEMO_REF

    t_start = time.perf_counter()
    outdir = pathlib.Path(outdir).expanduser()
    chosen = list(chosen if chosen is not None else default_rows(DEFAULT))
    if num < 2:
        raise UsageError("--num must be at least 2 (the Fréchet distance needs a covariance)")
    if steps < 1 or batch < 1:
        raise UsageError("--steps and --batch must be at least 1")
    settings = settings_of(num, steps, chosen)
    if check_outdir(outdir, settings, RESULTS):
        log((outdir / "results.md").read_text())
        log(f"{outdir} already holds this run's results (results.md, results.csv, results.png, samples.png); "
            f"nothing to do")
        return read_csv(outdir / "results.csv")
    # Everything the run needs, before the first image.
    _check_models(chosen)
    for row in chosen:
        row_config(row, outdir, "0", steps, batch)
    ref = load_ref(DEMO_REF)
    write_settings(outdir, settings)

    seeds = list(range(num))
    classes = requested_classes(seeds, 10, (1, RESOLUTION, RESOLUTION))
    timings = Timings(outdir)
    table = [data_row(num, ref)]
    for i, row in enumerate(chosen):
        folder = outdir / folder_name(row)
        seconds = sample_row(lambda chunk, r=row: row_config(r, outdir, chunk, steps, batch), folder, seeds, batch,
                             f"method {i + 1}/{len(chosen)} {row.name}", timings, row.name, progress)
        res = score_images(read_images(folder, seeds), ref, classes if row.pos.startswith("cond") else None)
        table.append({"method": row.name, "positive": row.pos, "g_method": _label(row),
                      "weight": f"{row.weight:g}" if row.g_method != "none" else "",
                      "window": row.window or "", "masked": row.masked if row.window else "",
                      "negative": row.neg, **res, "evals_per_step": counted_evals(folder), "seconds": seconds})
        log(f"{row.name:28s} consistency {res['consistency']:.3f}  FD {res['fd']:7.2f}  "
            f"confidence {res['confidence']:.3f}  ({seconds:.0f}s sampling)")
    md = write_results(table, chosen, outdir, num, steps)
    log("")
    log(md)
    log(f"wrote {outdir / 'results.md'}, results.csv, results.png, samples.png")
    log(f"wall time {_clock(time.perf_counter() - t_start)}")
    return table


def _label(row: Row) -> str:
    if row.g_method == "swg":
        return "m-swg" if row.masked else "swg"
    return {"wmg": "autoguidance"}.get(row.g_method, row.g_method)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs:02d} s"


# ----------------------------------------------------------------------------
# Results.

def _fmt(v: float, digits: int) -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else f"{v:.{digits}f}"


def write_results(table: list[dict], chosen: Sequence[Row], outdir: pathlib.Path, num: int, steps: int) -> str:
    """``results.csv``, ``results.png``, ``samples.png`` and, last, ``results.md``; returns the Markdown."""
    unguided = {r["positive"]: r for r in table if r["g_method"] == "none"}
    lines = [f"Long-range demo: {num} images per row (32x32, 2x2 digits of one class), {steps} Heun steps; "
             f"scores over the 4 quadrants of each image.", "",
             "| method | positive | guidance | weight | window (per axis) | consistency (higher better) "
             "| Δ vs none | FD (lower better) | ΔFD vs none | confidence | class match | evals/step | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        base = unguided.get(r["positive"])
        dc = f"{r['consistency'] - base['consistency']:+.3f}" if base else "-"
        dfd = f"{r['fd'] - base['fd']:+.2f}" if base else "-"
        win = f"{r['window']} ({window_steps(int(r['window']))})" if r["window"] else "-"
        lines.append(f"| {r['method']} | {r['positive']} | {r['g_method']} | {r['weight'] or '-'} | {win} "
                     f"| {r['consistency']:.3f} | {dc} | {r['fd']:.2f} | {dfd} | {r['confidence']:.3f} "
                     f"| {_fmt(r['class_match'], 3)} | {_fmt(r.get('evals_per_step') or math.nan, 2)} "
                     f"| {_fmt(r['seconds'], 0)} |")
    md = "\n".join(lines) + "\n"
    write_text_atomic(outdir / "results.csv", csv_text(table))
    plot(table, outdir / "results.png")
    grid = [(row.name, outdir / folder_name(row)) for row in chosen]
    sample_grid(grid, list(range(min(GRID_SEEDS, num))), outdir / "samples.png",
                title=f"Long-range demo samples: one row per method, the same seeds in each ({steps} Heun steps)")
    write_text_atomic(outdir / "results.md", md)
    return md


def plot(table: list[dict], path: pathlib.Path) -> None:
    """Consistency and FD against the guidance weight, one line per window size (M-SWG solid, SWG dashed).

    Each line starts at weight 0 from the unguided value; CFG and autoguidance
    are single markers.  Consistency is drawn on its whole range 0..1, FD from 0.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positives = [p for p in dict.fromkeys(r["positive"] for r in table) if p != "-"]
    fig, axes = plt.subplots(len(positives), 2, figsize=(11, 3.6 * len(positives)), squeeze=False)
    windows = sorted({int(r["window"]) for r in table if r["window"]})
    cmap = plt.get_cmap("viridis")
    color = {k: cmap(i / max(len(windows) - 1, 1)) for i, k in enumerate(windows)}
    data = next((r for r in table if r["positive"] == "-"), None)
    for (ax_c, ax_f), pos in zip(axes, positives):
        mine = [r for r in table if r["positive"] == pos]
        base = next((r for r in mine if r["g_method"] == "none"), None)
        for ax, key in ((ax_c, "consistency"), (ax_f, "fd")):
            for k in windows:
                for masked, style in ((1, "-"), (0, "--")):
                    pts = sorted((float(r["weight"]), r[key]) for r in mine
                                 if r["window"] and int(r["window"]) == k and int(r["masked"]) == masked)
                    if pts:
                        xs, ys = zip(*(([(0.0, base[key])] if base else []) + pts))
                        ax.plot(xs, ys, style, marker="o", ms=3, color=color[k],
                                label=f"{'M-SWG' if masked else 'SWG'} k={k}")
            for r, marker in ((r, "s" if r["g_method"] == "cfg" else "^") for r in mine
                              if r["g_method"] in ("cfg", "autoguidance")):
                ax.plot([float(r["weight"])], [r[key]], marker, color="tab:red" if marker == "s" else "tab:blue",
                        ms=7, linestyle="none", label=r["g_method"])
            if base is not None:
                ax.axhline(base[key], color="k", linestyle=":", linewidth=1, label="unguided")
            if data is not None:
                ax.axhline(data[key], color="tab:green", linestyle="-.", linewidth=1, label="training data")
            ax.set_xlabel("guidance weight w")
        ax_c.set_ylim(0, 1.02)
        ax_c.set_ylabel("consistency (4 quadrants agree)")
        ax_c.set_title(f"positive: {pos}  (higher is better)")
        top = max(r["fd"] for r in mine)
        ax_f.set_ylim(0, top * 1.08)
        ax_f.set_ylabel("FD of the quadrants")
        ax_f.set_title(f"positive: {pos}  (lower is better)")
        for ax in (ax_c, ax_f):  # the same lines in both panels: each panel names them
            ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)


# ----------------------------------------------------------------------------
# Command line.

def _parse(text: Optional[str], kind, what: str):
    if text is None:
        return None
    try:
        values = tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what}: cannot parse {text!r}; give a comma list, e.g. 8,16,24") from None
    bad = [v for v in values if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise UsageError(f"{what}: {bad[0]} is not finite; give ordinary numbers, e.g. 0.5,1")
    return values


@click.command(context_settings=CONTEXT)
@click.option("--outdir", required=True, help="Folder for the images (one subfolder per row) and results.")
@click.option("--full", is_flag=True, help=f"Larger run: {FULL['num']} images, {FULL['steps']} steps, windows "
              f"{','.join(map(str, FULL['windows']))}, weights {','.join(map(str, FULL['weights']))}.")
@click.option("--num", type=int, default=None, help=f"Images per row [default: {DEFAULT['num']}].")
@click.option("--steps", type=int, default=None, help=f"Heun steps [default: {DEFAULT['steps']}].")
@click.option("--windows", default=None, help="Comma list of M-SWG window sizes (of 32, divisible by 4).")
@click.option("--weights", default=None, help="Comma list of SWG weights.")
@click.option("--positives", default=None, help=f"Comma list of positive networks to sweep ({', '.join(MODELS)}) "
              f"[default: {','.join(DEFAULT['sweep'])}, and a probe of {','.join(DEFAULT['probe'])}].")
@click.option("--batch", type=int, default=64, show_default=True,
              help="Images drawn at a time; an interrupted row keeps its finished batches.")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@exit_on_usage_error
@exit_on_interrupt(lambda **kw: kw["outdir"])
def main(outdir, full, num, steps, windows, weights, positives, batch, no_progress):
    """Sample the long-range digits models with every guidance method and measure quadrant consistency."""
    base = FULL if full else DEFAULT
    windows = _parse(windows, int, "--windows") or base["windows"]
    weights = _parse(weights, float, "--weights") or base["weights"]
    sweep = _parse(positives, str, "--positives") or base["sweep"]
    probe = base["probe"] if positives is None else ()
    unknown = [p for p in sweep if p not in MODELS]
    if unknown:
        raise UsageError(f"unknown --positives {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    bad = [k for k in windows if not 4 <= k <= RESOLUTION or k % 4]
    if bad:
        raise UsageError(f"--windows {','.join(map(str, bad))}: window sizes must lie in 4..32 and be divisible "
                         f"by 4 (the U-Net halves 32x32 twice)")
    chosen = rows(sweep, windows, weights, [k for k in base["swg_windows"] if k in windows], probe, base["probe_at"])
    run_long_range(outdir, num if num is not None else base["num"], steps if steps is not None else base["steps"],
                   batch, chosen, progress=not no_progress)


if __name__ == "__main__":  # click's usage errors as one line, exit 2 (utils.cli.run_command)
    sys.exit(run_command(main, None, "demo/long_range.py"))
