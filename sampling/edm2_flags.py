"""The flags of ``sample_edm2.py``: click options -> :mod:`sampling.edm2_run` settings -> the run.

``sample_edm2.py`` is only ``sys.exit(main())`` over this module; tools that take the
sampler's flags (``search.optuna_search``) turn them into settings with
:func:`settings`.  Errors name this command line's flags (:data:`FLAGS`, :data:`SPELLING`).
"""

from __future__ import annotations

import json
from typing import Optional, Sequence

import click

from guidance.table import method_names, method_param_help
from sampling import edm2_run
from sampling.presets import format_presets
from utils import dist
from utils.cli import CONTEXT, PREFETCH_FIX, flag_spelling, int_range, offline_advice, option, run_command
from utils.errors import UsageError, exit_on_usage_error, spelling_of

__all__ = ["cli", "main", "settings", "FLAGS", "SPELLING", "DIT_FLAGS"]

D = edm2_run.GenerateConfig()  # the defaults, shown in --help
# Library parameters whose flag is not simply --<name> (guidance's own names included).
FLAGS = {"class_idx": "--class", "window_size": "--swg_sizes", "window_steps": "--swg_steps",
         "weight": "--g_weight", "method": "--g_method", "neg_denoiser": "--net_neg_pkl",
         "masked": "--scale_window_guide"}
SPELLING = flag_spelling(FLAGS)  # how this command line writes a parameter in an error
# sample_dit.py's flags, and what says the same here (offered when one is given to this command).
DIT_FLAGS = {"--g-scale": "--g_weight (the guidance weight w; CFG's w = s - 1)", "--crop": "--g_method swg",
             "--cfg-crop": "--g_method cfg-swg", "--vanila-cfg": "--g_method cfg", "--mask": "--scale_window_guide 1",
             "--window-size": "--swg_sizes", "--window-steps": "--swg_steps", "--method": "--g_method",
             "--weights": "--g_weight", "--crop-scale": "--g_weight w_neg,w_swg (the second weight)",
             "--sample-dir": "--outdir", "--num-fid-samples": "--seeds 0-N"}


def _method_options(fn):
    """Every method parameter of the guidance table (``--eta`` ...) and the sigma intervals."""
    for name, text, kind in reversed(method_param_help()):
        fn = option(f"--{name}", type=kind, default=None, help=text)(fn)
    fn = option("--swg_sigma_interval", default=None,
                help="The window term only where lo < sigma <= hi (e.g. 0.28,2.9) [default: every sigma].")(fn)
    return option("--g_sigma_interval", default=None,
                  help="The negative's terms only where lo < sigma <= hi (EDM2's guidance interval, e.g. 0.28,2.9).")(fn)


@click.command(context_settings=CONTEXT)
@option("--preset", default=None, help="Named settings (networks, method, weights); --list_presets lists them.")
@option("--list_presets", is_flag=True, help="Print the presets (models, methods, weights, scores) and exit.")
@option("--net_pos_pkl", default=None, help="Positive network: path, URL, hf://, or model name.")
@option("--net_neg_pkl", default=None, help="Negative network for cfg / wmg and their SWG combinations.")
@option("--outdir", default=None, help="Output folder (created; finished images are never overwritten).")
@option("--subdirs", is_flag=True, help="Per-1000-seed folders (000000/, 001000/, ...).")
@option("--save_tar", is_flag=True, help="Write tar shards of PNGs instead of loose PNGs.")
@option("--save", type=click.Choice(["png", "tar", "none"]), default=None,
        help="Image output: png [default], tar (= --save_tar), or none: metrics while sampling, no image files.")
@option("--keep", type=int_range(edm2_run.GenerateConfig, "keep"),
        default=None, help="With --save none: still write the first N images.")
@option("--save_stats", default=None,
        help="With --save none: write the run's feature statistics (EDM2 pickle layout) to this file.")
@option("--save_npz", is_flag=True, help="Also write <outdir>.npz (arr_0, uint8 NHWC) for the ADM evaluator.")
@option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-49999 or 1,2,5-10.")
@click.option("--class", "class_idx", type=int_range(edm2_run.GenerateConfig, "class_idx"),
              default=None, help="Class label for all images [default: random].")
@option("--batch", type=int_range(edm2_run.GenerateConfig, "batch"),
        default=None, help=f"Maximum batch per GPU [default: {D.batch:g}].")
@option("--steps", type=int_range(edm2_run.GenerateConfig, "steps"),
        default=None, help=f"Sampler steps [default: {D.steps:g}].")
@option("--sigma_min", type=float, default=None, help=f"Lowest noise level [default: {D.sigma_min:g}].")
@option("--sigma_max", type=float, default=None, help=f"Highest noise level [default: {D.sigma_max:g}].")
@option("--rho", type=float, default=None, help=f"Time step exponent [default: {D.rho:g}].")
@option("--S_churn", type=float, default=None, help=f"Stochasticity strength [default: {D.S_churn:g}].")
@option("--S_min", type=float, default=None, help=f"Stochastic min noise level [default: {D.S_min:g}].")
@option("--S_max", type=float, default=None, help=f"Stochastic max noise level [default: {D.S_max:g}].")
@option("--S_noise", type=float, default=None, help=f"Stochastic noise inflation [default: {D.S_noise:g}].")
@option("--g_method", default=None, help=" | ".join(method_names(pairings=False))
        + "; X-swg adds (M-)SWG to X (README: methods).")
@option("--g_weight", default=None, help="Guidance weight w, or two (w_neg,w_swg) for combinations.")
@option("--swg_sizes", default=None, help="Window size k in latent pixels (or kh,kw).")
@option("--swg_steps", default=None, help=f"Windows per axis n (or nh,nw) [default: {D.guidance.window_steps[0]}].")
@option("--scale_window_guide", default=None,
        help=f"1 = masked SWG (M-SWG), 0 = plain SWG [default: {int(D.guidance.masked)}].")
@option("--g_interval", default="none", show_default=True,
        help="Guide only at sampler steps first..last (inclusive), e.g. 4,20.")
@option("--clean_combos", is_flag=True,
        help="wmg-swg/cfg-swg: apply the mask and the labels as documented instead of the reference's behaviour.")
@_method_options
@option("--perturb_blocks", default=None,
        help="pag / seg / slg: block indices to perturb, e.g. 15 or 13,15 [default: 15, the U-Net's middle block "
             "dec.8x8_in0; a wrong index lists the valid ones] (docs/guidance.md).")
@option("--seg_sigma", default=None,
        help="seg: width of the query blur in tokens [default: inf, the mean query].")
@option("--max_window_batch", type=int, default=None, help="Cap on the batch of one window network call.")
@option("--metrics", default=None,
        help="Metrics after sampling: fid,fd_dinov2 (need --ref_path); fd_digits,conf_digits for the demo presets.")
@option("--ref_path", default=None, help="Reference statistics (path or URL).")
@option("--device", default=None, help="Torch device [default: cuda:<LOCAL_RANK> when available, else cpu].")
@option("--use_wandb", type=int, default=0, show_default=True, help="Log to Weights & Biases (0/1).")
@option("--wandb_group", default=None, help="W&B group.")
@option("--wandb_runname", default=None, help="W&B run name.")
@option("--prefetch", is_flag=True, help="Only download what this command needs into the cache, then exit.")
@exit_on_usage_error(spelling=SPELLING)
@offline_advice(PREFETCH_FIX)
def cli(prefetch: bool, list_presets: bool, **opts) -> None:
    """Sample EDM2 with sliding window guidance; see the README for the methods."""
    if list_presets:
        print(format_presets())
        return
    cfg = edm2_run.build_config(require_outdir=not prefetch, **opts)
    if prefetch:
        for path in edm2_run.prefetch(cfg):
            dist.print0(f"cached: {path}")
        return
    summary = edm2_run.generate(cfg)
    if summary["metrics"]:
        dist.print0(json.dumps(summary["metrics"]))


def settings(argv: Sequence[str]):
    """The :class:`sampling.edm2_run.GenerateConfig` these flags give (validated, nothing run or written)."""
    params = dict(cli.make_context("sample_edm2.py", list(argv)).params)
    prefetch = params.pop("prefetch")
    params.pop("list_presets")
    try:
        with spelling_of(SPELLING):  # warnings name these flags too
            return edm2_run.build_config(require_outdir=not prefetch, **params)
    except UsageError as exc:
        exc.spelling = SPELLING  # the error is about these flags, wherever it is reported
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: usage errors (click's and the library's) become one line ``error: ...`` and status 2."""
    return run_command(cli, argv, "sample_edm2.py", hints=DIT_FLAGS)
