"""Search guidance weights with Optuna, sampling each trial through the samplers' Python API.

    torchrun --standalone --nproc_per_node=4 -m search.optuna_search \\
        --sampler edm2 --outdir ./search/s_rct_mswg --n_trials 40 --objective fd_dinov2 \\
        --weight 0.8:1.6 --weight 0.0:0.4 --step 0.01 -- \\
        --net_pos_pkl raw-img512-s --net_neg_pkl raw-img512-xs-T16 --g_method wmg-swg \\
        --swg_sizes 40 --seeds 0-9999 --batch 256 --metrics fd_dinov2 \\
        --ref_path https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl

Everything after ``--`` is read as ``sample_edm2.py`` / ``sample_dit.py`` flags
(:func:`sampling.edm2_flags.settings`, :func:`sampling.dit_flags.settings`) and each
trial runs :func:`sampling.edm2_run.generate` / :func:`sampling.dit_run.generate` in this
process; the weights and the output folder are set by each trial:

* EDM2: ``--g_weight w1[,w2]`` and ``--outdir <outdir>/trial_NNNN_<weights>/samples``;
* DiT: ``--g-scale w1`` (and ``--crop-scale w2`` for ``--cfg-crop 1``) and
  ``--sample-dir <outdir>/trial_NNNN_<weights>`` (with ``--method X``: ``--weights w1[,w2...]``).

One ``--weight lo:hi`` per guidance weight spans the search space, sampled on a grid of
``--step`` (0 = continuous).  The objective is read from the ``metrics.json`` the sampler
writes into the trial's folder (``--metrics`` must include it, checked before the first
trial); ``is``, ``conf_digits``, precision and recall are maximised, the distances minimised.

Study: ``--storage`` is an Optuna database URL (PostgreSQL/MySQL for many concurrent
jobs, as the paper did); by default ``sqlite:///<outdir>/optuna.db``.  Running the command
again resumes the study (``--study`` name, default: the outdir's name).  Under torchrun,
rank 0 alone talks to the database: it asks for a trial, broadcasts the weights, every
rank samples its share, and rank 0 reports the value.  A weight set that an earlier
trial already finished or is running is not sampled again: the trial is marked *pruned*.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
from typing import Callable, Optional, Sequence

import click

from results.collect import find_runs, read_run
from sampling import dit_flags, dit_run, edm2_flags, edm2_run
from sampling.outputs import load_reference
from sampling.run_settings import effective_metrics
from utils import dist
from utils.atomic import write_json_atomic
from utils.cli import run_command
from utils.errors import UsageError, exit_on_usage_error, spell, spelling_of

__all__ = ["parse_range", "trial_folder", "sampler_argv", "sampler_settings", "run_sampler", "read_objective",
           "run_search", "cli", "main"]

# Objective (a key of the sampler's metrics.json) -> the --metrics entry that writes it.
OBJECTIVES = {"fid": "fid", "fd_dinov2": "fd_dinov2", "is": "is", "saturation": "saturation",
              "precision_inception": "pr_inception", "recall_inception": "pr_inception",
              "precision_dinov2": "pr_dinov2", "recall_dinov2": "pr_dinov2",
              "fd_digits": "fd_digits", "conf_digits": "conf_digits"}
MAXIMIZE = {"is", "conf_digits", "precision_inception", "recall_inception", "precision_dinov2", "recall_dinov2"}


def parse_range(text: str) -> tuple[float, float]:
    """``'0.5:2'`` -> ``(0.5, 2.0)``; low <= high."""
    try:
        lo, hi = (float(v) for v in str(text).split(":"))
    except ValueError:
        raise UsageError(f"--weight {text!r} is not 'low:high'; write e.g. --weight 0.0:1.5") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise UsageError(f"--weight {text!r}: need finite low <= high, e.g. --weight 0.0:1.5")
    return lo, hi


def _weight_name(weights: Sequence[float]) -> str:
    return "_".join(f"{w:g}" for w in weights)


def trial_folder(outdir: os.PathLike | str, number: int, weights: Sequence[float]) -> pathlib.Path:
    """``<outdir>/trial_0007_1.2_0.14``: one folder per trial."""
    return pathlib.Path(outdir) / f"trial_{number:04d}_{_weight_name(weights)}"


def _check_base_args(sampler: str, args: Sequence[str]) -> None:
    owned = {"edm2": ("--g_weight", "--outdir"),
             "dit": ("--g-scale", "--g_scale", "--crop-scale", "--crop_scale", "--sample-dir", "--sample_dir",
                     "--weights")}[sampler]
    clash = [a for a in args if a.split("=")[0] in owned]
    if clash:
        raise UsageError(f"{clash[0]} is set by the search for every trial; drop it from the sampler arguments")


def sampler_argv(sampler: str, base: Sequence[str], weights: Sequence[float], folder: pathlib.Path) -> list[str]:
    """The sampler's arguments for one trial."""
    if sampler == "edm2":
        return [*base, "--g_weight", ",".join(repr(float(w)) for w in weights), "--outdir", str(folder / "samples")]
    if any(a.split("=")[0] == "--method" for a in base):   # a table method (apg, fdg-swg ...): all its weights
        return [*base, "--weights", ",".join(repr(float(w)) for w in weights), "--sample-dir", str(folder)]
    if len(weights) > 2:
        raise UsageError("DiT takes at most two weights (--g-scale and, with --cfg-crop 1, --crop-scale)")
    argv = [*base, "--g-scale", repr(float(weights[0])), "--sample-dir", str(folder)]
    if len(weights) == 2:
        argv += ["--crop-scale", repr(float(weights[1]))]
    return argv


def _flags(sampler: str):
    return edm2_flags if sampler == "edm2" else dit_flags


def sampler_settings(sampler: str, argv: Sequence[str]):
    """The sampler's settings for ``argv`` (its flags), validated; nothing is sampled."""
    try:
        return _flags(sampler).settings(list(argv))
    except click.ClickException as exc:
        raise UsageError(f"sampler arguments rejected: {' '.join(exc.format_message().split())}") from None


def run_sampler(sampler: str, argv: Sequence[str]) -> dict:
    """Sample one trial in this process through the Python API; returns the run summary."""
    cfg = sampler_settings(sampler, argv)
    api = edm2_run if sampler == "edm2" else dit_run
    try:
        with spelling_of(_flags(sampler).SPELLING):  # its notes and warnings name the sampler's flags
            return api.generate(cfg)
    except UsageError as exc:
        exc.spelling = exc.spelling or _flags(sampler).SPELLING  # about the sampler's flags
        raise


def _check_objective(sampler: str, base_args: Sequence[str], ranges, outdir, objective: str) -> None:
    """Before any trial: ``objective`` must be a metric, and the sampler arguments valid and computing it."""
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective!r} is not a metric the samplers write; choose from "
                         f"{', '.join(OBJECTIVES)}")
    lows = [lo for lo, _ in ranges]
    try:
        cfg = sampler_settings(sampler, sampler_argv(sampler, base_args, lows, trial_folder(outdir, 0, lows)))
    except UsageError as exc:  # the search sets the weights: a wrong count is about its --weight ranges
        if exc.param in ("g_method", "method") and {"g_weight", "weights"} & set(exc.params):  # a weight count
            raise UsageError(f"{len(ranges)} --weight range(s) given, but the sampler's method needs another count: "
                             f"{exc.format(_flags(sampler).SPELLING)}; give one --weight low:high per weight, in the "
                             f"method's order (e.g. w, then w_swg)") from None
        raise
    metric = OBJECTIVES[objective]
    if metric not in cfg.metrics:
        raise UsageError(f"--objective {objective} needs the sampler's --metrics to include {metric} "
                         f"(it has {','.join(cfg.metrics) or 'none'}); add it after -- or choose another --objective")
    spelling = _flags(sampler).SPELLING
    if metric not in effective_metrics(cfg):  # DiT's default metrics, skipped without reference statistics
        raise UsageError(spell(f"--objective {objective}: the sampler skips {metric} without reference statistics; "
                               f"add `ref_path` after --", spelling))
    try:  # the reference statistics, downloaded or found in the cache now rather than after the first trial
        load_reference(cfg)
    except UsageError as exc:
        exc.spelling = exc.spelling or spelling
        raise


def read_objective(folder: pathlib.Path, objective: str) -> float:
    """The objective from the newest metrics file under ``folder`` (see :mod:`results.collect`)."""

    rows = [row for run in find_runs(folder) for row in read_run(run)]
    values = [row[objective] for row in rows if isinstance(row.get(objective), (int, float))]
    if not values:
        raise UsageError(f"no '{objective}' in the metrics under {folder}; add it to the sampler's `metrics` "
                         f"(with `ref_path`) or choose another --objective")
    return float(values[-1])


def _broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    if dist.get_world_size() > 1:
        import torch.distributed as td

        box = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]
    return obj


def _same(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=0, abs_tol=1e-9) for x, y in zip(a, b))


def run_search(sampler: str, base_args: Sequence[str], ranges: Sequence[tuple[float, float]], outdir: os.PathLike | str,
               *, n_trials: int = 20, objective: str = "fd_dinov2", step: float = 0.01, storage: Optional[str] = None,
               study_name: Optional[str] = None, seed: int = 0,
               log: Callable[[str], None] = lambda s: dist.print0(s)) -> Optional[dict]:
    """Run ``n_trials`` trials (all ranks call this); return the best trial on rank 0 (None elsewhere).

    The result is ``{"number", "weights", "value", "objective", "folder"}``, also written to
    ``<outdir>/best.json``.
    """
    if sampler not in ("edm2", "dit"):
        raise UsageError(f"--sampler must be edm2 or dit, got {sampler!r}")
    if not ranges:
        raise UsageError("no search space; give one --weight low:high per guidance weight")
    if n_trials < 1:
        raise UsageError(f"--n_trials must be >= 1, got {n_trials}")
    if step < 0:
        raise UsageError(f"--step must be >= 0 (0 = continuous), got {step}")
    _check_base_args(sampler, base_args)
    _check_objective(sampler, base_args, ranges, outdir, objective)
    dist.init()
    rank = dist.get_rank()
    outdir = pathlib.Path(outdir)
    study = None
    direction = "maximize" if objective in MAXIMIZE else "minimize"
    if rank == 0:
        import optuna

        outdir.mkdir(parents=True, exist_ok=True)
        storage = storage or f"sqlite:///{(outdir / 'optuna.db').resolve()}"
        study_name = study_name or outdir.resolve().name
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.create_study(study_name=study_name, storage=storage, direction=direction,
                                        sampler=optuna.samplers.TPESampler(seed=seed), load_if_exists=True)
        except (ImportError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot open the Optuna study {study_name!r} at {storage} "
                             f"({' '.join(str(exc).split())[:160]}); check --storage") from None
        if study.direction.name.lower() != direction:
            raise UsageError(f"study {study_name!r} {study.direction.name.lower()}s but --objective {objective} "
                             f"needs {direction}; use another --study")
        log(f"study {study_name!r} at {storage}: {len(study.trials)} earlier trial(s), objective {objective} "
            f"({direction})")

    for _ in range(n_trials):
        task = None
        if rank == 0:
            import optuna

            trial = study.ask()
            weights = []
            for i, (lo, hi) in enumerate(ranges):
                w = trial.suggest_float(f"w{i}", lo, hi, step=step or None) if hi > lo else \
                    trial.suggest_float(f"w{i}", lo, hi)
                weights.append(round(w, 10))
            others = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                                optuna.trial.TrialState.RUNNING))
            dup = next((t for t in others if t.number != trial.number and
                        _same([t.params.get(f"w{i}", math.nan) for i in range(len(ranges))], weights)), None)
            folder = trial_folder(outdir, trial.number, weights)
            task = {"number": trial.number, "weights": weights, "folder": str(folder),
                    "duplicate_of": dup.number if dup is not None else None}
        task = _broadcast(task)
        if task["duplicate_of"] is not None:
            if rank == 0:
                trial.set_user_attr("duplicate_of", task["duplicate_of"])
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log(f"trial {task['number']}: weights {task['weights']} repeat trial {task['duplicate_of']}; pruned")
            continue
        log(f"trial {task['number']}: weights {task['weights']} -> {task['folder']}")
        folder = pathlib.Path(task["folder"])
        try:
            run_sampler(sampler, sampler_argv(sampler, base_args, task["weights"], folder))
            dist.barrier()
            value = read_objective(folder, objective) if rank == 0 else None
        except UsageError as exc:
            if rank == 0:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            exc.spelling = exc.spelling or _flags(sampler).SPELLING  # the sampler's flags
            raise
        except BaseException:
            if rank == 0:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        if rank == 0:
            trial.set_user_attr("folder", str(folder))
            study.tell(trial, value)
            log(f"trial {task['number']}: {objective} = {value:.4f}")
        dist.barrier()

    if rank != 0:
        return None
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        raise UsageError("no trial finished; see the messages above")
    best = study.best_trial
    result = {"number": best.number, "weights": [round(best.params[f"w{i}"], 10) for i in range(len(ranges))],
              "value": best.value, "objective": objective, "folder": best.user_attrs.get("folder"),
              "study": study.study_name, "trials": len(study.trials)}
    write_json_atomic(outdir / "best.json", result, indent=2)
    log(f"best: trial {result['number']}, weights {','.join(f'{w:g}' for w in result['weights'])}, "
        f"{objective} = {result['value']:.4f} ({result['folder']})")
    return result


@click.command(context_settings={"help_option_names": ["-h", "--help"], "ignore_unknown_options": True})
@click.option("--sampler", type=click.Choice(["edm2", "dit"]), required=True, help="Which sampler runs the trials.")
@click.option("--outdir", type=click.Path(file_okay=False), required=True, help="Folder of the trial folders and the default database.")
@click.option("--weight", "weights", multiple=True, required=True,
              help="Search range low:high of one guidance weight; repeat for combined methods (w1, then w2).")
@click.option("--n_trials", "--n-trials", "n_trials", type=int, default=20, show_default=True,
              help="Trials this command runs (the study keeps earlier ones).")
@click.option("--objective", default="fd_dinov2", show_default=True,
              help="Metric to optimise, read from the trial's metrics.json (is, conf_digits, precision_*, recall_*: "
                   "maximised; distances: minimised).")
@click.option("--step", type=float, default=0.01, show_default=True, help="Grid of the weights (0 = continuous).")
@click.option("--storage", default=None, help="Optuna database URL  [default: sqlite:///<outdir>/optuna.db]")
@click.option("--study", "study_name", default=None, help="Study name  [default: the outdir's name]")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of Optuna's TPE sampler.")
@click.argument("sampler_args", nargs=-1, type=click.UNPROCESSED)
@exit_on_usage_error
def cli(sampler, outdir, weights, n_trials, objective, step, storage, study_name, seed, sampler_args):
    """Search guidance weights; arguments after -- go to the sampler (sample_edm2.py / sample_dit.py)."""
    ranges = [parse_range(w) for w in weights]
    run_search(sampler, list(sampler_args), ranges, outdir, n_trials=n_trials, objective=objective, step=step,
               storage=storage, study_name=study_name, seed=seed)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: usage errors (click's and the search's) become one line ``error: ...`` and status 2."""
    return run_command(cli, argv, "python -m search.optuna_search")


if __name__ == "__main__":
    sys.exit(main())
