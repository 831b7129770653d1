#!/usr/bin/env bash
# Guidance-weight sweep in streaming mode: no image files, metrics computed while sampling
# (results/sweep.py). One line per method, each weight repeated over seed offsets; writes
# $out/sweep.md + sweep.csv (mean, min, max, spread, best per metric) and $out/sweep.png
# (FD-DINOv2, FID, IS, saturation against w, one line per method).
#
#   bash bash/sweep.sh                                  # EDM2-S: M-SWG and WMG (RT) over w, 3 seed sets of 50k
#   lines="M-SWG=demo-digits:0.1 0.3;WMG=demo-digits-rt:0.8 1.2" seeds=0-255 offsets=0,1000 \
#       metrics=fd_digits,conf_digits,saturation nproc_per_node=1 out=./sweeps/digits bash bash/sweep.sh
#   DRY_RUN=1 bash bash/sweep.sh                       # print the torchrun command only
#
# lines: methods separated by ';', each LABEL=PRESET:W1 W2 ... (presets: sampling/presets.py;
# a weight is 0.2, or 1.2,0.14 for two-weight methods whose last weight is swept).
# A killed sweep is resumed by running the same command; finished points are not sampled again.
# Shared switches (DRY_RUN, nproc_per_node, TORCHRUN_ARGS, poll, EXTRA_ARGS): bash/common.sh.
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

lines="${lines:-M-SWG=swg-edm2-s-mswg-0.2:0.1 0.2 0.4 0.6 0.8 1.1;WMG=swg-edm2-s-rt:1.2 1.4 1.6 2.0}"
seeds="${seeds:-0-49999}"                     # seeds of one point
offsets="${offsets:-0,50000,100000}"          # one run per offset (EDM2 reports the best of three)
metrics="${metrics:-fid,fd_dinov2,is,saturation}"
ref_path="${ref_path:-}"                      # empty: each preset's reference statistics
batch="${batch:-}"                            # images per batch per GPU; empty: the sampler's default
out="${out:-./sweeps/edm2-s}"
poll="${poll:-0}"
nproc_per_node="${nproc_per_node:-$(swg_default_nproc)}"

args=(--seeds "$seeds" --offsets "$offsets" --metrics "$metrics" --out "$out")
[ -n "$ref_path" ] && args+=(--ref_path "$ref_path")
[ -n "$batch" ] && args+=(--batch "$batch")
IFS=';' read -r -a line_list <<< "$lines"
for line in "${line_list[@]}"; do
    line="$(echo "$line" | sed 's/^ *//; s/ *$//')"
    [ -n "$line" ] && args+=(--line "$line")
done
swg_launch -m results.sweep "${args[@]}"
swg_finish
