#!/usr/bin/env bash
# EDM2 with a weaker negative model combined with M-SWG (RT+M-SWG or RCT+M-SWG), one run per weight pair.
#
#   bash bash/edm2_wmg_swg.sh                              # EDM2-S, RT negative, w = 1.2,0.25
#   negative=RCT bash bash/edm2_wmg_swg.sh                 # EDM2-S, RCT negative, w = 1.2,0.14
#   model_size=xxl negative=RCT g_weight="1.2,0.1 1.2,0.2" bash bash/edm2_wmg_swg.sh
#   g_method=wmg g_weight="1.0 1.5" bash bash/edm2_wmg_swg.sh   # the negative alone (autoguidance)
#
# A weight pair "w1,w2" is (negative-model weight, window weight); pairs are separated by spaces.
# negative: RT = same capacity, reduced training (S: T/16, XXL: T/3.5); RCT = reduced capacity and
# training (S: XS at T/16, XXL: M at T/3.5).  Defaults: the paper's README (EDM2-S rows).
# Shared switches (DRY_RUN, nproc_per_node, TORCHRUN_ARGS, poll, EXTRA_ARGS): bash/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

base_out_dir="${base_out_dir:-./samples}"
batch="${batch:-256}"
resolution="${resolution:-512}"
metrics="${metrics:-fid,fd_dinov2}"
seeds="${seeds:-0-49999}"
g_interval="${g_interval:-none}"
swg_sizes="${swg_sizes:-40}"                  # window size k
swg_steps="${swg_steps:-2}"                   # windows per axis
scale_window_guide="${scale_window_guide:-1}" # the combined methods ignore the mask unless EXTRA_ARGS=--clean_combos
model_size="${model_size:-s}"                 # s or xxl
g_method="${g_method:-wmg-swg}"               # wmg-swg, or wmg (negative model only)
negative="${negative:-RT}"                    # RT or RCT
ref_path="${ref_path:-https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img${resolution}.pkl}"
use_wandb="${use_wandb:-0}"
poll="${poll:-1}"                             # the reference polls for free GPUs here
nproc_per_node="${nproc_per_node:-$(swg_default_nproc)}"

swg_choose model_size "$model_size" s xxl
swg_choose negative "$negative" RT RCT
swg_choose g_method "$g_method" wmg-swg wmg
# Model names from networks/zoo.py (MODELS); the table there holds the URLs.
case "$model_size/$negative" in
    s/RT)    pos=raw-img512-s;   neg=raw-img512-s-T16 ;;
    s/RCT)   pos=raw-img512-s;   neg=raw-img512-xs-T16 ;;
    xxl/RT)  pos=raw-img512-xxl; neg=raw-img512-xxl-T8 ;;
    xxl/RCT) pos=raw-img512-xxl; neg=raw-img512-m-T8 ;;
esac
net_pos_pkl="${net_pos_pkl:-$pos}"
net_neg_pkl="${net_neg_pkl:-$neg}"
if [ "$g_method" = "wmg" ]; then
    g_weight="${g_weight:-1.2}"
    tag="${negative}"
else
    if [ "$negative" = "RCT" ]; then g_weight="${g_weight:-1.2,0.14}"; else g_weight="${g_weight:-1.2,0.25}"; fi
    tag="${negative}_SWG"
fi

swg_edm2_neg_sweep wmg-swg "$tag"
swg_finish
