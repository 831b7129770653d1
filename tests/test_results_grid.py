"""results/grid.py column labels say what was drawn (issue 23 #12, as in results.collect)."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from results.grid import edm2_grid
from utils import cache


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


def test_offline_advice_names_no_flag_the_grid_lacks(tmp_path, monkeypatch):
    """results.grid has no --prefetch: a network it cannot download names the cache path and $SWG_CACHE."""
    monkeypatch.setenv("SWG_CACHE", str(tmp_path / "cache"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}/nets/pos.pkl"
    with pytest.raises(cache.OfflineError) as err:
        edm2_grid(url, ["none"], seeds=[0], device="cpu")
    message = str(err.value)
    assert str(tmp_path / "cache" / "127.0.0.1" / "nets" / "pos.pkl") in message and "$SWG_CACHE" in message
    assert "--prefetch" not in message, message
