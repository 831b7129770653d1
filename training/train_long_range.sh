#!/usr/bin/env bash
# Reproduce the long-range demo's models (demo/models/quad-*; see demo/README.md, "Long-range experiment").
#
#   bash training/train_long_range.sh                   # CPU; the two runs in parallel, one thread each
#   OUTDIR=/tmp/quad-models bash training/train_long_range.sh
#
# Data: 16384 fixed 32x32 images, each a 2x2 grid of four 16x16 digits of one class
# (training.data.load_quad_digits, seed 0, the 1497 training digits only).
# Network: EDM2 U-Net, 16 base channels, levels 32/16/8 (mult 1,2,2), 1 block per level,
# self-attention at 8x8 (0.28 M parameters).  T = 1000 iterations of batch 64 (64k images).
# The EMA snapshots at T/8 and T/4 are the less-trained checkpoints (positives that have
# not learnt the rule yet, and autoguidance negatives); those at T/2 and 3T/4 are kept so that
# the training curve can be inspected (not shipped).  All random draws come from the seeds
# on the CPU.  Existing outputs are never overwritten (the script stops with an error).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
OUTDIR=${OUTDIR:-demo/models}
THREADS=${THREADS:-1}
T=1000
COMMON="--data quad-digits --num-images 16384 --data-seed 0 --resolution 32 --model-channels 16
        --channel-mult 1,2,2 --attn-resolutions 8 --batch 64 --lr 1e-2 --steps $T
        --device $DEVICE --threads $THREADS"
# shellcheck disable=SC2086
$PY -m training.train_edm2 --out "$OUTDIR/quad-cond" $COMMON --seed 0 \
    --snapshot "125:$OUTDIR/quad-cond-T8" --snapshot "250:$OUTDIR/quad-cond-T4" \
    --snapshot "500:$OUTDIR/quad-cond-T2" --snapshot "750:$OUTDIR/quad-cond-T34" &
cond=$!
# shellcheck disable=SC2086
$PY -m training.train_edm2 --out "$OUTDIR/quad-uncond" --uncond $COMMON --seed 1 \
    --snapshot "125:$OUTDIR/quad-uncond-T8" --snapshot "250:$OUTDIR/quad-uncond-T4" \
    --snapshot "500:$OUTDIR/quad-uncond-T2" --snapshot "750:$OUTDIR/quad-uncond-T34" &
uncond=$!
wait $cond
wait $uncond
