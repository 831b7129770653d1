"""Collect the metrics of every run under a folder into one table, and plot metrics against the weight.

    python -m results.collect ./samples --out ./report

A *run* is a folder holding ``metrics.json`` (written by :func:`metrics.api.write_metrics`:
``{"results": {...}, "args": {...}, "time": ...}``; a re-evaluation adds
``metrics-1.json``, ``metrics-2.json``, ...) or only ``metrics.csv`` (one row: arguments
then results).  The sampler's own record of the settings is read beside it: ``settings.json``
(both samplers), or the older ``generate_args.json`` (``sample_edm2.py``) / ``args.json`` (``sample_dit.py``).

Each run becomes one row (its newest evaluation unless ``--all-evals``):

=============  ==================================================================
column         meaning
=============  ==================================================================
``sampler``    ``edm2`` or ``dit``
``model``      EDM2: checkpoint file name (or preset); DiT: ``DiT-XL/2@256`` (+ checkpoint)
``method``     ``none``, ``cfg``, ``wmg``, ``swg``, ``wmg-swg``, ``cfg-swg`` (DiT: also ``uncond``)
``masked``     1 when the M-SWG mask is applied (EDM2 combined methods in reference mode: 0)
``label``      display name, e.g. ``M-SWG``, ``WMG+SWG``, ``CFG+M-SWG``
``weights``    guidance weights as given, ``w`` or ``w1,w2``
``windows``    ``k=40,n=2`` (window size, windows per axis), empty without windows
``N``          number of images evaluated
``evals_per_step``  network evaluations per image per sampler step, counted while sampling
               (``evals.json``; a window counts one); ``cost_per_step`` weights them by input area
``fid`` ...    ``fid``, ``fd_dinov2``, ``is``, ``saturation`` and any other result
=============  ==================================================================

A folder written by ``demo/run_demo.py`` (``demo_settings.json`` + the demo's
``results.csv``) is read too: one row per method, its settings from the method's
``generate_args.json`` and its scores from the demo's table (``fd`` ->
``fd_digits``, ``confidence`` -> ``conf_digits``, ``class_match``).  The report
is then written to ``ROOT/report`` by default, as ``ROOT`` holds the demo's own
``results.md``; ``--out ROOT`` is refused.

The plot has one panel per metric; each line is one (model, method, fixed weights)
series with the *last* guidance weight on the x axis (the SWG weight of the combined
methods, whose first weight is written in the legend).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pathlib
import re
import sys
from typing import Any, Iterable, Mapping, Optional, Sequence

import click

from guidance import METHODS
from sampling.run_folder import EVALS_FILE
from utils.atomic import atomic_path, ensure_dir
from utils.cli import CONTEXT, run_command
from utils.errors import UsageError, exit_on_usage_error

__all__ = ["ARGS_FILES", "MAIN_COLUMNS", "PLOT_METRICS", "TABLE_METRICS", "DEMO_SETTINGS", "find_runs", "read_run",
           "is_demo_run", "read_demo_run", "collect", "to_csv", "to_markdown", "plot_metrics", "default_out",
           "write_report", "main"]

ARGS_FILES = ("settings.json", "generate_args.json", "args.json")  # sampling.run_folder.SETTINGS_FILE, then older names
MAIN_COLUMNS = ("method", "weights", "windows", "model", "N", "fid", "fd_dinov2", "is", "saturation")
PLOT_METRICS = {"fid": "FID", "fd_dinov2": "FD-DINOv2", "is": "Inception score", "saturation": "Saturation",
                "fd_digits": "FD (digits)", "conf_digits": "Confidence (digits)"}
# Markdown columns, in this order; each appears when at least one row has it.
TABLE_METRICS = {"fid": "FID", "sfid": "sFID", "fd_dinov2": "FDD", "is": "IS",
                 "precision_inception": "precision", "recall_inception": "recall", "kid_inception": "KID",
                 "fd_clip": "FD-CLIP", "saturation": "saturation",
                 "fd_digits": "FD-digits", "conf_digits": "confidence", "class_match": "class match",
                 "evals_per_step": "evals/step"}
_DIGITS = {"saturation": 3, "conf_digits": 3, "class_match": 3, "precision_inception": 3, "recall_inception": 3,
           "kid_inception": 4}  # decimals of these columns (others: --digits)
DEMO_SETTINGS = "demo_settings.json"  # the record demo/run_demo.py keeps beside its results.csv
_DEMO_SCORES = {"fd_digits": ("fd_digits", "fd"), "conf_digits": ("conf_digits", "confidence"),
                "class_match": ("class_match",)}  # our name <- the demo table's column(s)
_METRICS_NAME = re.compile(r"^metrics(?:-(\d+))?\.(json|csv)$")


# ----------------------------------------------------------------------------
# Reading runs.

def _evaluations(folder: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """``(index, path)`` of the metric files in ``folder``: ``metrics.json`` is 0, ``metrics-k.json`` is k.

    When both ``.json`` and ``.csv`` exist for one index the JSON is used.
    """
    found: dict[int, pathlib.Path] = {}
    for path in folder.iterdir():
        m = _METRICS_NAME.match(path.name)
        if m and path.is_file():
            k = int(m.group(1) or 0)
            if k not in found or path.suffix == ".json":
                found[k] = path
    return sorted(found.items())


def find_runs(root: os.PathLike | str) -> list[pathlib.Path]:
    """Every folder under ``root`` (``root`` included) that holds a metrics file, sorted."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder; pass the folder that holds the runs (e.g. ./samples)")
    runs = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if any(_METRICS_NAME.match(f) for f in filenames) or is_demo_run(dirpath):
            runs.append(pathlib.Path(dirpath))
    return sorted(runs)


def is_demo_run(folder: os.PathLike | str) -> bool:
    """True for a folder written by ``demo/run_demo.py`` (its settings record and its table)."""
    folder = pathlib.Path(folder)
    return (folder / DEMO_SETTINGS).is_file() and (folder / "results.csv").is_file()


def _scalar(text: str) -> Any:
    """A CSV cell back to a Python value: numbers, JSON lists, booleans, empty -> None."""
    if text == "":
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    if text in ("True", "False"):
        return text == "True"
    if text[:1] in "[{":
        try:
            return json.loads(text)
        except ValueError:
            pass
    return text


def _read_metrics_file(path: pathlib.Path) -> tuple[dict, dict]:
    """``(results, args)`` of one metrics file."""
    if path.suffix == ".json":
        doc = json.loads(path.read_text())
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if "results" in doc:
            return dict(doc["results"]), dict(doc.get("args") or {})
        return dict(doc), {}  # a bare {metric: value} file
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError("no data row")
    row = {k: _scalar(v) for k, v in rows[-1].items()}
    known = {"fid", "fd_dinov2", "is", "is_std", "saturation", "num_images"}
    known |= {k for k in row if k.startswith(("precision_", "recall_"))}
    return {k: v for k, v in row.items() if k in known}, {k: v for k, v in row.items() if k not in known}


def _read_args(folder: pathlib.Path) -> dict:
    for name in ARGS_FILES:
        for where in (folder, folder.parent):
            path = where / name
            if path.is_file():
                try:
                    doc = json.loads(path.read_text())
                except ValueError:
                    continue
                if isinstance(doc, dict):
                    return doc
    return {}


def _read_evals(folder: pathlib.Path) -> dict:
    """``evals_per_step`` and ``cost_per_step`` counted by the sampler (``evals.json``), when present."""
    try:
        doc = json.loads((folder / EVALS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: doc.get(k) for k in ("evals_per_step", "cost_per_step") if isinstance(doc, dict)}


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str):
        return [_scalar(v.strip()) for v in value.strip("[]()").split(",") if v.strip()]
    return [value]


def _fmt_num(v) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v)) if abs(v) >= 1 else f"{v:g}"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _windows(method: str) -> bool:
    return method in METHODS and METHODS[method].windows


def _label(method: str, masked: bool) -> str:
    if method == "uncond":  # DiT's --uncond 1: the null class, no guidance
        return "unconditional"
    return METHODS[method].display(masked) if method in METHODS else method


def _describe(args: Mapping[str, Any]) -> dict:
    """Sampler, model, method, mask, weights and windows from either sampler's arguments."""
    if "g_method" in args or "net_pos_pkl" in args:  # sample_edm2.py
        method = str(args.get("g_method") or "none").replace("_", "-")
        weights = [float(w) for w in _as_list(args.get("g_weight"))]
        mask = str(args.get("scale_window_guide", 1)) in ("1", "True", "true")
        if method in METHODS and "reference_quirks" in METHODS[method].options and not args.get("clean_combos"):
            mask = False  # the reference's wmg-swg / cfg-swg never apply the mask (the newer X-swg do)
        model = args.get("preset") or pathlib.PurePosixPath(str(args.get("net_pos_pkl") or "?")).name
        model = re.sub(r"\.(pkl|pt|safetensors)$", "", model)
        sizes, steps = _as_list(args.get("swg_sizes")), _as_list(args.get("swg_steps")) or [2]
        sampler = "edm2"
    else:  # sample_dit.py
        method = str(args.get("method") or "none")
        g, c = args.get("g_scale"), args.get("crop_scale")
        if _as_list(args.get("weights")):  # --method X --weights w[,...] (the methods without a switch)
            weights = [float(w) for w in _as_list(args.get("weights"))]
        else:
            weights = [] if method in ("none", "uncond") or g is None else [float(g)]
            if method == "cfg-swg" and c is not None:
                weights.append(float(c))
        mask = str(args.get("mask", 0)) in ("1", "True", "true")
        model = f"{args.get('model', 'DiT')}@{args.get('image_size', '?')}"
        if args.get("ckpt"):
            model += f" ({re.sub(r'[.](pt|pth|safetensors)$', '', pathlib.PurePosixPath(str(args['ckpt'])).name)})"
        sizes, steps = _as_list(args.get("window_size")), _as_list(args.get("window_steps")) or [2]
        sampler = "dit"
    masked = bool(mask) and _windows(method)
    windows = ""
    if _windows(method) and sizes:
        windows = f"k={'x'.join(map(str, sizes))},n={'x'.join(map(str, steps))}"
    return {"sampler": sampler, "model": model, "method": method, "masked": int(masked),
            "label": _label(method, masked), "weights": ",".join(_fmt_num(w) for w in weights),
            "windows": windows, "_weights": weights}


def read_run(folder: os.PathLike | str, *, all_evals: bool = False, root: Optional[os.PathLike] = None) -> list[dict]:
    """Rows of one run folder (its newest evaluation, or all with ``all_evals``)."""
    folder = pathlib.Path(folder)
    evals = _evaluations(folder)
    if not all_evals:
        evals = evals[-1:]
    file_args = _read_args(folder)
    rows = []
    for index, path in evals:
        try:
            results, metric_args = _read_metrics_file(path)
        except (ValueError, OSError, KeyError) as exc:
            print(f"warning: skipping {path}: {exc}", file=sys.stderr)
            continue
        args = {**metric_args, **file_args}  # the sampler's own record wins
        row = _describe(args)
        # The reference this evaluation compared against: metrics calc's --ref, else the sampler's ref_path.
        ref = metric_args.get("ref") or metric_args.get("ref_path") or file_args.get("ref_path")
        row["ref"] = _short_source(ref) if ref else None
        n = results.pop("num_images", None)
        row["N"] = int(n) if n is not None else args.get("num_images")
        row.update({k: v for k, v in results.items() if isinstance(v, (int, float)) or v is None})
        row.update(_read_evals(folder))
        rel = folder.relative_to(root) if root is not None else folder
        row["run"] = str(rel)
        row["evaluation"] = index
        rows.append(row)
    return rows


def read_demo_run(folder: os.PathLike | str, *, root: Optional[os.PathLike] = None) -> list[dict]:
    """Rows of a digits-demo folder: one per method of its ``results.csv`` (see the module docstring).

    A method whose own folder holds a metrics file is left out here: :func:`read_run` reads it.
    """
    folder = pathlib.Path(folder)
    try:
        settings = json.loads((folder / DEMO_SETTINGS).read_text())
        with open(folder / "results.csv", newline="") as f:
            table = list(csv.DictReader(f))
    except (ValueError, OSError) as exc:
        print(f"warning: skipping the demo run {folder}: {exc}", file=sys.stderr)
        return []
    rows = []
    for rec in table:
        name = rec.get("method") or ""
        sub = folder / name
        if name and sub.is_dir() and _evaluations(sub):
            continue
        args = _read_args(sub) if name and sub.is_dir() else {}
        if not args:  # the method's folder is gone: what the demo's table says
            args = {"preset": name, "g_method": rec.get("g_method") or "none", "g_weight": rec.get("weight"),
                    "scale_window_guide": rec.get("masked") or 1}
        row = _describe(args)
        row["ref"] = _short_source(args["ref_path"]) if args.get("ref_path") else None  # the preset's reference
        row["N"] = settings.get("num") if isinstance(settings, dict) else None
        for key, columns in _DEMO_SCORES.items():
            value = next((_scalar(rec[c]) for c in columns if rec.get(c) not in (None, "")), None)
            if isinstance(value, (int, float)):
                row[key] = float(value)
        row["run"] = str(sub.relative_to(root) if root is not None else sub)
        row["evaluation"] = 0
        rows.append(row)
    return rows


def _short_source(source) -> str:
    """``img512.pkl`` for a path or URL: the file name, enough to tell references apart in a table."""
    return pathlib.PurePosixPath(str(source).rstrip("/")).name or str(source)


def collect(root: os.PathLike | str, *, all_evals: bool = False) -> list[dict]:
    """All rows under ``root``, ordered by sampler, model, method, weights."""
    root = pathlib.Path(root)
    rows = [row for folder in find_runs(root)
            for row in [*read_run(folder, all_evals=all_evals, root=root),
                        *(read_demo_run(folder, root=root) if is_demo_run(folder) else [])]]
    if not rows:
        raise UsageError(f"no metrics.json or metrics.csv under {root}; run the samplers with --metrics "
                         f"(and --ref_path) or point at the folder that holds the runs")
    rows.sort(key=lambda r: (r["sampler"], r["model"], r["method"], r["masked"], r["_weights"], r["run"],
                             r["evaluation"]))
    return rows


# ----------------------------------------------------------------------------
# Tables.

def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    extra = sorted({k for r in rows for k in r} - set(MAIN_COLUMNS) - {"_weights", "run", "evaluation", "sampler",
                                                                         "label", "masked"})
    return ["sampler", "label", *MAIN_COLUMNS, "masked", *extra, "run", "evaluation"]


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in writer.fieldnames})
    return buf.getvalue()


def _cell(v, digits: int) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v).replace("|", "\\|")


def _run_name(row: Mapping[str, Any]) -> str:
    run, k = str(row.get("run") or ""), row.get("evaluation") or 0
    return f"{run} (metrics-{k})" if k else run


def to_markdown(rows: Sequence[Mapping[str, Any]], digits: int = 2) -> str:
    """A Markdown table: method (display name), weights, windows, model, N, the reference (file name), the
    metrics any row has, run.

    The metrics are those of :data:`TABLE_METRICS` (FID, sFID, FDD, IS, precision, recall, KID,
    FD-CLIP, saturation, and the digits demo's FD-digits, confidence and class match); a column
    no row has is left out.  The last column is the run folder (relative to the collected root;
    ``(metrics-k)`` for a re-evaluation), so that rows with the same settings can be told apart.
    """
    present = [k for k in TABLE_METRICS if any(isinstance(r.get(k), (int, float)) for r in rows)]
    refs = ["ref"] if any(r.get("ref") for r in rows) and present else []  # the reference the scores compare with
    head = ["method", "weights", "windows", "model", "N", *refs, *(TABLE_METRICS[k] for k in present), "run"]
    keys = ["label", "weights", "windows", "model", "N", *refs, *present]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i < 4 or head[i] == "ref" or i == len(head) - 1 else "---:"
                            for i in range(len(head))) + "|"]
    for r in rows:
        cells = [_cell(r.get(k), _DIGITS.get(k, digits)) for k in keys]
        cells.append(_cell(_run_name(r), digits))
        lines.append("| " + " | ".join(c if c else " " for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Plot.

def _series(rows: Sequence[Mapping[str, Any]], metric: str) -> dict[str, list[tuple[float, float]]]:
    """Legend label -> sorted ``(x = last weight, metric)`` points; unguided runs sit at w = 0."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        value = r.get(metric)
        if not isinstance(value, (int, float)) or math.isnan(value):
            continue
        w = r["_weights"]
        x = w[-1] if w else 0.0
        fixed = f" (w1={_fmt_num(w[0])})" if len(w) > 1 else ""
        windows = f", {r['windows']}" if r["windows"] else ""
        series.setdefault(f"{r['model']}: {r['label']}{fixed}{windows}", []).append((x, float(value)))
    return {k: sorted(v) for k, v in sorted(series.items())}


def plot_metrics(rows: Sequence[Mapping[str, Any]], path: os.PathLike | str,
                 metrics: Iterable[str] = tuple(PLOT_METRICS)) -> Optional[pathlib.Path]:
    """One panel per metric present, metric against guidance weight, one line per series; PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    present = [m for m in metrics if _series(rows, m)]
    if not present:
        return None
    labels_all = sorted({label for m in present for label in _series(rows, m)})
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    markers = "osD^v<>ph*"
    style = {label: (cycle[i % len(cycle)], markers[(i // len(cycle)) % len(markers)])
             for i, label in enumerate(labels_all)}  # one look per series in every panel
    fig, axes = plt.subplots(1, len(present), figsize=(4.6 * len(present), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], present):
        for label, points in _series(rows, metric).items():
            xs, ys = zip(*points)
            color, marker = style[label]
            ax.plot(xs, ys, marker=marker, color=color, label=label)
        ax.set_xlabel("guidance weight w")
        ax.set_ylabel(PLOT_METRICS.get(metric, metric))
        ax.set_title(PLOT_METRICS.get(metric, metric))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(3, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 3), 1, 1))
    path = pathlib.Path(path)
    _atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------
# Output.

def _atomic(path: pathlib.Path, write) -> None:
    with atomic_path(path, flag="--out") as tmp:
        write(tmp)


def default_out(root: os.PathLike | str) -> pathlib.Path:
    """``root``, or ``root/report`` for a demo folder (whose own results.md must not be replaced)."""
    root = pathlib.Path(root)
    return root / "report" if is_demo_run(root) else root


def write_report(root: os.PathLike | str, out: os.PathLike | str, *, all_evals: bool = False,
                 digits: int = 2) -> dict[str, pathlib.Path]:
    """Write ``results.csv``, ``results.md`` and ``metrics_vs_weight.png`` into ``out``; return their paths."""
    out = pathlib.Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; choose a folder")
    if (out / DEMO_SETTINGS).is_file():
        raise UsageError(f"--out {out} holds the digits demo's own results.md and results.csv; "
                         f"choose another folder, e.g. --out {out / 'report'}")
    rows = collect(root, all_evals=all_evals)
    ensure_dir(out, "--out")
    paths = {"csv": out / "results.csv", "markdown": out / "results.md"}
    _atomic(paths["csv"], lambda tmp: pathlib.Path(tmp).write_text(to_csv(rows)))
    _atomic(paths["markdown"], lambda tmp: pathlib.Path(tmp).write_text(to_markdown(rows, digits)))
    png = plot_metrics(rows, out / "metrics_vs_weight.png")
    if png is not None:
        paths["plot"] = png
    return paths


@click.command(context_settings=CONTEXT)
@click.argument("root", type=click.Path(file_okay=False, path_type=pathlib.Path))
@click.option("--out", "out", type=click.Path(path_type=pathlib.Path), default=None,
              help="Folder for results.csv, results.md and metrics_vs_weight.png  "
                   "[default: ROOT; ROOT/report for a digits-demo folder]")
@click.option("--all-evals", is_flag=True, help="One row per evaluation (metrics-k.json) instead of the newest.")
@click.option("--digits", type=click.IntRange(0, 8), default=2, show_default=True, help="Decimals in the Markdown table.")
@exit_on_usage_error
def main(root: pathlib.Path, out: Optional[pathlib.Path], all_evals: bool, digits: int) -> None:
    """Collect every run's metrics under ROOT into one table and plot each metric against the guidance weight."""
    paths = write_report(root, out if out is not None else default_out(root), all_evals=all_evals, digits=digits)
    print(pathlib.Path(paths["markdown"]).read_text(), end="")
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}", file=sys.stderr)


if __name__ == "__main__":  # click's usage errors as one line, exit 2 (utils.cli.run_command)
    sys.exit(run_command(main, None, "python -m results.collect"))
