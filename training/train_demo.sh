#!/usr/bin/env bash
# Reproduce the shipped demo models (demo/models/) and reference statistics (demo/refs/).
#
#   bash training/train_demo.sh                 # on the CPU (2 threads), ~15 + 15 + 1 + 3 minutes
#   DEVICE=cuda bash training/train_demo.sh     # on a GPU, ~2 minutes per model
#   OUTDIR=/tmp/demo-models bash training/train_demo.sh
#
# The shipped networks were trained with DEVICE=cuda (one GPU, the three runs in
# parallel); the classifier with the CPU command below.  All random draws are
# made on the CPU from fixed seeds, so the CPU and GPU runs see the same batches,
# noise levels and noise; their weights differ only by floating-point rounding.
# Existing outputs are never overwritten (the scripts stop with an error).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DEVICE=${DEVICE:-cpu}
OUTDIR=${OUTDIR:-demo/models}
REFDIR=${REFDIR:-demo/refs}
T=2000          # training iterations of the full models (batch 128: 171 passes over 1497 digits)
T16=125         # T/16: reduced training (RT) and reduced capacity + training (RCT)
COMMON="--device $DEVICE --threads 2 --batch 128 --lr 1e-2"

# Positive: class-conditional, 32 base channels, levels 16/8/4; its EMA at T/16 is the RT negative.
$PY -m training.train_edm2 --out "$OUTDIR/digits-cond" $COMMON --steps $T --seed 0 \
    --snapshot "$T16:$OUTDIR/digits-rt"
# CFG negative: same architecture, unconditional (label_dim 0).
$PY -m training.train_edm2 --out "$OUTDIR/digits-uncond" --uncond $COMMON --steps $T --seed 1
# RCT negative: 16 base channels (1/4 of the parameters) and T/16 iterations.
$PY -m training.train_edm2 --out "$OUTDIR/digits-rct" --model-channels 16 $COMMON --steps $T16 --seed 2
# Feature detector and reference statistics of the 1497 training digits.
$PY -m training.train_classifier --out "$OUTDIR/digits-classifier.safetensors" \
    --refs-out "$REFDIR/digits-ref.pkl" --epochs 20 --seed 0
