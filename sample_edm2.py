"""Generate images with EDM2 and sliding window guidance (SWG / M-SWG) or its combinations.

Runs as ``python sample_edm2.py ...`` or ``torchrun --nproc_per_node=N sample_edm2.py ...``.
The options are those of the paper's reference script; ``--preset`` fills the
ones you leave out.  All work happens in :mod:`sampling.edm2_run`.

Example (M-SWG with EDM2-S, as in the SWG README):

    torchrun --standalone --nproc_per_node=4 sample_edm2.py \\
        --net_pos_pkl https://nvlabs-fi-cdn.nvidia.com/edm2/raw-snapshots/edm2-img512-s/edm2-img512-s-2147483-0.100.pkl \\
        --outdir ./samples/IN512/s/MSWG/0.2/samples/ --seeds 0-49999 --subdirs --batch 1024 \\
        --metrics fid,fd_dinov2 --ref_path https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl \\
        --g_weight 0.2 --g_method swg --swg_sizes 40 --swg_steps 2 --scale_window_guide 1
"""

from __future__ import annotations

import json
import sys

import click

from utils.errors import UsageError, exit_on_usage_error


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--preset", default=None, help="Named settings (networks, method, weights); see networks/presets.py.")
@click.option("--net_pos_pkl", default=None, help="Positive network: path, URL, hf://, or model name.")
@click.option("--net_neg_pkl", default=None, help="Negative network for cfg / wmg and their SWG combinations.")
@click.option("--outdir", default=None, help="Output folder (created; finished images are never overwritten).")
@click.option("--subdirs", is_flag=True, help="Per-1000-seed folders (000000/, 001000/, ...).")
@click.option("--save_tar", is_flag=True, help="Write tar shards of PNGs instead of loose PNGs.")
@click.option("--seeds", default="0-63", show_default=True, help="Seeds, e.g. 0-49999 or 1,2,5-10.")
@click.option("--class", "class_idx", type=int, default=None, help="Class label for all images [default: random].")
@click.option("--batch", type=int, default=None, help="Maximum batch per GPU [default: 32].")
@click.option("--steps", type=int, default=None, help="Sampler steps [default: 32].")
@click.option("--sigma_min", type=float, default=None, help="Lowest noise level [default: 0.002].")
@click.option("--sigma_max", type=float, default=None, help="Highest noise level [default: 80].")
@click.option("--rho", type=float, default=None, help="Time step exponent [default: 7].")
@click.option("--S_churn", "S_churn", type=float, default=None, help="Stochasticity strength [default: 0].")
@click.option("--S_min", "S_min", type=float, default=None, help="Stochastic min noise level [default: 0].")
@click.option("--S_max", "S_max", type=float, default=None, help="Stochastic max noise level [default: inf].")
@click.option("--S_noise", "S_noise", type=float, default=None, help="Stochastic noise inflation [default: 1].")
@click.option("--g_method", default=None, help="none | cfg | wmg | swg | wmg-swg | cfg-swg (cfg_swg accepted).")
@click.option("--g_weight", default=None, help="Guidance weight w, or two (w_neg,w_swg) for combinations.")
@click.option("--swg_sizes", default=None, help="Window size k in latent pixels (or kh,kw).")
@click.option("--swg_steps", default=None, help="Windows per axis n (or nh,nw) [default: 2].")
@click.option("--scale_window_guide", default=None, help="1 = masked SWG (M-SWG), 0 = plain SWG [default: 1].")
@click.option("--g_interval", default="none", show_default=True,
              help="Guide only at sampler steps first..last (inclusive), e.g. 4,20.")
@click.option("--clean_combos", is_flag=True,
              help="wmg-swg/cfg-swg: apply the mask and the labels as documented instead of the reference's behaviour.")
@click.option("--max_window_batch", type=int, default=None, help="Cap on the batch of one window network call.")
@click.option("--metrics", default=None, help="Metrics after sampling: fid,fd_dinov2 (need --ref_path); fd_digits,conf_digits for the demo presets.")
@click.option("--ref_path", default=None, help="Reference statistics (path or URL).")
@click.option("--use_wandb", type=int, default=0, show_default=True, help="Log to Weights & Biases (0/1).")
@click.option("--wandb_group", default=None, help="W&B group.")
@click.option("--wandb_runname", default=None, help="W&B run name.")
@click.option("--prefetch", is_flag=True, help="Only download what this command needs into the cache, then exit.")
@exit_on_usage_error
def main(prefetch: bool, **opts) -> None:
    """Sample EDM2 with sliding window guidance; see the README for the methods."""
    from sampling import edm2_run
    from utils import dist

    cfg = edm2_run.build_config(require_outdir=not prefetch, **opts)
    if prefetch:
        for path in edm2_run.prefetch(cfg):
            dist.print0(f"cached: {path}")
        return
    summary = edm2_run.generate(cfg)
    if "metrics" in summary:
        dist.print0(json.dumps(summary["metrics"]))


def cli(argv=None) -> None:
    """Entry point: click's own usage errors also become one line and exit 2."""
    try:
        main.main(args=argv, prog_name="sample_edm2.py", standalone_mode=False)
    except click.exceptions.Abort:
        print("error: aborted", file=sys.stderr)
        sys.exit(130)
    except click.ClickException as exc:
        msg = " ".join(exc.format_message().split())
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except UsageError as exc:  # raised outside the decorated function (should not happen)
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
