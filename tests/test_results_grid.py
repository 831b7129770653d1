"""results/grid.py column labels say what was drawn (issue 23 #12, as in results.collect)."""

from __future__ import annotations

import numpy as np

from results.grid import edm2_grid


def test_edm2_combination_labels_follow_the_mask_actually_applied():
    """The EDM2 reference's cfg-swg ignores the mask: a 'cfg-m-swg' column without clean_combos draws the
    same images as 'cfg-swg' and is labelled CFG+SWG; with clean_combos the mask is applied (other images)
    and the label is CFG+M-SWG."""
    cols = ["cfg-m-swg:0.3,0.3", "cfg-swg:0.3,0.3", "m-swg:0.3"]
    kw = dict(seeds=[0, 1], net_uncond="demo-digits-uncond", swg_sizes=12, steps=2, device="cpu")
    ref = edm2_grid("demo-digits-cond", cols, **kw)
    assert [c.split("\n")[0] for c in ref.col_labels] == ["CFG+SWG", "CFG+SWG", "M-SWG"]
    assert np.array_equal(ref.images[:, 0], ref.images[:, 1])
    clean = edm2_grid("demo-digits-cond", cols, clean_combos=True, **kw)
    assert [c.split("\n")[0] for c in clean.col_labels] == ["CFG+M-SWG", "CFG+SWG", "M-SWG"]
    assert not np.array_equal(clean.images[:, 0], clean.images[:, 1])
