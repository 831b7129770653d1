"""Command line: ``python -m metrics calc``, ``ref`` and ``combine`` (torchrun-able).

    python -m metrics calc --images samples/ --ref img512.pkl --metrics fid,fd_dinov2 [--num 50000]
    python -m metrics calc --images run_stats.pkl --ref img512.pkl --metrics fid,is   # a --save_stats file
    python -m metrics ref  --images imagenet512/ --dest img512.pkl [--features 50000]
    python -m metrics combine --stats a.pkl --stats b.pkl --dest ab.pkl
    torchrun --standalone --nproc_per_node=4 -m metrics calc ...
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
from typing import Optional

import click
import numpy as np

from utils import dist
from utils.atomic import check_output_dir
from utils.cache import OfflineError, cache_path
from utils.cli import flag_spelling
from utils.device import resolve_device
from utils.errors import UsageError, exit_on_usage_error

from .api import (ALIASES, METRICS, STAT_KEYS, blocks_for, calc_metrics, compute_stats, detectors_for, parse_metrics,
                  write_metrics)
from .detectors import weights_source
from .images import open_images, select_indices
from .refs import load_ref, save_adm_ref, save_ref
from .stream import combine_stats

__all__ = ["main"]


# The library's parameters whose flag here is not --<name> (they are named in its errors).
SPELLING = flag_spelling({"ref_path": "--ref"})


def _detector_kwargs(inception_weights, dinov2_weights, dinov2_resize, clip_weights=None) -> dict:
    kw = {"inception": {}, "dinov2": {"resize_mode": dinov2_resize}, "clip": {}}
    if inception_weights:
        kw["inception"]["weights"] = inception_weights
    if dinov2_weights:
        kw["dinov2"]["weights"] = dinov2_weights
    if clip_weights:
        kw["clip"]["weights"] = clip_weights
    return kw


WEIGHT_FLAGS = {"inception": "--inception_weights", "dinov2": "--dinov2_weights", "clip": "--clip_weights"}


@contextlib.contextmanager
def _offline_advice(file_flag: Optional[str] = None):
    """A download that fails (:class:`utils.cache.OfflineError`) names the flag that takes a local copy
    (a detector's ``--*_weights``, else ``file_flag`` for a reference or statistics URL); otherwise
    the cache's own advice, which holds for any command."""
    try:
        yield
    except OfflineError as exc:
        for kind, flag in WEIGHT_FLAGS.items():
            if exc.target is not None and exc.target == cache_path(weights_source(kind)):
                raise exc.advise(f"or give a local copy with {flag} FILE") from None
        if file_flag:
            raise exc.advise(f"or give a local copy as {file_flag} FILE") from None
        raise


# command -> (how to call it, what its IMAGES may be)
_IMAGE_USAGE = {
    "calc": ("python -m metrics calc IMAGES --ref REF", "PNG/JPEG folder, .zip, .tar, ADM .npz or a --save_stats .pkl"),
    "ref": ("python -m metrics ref IMAGES --dest FILE", "PNG/JPEG folder, .zip, .tar or ADM .npz"),
}


def _image_source(images_arg: Optional[str], images: Optional[str], command: str = "calc") -> str:
    """The images of ``command`` (calc, ref), given as IMAGES or --images; refused when missing, named the way
    it was given."""
    usage, kinds = _IMAGE_USAGE[command]
    if images_arg and images and images_arg != images:
        raise UsageError(f"two image sources ({images_arg} and --images {images}); give one")
    how = "IMAGES" if images_arg else "--images"
    images = images or images_arg
    if not images:
        raise UsageError(f"no images given; use '{usage} [--metrics fid,...]' (IMAGES: {kinds})")
    if not pathlib.Path(images).expanduser().exists():
        raise UsageError(f"images not found: {images}; give an existing {kinds} as {how}"
                         + (f" ('{usage}')" if how == "IMAGES" else ""))
    return images


_common = [
    click.option("--batch", default=64, show_default=True, type=click.IntRange(min=1), help="images per detector call (per rank)"),
    click.option("--device", default=None, help="torch device (default: cuda when available)"),
    click.option("--inception_weights", default=None, type=click.Path(dir_okay=False), help="local pt_inception-2015-12-05 .pth instead of the cached download"),
    click.option("--dinov2_weights", default=None, type=click.Path(dir_okay=False), help="local DINOv2 ViT-L/14 weights (.safetensors or .pth)"),
    click.option("--clip_weights", default=None, type=click.Path(dir_okay=False), help="local CLIP ViT-L/14 weights (open_clip state dict, .bin or .safetensors)"),
    click.option("--dinov2_resize", default="torch", show_default=True, type=click.Choice(["torch", "pil"]), help="DINOv2 resize: fast torch bicubic or EDM2's slower PIL mode"),
]


def _with_common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


@click.group(invoke_without_command=True)
@click.pass_context
@exit_on_usage_error(spelling=SPELLING)
def main(ctx):
    """FID, sFID, FD-DINOv2, FD-CLIP, IS, KID, precision/recall, density/coverage and saturation of images."""
    if ctx.invoked_subcommand is None:
        raise UsageError("no command; use 'python -m metrics calc IMAGES --ref REF' (or ref, combine; "
                         "--help lists them)")


@main.command()
@click.argument("images_arg", metavar="[IMAGES]", required=False)
@click.option("--images", default=None, help="folder (recursive PNG/JPEG, tar shards), .zip, .tar or ADM .npz (or give it as IMAGES)")
@click.option("--ref", "ref", default=None, help="reference .pkl/.npz, URL, or an image folder")
@click.option("--metrics", default="fid,fd_dinov2", show_default=True,
              help=f"comma list of {','.join(METRICS)}; short names: pr, kid, dc (Inception), "
                   f"adm = {','.join(ALIASES['adm'])} (ADM's and DiT's five numbers)")
@click.option("--num", default=None, type=int, help="use N images drawn with --seed (default: all)")
@click.option("--seed", default=0, show_default=True, help="seed of the --num choice")
@click.option("--out", default=None, type=click.Path(file_okay=False), help="also write metrics.json and metrics.csv here")
@_with_common
@exit_on_usage_error(spelling=SPELLING)
def calc(images_arg, images, ref, metrics, num, seed, out, batch, device, inception_weights, dinov2_weights,
         clip_weights, dinov2_resize):
    """Compute metrics of IMAGES (or --images) against --ref."""
    images = _image_source(images_arg, images)
    names = parse_metrics(metrics)
    device = resolve_device(device)
    if out and os.environ.get("RANK", "0") == "0":  # rank 0 writes; probing on every rank would race
        check_output_dir(out, "--out")  # before the work, not after
    dist.init()
    with _offline_advice("--ref"):
        results = calc_metrics(images, names, ref_path=ref, num=num, batch=batch, device=device, seed=seed,
                               detector_kwargs=_detector_kwargs(inception_weights, dinov2_weights, dinov2_resize,
                                                                clip_weights))
    if dist.get_rank() == 0:
        if out:
            args = dict(images=images, ref=ref, metrics=",".join(names), num=num, seed=seed)
            write_metrics(out, results, args)
        click.echo(json.dumps(results))


ADM_REF_IMAGES = 10000  # images in ADM's reference batches (for precision/recall)


@main.command()
@click.argument("images_arg", metavar="[IMAGES]", required=False)
@click.option("--images", default=None, help="folder (recursive), .zip, .tar or ADM .npz of reference images (or give it as IMAGES)")
@click.option("--dest", required=True, type=click.Path(dir_okay=False),
              help="output: a reference pickle (.pkl), or an ADM reference batch (.npz: arr_0, mu, sigma, mu_s, sigma_s)")
@click.option("--metrics", default=None, help="which statistics: "
              + ", ".join(n for n, s in METRICS.items() if s.kind == "fd")
              + " [default: fid,fd_dinov2; fid,sfid for an .npz]")
@click.option("--num", default=None, type=int, help="use N images drawn with --seed (default: all)")
@click.option("--seed", default=0, show_default=True)
@click.option("--features", default=None, type=click.IntRange(min=0),
              help="also store up to N feature rows (.pkl) or N images as arr_0 (.npz) for precision/recall "
                   f"[default: 0 for .pkl, {ADM_REF_IMAGES} for .npz]")
@click.option("--overwrite", is_flag=True, help="replace an existing --dest")
@_with_common
@exit_on_usage_error(spelling=SPELLING)
def ref(images_arg, images, dest, metrics, num, seed, features, overwrite, batch, device, inception_weights,
        dinov2_weights, clip_weights, dinov2_resize):
    """Compute reference statistics of IMAGES (or --images) into --dest (EDM2 pickle or ADM reference batch)."""
    images = _image_source(images_arg, images, "ref")
    adm = dest.lower().endswith(".npz")
    names = parse_metrics(metrics or ("fid,sfid" if adm else "fid,fd_dinov2"))
    for name in names:
        if METRICS[name].kind != "fd":
            raise UsageError(f"'ref' stores Fréchet statistics only (fid, sfid, {','.join(list(STAT_KEYS.values())[1:])}); "
                             f"drop {name}")
    if adm and set(names) != {"fid", "sfid"}:
        raise UsageError(f"an ADM reference batch (.npz) holds fid and sfid statistics; use --metrics fid,sfid "
                         f"or a .pkl --dest for {','.join(sorted(set(names) - {'fid', 'sfid'}))}")
    features = (ADM_REF_IMAGES if adm else 0) if features is None else features
    blocks = blocks_for(names)
    device = resolve_device(device)
    if os.path.exists(dest) and not overwrite:
        raise UsageError(f"{dest} already exists; choose another --dest or pass --overwrite")
    if os.environ.get("RANK", "0") == "0":  # rank 0 writes; probing on every rank would race
        check_output_dir(os.path.dirname(os.path.abspath(dest)), "--dest")  # before the work, not after
    source = open_images(images)
    dist.init()
    keep = [] if adm or features == 0 else [b for b in blocks if b != "sfid"]
    with _offline_advice():
        stats = compute_stats(source, detectors_for(names), blocks=blocks, keep_features=keep, num=num, batch=batch,
                              seed=seed, device=device,
                              detector_kwargs=_detector_kwargs(inception_weights, dinov2_weights, dinov2_resize,
                                                               clip_weights),
                              desc="reference images")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(stats["num_images"], min(features, stats["num_images"]), replace=False))
    for block in keep:
        stats[block]["features"] = stats[block]["features"][chosen]
    if dist.get_rank() == 0:
        if adm:
            indices = select_indices(len(source), num, seed)[chosen]
            arr = np.stack([source.load(int(i)) for i in indices]) if len(indices) else \
                np.zeros([0, *stats["resolution"], 3], np.uint8)
            path = save_adm_ref(stats, arr, dest, overwrite=overwrite)
            click.echo(f"wrote {path} (statistics of {stats['num_images']} images: mu, sigma, mu_s, sigma_s; "
                       f"{len(indices)} images in arr_0)")
        else:
            path = save_ref(stats, dest, overwrite=overwrite)
            click.echo(f"wrote {path} ({stats['num_images']} images: {', '.join(blocks)})")
    dist.barrier()


@main.command()
@click.option("--stats", "stats", multiple=True, required=True, type=click.Path(dir_okay=False),
              help="statistics .pkl of disjoint image sets (--save_stats or 'ref' output); repeat the option")
@click.option("--dest", required=True, type=click.Path(dir_okay=False), help="output statistics pickle")
@click.option("--overwrite", is_flag=True, help="replace an existing --dest")
@exit_on_usage_error(spelling=SPELLING)
def combine(stats, dest, overwrite):
    """Statistics of the union of the images behind several statistics files (FD blocks, saturation)."""
    same = sorted({str(p) for p in stats if sum(os.path.realpath(q) == os.path.realpath(p) for q in stats) > 1})
    if same:  # the same images twice would count twice: a mistake, not a union
        raise UsageError(f"--stats {', '.join(same)} is given more than once; give each statistics file once")
    if os.path.exists(dest) and not overwrite:
        raise UsageError(f"{dest} already exists; choose another --dest or pass --overwrite")
    with _offline_advice("--stats"):
        loaded = [load_ref(p) for p in stats]
    merged = combine_stats(loaded)
    path = save_ref(merged, dest, overwrite=overwrite)
    blocks = [k for k in merged if isinstance(merged[k], dict)]
    click.echo(f"wrote {path} ({merged['num_images']} images: {', '.join(blocks)})")
