"""Guidance-weight sweeps in streaming mode: the paper's metric-vs-weight figure and its table.

    python -m results.sweep --line "M-SWG=demo-digits:0.1 0.2 0.3" --line "WMG=demo-digits-rt:0.8 1.2" \\
        --seeds 0-999 --offsets 0,100000,200000 --metrics fd_digits,conf_digits,saturation --out sweeps/digits
    torchrun --standalone --nproc_per_node=8 -m results.sweep --line "M-SWG=edm2-img512-s-mswg:0.1 0.2" ...

A *line* is one method: a legend label, a sampler preset (:mod:`sampling.presets`)
and the guidance weights to run (``0.2`` or, for two-weight methods, ``1.2,0.14``;
the figure's x axis is the last weight).  Every (line, weight, seed offset) is
one *point*: a sampling run of ``seeds + offset`` with ``save='none'`` (images go
straight into the detectors, :mod:`metrics.stream`; nothing is written but the
statistics) into ``out/<label>/w<weights>/o<offset>``.  A point that was
interrupted resumes, a finished one reports its metrics without sampling, so a
killed sweep is rerun with the same command.

EDM2 reports the best of three seed sets; with several ``--offsets`` each
point is repeated over disjoint seed sets and the table gives, per metric,
the mean, min, max, the spread (max - min) and the best value (min for
distances, max for the Inception score and the digits confidence).

Outputs in ``out``: ``sweep_points.csv`` (one row per run), ``sweep.csv`` and
``sweep.md`` (one row per line and weight), ``sweep.png`` (one panel per
metric, FD-DINOv2, FID, IS, saturation first, one line per method: the mean,
with the min-max band over offsets).  The sampler is called through its Python
API (:func:`sampling.edm2_run.build_config`, :func:`sampling.edm2_run.generate`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import pathlib
import re
import sys
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import click

from sampling import edm2_run
from sampling.seeds import parse_int_list
from utils import dist
from utils.atomic import atomic_path
from utils.cli import CONTEXT, run_command
from utils.errors import UsageError, exit_on_usage_error

__all__ = ["Line", "parse_line", "run_sweep", "summarize", "to_markdown", "plot_sweep", "write_sweep", "main"]

# Panel order of the figure (the paper's), then any other metric.
PANELS = {"fd_dinov2": "FD-DINOv2", "fid": "FID", "is": "Inception score", "saturation": "Saturation",
          "fd_digits": "FD (digits)", "conf_digits": "Confidence (digits)"}
HIGHER_IS_BETTER = {"is", "conf_digits"}
_SKIP = {"num_images", "is_std"}


@dataclasses.dataclass
class Line:
    """One method of a sweep: ``label`` in the legend, a sampler ``preset``, the ``weights`` to run."""

    label: str
    preset: str
    weights: list
    options: dict = dataclasses.field(default_factory=dict)  # more build_config keywords

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", self.label).strip("_") or "line"


def parse_line(text: str) -> Line:
    """``'LABEL=PRESET:W W ...'`` (a weight is ``0.2`` or ``1.2,0.14``) -> :class:`Line`."""
    m = re.match(r"^\s*([^=]+?)\s*=\s*([^:\s]+)\s*:\s*(.+?)\s*$", str(text))
    if not m:
        raise UsageError(f"--line {text!r}: write LABEL=PRESET:W1 W2 ..., e.g. 'M-SWG=demo-digits:0.1 0.2 0.3'")
    label, preset, weights = m.group(1), m.group(2), m.group(3).split()
    for w in weights:
        try:
            [float(v) for v in w.split(",")]
        except ValueError:
            raise UsageError(f"--line {text!r}: weight {w!r} is not a number or a pair like 1.2,0.14") from None
    return Line(label, preset, weights)


def _x(weight: str) -> float:
    return float(weight.split(",")[-1])


def _point_dir(out: pathlib.Path, line: Line, weight: str, offset: int) -> pathlib.Path:
    return out / line.slug / f"w{weight.replace(',', '_')}" / f"o{offset}"


def _edm2_point(line: Line, weight: str, seeds: list, outdir: pathlib.Path, common: Mapping[str, Any],
                progress: bool) -> dict:
    """One streaming EDM2 run through the sampler's Python API; returns its metrics."""
    cfg = edm2_run.build_config(preset=line.preset, outdir=str(outdir), seeds=seeds, g_weight=weight,
                                save="none", **{**common, **line.options})
    return edm2_run.generate(cfg, progress=progress)["metrics"]


def run_sweep(lines: Sequence[Line], *, seeds: Sequence[int], out: os.PathLike | str, offsets: Sequence[int] = (0,),
              metrics: Optional[str] = None, ref_path: Optional[str] = None, batch: Optional[int] = None,
              device: Optional[str] = None, progress: bool = True, options: Optional[Mapping[str, Any]] = None,
              run_point: Optional[Callable[..., dict]] = None) -> list:
    """Run every (line, weight, offset) point; return one row per point (label, weight, x, offset, metrics).

    ``metrics`` / ``ref_path`` default to each preset's; ``options`` are more sampler
    settings for every point (e.g. ``steps``).  ``run_point`` replaces the EDM2 runner
    (same arguments as :func:`_edm2_point`).
    """
    if not lines:
        raise UsageError("no --line given; e.g. --line 'M-SWG=demo-digits:0.1 0.2 0.3'")
    labels = [line.label for line in lines]
    if len(set(labels)) != len(labels) or len({line.slug for line in lines}) != len(lines):
        raise UsageError(f"line labels must differ (also as folder names): {labels}")
    offsets = [int(o) for o in offsets]
    if len(set(offsets)) != len(offsets) or any(o < 0 for o in offsets):
        raise UsageError(f"--offsets must be distinct non-negative integers, got {offsets}")
    seeds = [int(s) for s in seeds]
    span = max(seeds) - min(seeds) + 1
    if len(offsets) > 1 and min(b - a for a, b in zip(sorted(offsets), sorted(offsets)[1:])) < span:
        raise UsageError(f"--offsets {','.join(map(str, offsets))} are closer than the {span} seeds of --seeds, "
                         f"so seed sets overlap; space them by at least {span}")
    common = {k: v for k, v in dict(metrics=metrics, ref_path=ref_path, batch=batch, device=device).items()
              if v is not None}
    common.update(options or {})
    run_point = run_point or _edm2_point
    out = pathlib.Path(out)
    rows = []
    for line in lines:
        for weight in line.weights:
            for offset in offsets:
                results = run_point(line, weight, [s + offset for s in seeds], _point_dir(out, line, weight, offset),
                                    common, progress)
                rows.append({"label": line.label, "preset": line.preset, "weights": weight, "w": _x(weight),
                             "offset": offset, **dict(results or {})})
    return rows


def _metric_names(rows: Sequence[Mapping[str, Any]]) -> list:
    fixed = {"label", "preset", "weights", "w", "offset", "N", "repeats"} | _SKIP
    names = []
    for r in rows:
        for k, v in r.items():
            if k not in fixed and k not in names and isinstance(v, (int, float)):
                names.append(k)
    return sorted(names, key=lambda m: (list(PANELS).index(m) if m in PANELS else len(PANELS), m))


def summarize(rows: Sequence[Mapping[str, Any]]) -> list:
    """One row per (label, weights): ``N``, ``repeats`` and per metric ``<m>``/``_min``/``_max``/``_spread``/``_best``."""
    groups: Dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["label"], r["weights"]), []).append(r)
    names = _metric_names(rows)
    out = []
    for (label, weights), rs in groups.items():
        row = {"label": label, "weights": weights, "w": rs[0]["w"], "repeats": len(rs),
               "N": rs[0].get("num_images")}
        for m in names:
            vals = [float(r[m]) for r in rs if isinstance(r.get(m), (int, float)) and not math.isnan(r[m])]
            if not vals:
                continue
            lo, hi = min(vals), max(vals)
            row.update({m: sum(vals) / len(vals), f"{m}_min": lo, f"{m}_max": hi, f"{m}_spread": hi - lo,
                        f"{m}_best": hi if m in HIGHER_IS_BETTER else lo})
        out.append(row)
    return out


def _csv(rows: Sequence[Mapping[str, Any]]) -> str:
    cols: list = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return buf.getvalue()


def to_markdown(summary: Sequence[Mapping[str, Any]], digits: int = 2) -> str:
    """The paper-style table: method, weights, N, repeats, and per metric ``mean (min-max)`` or the value."""
    names = _metric_names(summary)
    names = [m for m in names if not re.search(r"_(min|max|spread|best)$", m)]
    head = ["method", "w", "N", "repeats"] + [PANELS.get(m, m) for m in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in summary:
        cells = [r["label"], r["weights"], str(r.get("N") or ""), str(r["repeats"])]
        for m in names:
            if m not in r:
                cells.append("")
            elif r["repeats"] > 1:
                cells.append(f"{r[m]:.{digits}f} ({r[m + '_min']:.{digits}f}-{r[m + '_max']:.{digits}f})")
            else:
                cells.append(f"{r[m]:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: Sequence[Mapping[str, Any]], path: os.PathLike | str) -> Optional[pathlib.Path]:
    """One panel per metric against w, one line per method (mean; band: min to max over offsets)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in _metric_names(summary) if not re.search(r"_(min|max|spread|best)$", m)]
    if not names:
        return None
    labels = list(dict.fromkeys(r["label"] for r in summary))
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, m in zip(axes[0], names):
        for i, label in enumerate(labels):
            pts = sorted((r["w"], r[m], r[m + "_min"], r[m + "_max"]) for r in summary if r["label"] == label and m in r)
            if not pts:
                continue
            xs, ys, lo, hi = zip(*pts)
            ax.plot(xs, ys, marker="osD^v<>"[i % 7], color=f"C{i % 10}", label=label)
            if any(h > l for l, h in zip(lo, hi)):
                ax.fill_between(xs, lo, hi, color=f"C{i % 10}", alpha=0.2, linewidth=0)
        ax.set_xlabel("guidance weight w")
        ax.set_title(PANELS.get(m, m))
        ax.grid(alpha=0.3)
    handles, names_ = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, names_, loc="lower center", ncol=min(4, len(names_)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08 + 0.04 * ((len(names_) - 1) // 4), 1, 1))
    path = pathlib.Path(path)
    with atomic_path(path, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_sweep(rows: Sequence[Mapping[str, Any]], out: os.PathLike | str, digits: int = 2) -> dict:
    """Write ``sweep_points.csv``, ``sweep.csv``, ``sweep.md`` and ``sweep.png`` into ``out``; return the paths."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    paths = {"points": out / "sweep_points.csv", "csv": out / "sweep.csv", "markdown": out / "sweep.md"}
    for key, text in (("points", _csv(rows)), ("csv", _csv(summary)), ("markdown", to_markdown(summary, digits))):
        with atomic_path(paths[key]) as tmp:
            pathlib.Path(tmp).write_text(text)
    png = plot_sweep(summary, out / "sweep.png")
    if png is not None:
        paths["figure"] = png
    return paths


@click.command(context_settings=CONTEXT)
@click.option("--line", "lines", multiple=True, required=True,
              help="LABEL=PRESET:W1 W2 ... (repeat for each method); a weight is 0.2 or 1.2,0.14")
@click.option("--seeds", default="0-49999", show_default=True, help="seeds of one point, e.g. 0-49999")
@click.option("--offsets", default="0", show_default=True,
              help="comma list of seed offsets; each point runs once per offset (e.g. 0,50000,100000)")
@click.option("--metrics", default=None, help="metrics of every point (default: each preset's)")
@click.option("--ref_path", default=None, help="reference statistics (default: each preset's)")
@click.option("--batch", default=None, type=int, help="images per batch per process")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="sampler steps of every point (default: each "
              "preset's)")
@click.option("--device", default=None, help="torch device (default: cuda:<LOCAL_RANK> when available)")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=pathlib.Path),
              help="sweep folder: one subfolder per point, the table and the figure")
@click.option("--digits", type=click.IntRange(0, 8), default=2, show_default=True, help="decimals in sweep.md")
@exit_on_usage_error
def main(lines, seeds, offsets, metrics, ref_path, batch, steps, device, out, digits):
    """Run a guidance-weight sweep in streaming mode (no image files) and write its table and figure."""
    parsed = [parse_line(t) for t in lines]
    try:
        offs = [int(v) for v in str(offsets).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"--offsets {offsets!r}: give integers separated by commas, e.g. 0,50000,100000") from None
    rows = run_sweep(parsed, seeds=parse_int_list(seeds, "--seeds"), out=out, offsets=offs or [0], metrics=metrics,
                     ref_path=ref_path, batch=batch, device=device, options={"steps": steps} if steps else None)
    if dist.get_rank() == 0:
        paths = write_sweep(rows, out, digits)
        print(paths["markdown"].read_text(), end="")
        for kind, path in paths.items():
            print(f"wrote {kind}: {path}", file=sys.stderr)


if __name__ == "__main__":  # click's usage errors as one line, exit 2 (utils.cli.run_command)
    sys.exit(run_command(main, None, "python -m results.sweep"))
