"""Generate images with EDM2 and sliding window guidance (SWG / M-SWG) or its combinations.

Runs as ``python sample_edm2.py ...`` or ``torchrun --nproc_per_node=N sample_edm2.py ...``.
The options are those of the paper's reference script (every multi-word flag also
with dashes: ``--g-weight``); ``--preset`` fills the ones you leave out and
``--list_presets`` lists them.  This file is the entry point only: the flags are
:mod:`sampling.edm2_flags`, the work :mod:`sampling.edm2_run` and :mod:`sampling.run`.

Example (M-SWG with EDM2-S, as in the SWG README):

    torchrun --standalone --nproc_per_node=4 sample_edm2.py \\
        --net_pos_pkl https://nvlabs-fi-cdn.nvidia.com/edm2/raw-snapshots/edm2-img512-s/edm2-img512-s-2147483-0.100.pkl \\
        --outdir ./samples/IN512/s/MSWG/0.2/samples/ --seeds 0-49999 --subdirs --batch 1024 \\
        --metrics fid,fd_dinov2 --ref_path https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl \\
        --g_weight 0.2 --g_method swg --swg_sizes 40 --swg_steps 2 --scale_window_guide 1
"""

import sys

from sampling.edm2_flags import FLAGS, cli, main, settings

__all__ = ["FLAGS", "cli", "main", "settings"]

if __name__ == "__main__":
    sys.exit(main())
