"""Benchmark: what the run's bookkeeping costs at 1k, 10k and 50k images, with a network that costs nothing.

A stand-in backend (:class:`FreeBackend`: each image a constant 32x32 colour picked by its seed, no
network) and a stand-in detector (:class:`FreeDetector`: 8 pooled features, flat class probabilities)
go through the whole lifecycle of :func:`sampling.run.generate`: settings file, folder lock, pending
seeds and their split, the batch loop with its preemption check, the sinks (PNG files in per-1000
folders, or the streaming statistics of ``save='none'``), metrics, summary.  So the time measured is
the bookkeeping's (plus PNG encoding of tiny images), and the memory is the lifecycle's.

Each case runs in a fresh process (``--case``); the table gives the peak resident memory (``ru_maxrss``),
the seconds per 1,000 images, and the time a rerun of the finished run takes to find nothing left to do
(goal: flat memory, a finished 50k rerun in under 10 s).

    python benchmarks/bench_bookkeeping.py                  # 1k, 10k, 50k in both modes (~10 min, 2 cores)
    python benchmarks/bench_bookkeeping.py --sizes 1000,10000 --batch 64
"""

from __future__ import annotations

import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import click
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from metrics import detectors  # noqa: E402
from metrics.detectors import Detector  # noqa: E402
from sampling import run  # noqa: E402
from sampling.run_settings import RunSettings, check_run_settings  # noqa: E402
from sampling.seeds import Draw  # noqa: E402

MODES = {"png-subdirs": dict(save="png", subdirs=True), "streaming": dict(save="none", metrics=("is", "saturation"))}


class FreeDetector(Detector):
    """A detector that costs nothing: 8 pooled values as features, flat probabilities over 1008 classes."""

    name = "inception"
    feature_dim = 8

    def __call__(self, images):
        x = images.float().mean(dim=(2, 3))
        feats = torch.cat([x, x ** 2 / 255, x.sum(1, keepdim=True), x.prod(1, keepdim=True) / 255 ** 2,
                           x[:, :2] - x[:, 1:]], dim=1)[:, :8]
        return {"features": feats.double(), "probs": torch.full((images.shape[0], 1008), 1 / 1008,
                                                                dtype=torch.float64)}


class FreeBackend(run.Backend):
    """Images for free: each seed's image is one colour derived from the seed (no network, no noise)."""

    name = "free"

    def fetch(self) -> list:
        return []

    def load(self, device) -> None:
        pass

    def draw(self, seeds, device, classes=None) -> Draw:
        s = torch.as_tensor(list(seeds), dtype=torch.int64)
        return Draw(seeds=list(seeds), noise=s, labels=None, classes=None, rnd=None)

    def sample(self, draw: Draw) -> torch.Tensor:
        return draw.noise

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        colours = torch.stack([x * 37 % 256, x * 101 % 256, x * 211 % 256], dim=1).to(torch.uint8)
        return colours[:, :, None, None].expand(-1, -1, 32, 32).contiguous()


def run_case(outdir: str, n: int, mode: str, batch: int) -> dict:
    """One generate() of ``n`` seeds into ``outdir``; returns seconds and the summary's counts."""
    detectors.LOADERS["inception"] = lambda device, **kw: FreeDetector()
    settings = RunSettings(outdir=outdir, seeds=list(range(n)), batch=batch, device="cpu", **MODES[mode])
    check_run_settings(settings)
    t0 = time.perf_counter()
    summary = run.generate(FreeBackend(settings), progress_bar=False)
    return {"seconds": time.perf_counter() - t0, "pending": summary["pending"]}


def _child(outdir: str, n: int, mode: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps([outdir, n, mode, batch])]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_seconds": time.perf_counter() - t0}


@click.command()
@click.option("--sizes", default="1000,10000,50000", show_default=True, help="numbers of images, comma-separated")
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--batch", default=64, show_default=True, help="images per batch")
@click.option("--case", default=None, hidden=True)
def main(sizes: str, modes: str, batch: int, case) -> None:
    if case:  # one measured run in this fresh process
        outdir, n, mode, b = json.loads(case)
        result = run_case(outdir, n, mode, b)
        result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return
    rows = []
    for mode in modes.split(","):
        for n in [int(s) for s in sizes.split(",")]:
            tmp = tempfile.mkdtemp(prefix="bench-bookkeeping-")
            try:
                out = os.path.join(tmp, "run")
                first = _child(out, n, mode, batch)
                again = _child(out, n, mode, batch)
                assert again["pending"] == 0
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            rows.append((mode, n, first["max_rss_mb"], 1000 * first["seconds"] / n, again["seconds"],
                         again["process_seconds"], again["max_rss_mb"]))
            print(f"{mode} {n}: done", file=sys.stderr, flush=True)
    print("| mode | images | peak RSS (MB) | s per 1,000 images | rerun of the finished run: generate() (s) "
          "| rerun: whole process (s) | rerun peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode, n, rss, per_k, rerun, wall, rss2 in rows:
        print(f"| {mode} | {n:,} | {rss:.0f} | {per_k:.2f} | {rerun:.2f} | {wall:.1f} | {rss2:.0f} |")
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {os.cpu_count()} CPUs, torch {torch.__version__}; uptime: {load}")


if __name__ == "__main__":
    main()
