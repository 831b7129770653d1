#!/usr/bin/env bash
# EDM2 with (masked) sliding window guidance, one run per guidance weight.
#
#   bash bash/edm2_swg.sh                          # the paper's EDM2-S M-SWG runs, w = 0.2 and 1.1
#   g_weight="0.1 0.2 0.3" seeds=0-9999 bash bash/edm2_swg.sh
#   DRY_RUN=1 bash bash/edm2_swg.sh                # print the torchrun commands only
#
# Every variable below can be set in the environment; the defaults are the paper's settings
# (README table: EDM2-S, M-SWG, k = 40, 2 windows per axis, 50k images, FID and FD-DINOv2).
# Shared switches (DRY_RUN, nproc_per_node, TORCHRUN_ARGS, poll, EXTRA_ARGS): bash/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

base_out_dir="${base_out_dir:-./samples}"    # runs go to $base_out_dir/IN<res>/<size>/<MSWG|SWG>/<w>/samples
batch="${batch:-100}"                         # images per batch per GPU
resolution="${resolution:-512}"               # ImageNet resolution (reference statistics img<res>.pkl)
metrics="${metrics:-fid,fd_dinov2}"           # metrics once all images exist ("none" to skip)
seeds="${seeds:-0-49999}"                     # 50k images for FID / FD-DINOv2
g_interval="${g_interval:-none}"              # sampler steps with guidance, "first,last" or none
swg_sizes="${swg_sizes:-40}"                  # window size k (latent pixels)
swg_steps="${swg_steps:-2}"                   # windows per axis (N = swg_steps^2 windows)
scale_window_guide="${scale_window_guide:-1}" # 1 = masked SWG (M-SWG), 0 = plain SWG
model_size="${model_size:-s}"                 # s or xxl
ref_path="${ref_path:-https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img${resolution}.pkl}"
use_wandb="${use_wandb:-0}"
poll="${poll:-0}"                             # 1 = wait for free GPUs before each run
g_weight="${g_weight:-0.2 1.1}"               # space-separated list of weights w to sweep
nproc_per_node="${nproc_per_node:-$(swg_default_nproc)}"

swg_choose model_size "$model_size" s xxl
swg_choose scale_window_guide "$scale_window_guide" 0 1
# Model names from networks/zoo.py (MODELS): the raw full-training snapshots.
net_pos_pkl="${net_pos_pkl:-raw-img${resolution}-${model_size}}"
tag=$([ "$scale_window_guide" = "1" ] && echo MSWG || echo SWG)

for w in $g_weight; do
    outdir="$base_out_dir/IN${resolution}/${model_size}/${tag}/$(swg_weight_name "$w")/samples"
    swg_launch sample_edm2.py --net_pos_pkl "$net_pos_pkl" --outdir "$outdir" \
        --seeds "$seeds" --subdirs --batch "$batch" --metrics "$metrics" --ref_path "$ref_path" \
        --g_method swg --g_weight "$w" --swg_sizes "$swg_sizes" --swg_steps "$swg_steps" \
        --scale_window_guide "$scale_window_guide" --g_interval "$g_interval" --use_wandb "$use_wandb"
done
swg_finish
