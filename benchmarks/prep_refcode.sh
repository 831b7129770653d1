#!/usr/bin/env bash
# Copy the paper's reference code into .refcode/ (ignored by git, never committed) for
# benchmarks/gpu_bench.py, which compares this project with it on the same random weights.
#
#   bash benchmarks/prep_refcode.sh [CHECKOUT]
#
# CHECKOUT: a local checkout (or bare mirror) of https://github.com/HHU-MMBS/swg_bmvc2025_official
# (its edm2/ folder holds NVlabs/edm2's networks with the SWG sampler, and the DiT model). Without
# it the repository is cloned (needs internet: run this where there is some, then carry .refcode to
# the GPU machine with the working tree, e.g. the device tool's carry=[".refcode"]). The commit
# copied is written to .refcode/COMMIT and reported by gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.refcode
SRC=${1:-}
REPO_URL=https://github.com/HHU-MMBS/swg_bmvc2025_official
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
if [ -z "$SRC" ]; then
    SRC=$SCRATCH/swg
    git clone --quiet --depth 1 "$REPO_URL" "$SRC"
fi
FILES="edm2/training/__init__.py edm2/training/networks_edm2.py edm2/torch_utils/__init__.py
edm2/torch_utils/persistence.py edm2/torch_utils/misc.py edm2/dnnlib/__init__.py edm2/dnnlib/util.py
edm2/dnnlib/slurm_utils.py edm2/sample_edm2.py edm2/diffusion/__init__.py edm2/diffusion/models.py
edm2/LICENSE_EDM2.txt edm2/LICENSE_DIT.txt"
NEW=$SCRATCH/refcode  # filled completely, then moved: a failure leaves no half-copied .refcode
for f in $FILES; do
    mkdir -p "$NEW/$(dirname "$f")"
    if [ -f "$SRC/$f" ]; then
        cp "$SRC/$f" "$NEW/$f"
    elif git -C "$SRC" cat-file -e "HEAD:$f" 2>/dev/null; then  # a bare mirror
        git -C "$SRC" show "HEAD:$f" > "$NEW/$f"
    else
        echo "error: $SRC has no $f; give a checkout of $REPO_URL" >&2
        exit 2
    fi
done
# diffusion/__init__.py imports the whole DiT diffusion package; only models.py is used.
: > "$NEW/edm2/diffusion/__init__.py"
git -C "$SRC" rev-parse HEAD 2>/dev/null > "$NEW/COMMIT" || echo unknown > "$NEW/COMMIT"
rm -rf "$DEST"
mv "$NEW" "$DEST"
echo "reference code ($(cut -c1-12 "$DEST/COMMIT")) copied to $DEST ($(du -sh "$DEST" | cut -f1))"
