#!/usr/bin/env bash
# One call on a GPU machine (no internet there): this project vs the SWG reference code on the same
# random weights, then gpu_bench.json / gpu_bench.md under $OUT (default out/gpu_bench).
#
# Before (where there is internet, from the repository root):
#   bash benchmarks/prep_refcode.sh [CHECKOUT]      # -> .refcode/ (git-ignored)
#   # optional, for the decoded-image PSNR (diffusers is not on the GPU image):
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl diffusers==0.42.1 importlib_metadata
# Then carry both with the working tree, e.g. with the device tool:
#   run(command="bash benchmarks/run_gpu_bench.sh", carry=[".refcode", ".whl"], timeout_s=540)
# Results go to $OUT (the device tool sets it; do not override it there, only $OUT comes back),
# else to out/gpu_bench. PY (default python3) is the interpreter, LIMIT (default 480) the seconds
# gpu_bench.py may run.
#
# The comparisons run first and are saved as they finish, then the fp16-vs-fp32 section; the variants (channels-last,
# torch.compile, CUDA graphs: compile time included in this call) run last, so a time limit costs
# only them. Extra arguments go to benchmarks/gpu_bench.py (e.g. --variants "" to skip them).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-out/gpu_bench}
LIMIT=${LIMIT:-480}
mkdir -p "$OUT"
if [ ! -f .refcode/edm2/training/networks_edm2.py ]; then
    echo "error: .refcode/ is missing; run benchmarks/prep_refcode.sh and carry .refcode" >&2
    exit 2
fi
PKGS=$(mktemp -d)  # outside $OUT: unpacked wheels are not results
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import diffusers" 2>/dev/null; then
    "$PY" -m pip install -q --no-deps --no-index --target "$PKGS" .whl/*.whl
    export PYTHONPATH="$PKGS${PYTHONPATH:+:$PYTHONPATH}"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true; } > "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" | tee "$OUT/torch.txt"
export PYTHONUNBUFFERED=1
timeout -k 10 "$LIMIT" "$PY" benchmarks/gpu_bench.py --refcode .refcode --out "$OUT" \
    --variants nocache,channels_last,compile,cudagraphs "$@" 2>&1 | tee "$OUT/gpu_bench.log"
status=${PIPESTATUS[0]}
rm -rf "$PKGS"
[ "$status" = 124 ] && echo "gpu_bench stopped at the ${LIMIT} s limit; $OUT/gpu_bench.json holds what finished" >&2
exit "$status"
