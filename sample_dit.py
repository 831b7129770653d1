"""Sample ImageNet images from a pretrained DiT with SWG, M-SWG, CFG or CFG+SWG (torchrun-ready).

    torchrun --standalone --nproc_per_node=4 sample_dit.py --model DiT-XL/2 \\
        --num-fid-samples 50000 --g-scale 0.5 --per-proc-batch-size 32 --crop 1 --mask 1 \\
        --sample-dir ./samples/IN256/cond_DiT_MSWG

Every multi-word flag has both spellings (``--g-scale`` / ``--g_scale``); a
switch given without a value means 1 (``--crop --mask``).  This file is the entry point
only: the flags are :mod:`sampling.dit_flags`, the work :mod:`sampling.dit_run`
(``build_config`` -> ``generate`` / ``prefetch``) and :mod:`sampling.run`.
"""

import sys

from sampling.dit_flags import FLAGS, cli, main, settings

__all__ = ["FLAGS", "cli", "main", "settings"]

if __name__ == "__main__":
    sys.exit(main())
