"""networks.presets: addresses, the folder-naming rule, published scores, the SWG table."""

from __future__ import annotations

import re

import pytest

from networks import presets as PR
from utils.errors import UsageError

URL_RE = re.compile(r"^https://nvlabs-fi-cdn\.nvidia\.com/edm2/(posthoc-reconstructions/edm2-img(512|64)-[a-z-]+-\d{7}"
                    r"-\d\.\d{3}\.pkl|raw-snapshots/(edm2-img512-[a-z-]+)/(edm2-img512-[a-z-]+)-\d{7}-0\.100\.pkl)$")


def test_every_address_is_well_formed_and_raw_folders_match_runs():
    urls = list(PR.MODELS.values())
    for p in PR.PRESETS.values():
        urls += [p.net_pos_pkl] + ([p.net_neg_pkl] if p.net_neg_pkl else [])
    for url in urls:
        m = URL_RE.match(url)
        assert m, url
        if m.group(3):
            assert m.group(3) == m.group(4), url  # folder named after the run


def test_paper_addresses():
    assert PR.MODELS["raw-img512-s"].endswith("raw-snapshots/edm2-img512-s/edm2-img512-s-2147483-0.100.pkl")
    assert PR.MODELS["raw-img512-xs-T16"].endswith("raw-snapshots/edm2-img512-xs/edm2-img512-xs-0134217-0.100.pkl")
    # The reference script's edm2-img512-xl/ folder for these two is corrected.
    assert PR.MODELS["raw-img512-xxl-T8"].endswith("raw-snapshots/edm2-img512-xxl/edm2-img512-xxl-0268435-0.100.pkl")
    assert PR.MODELS["raw-img512-m-T8"].endswith("raw-snapshots/edm2-img512-m/edm2-img512-m-0268435-0.100.pkl")
    assert PR.MODELS["raw-img512-xxl"].endswith("edm2-img512-xxl/edm2-img512-xxl-0939524-0.100.pkl")
    assert PR.MODELS["raw-img512-xs-uncond"].endswith(
        "raw-snapshots/edm2-img512-xs-uncond/edm2-img512-xs-uncond-2147483-0.100.pkl")
    assert PR.REFS["img512"] == "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl"


def test_edm2_presets_and_scores():
    s = PR.get_preset("edm2-img512-s-fid")
    assert s.net_pos_pkl.endswith("posthoc-reconstructions/edm2-img512-s-2147483-0.130.pkl") and s.fid == 2.56
    assert PR.get_preset("edm2-img512-s-dino").fd_dinov2 == 68.64
    cfg = PR.get_preset("edm2-img512-s-guid-dino")
    assert cfg.g_method == "cfg" and cfg.g_weight == (0.9,) and cfg.fd_dinov2 == 52.32
    assert cfg.net_neg_pkl.endswith("edm2-img512-xs-uncond-2147483-0.085.pkl")
    ag = PR.get_preset("edm2-img512-xxl-autog-dino")
    assert ag.g_method == "wmg" and ag.g_weight == (1.3,) and ag.fd_dinov2 == 24.18
    assert ag.net_neg_pkl.endswith("edm2-img512-m-0268435-0.205.pkl")
    assert PR.get_preset("edm2-img512-s-autog-fid").fid == 1.34
    assert PR.get_preset("edm2-img512-xxl-fid").fid == 1.91
    assert PR.get_preset("edm2-img64-s-fid").ref_path.endswith("img64.pkl")
    sizes = {n.split("-")[2] for n in PR.PRESETS if n.startswith("edm2-img512-") and n.endswith("-fid")}
    assert {"xs", "s", "m", "l", "xl", "xxl"} <= sizes


def test_swg_table_rows():
    rows = {  # name: (method, weights, neg model, FID, FDD) from the seed README's EDM2 table
        "swg-edm2-s-rt-mswg": ("wmg-swg", (1.2, 0.25), "raw-img512-s-T16", 3.35, 40.94),
        "swg-edm2-s-rct-mswg": ("wmg-swg", (1.2, 0.14), "raw-img512-xs-T16", 3.22, 39.17),
        "swg-edm2-s-mswg-0.2": ("swg", (0.2,), None, 2.55, 81.35),
        "swg-edm2-s-mswg-1.1": ("swg", (1.1,), None, 4.96, 53.45),
        "swg-edm2-s-cfg-mswg": ("cfg-swg", (0.3, 0.3), "raw-img512-xs-uncond", 7.57, 51.86),
    }
    for name, (method, w, neg, fid, fdd) in rows.items():
        p = PR.get_preset(name)
        assert (p.g_method, p.g_weight, p.fid, p.fd_dinov2) == (method, w, fid, fdd)
        assert p.net_neg_pkl == (PR.MODELS[neg] if neg else None)
        assert p.net_pos_pkl == PR.MODELS["raw-img512-s"]
        assert (p.swg_sizes, p.swg_steps, p.scale_window_guide) == ((40,), (2,), 1)
        assert p.settings()["g_method"] == method and "fid" not in p.settings()


def test_unknown_preset_and_model_names():
    with pytest.raises(UsageError, match="unknown preset 'edm2-s-fid'"):
        PR.get_preset("edm2-s-fid")
    assert PR.resolve_model("raw-img512-s") == PR.MODELS["raw-img512-s"]
    assert PR.resolve_model("/tmp/x.pkl") == "/tmp/x.pkl" and PR.resolve_model(None) is None
