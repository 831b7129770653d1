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


def test_columns_take_every_method_of_the_table():
    from results.grid import Column, _dit_options, parse_columns
    from utils.errors import UsageError

    cols = parse_columns(["apg:0.4", "apg-m-swg:0.4,0.2", "apg-swg:0.4,0.2", "cfg-zero*:0.4", "pag:2", "mswg:0.2"])
    assert cols == [Column("apg", (0.4,), False), Column("apg-swg", (0.4, 0.2), True),
                    Column("apg-swg", (0.4, 0.2), False), Column("cfg-zero", (0.4,), False),
                    Column("pag", (2.0,), False), Column("swg", (0.2,), False)]
    assert parse_columns(["apg-mswg:0.4,0.2"]) == [Column("apg-swg", (0.4, 0.2), True)]  # the demo's row name
    with pytest.raises(UsageError, match="did you mean apg"):
        parse_columns(["apgg:0.4"])
    with pytest.raises(UsageError, match="apg-swg takes 2 weight"):
        parse_columns(["apg-m-swg:0.4"])
    # DiT: the reference's switches for its modes (CFG's scale s = 1 + w), --method for the others.
    assert _dit_options(parse_columns(["cfg:0.5"])[0]) == {"vanila_cfg": 1, "g_scale": 1.5}
    assert _dit_options(parse_columns(["cfg-m-swg:0.6,0.5"])[0]) == {"cfg_crop": 1, "g_scale": 0.6,
                                                                     "crop_scale": 0.5, "mask": 1}
    assert _dit_options(parse_columns(["m-swg:1.5"])[0]) == {"crop": 1, "g_scale": 1.5, "mask": 1}
    assert _dit_options(parse_columns(["apg-m-swg:1,0.2"])[0]) == {"method": "apg-swg", "weights": [1.0, 0.2],
                                                                   "mask": 1}
    assert _dit_options(parse_columns(["none"])[0]) == {}
    with pytest.raises(UsageError, match="DiT has no weaker model"):
        _dit_options(parse_columns(["wmg:1"])[0])


def test_a_zoo_column_is_the_image_the_sampler_writes():
    from sampling import edm2_run

    cols = ["apg-m-swg:0.4,0.2", "pag:2"]
    grid = edm2_grid("demo-digits-cond", cols, seeds=[0, 1], net_uncond="demo-digits-uncond", swg_sizes=12,
                     steps=2, device="cpu")
    for c, (method, weights, neg) in enumerate([("apg-swg", "0.4,0.2", "demo-digits-uncond"), ("pag", "2", None)]):
        cfg = edm2_run.build_config(net_pos_pkl="demo-digits-cond", net_neg_pkl=neg, g_method=method,
                                    g_weight=weights, swg_sizes=12 if neg else None, steps=2, outdir=None,
                                    require_outdir=False, seeds="0-1", clean_combos=True)
        backend = edm2_run.EDM2Backend(cfg)
        backend.load("cpu")
        expect = backend.images([0, 1], "cpu").permute(0, 2, 3, 1).numpy()
        assert np.array_equal(grid.images[:, c], expect)
