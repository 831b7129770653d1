#!/usr/bin/env bash
# Wait until enough GPUs have enough free memory, then run a command on them.
#
#   bash/gpu_wait.sh [--gpus N] [--min-free-mb MB] [--interval 10m] [--timeout SECONDS] -- COMMAND ARG...
#
# Every --interval (a sleep(1) duration: 30, 30s, 10m, 1h) the free memory of each GPU is read
# with nvidia-smi.  As soon as N GPUs have at least MB MiB free, CUDA_VISIBLE_DEVICES is set to
# those GPUs (most free memory first) and COMMAND replaces this script (its exit status is
# returned).  Only GPUs already listed in CUDA_VISIBLE_DEVICES are considered when it is set.
# --timeout 0 (default) waits forever; otherwise the script gives up with status 3.
# Defaults come from GPU_WAIT_GPUS (1), GPU_MIN_FREE_MB (30000), GPU_POLL_INTERVAL (10m),
# GPU_WAIT_TIMEOUT (0).
set -u

gpus="${GPU_WAIT_GPUS:-1}"
min_free="${GPU_MIN_FREE_MB:-30000}"
interval="${GPU_POLL_INTERVAL:-10m}"
timeout="${GPU_WAIT_TIMEOUT:-0}"

usage() {
    echo "error: $1; usage: gpu_wait.sh [--gpus N] [--min-free-mb MB] [--interval 10m] [--timeout S] -- COMMAND ..." >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --gpus) [ $# -ge 2 ] || usage "--gpus needs a value"; gpus="$2"; shift 2 ;;
        --min-free-mb) [ $# -ge 2 ] || usage "--min-free-mb needs a value"; min_free="$2"; shift 2 ;;
        --interval) [ $# -ge 2 ] || usage "--interval needs a value"; interval="$2"; shift 2 ;;
        --timeout) [ $# -ge 2 ] || usage "--timeout needs a value"; timeout="$2"; shift 2 ;;
        --) shift; break ;;
        *) usage "unknown option $1 (put the command after --)" ;;
    esac
done
[ $# -gt 0 ] || usage "no command given"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || usage "--gpus must be a positive integer, got $gpus"
[[ "$min_free" =~ ^[0-9]+$ ]] || usage "--min-free-mb must be an integer (MiB), got $min_free"
[[ "$timeout" =~ ^[0-9]+$ ]] || usage "--timeout must be a number of seconds, got $timeout"
command -v nvidia-smi >/dev/null 2>&1 || usage "nvidia-smi not found; run on a GPU node or launch without polling (poll=0)"

# Print "index free_mib" for the candidate GPUs, most free memory first.
free_gpus() {
    local allowed=",${CUDA_VISIBLE_DEVICES:-},"
    nvidia-smi --query-gpu=index,memory.free --format=csv,noheader,nounits |
        tr -d ' ' | sort -t',' -k2 -nr |
        while IFS=',' read -r idx free; do
            [ -n "$idx" ] || continue
            if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [[ "$allowed" != *",$idx,"* ]]; then
                continue
            fi
            if [[ "$free" =~ ^[0-9]+$ ]] && [ "$free" -ge "$min_free" ]; then
                echo "$idx"
            fi
        done
}

start=$(date +%s)
while true; do
    mapfile -t ready < <(free_gpus)
    if [ "${#ready[@]}" -ge "$gpus" ]; then
        chosen=$(IFS=','; echo "${ready[*]:0:$gpus}")
        echo "gpu_wait: using GPU(s) $chosen (>= $min_free MiB free each)" >&2
        export CUDA_VISIBLE_DEVICES="$chosen"
        exec "$@"
    fi
    now=$(date +%s)
    if [ "$timeout" -gt 0 ] && [ $((now - start)) -ge "$timeout" ]; then
        echo "error: gave up after ${timeout}s: fewer than $gpus GPU(s) with $min_free MiB free; lower --min-free-mb or --gpus, or wait longer" >&2
        exit 3
    fi
    echo "gpu_wait: ${#ready[@]} of $gpus GPU(s) free, checking again in $interval" >&2
    sleep "$interval"
done
