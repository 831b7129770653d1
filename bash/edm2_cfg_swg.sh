#!/usr/bin/env bash
# EDM2 with classifier-free guidance combined with M-SWG (CFG+M-SWG), one run per weight pair.
#
#   bash bash/edm2_cfg_swg.sh                        # EDM2-S, w = 0.3,0.3 (README table)
#   g_weight="0.2,0.3 0.3,0.3 0.4,0.3" bash bash/edm2_cfg_swg.sh
#   g_method=cfg g_weight="0.4 0.9" bash bash/edm2_cfg_swg.sh   # plain CFG baseline
#
# A weight pair "w1,w2" is (CFG weight, window weight) in the paper's convention D_pos + w (D_pos - D_neg);
# EDM2's own guidance value is g = w1 + 1.  The unconditional network is EDM2-XS-uncond.
# Shared switches (DRY_RUN, nproc_per_node, TORCHRUN_ARGS, poll, EXTRA_ARGS): bash/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

base_out_dir="${base_out_dir:-./samples}"
batch="${batch:-256}"
resolution="${resolution:-512}"
metrics="${metrics:-fid,fd_dinov2}"
seeds="${seeds:-0-49999}"
g_interval="${g_interval:-none}"
swg_sizes="${swg_sizes:-40}"
swg_steps="${swg_steps:-2}"
scale_window_guide="${scale_window_guide:-1}"
model_size="${model_size:-s}"                 # s or xxl
g_method="${g_method:-cfg-swg}"               # cfg-swg, or cfg
ref_path="${ref_path:-https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img${resolution}.pkl}"
use_wandb="${use_wandb:-0}"
poll="${poll:-0}"
nproc_per_node="${nproc_per_node:-$(swg_default_nproc)}"

swg_choose model_size "$model_size" s xxl
swg_choose g_method "$g_method" cfg-swg cfg
net_pos_pkl="${net_pos_pkl:-raw-img512-${model_size}}"
net_neg_pkl="${net_neg_pkl:-raw-img512-xs-uncond}"   # EDM2 guides every size with XS-uncond
if [ "$g_method" = "cfg" ]; then
    g_weight="${g_weight:-0.9}"
    tag=CFG
else
    g_weight="${g_weight:-0.3,0.3}"
    tag=CFG_SWG
fi

swg_edm2_neg_sweep cfg-swg "$tag"
swg_finish
