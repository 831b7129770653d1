"""networks.zoo (addresses, the folder-naming rule) and sampling.presets (published scores, the SWG table)."""

from __future__ import annotations

import re

import pytest

from networks import zoo as Z
from sampling import presets as PR
from utils.errors import UsageError

URL_RE = re.compile(r"^https://nvlabs-fi-cdn\.nvidia\.com/edm2/(posthoc-reconstructions/edm2-img(512|64)-[a-z-]+-\d{7}"
                    r"-\d\.\d{3}\.pkl|raw-snapshots/(edm2-img512-[a-z-]+)/(edm2-img512-[a-z-]+)-\d{7}-0\.100\.pkl)$")


def test_every_address_is_well_formed_and_raw_folders_match_runs():
    urls = [u for u in Z.MODELS.values() if u.startswith("https://")]
    for p in PR.PRESETS.values():
        urls += [u for u in (p.net_pos_pkl, p.net_neg_pkl) if u and u.startswith("https://")]
    assert len(urls) > 40
    for url in urls:
        m = URL_RE.match(url)
        assert m, url
        if m.group(3):
            assert m.group(3) == m.group(4), url  # folder named after the run


def test_paper_addresses():
    assert Z.MODELS["raw-img512-s"].endswith("raw-snapshots/edm2-img512-s/edm2-img512-s-2147483-0.100.pkl")
    assert Z.MODELS["raw-img512-xs-T16"].endswith("raw-snapshots/edm2-img512-xs/edm2-img512-xs-0134217-0.100.pkl")
    # The reference script's edm2-img512-xl/ folder for these two is corrected.
    assert Z.MODELS["raw-img512-xxl-T8"].endswith("raw-snapshots/edm2-img512-xxl/edm2-img512-xxl-0268435-0.100.pkl")
    assert Z.MODELS["raw-img512-m-T8"].endswith("raw-snapshots/edm2-img512-m/edm2-img512-m-0268435-0.100.pkl")
    assert Z.MODELS["raw-img512-xxl"].endswith("edm2-img512-xxl/edm2-img512-xxl-0939524-0.100.pkl")
    assert Z.MODELS["raw-img512-xs-uncond"].endswith(
        "raw-snapshots/edm2-img512-xs-uncond/edm2-img512-xs-uncond-2147483-0.100.pkl")
    assert Z.REFS["img512"] == "https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl"


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
        assert p.net_neg_pkl == (Z.MODELS[neg] if neg else None)
        assert p.net_pos_pkl == Z.MODELS["raw-img512-s"]
        assert (p.swg_sizes, p.swg_steps, p.scale_window_guide) == ((40,), (2,), 1)
        assert p.settings()["g_method"] == method and "fid" not in p.settings()


def test_unknown_preset_and_model_names():
    with pytest.raises(UsageError, match="unknown preset 'edm2-s-fid'"):
        PR.get_preset("edm2-s-fid")
    assert Z.resolve_model("raw-img512-s") == Z.MODELS["raw-img512-s"]
    assert Z.resolve_model("/tmp/x.pkl") == "/tmp/x.pkl" and Z.resolve_model(None) is None


def test_demo_presets_point_at_the_shipped_files_from_any_directory(tmp_path, monkeypatch):
    import json
    import pathlib

    from sampling.edm2_run import build_config

    repo = pathlib.Path(__file__).resolve().parents[1]
    local = {n: v for n, v in Z.MODELS.items() if not v.startswith("https://")}
    assert set(local) == {"demo-digits-cond", "demo-digits-uncond", "demo-digits-rt", "demo-digits-rct"}
    rows = {  # name: (method, weights, negative model file, windows)
        "demo-digits": ("swg", (0.2,), None, True),
        "demo-digits-none": ("none", None, None, False),
        "demo-digits-uncond": ("cfg", (0.4,), "digits-uncond", False),
        "demo-digits-rt": ("wmg", (1.2,), "digits-rt", False),
        "demo-digits-rct": ("wmg", (1.2,), "digits-rct", False),
        "demo-digits-rt-mswg": ("wmg-swg", (1.2, 0.25), "digits-rt", True),
        "demo-digits-rct-mswg": ("wmg-swg", (1.2, 0.14), "digits-rct", True),
        "demo-digits-cfg-mswg": ("cfg-swg", (0.3, 0.3), "digits-uncond", True),
        # The guidance zoo, each alone and with M-SWG (weight 0.2), the CFG negative.
        **{f"demo-digits-{m}": (m, w, "digits-uncond", False) for m, w in (
            ("apg", (0.4,)), ("cfg-zero", (0.4,)), ("fdg", (0.2, 0.4)), ("tcfg", (0.4,)))},
        **{f"demo-digits-{m}-mswg": (f"{m}-swg", w, "digits-uncond", True) for m, w in (
            ("apg", (0.4, 0.2)), ("cfg-zero", (0.4, 0.2)), ("fdg", (0.2, 0.4, 0.2)), ("tcfg", (0.4, 0.2)))},
        # Perturbed passes of the positive network: no second network.
        **{f"demo-digits-{m}": (m, (w,), None, False) for m, w in (("pag", 3.0), ("seg", 3.0), ("slg", 2.8))},
        **{f"demo-digits-{m}-mswg": (f"{m}-swg", (w, 0.2), None, True)
           for m, w in (("pag", 3.0), ("seg", 3.0), ("slg", 2.8))},
    }
    assert {n for n in PR.PRESETS if n.startswith("demo-")} == set(rows)
    monkeypatch.chdir(tmp_path)  # nothing may depend on the working directory
    for name, (method, w, neg, windows) in rows.items():
        p = PR.get_preset(name)
        assert (p.g_method, p.g_weight) == (method, w), name
        assert p.net_pos_pkl == str(repo / "demo" / "models" / "digits-cond.safetensors")
        assert p.net_neg_pkl == (str(repo / "demo" / "models" / f"{neg}.safetensors") if neg else None)
        assert (p.swg_sizes, p.swg_steps) == (((12,), (2,)) if windows else (None, None))
        assert p.settings()["ref_path"] == str(repo / "demo" / "refs" / "digits-ref.pkl")
        assert p.settings()["metrics"] == "fd_digits"
        for path in (p.net_pos_pkl, p.net_neg_pkl, p.ref_path):
            if path:
                assert pathlib.Path(path).is_absolute() and pathlib.Path(path).is_file(), path
        cfg = build_config(preset=name, outdir=str(tmp_path / "out"), seeds="0-15")
        assert (cfg.guidance.method, cfg.net_pos_pkl, cfg.ref_path) == (method, p.net_pos_pkl, p.ref_path)
    meta = json.loads((repo / "demo" / "models" / "digits-cond.json").read_text())
    assert meta["init_kwargs"]["img_resolution"] == 16  # 12x12 windows, 2 per axis, fit 16x16
    assert not (repo / "demo" / "presets.json").exists()  # one source of truth: this module
