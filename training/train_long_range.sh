#!/usr/bin/env bash
# Reproduce the long-range demo's models (demo/models/quad-*; see demo/README.md, "Long-range experiment").
#
#   bash training/train_long_range.sh                   # CPU; the two runs in parallel, one thread each
#   OUTDIR=/tmp/quad-models bash training/train_long_range.sh
#   T=1000 OUTDIR=/tmp/longer bash training/train_long_range.sh   # a longer run (same first 250 steps)
#
# Data: 16384 fixed 32x32 images, each a 2x2 grid of four 16x16 digits of one class
# (training.data.load_quad_digits, seed 0, the 1497 training digits only).
# Network: EDM2 U-Net, 16 base channels, levels 32/16/8 (mult 1,2,2), 1 block per level,
# self-attention at 8x8 (0.28 M parameters).  T = 250 iterations of batch 64 (16k images):
# about 21 minutes per model with one thread on the shared, heavily loaded 2-core machine
# (load average 10-17), both runs in parallel.  The EMA snapshot at step 125 (-early) is
# the less-trained checkpoint: a positive that has learnt less, and the autoguidance negative.
#
# The shipped files are the EMA snapshots at steps 250 and 125 of this command started
# with T=1000 (stopped after step 350 for time; their JSON says steps 1000, snapshot_step 250
# / 125).  The learning-rate schedule and the EMA do not depend on T, so T=250 gives the same
# weights.  All random draws come from the seeds on the CPU.  Existing outputs are never
# overwritten (the script stops with an error).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
OUTDIR=${OUTDIR:-demo/models}
THREADS=${THREADS:-1}
T=${T:-250}
EARLY=125
COMMON="--data quad-digits --num-images 16384 --data-seed 0 --resolution 32 --model-channels 16
        --channel-mult 1,2,2 --attn-resolutions 8 --batch 64 --lr 1e-2 --steps $T
        --device $DEVICE --threads $THREADS"
# shellcheck disable=SC2086
$PY -m training.train_edm2 --out "$OUTDIR/quad-cond" $COMMON --seed 0 --snapshot "$EARLY:$OUTDIR/quad-cond-early" &
cond=$!
# shellcheck disable=SC2086
$PY -m training.train_edm2 --out "$OUTDIR/quad-uncond" --uncond $COMMON --seed 1 \
    --snapshot "$EARLY:$OUTDIR/quad-uncond-early" &
uncond=$!
wait $cond
wait $uncond
