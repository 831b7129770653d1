#!/usr/bin/env bash
# DiT-XL/2 with (masked) sliding window guidance, one run per weight.
#
#   bash bash/dit_swg.sh                               # DiT-XL/2 256px, M-SWG, w = 0.5 (best FID) and 1.5 (best FDD)
#   mask=0 g_weight="0.25 0.5" bash bash/dit_swg.sh   # plain SWG
#   DRY_RUN=1 bash bash/dit_swg.sh
#
# Reference statistics for 256px: download img256.pkl (link in the README) to ./dataset_refs/.
# Each run gets its own folder under $base_out_dir, named by sample_dit.py from the settings.
# Shared switches (DRY_RUN, nproc_per_node, TORCHRUN_ARGS, poll, EXTRA_ARGS): bash/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

base_out_dir="${base_out_dir:-./samples/IN256/cond_DiT_SWG}"
ref_path="${ref_path:-./dataset_refs/img256.pkl}"
model="${model:-DiT-XL/2}"
resolution="${resolution:-256}"               # 256 or 512 (released DiT-XL/2 weights)
num_samples="${num_samples:-50000}"
batch="${batch:-32}"                          # images per batch per GPU
metrics="${metrics:-fid,fd_dinov2}"
mask="${mask:-1}"                             # 1 = M-SWG, 0 = SWG
swg_sizes="${swg_sizes:-}"                    # window size in latent pixels; empty = 5/8 of the latent (20 at 256px)
swg_steps="${swg_steps:-2}"                   # windows per axis
save_tar="${save_tar:-1}"                     # tar shards instead of single PNGs
poll="${poll:-0}"
g_weight="${g_weight:-0.5 1.5}"               # space-separated list of SWG weights
nproc_per_node="${nproc_per_node:-$(swg_default_nproc)}"

swg_choose mask "$mask" 0 1
swg_choose save_tar "$save_tar" 0 1

for w in $g_weight; do
    args=(--model "$model" --image-size "$resolution" --num-fid-samples "$num_samples" --g-scale "$w"
          --per-proc-batch-size "$batch" --crop 1 --mask "$mask" --window-steps "$swg_steps"
          --sample-dir "$base_out_dir" --ref-path "$ref_path" --metrics "$metrics")
    [ -n "$swg_sizes" ] && args+=(--window-size "$swg_sizes")
    [ "$save_tar" = "1" ] && args+=(--save-tar)
    swg_launch sample_dit.py "${args[@]}"
done
swg_finish
