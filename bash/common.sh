#!/usr/bin/env bash
# Shared helpers for the sweep scripts in bash/ (sourced, not run).
#
# Environment understood by every sweep script (all optional):
#   DRY_RUN=1           print the torchrun commands (one per line, shell-quoted) and run nothing
#   nproc_per_node=N    processes (GPUs) per node; default: the entries of CUDA_VISIBLE_DEVICES,
#                       else the GPUs nvidia-smi lists, else 1
#   TORCHRUN_ARGS="..." launcher arguments replacing "--standalone --nproc_per_node=N"; in them
#                       {run} becomes the run's index in the sweep (0, 1, ...) and {port} becomes
#                       MASTER_PORT + index, so successive runs use fresh rendezvous (multi-node:
#                       see bash/slurm_example.sbatch)
#   poll=1              wait for free GPUs before each run (bash/gpu_wait.sh)
#   poll_interval=10m   time between two GPU checks; min_free_mb=30000 free memory a GPU needs
#   EXTRA_ARGS="..."    appended to every sampler command (e.g. "--clean_combos --max_window_batch 64")
#   PYTHON_LAUNCHER     the launcher executable (default: torchrun)
#
# The sweeps run from the repository root: relative paths (base_out_dir, ref_path) are the repo's.
# A failed run does not stop the sweep; the script exits 1 at the end (rerun it to resume).
# SIGTERM or SIGUSR1 (preemption) stops the sweep: the running sampler stops cleanly (outside srun the
# signal is passed on to it as SIGTERM; under srun every process of the step gets it already), no
# further run starts, and the script exits 75 (rerun it to resume; docs/clusters.md).

SWG_BASH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SWG_ROOT="$(dirname "$SWG_BASH_DIR")"
swg_failures=0
swg_run_index=0
swg_stopped=""
swg_child=""

# Preemption: remember the signal, pass it on to the running launcher (unless srun already did), stop the sweep.
swg_on_signal() {
    swg_stopped="$1"
    echo "sweep: $1 received: stopping the running sampler cleanly; no further run starts" >&2
    if [ -n "$swg_child" ] && [ -z "${SLURM_STEP_ID:-}" ]; then
        kill -TERM "$swg_child" 2>/dev/null
    fi
}
trap 'swg_on_signal SIGTERM' TERM
trap 'swg_on_signal SIGUSR1' USR1

# Number of processes per node when the user did not set nproc_per_node.
swg_default_nproc() {
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
        echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .
    elif [ "${DRY_RUN:-0}" != "1" ] && command -v nvidia-smi >/dev/null 2>&1; then
        local n
        n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
        if [ "$n" -gt 0 ]; then echo "$n"; else echo 1; fi
    else
        echo 1
    fi
}

# "1.2,0.25" -> "1.2_0.25" (folder names).
swg_weight_name() {
    echo "$1" | tr ',' '_'
}

# Refuse a value outside a list: swg_choose NAME VALUE CHOICE...
swg_choose() {
    local name="$1" value="$2"
    shift 2
    local c
    for c in "$@"; do
        [ "$value" = "$c" ] && return 0
    done
    echo "error: $name=$value is not one of: $*; set $name to one of them" >&2
    exit 2
}

# Print a command on one line, quoting only the words that need it (paste-able into a shell).
swg_print_command() {
    local word line=""
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
            line+="$word "
        else
            line+="$(printf '%q' "$word") "
        fi
    done
    echo "${line% }"
}

# swg_launch SCRIPT ARG...: run one sampler under torchrun (or print it under DRY_RUN=1).
swg_launch() {
    local script="$1"
    shift
    local -a launcher
    if [ -n "${TORCHRUN_ARGS:-}" ]; then
        local targs="${TORCHRUN_ARGS//\{run\}/$swg_run_index}"
        targs="${targs//\{port\}/$(( ${MASTER_PORT:-29500} + swg_run_index ))}"
        # shellcheck disable=SC2206 # word splitting of the user's launcher arguments is intended
        launcher=(${PYTHON_LAUNCHER:-torchrun} $targs)
    else
        launcher=(${PYTHON_LAUNCHER:-torchrun} --standalone "--nproc_per_node=$nproc_per_node")
    fi
    local -a extra=()
    # shellcheck disable=SC2206
    [ -n "${EXTRA_ARGS:-}" ] && extra=($EXTRA_ARGS)
    local -a cmd=("${launcher[@]}" "$script" "$@" "${extra[@]}")
    swg_run_index=$((swg_run_index + 1))
    if [ "${DRY_RUN:-0}" = "1" ]; then
        swg_print_command "${cmd[@]}"
        return 0
    fi
    [ -n "$swg_stopped" ] && exit 75
    echo "+ ${cmd[*]}" >&2
    local rc=0
    if [ "${poll:-0}" = "1" ]; then
        cmd=("$SWG_BASH_DIR/gpu_wait.sh" --gpus "$nproc_per_node" --min-free-mb "${min_free_mb:-30000}"
             --interval "${poll_interval:-10m}" -- "${cmd[@]}")
    fi
    # In the background, so that a signal reaches the trap while the run goes on; wait again after a trap.
    "${cmd[@]}" &
    swg_child=$!
    while true; do
        wait "$swg_child"
        rc=$?
        kill -0 "$swg_child" 2>/dev/null || break
    done
    swg_child=""
    if [ -n "$swg_stopped" ]; then
        echo "sweep: stopped by $swg_stopped (status $rc); rerun the same command to resume" >&2
        exit 75
    fi
    if [ "$rc" -ne 0 ]; then
        echo "warning: run failed with status $rc: ${cmd[*]}" >&2
        swg_failures=$((swg_failures + 1))
    fi
}

# EDM2 sweep with a negative network: one run per entry of $g_weight into
# $base_out_dir/IN$resolution/$model_size/<tag>/<weight>/samples. The window flags are passed
# only for the combined method ($1: wmg-swg or cfg-swg); the rest comes from the caller's variables.
swg_edm2_neg_sweep() {
    local combined="$1" tag="$2" w outdir args
    for w in $g_weight; do
        outdir="$base_out_dir/IN${resolution}/${model_size}/${tag}/$(swg_weight_name "$w")/samples"
        args=(--net_pos_pkl "$net_pos_pkl" --net_neg_pkl "$net_neg_pkl" --outdir "$outdir"
              --seeds "$seeds" --subdirs --batch "$batch" --metrics "$metrics" --ref_path "$ref_path"
              --g_method "$g_method" --g_weight "$w" --g_interval "$g_interval" --use_wandb "$use_wandb")
        if [ "$g_method" = "$combined" ]; then
            args+=(--swg_sizes "$swg_sizes" --swg_steps "$swg_steps" --scale_window_guide "$scale_window_guide")
        fi
        swg_launch sample_edm2.py "${args[@]}"
    done
}

# Exit status of a sweep: non-zero when a run failed (the other runs still ran).
swg_finish() {
    if [ "$swg_failures" -gt 0 ]; then
        echo "error: $swg_failures run(s) failed; rerun the script to resume them (finished images are kept)" >&2
        exit 1
    fi
}

# Sweeps run from the repository root, so relative paths (./samples, ./dataset_refs) are the repo's.
cd "$SWG_ROOT" || exit 2
