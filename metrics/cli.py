"""Command line: ``python -m metrics calc``, ``ref`` and ``combine`` (torchrun-able).

    python -m metrics calc --images samples/ --ref img512.pkl --metrics fid,fd_dinov2 [--num 50000]
    python -m metrics calc --images run_stats.pkl --ref img512.pkl --metrics fid,is   # a --save_stats file
    python -m metrics ref  --images imagenet512/ --dest img512.pkl [--features 50000]
    python -m metrics combine --stats a.pkl --stats b.pkl --dest ab.pkl
    torchrun --standalone --nproc_per_node=4 -m metrics calc ...
"""

from __future__ import annotations

import json
import os

import click
import numpy as np

from utils.atomic import check_output_dir
from utils.device import resolve_device
from utils.errors import UsageError, exit_on_usage_error

from utils import dist
from .api import METRICS, STAT_KEYS, calc_metrics, compute_stats, parse_metrics, write_metrics
from .refs import save_ref

__all__ = ["main"]


def _detector_kwargs(inception_weights, dinov2_weights, dinov2_resize) -> dict:
    kw = {"inception": {}, "dinov2": {"resize_mode": dinov2_resize}}
    if inception_weights:
        kw["inception"]["weights"] = inception_weights
    if dinov2_weights:
        kw["dinov2"]["weights"] = dinov2_weights
    return kw


_common = [
    click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1), help="images per detector call (per rank)"),
    click.option("--device", default=None, help="torch device (default: cuda when available)"),
    click.option("--inception_weights", default=None, type=click.Path(dir_okay=False), help="local pt_inception-2015-12-05 .pth instead of the cached download"),
    click.option("--dinov2_weights", default=None, type=click.Path(dir_okay=False), help="local DINOv2 ViT-L/14 weights (.safetensors or .pth)"),
    click.option("--dinov2_resize", default="torch", show_default=True, type=click.Choice(["torch", "pil"]), help="DINOv2 resize: fast torch bicubic or EDM2's slower PIL mode"),
]


def _with_common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.group()
def main():
    """FID, FD-DINOv2, Inception score, saturation and precision/recall of generated images."""


@main.command()
@click.option("--images", required=True, help="folder (recursive PNG/JPEG, tar shards), .zip, .tar or ADM .npz")
@click.option("--ref", "ref", default=None, help="reference .pkl/.npz, URL, or an image folder")
@click.option("--metrics", default="fid,fd_dinov2", show_default=True, help=f"comma list of {','.join(METRICS)}")
@click.option("--num", default=None, type=int, help="use N images drawn with --seed (default: all)")
@click.option("--seed", default=0, show_default=True, help="seed of the --num choice")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="also write metrics.json and metrics.csv here")
@_with_common
@exit_on_usage_error
def calc(images, ref, metrics, num, seed, out, batch, device, inception_weights, dinov2_weights, dinov2_resize):
    """Compute metrics of --images against --ref."""
    names = parse_metrics(metrics)
    device = resolve_device(device)
    if out and os.environ.get("RANK", "0") == "0":  # rank 0 writes; probing on every rank would race
        check_output_dir(out, "--out")  # before the work, not after
    dist.init()
    results = calc_metrics(images, names, ref_path=ref, num=num, batch=batch, device=device, seed=seed,
                           detector_kwargs=_detector_kwargs(inception_weights, dinov2_weights, dinov2_resize))
    if dist.get_rank() == 0:
        if out:
            args = dict(images=images, ref=ref, metrics=",".join(names), num=num, seed=seed)
            write_metrics(out, results, args)
        click.echo(json.dumps(results))


@main.command()
@click.option("--images", required=True, help="folder (recursive), .zip, .tar or ADM .npz of reference images")
@click.option("--dest", required=True, type=click.Path(dir_okay=False), help="output reference pickle")
@click.option("--metrics", default="fid,fd_dinov2", show_default=True, help="which statistics: fid and/or fd_dinov2")
@click.option("--num", default=None, type=int, help="use N images drawn with --seed (default: all)")
@click.option("--seed", default=0, show_default=True)
@click.option("--features", default=0, show_default=True, type=click.IntRange(min=0), help="also store up to N feature rows for precision/recall")
@click.option("--overwrite", is_flag=True, help="replace an existing --dest")
@_with_common
@exit_on_usage_error
def ref(images, dest, metrics, num, seed, features, overwrite, batch, device, inception_weights, dinov2_weights, dinov2_resize):
    """Compute EDM2-format reference statistics of --images into --dest."""
    names = parse_metrics(metrics)
    kinds = []
    for name in names:
        kind, what = METRICS[name].detector, METRICS[name].kind
        if what != "fd":
            raise UsageError(f"'ref' stores Fréchet statistics only ({','.join(STAT_KEYS.values())}); drop {name}")
        kinds.append(kind)
    device = resolve_device(device)
    if os.path.exists(dest) and not overwrite:
        raise UsageError(f"{dest} already exists; choose another --dest or pass --overwrite")
    if os.environ.get("RANK", "0") == "0":  # rank 0 writes; probing on every rank would race
        check_output_dir(os.path.dirname(os.path.abspath(dest)), "--dest")  # before the work, not after
    dist.init()
    stats = compute_stats(images, kinds, keep_features=features > 0, num=num, batch=batch, seed=seed, device=device,
                          detector_kwargs=_detector_kwargs(inception_weights, dinov2_weights, dinov2_resize),
                          desc="reference images")
    if features > 0:
        rng = np.random.default_rng(seed)
        for kind in kinds:
            block = stats[STAT_KEYS[kind]]
            rows = block["features"]
            if rows.shape[0] > features:
                rows = rows[np.sort(rng.choice(rows.shape[0], features, replace=False))]
            block["features"] = rows
    if dist.get_rank() == 0:
        path = save_ref(stats, dest, overwrite=overwrite)
        click.echo(f"wrote {path} ({stats['num_images']} images: {', '.join(STAT_KEYS[k] for k in kinds)})")
    dist.barrier()


@main.command()
@click.option("--stats", "stats", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="statistics .pkl of disjoint image sets (--save_stats or 'ref' output); repeat the option")
@click.option("--dest", required=True, type=click.Path(dir_okay=False), help="output statistics pickle")
@click.option("--overwrite", is_flag=True, help="replace an existing --dest")
@exit_on_usage_error
def combine(stats, dest, overwrite):
    """Statistics of the union of the images behind several statistics files (FD blocks, saturation)."""
    from .refs import load_ref
    from .stream import combine_stats

    if os.path.exists(dest) and not overwrite:
        raise UsageError(f"{dest} already exists; choose another --dest or pass --overwrite")
    merged = combine_stats([load_ref(p) for p in stats])
    path = save_ref(merged, dest, overwrite=overwrite)
    blocks = [k for k in merged if isinstance(merged[k], dict)]
    click.echo(f"wrote {path} ({merged['num_images']} images: {', '.join(blocks)})")
