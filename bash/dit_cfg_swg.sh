#!/usr/bin/env bash
# DiT-XL/2 with classifier-free guidance combined with (M-)SWG, one run per weight pair.
#
#   bash bash/dit_cfg_swg.sh                                 # CFG+M-SWG, w = 0.6,0.5 (best FDD with the mask)
#   mask=0 g_weight="0.7,0.1" bash bash/dit_cfg_swg.sh       # CFG+SWG without the mask (best FDD)
#   g_weight="0.5,0.5 0.6,0.5 0.7,0.5" bash bash/dit_cfg_swg.sh
#
# A pair "g,c" is (CFG weight --g-scale, SWG weight --crop-scale); pairs are separated by spaces.
# Shared switches (DRY_RUN, nproc_per_node, TORCHRUN_ARGS, poll, EXTRA_ARGS): bash/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

base_out_dir="${base_out_dir:-./samples/IN256/cond_DiT_CFG_SWG}"
ref_path="${ref_path:-./dataset_refs/img256.pkl}"
model="${model:-DiT-XL/2}"
resolution="${resolution:-256}"
num_samples="${num_samples:-50000}"
batch="${batch:-32}"
metrics="${metrics:-fid,fd_dinov2}"
mask="${mask:-1}"
swg_sizes="${swg_sizes:-}"
swg_steps="${swg_steps:-2}"
save_tar="${save_tar:-1}"
poll="${poll:-0}"
g_weight="${g_weight:-0.6,0.5}"
nproc_per_node="${nproc_per_node:-$(swg_default_nproc)}"

swg_choose mask "$mask" 0 1
swg_choose save_tar "$save_tar" 0 1

for pair in $g_weight; do
    g="${pair%%,*}"
    c="${pair#*,}"
    if [ "$g" = "$pair" ] || [[ "$c" == *,* ]]; then
        echo "error: g_weight entry '$pair' must be a pair 'g,c' (CFG weight, SWG weight), e.g. 0.6,0.5" >&2
        exit 2
    fi
    args=(--model "$model" --image-size "$resolution" --num-fid-samples "$num_samples" --g-scale "$g"
          --crop-scale "$c" --per-proc-batch-size "$batch" --cfg-crop 1 --mask "$mask"
          --window-steps "$swg_steps" --sample-dir "$base_out_dir" --ref-path "$ref_path" --metrics "$metrics")
    [ -n "$swg_sizes" ] && args+=(--window-size "$swg_sizes")
    [ "$save_tar" = "1" ] && args+=(--save-tar)
    swg_launch sample_dit.py "${args[@]}"
done
swg_finish
