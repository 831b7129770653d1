"""Benchmark: metrics while sampling (``save='none'``) vs write-then-score, on the offline digits models.

Both paths sample the same seeds with the same preset and score the same
metrics.  *Write then score*: the sampler writes PNGs (``save='png'``), then
:func:`metrics.api.calc_metrics` reads them back (what ``python -m metrics calc``
does).  *Streaming*: the sampler feeds each decoded batch to the detectors
(:mod:`metrics.stream`) and writes no image.  Prints the wall time of each
(best of ``--repeats``, alternating the two so that a change of machine load
hits both), their ratio (target >= 1.3x), the bytes each leaves on disk
(image files separately), the largest relative difference of the metrics, and
``uptime`` (the machine may be shared).

    python benchmarks/bench_streaming.py [--preset demo-digits] [--seeds 0-511] [--steps 16] [--repeats 2]
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import click

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics import api  # noqa: E402
from sampling import edm2_run  # noqa: E402

IMAGE_SUFFIXES = (".png", ".tar", ".npz")


def disk_bytes(folder: pathlib.Path) -> tuple[int, int]:
    """(bytes of image files, bytes of everything else) under ``folder``."""
    images = other = 0
    for path in folder.rglob("*"):
        if path.is_file():
            if path.name.lower().endswith(IMAGE_SUFFIXES):
                images += path.stat().st_size
            else:
                other += path.stat().st_size
    return images, other


def write_then_score(options: dict, outdir: pathlib.Path, metrics: str, ref_path: str) -> dict:
    edm2_run.generate(edm2_run.build_config(outdir=str(outdir), save="png", metrics="none", **options), progress=False)
    return api.calc_metrics(str(outdir), metrics, ref_path=ref_path, progress=False)


def streaming(options: dict, outdir: pathlib.Path, metrics: str, ref_path: str) -> dict:
    cfg = edm2_run.build_config(outdir=str(outdir), save="none", metrics=metrics, ref_path=ref_path, **options)
    return edm2_run.generate(cfg, progress=False)["metrics"]


@click.command()
@click.option("--preset", default="demo-digits", show_default=True, help="sampler preset (sampling/presets.py)")
@click.option("--seeds", default="0-511", show_default=True)
@click.option("--steps", default=16, show_default=True, type=int, help="sampler steps")
@click.option("--batch", default=128, show_default=True, type=int, help="sampler batch")
@click.option("--metrics", default="fd_digits,conf_digits,saturation", show_default=True)
@click.option("--repeats", default=2, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="cpu", show_default=True)
@click.option("--workdir", default=None, type=click.Path(file_okay=False), help="scratch folder (default: a temp dir)")
def main(preset, seeds, steps, batch, metrics, repeats, device, workdir):
    from sampling import presets

    ref_path = presets.get_preset(preset).settings().get("ref_path")
    options = dict(preset=preset, seeds=seeds, steps=steps, batch=batch, device=device)
    root = pathlib.Path(workdir or tempfile.mkdtemp(prefix="bench_streaming_"))
    times = {"write-then-score": [], "streaming": []}
    results, sizes = {}, {}
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    for r in range(repeats):
        for name, fn in (("write-then-score", write_then_score), ("streaming", streaming)):
            outdir = root / f"{name}-{r}"
            shutil.rmtree(outdir, ignore_errors=True)
            t0 = time.perf_counter()
            results[name] = fn(options, outdir, metrics, ref_path)
            times[name].append(time.perf_counter() - t0)
            sizes[name] = disk_bytes(outdir)
            shutil.rmtree(outdir, ignore_errors=True)
    print(f"uptime after:  {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    n = results["streaming"]["num_images"]
    print(f"{preset}: {n} images, {steps} steps, batch {batch}, metrics {metrics}, device {device}, "
          f"best of {repeats}")
    for name in times:
        img, other = sizes[name]
        print(f"{name:17s} {min(times[name]):8.2f} s  (all: {', '.join(f'{t:.2f}' for t in times[name])})  "
              f"image bytes {img:>10d}  other bytes {other:>8d}")
    print(f"speed-up: {min(times['write-then-score']) / min(times['streaming']):.2f}x (target >= 1.3x)")
    keys = [k for k in results["write-then-score"] if k != "num_images"]
    worst = max(abs(results["streaming"][k] - results["write-then-score"][k])
                / max(abs(results["write-then-score"][k]), 1e-300) for k in keys)
    print(f"metrics: {results['streaming']}  max relative difference {worst:.1e}")


if __name__ == "__main__":
    main()
