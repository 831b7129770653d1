"""The flags of ``sample_dit.py``: click options -> :mod:`sampling.dit_run` settings -> the run.

``sample_dit.py`` is only ``sys.exit(main())`` over this module; tools that take the
sampler's flags (``search.optuna_search``) turn them into settings with
:func:`settings`.  Errors name this command line's flags (:data:`FLAGS`, :data:`SPELLING`).
"""

from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

import click

from guidance.dit import REFERENCE_MODES, ReferenceMode, table_methods
from guidance.perturb import kind_options
from guidance.table import METHODS, method_param_help
from sampling import dit_run
from utils import dist
from sampling.run_settings import RunSettings
from utils.cli import CONTEXT, PREFETCH_FIX, flag_spelling, int_range, offline_advice, run_command
from utils.errors import UsageError, exit_on_usage_error, spelling_of

__all__ = ["cli", "main", "settings", "format_methods", "FLAGS", "SPELLING", "EDM2_FLAGS"]
D = dit_run.DiTOptions()  # the defaults
# Library parameters whose flag is not simply --<name-with-dashes> (the run's and guidance's names included).
FLAGS = {"batch": "--per-proc-batch-size", "outdir": "--sample-dir", "weight": "--g-scale", "masked": "--mask",
         "swg_sizes": "--window-size", "swg_steps": "--window-steps"}
SPELLING = flag_spelling(FLAGS, dashes=True)  # how this command line writes a parameter in an error
# sample_edm2.py's flags, and what says the same here (offered when one is given to this command).
EDM2_FLAGS = {"--g_method": "--method, or the switches --crop 1 (swg), --cfg-crop 1 (cfg-swg), --vanila-cfg 1 (cfg)",
              "--g_weight": "--g-scale with a switch, or --weights with --method", "--swg_sizes": "--window-size",
              "--swg_steps": "--window-steps", "--scale_window_guide": "--mask 1", "--outdir": "--sample-dir",
              "--batch": "--per-proc-batch-size", "--steps": "--num-sampling-steps", "--preset": "the flags of "
              "--list-methods (DiT has no presets)", "--net_pos_pkl": "--ckpt", "--class": "--num-classes / --seeds"}


# ----------------------------------------------------------------------------
# Command line.

def _switch(*names, help):  # noqa: A002 - click's argument name
    """A 0/1 switch; given without a value it means 1 (``--crop --mask``, the paper's shorthand)."""
    return click.option(*names, type=click.IntRange(0, 1), default=0, is_flag=False, flag_value=1,
                        show_default=True, help=help)


def _method_options(fn):
    """``--method``, ``--weights``, every method parameter of the table and the sigma intervals."""
    for name, text, kind in reversed(method_param_help()):
        flag = name.replace("_", "-")
        fn = click.option(*dict.fromkeys((f"--{flag}", f"--{name}")), name, type=kind, default=None, help=text)(fn)
    for flag, text in (("seg-sigma", "With --method seg / seg-swg: width of the query blur in tokens [default: inf, "
                                     "the mean query]"),
                       ("perturb-blocks", "With --method pag / seg / slg (or X-swg): block indices to perturb, "
                                          "e.g. 14 or 13,14 [default: pag/seg the middle block depth//2, slg "
                                          "depth*{7,8,9}//24; docs/guidance.md]"),
                       ("swg-sigma-interval", "With --method X-swg: the window term only where lo < sigma <= hi"),
                       ("g-sigma-interval", "With --method: its negative's terms only where lo < sigma <= hi "
                                            "(sigma = sqrt(1/alpha_bar - 1)), e.g. 0.28,2.9"),
                       ("weights", "With --method: its weights, comma separated (table convention: "
                                   "D = D_pos + w rule), e.g. 0.4 or 0.4,0.2 for X-swg"),
                       ("method", "Another guidance method instead of the switches: "
                                  + ", ".join(table_methods()) + " (--list-methods)")):
        name = flag.replace("-", "_")
        fn = click.option(*dict.fromkeys((f"--{flag}", f"--{name}")), name, default=None, help=text)(fn)
    return fn


def _list_methods(ctx, _param, value):
    if value:
        click.echo(format_methods())
        ctx.exit(0)


def _switch_flags(mode: ReferenceMode) -> str:
    mask = " [--mask 1]" if mode.windows else ""
    scales = " ".join(f"--{s.replace('_', '-')} {v}" for s, v in zip(mode.scales, mode.meaning))
    return f"--{mode.switch.replace('_', '-')} 1{mask} {scales}"


def format_methods() -> str:
    """DiT's methods: the reference switches and each table method with its example weights and parameters."""
    rows = [("method", "flags", "weights (example)", "parameters")]
    rows += [(m.mode, _switch_flags(m), ",".join(f"{v:g}" for v in m.example), "-")
             for m in REFERENCE_MODES if m.scales]
    for name in table_methods():
        spec = METHODS[name]
        mask = " [--mask 1]" if spec.windows else ""
        options = [f"{p.name}={p.default:g}" for p in spec.params]
        if spec.perturbation:
            options += [f"{k}={v}" for k, v in kind_options(spec.perturbation).items()]
        rows.append((name, f"--method {name} --weights {','.join(spec.weights)}{mask}", spec.example_text(),
                     ",".join(options) or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@click.command(context_settings=CONTEXT)
@click.option("--list-methods", "--list_methods", is_flag=True, expose_value=False, is_eager=True,
              callback=_list_methods, help="Print every guidance method with its flags and example weights, and exit.")
@_method_options
@click.option("--model", default=D.model, show_default=True, help="DiT model zoo name (DiT-{S,B,L,XL}/{2,4,8})")
@click.option("--model-kwargs", "--model_kwargs", "model_kwargs", default=D.model_kwargs,
              help="JSON constructor overrides for custom checkpoints, e.g. '{\"hidden_size\": 384}'")
@click.option("--ckpt", default=D.ckpt,
              help="DiT checkpoint path/URL, or diffusers DiT weights (DiTPipeline folder, its transformer/ folder, "
                   "or hub id like facebook/DiT-XL-2-256)  [default: the released DiT-XL/2 for the size]")
@click.option("--vae", type=click.Choice(["ema", "mse"]), default=D.vae, show_default=True,
              help="stabilityai/sd-vae-ft-{ema,mse}")
@click.option("--vae-path", "--vae_path", "vae_path", default=D.vae_path,
              help="Local diffusers AutoencoderKL folder")
@click.option("--sample-dir", "--sample_dir", "sample_dir", default=D.sample_dir, show_default=True,
              help="Parent folder of the run folder")
@click.option("--per-proc-batch-size", "--per_proc_batch_size", "per_proc_batch_size",
              type=int_range(RunSettings, "batch"), default=D.per_proc_batch_size,
              show_default=True, help="Images per batch on each process")
@click.option("--num-fid-samples", "--num_fid_samples", "num_fid_samples",
              type=int_range(dit_run.DiTConfig, "num_fid_samples"), default=D.num_fid_samples,
              help="Sample images 0..N-1  [default: 50000]")
@click.option("--seeds", default=D.seeds, help="Image indices instead of --num-fid-samples, e.g. 0-999,2000")
@click.option("--image-size", "--image_size", "image_size", type=int, default=D.image_size, show_default=True,
              help="Image resolution (256 or 512 for the released weights)")
@click.option("--num-classes", "--num_classes", "num_classes", type=int_range(dit_run.DiTConfig, "num_classes"),
              default=D.num_classes, show_default=True, help="Classes of the checkpoint (ImageNet: 1000)")
@click.option("--g-scale", "--g_scale", "g_scale", type=float, default=D.g_scale, show_default=True,
              help="SWG weight (--crop), CFG scale (--vanila-cfg) or CFG weight (--cfg-crop)")
@click.option("--crop-scale", "--crop_scale", "crop_scale", type=float, default=D.crop_scale, show_default=True,
              help="SWG weight of --cfg-crop")
@_switch("--crop", help="SWG (M-SWG with --mask 1)")
@_switch("--mask", help="Masked SWG: guide only where windows overlap")
@_switch("--cfg-crop", "--cfg_crop", "cfg_crop", help="CFG + SWG")
@_switch("--uncond", help="Sample the null class (unconditional)")
@_switch("--vanila-cfg", "--vanila_cfg", "vanila_cfg", help="Plain classifier-free guidance")
@click.option("--window-size", "--window_size", "--crop-size", "--crop_size", "window_size", type=int, default=D.window_size,
              help="SWG window in latent pixels  [default: 5/8 of the latent (20 at 256px, 40 at 512px), "
                   "rounded down to the patch size]")
@click.option("--window-steps", "--window_steps", "window_steps", type=int, default=D.window_steps,
              show_default=True,
              help="SWG windows per axis")
@click.option("--cfg-channels", "--cfg_channels", "cfg_channels", type=click.Choice(["reference", "all"]),
              default=D.cfg_channels, show_default=True,
              help="Plain CFG on 3 latent channels (DiT release) or all 4")
@click.option("--pos-embed", "--pos_embed", "pos_embed", type=click.Choice(["resize", "sincos"]),
              default=D.pos_embed, show_default=True,
              help="Window position table: bicubic resize of the trained one (reference) or exact sin-cos")
@click.option("--num-sampling-steps", "--num_sampling_steps", "num_sampling_steps",
              default=D.num_sampling_steps,
              show_default=True, help="Respacing of the 1000 steps: 250, ddim50, 10,15,20, ...")
@click.option("--global-seed", "--global_seed", "global_seed", type=int_range(dit_run.DiTConfig, "global_seed"),
              default=D.global_seed, show_default=True,
              help="Seed of every image's generator: image i uses global_seed * 2^32 + i")
@click.option("--tf32/--no-tf32", " /--no_tf32", "tf32", default=D.tf32, show_default=True, help="TF32 matmuls on Ampere+ GPUs")
@click.option("--save-tar/--no-save-tar", "--save_tar/--no_save_tar", "save_tar", default=D.save_tar, show_default=True,
              help="Write tar shards of PNGs instead of single PNGs")
@click.option("--save", type=click.Choice(["png", "tar", "none"]), default=D.save,
              help="Image output: png (default), tar (= --save-tar), or none: metrics while sampling, no image files")
@click.option("--keep", type=int_range(RunSettings, "keep"), default=D.keep, show_default=True,
              help="With --save none: still write the first N images as PNGs")
@click.option("--save-stats", "--save_stats", "save_stats", default=D.save_stats,
              help="With --save none: write the run's feature statistics (EDM2 pickle layout) to this file")
@click.option("--save-npz/--no-save-npz", "--save_npz/--no_save_npz", "save_npz", default=D.save_npz, show_default=True,
              help="Also write <run>/samples.npz (arr_0, uint8 NHWC) for the ADM evaluator")
@click.option("--subdirs", is_flag=True, default=D.subdirs, help="PNGs in per-1000 subfolders")
@click.option("--metrics", default=D.metrics,
              help=f"Metrics after sampling (space or comma separated), or none  [default: "
                   f"{dit_run.DEFAULT_METRICS}, skipped with a note when no reference statistics are found; "
                   f"metrics given here need them]")
@click.option("--ref-path", "--ref_path", "ref_path", default=D.ref_path,
              help="Reference statistics (path/URL) for the metrics, e.g. dataset_refs/img256.pkl")
@click.option("--max-window-batch", "--max_window_batch", "max_window_batch", type=int, default=D.max_window_batch,
              help="Cap on the batch of one window network call (memory)")
@click.option("--device", default=D.device,
              help="Torch device  [default: cuda:<LOCAL_RANK> when available, else cpu]")
@click.option("--prefetch", is_flag=True, default=False, help="Only download what this command needs into the cache")
@click.option("--use-wandb", "--use_wandb", "use_wandb", type=click.IntRange(0, 1), default=D.use_wandb,
              show_default=True, help="Log arguments, metrics and a sample grid to wandb (rank 0)")
@click.option("--wandb-group", "--wandb_group", "wandb_group", default=D.wandb_group, help="wandb group")
@click.option("--wandb-runname", "--wandb_runname", "wandb_runname", default=D.wandb_runname, help="wandb run name")
@exit_on_usage_error(spelling=SPELLING)
@offline_advice(PREFETCH_FIX)
def cli(prefetch: bool, **opts):
    """Sample images from DiT with sliding window guidance (SWG / M-SWG), CFG or CFG+SWG."""
    cfg = dit_run.build_config(**opts)
    if prefetch:
        paths = dit_run.prefetch(cfg)
        dist.print0("cached: " + ", ".join(paths))
        return {"prefetched": paths}
    summary = dit_run.generate(cfg)
    if summary["metrics"]:
        dist.print0(json.dumps(summary["metrics"]))
    return summary


def _join_metric_words(argv: Sequence[str]) -> list[str]:
    """Let ``--metrics fid fd_dinov2`` (the reference's space-separated form) reach click as one value."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        out.append(arg)
        i += 1
        if arg == "--metrics":
            words = []
            while i < len(argv) and not argv[i].startswith("-"):
                words.append(argv[i])
                i += 1
            out.append(",".join(words))
    return out


def settings(argv: Sequence[str]):
    """The :class:`sampling.dit_run.DiTConfig` these flags give (validated, nothing run or written)."""
    params = dict(cli.make_context("sample_dit.py", _join_metric_words(list(argv))).params)
    params.pop("prefetch")
    try:
        with spelling_of(SPELLING):  # warnings name these flags too
            return dit_run.build_config(**params)
    except UsageError as exc:
        exc.spelling = SPELLING  # the error is about these flags, wherever it is reported
        raise


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: usage errors (click's and the library's) become one line ``error: ...`` and status 2."""
    return run_command(cli, _join_metric_words(list(sys.argv[1:] if argv is None else argv)), "sample_dit.py",
                       hints=EDM2_FLAGS)
