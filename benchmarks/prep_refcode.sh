#!/usr/bin/env bash
# Copy the paper's reference code into .refcode/ (ignored by git, never committed) for
# benchmarks/gpu_bench.py, which compares this project with it on the same random weights.
#
#   bash benchmarks/prep_refcode.sh [CHECKOUT]
#
# CHECKOUT: a local checkout of https://github.com/HHU-MMBS/swg_bmvc2025_official (its edm2/
# folder holds NVlabs/edm2's networks with the SWG sampler, and the DiT model). Without it the
# repository is cloned (needs internet: run this where there is some, then carry .refcode to
# the GPU machine with the working tree, e.g. the device tool's carry=[".refcode"]).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.refcode
SRC=${1:-}
REPO_URL=https://github.com/HHU-MMBS/swg_bmvc2025_official
if [ -z "$SRC" ]; then
    SRC=$(mktemp -d)/swg
    git clone --depth 1 "$REPO_URL" "$SRC"
fi
if [ -d "$SRC/.git" ] || [ -f "$SRC/HEAD" ]; then :; fi
FILES="edm2/training/__init__.py edm2/training/networks_edm2.py edm2/torch_utils/__init__.py
edm2/torch_utils/persistence.py edm2/torch_utils/misc.py edm2/dnnlib/__init__.py edm2/dnnlib/util.py
edm2/dnnlib/slurm_utils.py edm2/sample_edm2.py edm2/diffusion/__init__.py edm2/diffusion/models.py
edm2/LICENSE_EDM2.txt edm2/LICENSE_DIT.txt"
rm -rf "$DEST"
for f in $FILES; do
    mkdir -p "$DEST/$(dirname "$f")"
    if [ -f "$SRC/$f" ]; then
        cp "$SRC/$f" "$DEST/$f"
    elif git -C "$SRC" cat-file -e "HEAD:$f" 2>/dev/null; then  # a bare mirror
        git -C "$SRC" show "HEAD:$f" > "$DEST/$f"
    else
        echo "error: $SRC has no $f; give a checkout of $REPO_URL" >&2
        exit 2
    fi
done
# diffusion/__init__.py imports the whole DiT diffusion package; only models.py is used.
: > "$DEST/edm2/diffusion/__init__.py"
echo "reference code ($(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown)) copied to $DEST ($(du -sh "$DEST" | cut -f1))"
