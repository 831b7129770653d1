"""Sampling presets: named settings (networks, method, weights, windows) with their published scores.

``sample_edm2.py --preset NAME`` fills the options you leave out; ``--list_presets``
prints this table.  Networks are names of :data:`networks.zoo.MODELS`.

Guidance weights use the paper's convention ``D = D_pos + w (D_pos - D_neg)``.
EDM2's own presets are written as ``gnet + g (net - gnet)``, so ``w = g - 1``.
Scores are FID / FD-DINOv2 on 50k ImageNet images as published (EDM2 paper and
README; the SWG README for the ``swg-*`` presets).

The ``demo-digits*`` presets use the small digits models shipped in
``demo/models/`` (see ``demo/README.md``) and score with the demo's digit
classifier (``--metrics fd_digits`` against ``demo/refs/digits-ref.pkl``).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from guidance.table import METHODS
from networks.zoo import DEMO_REF, FULL, L_FULL, MODELS, REFS, T_16, T_8, XL_FULL, XXL_FULL, close_names, posthoc_url
from utils.errors import UsageError

__all__ = ["Preset", "PRESETS", "get_preset", "preset_names", "format_presets"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sampling settings; ``None`` fields are left to the command line / defaults."""

    net_pos_pkl: str
    net_neg_pkl: Optional[str] = None
    g_method: str = "none"
    g_weight: Optional[tuple] = None
    swg_sizes: Optional[tuple] = None
    swg_steps: Optional[tuple] = None
    scale_window_guide: Optional[int] = None
    ref_path: Optional[str] = None
    metrics: Optional[str] = None         # --metrics filled in by the preset (demo presets only)
    g_params: Optional[dict] = None       # the method's parameters (guidance.table: APG's eta ...)
    fid: Optional[float] = None           # published FID
    fd_dinov2: Optional[float] = None     # published FD-DINOv2
    source: str = ""                      # where the numbers come from

    def settings(self) -> dict:
        """CLI option values this preset provides (only non-None ones)."""
        keys = ("net_pos_pkl", "net_neg_pkl", "g_method", "g_weight", "swg_sizes", "swg_steps",
                "scale_window_guide", "ref_path", "metrics", "g_params")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


def _edm2_presets() -> dict[str, Preset]:
    """EDM2's ``generate_images.py`` presets with their published scores (``w = g - 1``)."""
    p: dict[str, Preset] = {}
    src = "EDM2 generate_images.py presets"
    plain = [  # (res, size, kimg, ema, metric, score)
        (512, "xs", FULL, 0.135, "fid", 3.53), (512, "xs", FULL, 0.200, "dino", 103.39),
        (512, "s", FULL, 0.130, "fid", 2.56), (512, "s", FULL, 0.190, "dino", 68.64),
        (512, "m", FULL, 0.100, "fid", 2.25), (512, "m", FULL, 0.155, "dino", 58.44),
        (512, "l", L_FULL, 0.085, "fid", 2.06), (512, "l", L_FULL, 0.155, "dino", 52.25),
        (512, "xl", XL_FULL, 0.085, "fid", 1.96), (512, "xl", XL_FULL, 0.155, "dino", 45.96),
        (512, "xxl", XXL_FULL, 0.070, "fid", 1.91), (512, "xxl", XXL_FULL, 0.150, "dino", 42.84),
        (64, "s", 1073741, 0.075, "fid", 1.58), (64, "m", FULL, 0.060, "fid", 1.43),
        (64, "l", 1073741, 0.040, "fid", 1.33), (64, "xl", 671088, 0.040, "fid", 1.33),
    ]
    for res, size, kimg, ema, metric, score in plain:
        p[f"edm2-img{res}-{size}-{metric}"] = Preset(
            posthoc_url(size, kimg, ema, res), ref_path=REFS[f"img{res}"], source=src,
            **({"fid": score} if metric == "fid" else {"fd_dinov2": score}))
    guided = [  # (name, net (size, kimg, ema), gnet (size, kimg, ema), g, metric, score, method, res)
        ("xs-guid-fid", ("xs", FULL, 0.045), ("xs-uncond", FULL, 0.045), 1.40, "fid", 2.91, "cfg", 512),
        ("xs-guid-dino", ("xs", FULL, 0.150), ("xs-uncond", FULL, 0.150), 1.70, "dino", 79.94, "cfg", 512),
        ("s-guid-fid", ("s", FULL, 0.025), ("xs-uncond", FULL, 0.025), 1.40, "fid", 2.23, "cfg", 512),
        ("s-guid-dino", ("s", FULL, 0.085), ("xs-uncond", FULL, 0.085), 1.90, "dino", 52.32, "cfg", 512),
        ("m-guid-fid", ("m", FULL, 0.030), ("xs-uncond", FULL, 0.030), 1.20, "fid", 2.01, "cfg", 512),
        ("m-guid-dino", ("m", FULL, 0.015), ("xs-uncond", FULL, 0.015), 2.00, "dino", 41.98, "cfg", 512),
        ("l-guid-fid", ("l", L_FULL, 0.015), ("xs-uncond", FULL, 0.015), 1.20, "fid", 1.88, "cfg", 512),
        ("l-guid-dino", ("l", L_FULL, 0.035), ("xs-uncond", FULL, 0.035), 1.70, "dino", 38.20, "cfg", 512),
        ("xl-guid-fid", ("xl", XL_FULL, 0.020), ("xs-uncond", FULL, 0.020), 1.20, "fid", 1.85, "cfg", 512),
        ("xl-guid-dino", ("xl", XL_FULL, 0.030), ("xs-uncond", FULL, 0.030), 1.70, "dino", 35.67, "cfg", 512),
        ("xxl-guid-fid", ("xxl", XXL_FULL, 0.015), ("xs-uncond", FULL, 0.015), 1.20, "fid", 1.81, "cfg", 512),
        ("xxl-guid-dino", ("xxl", XXL_FULL, 0.015), ("xs-uncond", FULL, 0.015), 1.70, "dino", 33.09, "cfg", 512),
        ("s-autog-fid", ("s", FULL, 0.070), ("xs", T_16, 0.125), 2.10, "fid", 1.34, "wmg", 512),
        ("s-autog-dino", ("s", FULL, 0.120), ("xs", T_16, 0.165), 2.45, "dino", 36.67, "wmg", 512),
        ("xxl-autog-fid", ("xxl", XXL_FULL, 0.075), ("m", T_8, 0.155), 2.05, "fid", 1.25, "wmg", 512),
        ("xxl-autog-dino", ("xxl", XXL_FULL, 0.130), ("m", T_8, 0.205), 2.30, "dino", 24.18, "wmg", 512),
        ("s-uncond-autog-fid", ("s-uncond", FULL, 0.070), ("xs-uncond", T_16, 0.110), 2.85, "fid", 3.86, "wmg", 512),
        ("s-uncond-autog-dino", ("s-uncond", FULL, 0.090), ("xs-uncond", T_16, 0.125), 2.90, "dino", 90.39, "wmg", 512),
        ("s-autog-fid", ("s", 1073741, 0.045), ("xs", T_16, 0.110), 1.70, "fid", 1.01, "wmg", 64),
        ("s-autog-dino", ("s", 1073741, 0.105), ("xs", T_16, 0.175), 2.20, "dino", 31.85, "wmg", 64),
    ]
    for name, net, gnet, g, metric, score, method, res in guided:
        p[f"edm2-img{res}-{name}"] = Preset(
            posthoc_url(*net, res=res), posthoc_url(*gnet, res=res), method, (round(g - 1, 6),),
            ref_path=REFS[f"img{res}"], source=src, **({"fid": score} if metric == "fid" else {"fd_dinov2": score}))
    return p


def _swg_presets() -> dict[str, Preset]:
    """One preset per row of the SWG README's EDM2 table (EDM2-S, 40x40 windows, 2 per axis)."""
    src = "SWG README, EDM2 table (reproduced with the reference code)"
    win = dict(swg_sizes=(40,), swg_steps=(2,), scale_window_guide=1, ref_path=REFS["img512"], source=src)
    s = MODELS["raw-img512-s"]
    return {
        "swg-edm2-s-rt-mswg": Preset(s, MODELS["raw-img512-s-T16"], "wmg-swg", (1.2, 0.25), fid=3.35,
                                     fd_dinov2=40.94, **win),
        "swg-edm2-s-rct-mswg": Preset(s, MODELS["raw-img512-xs-T16"], "wmg-swg", (1.2, 0.14), fid=3.22,
                                      fd_dinov2=39.17, **win),
        "swg-edm2-s-mswg-0.2": Preset(s, None, "swg", (0.2,), fid=2.55, fd_dinov2=81.35, **win),
        "swg-edm2-s-mswg-1.1": Preset(s, None, "swg", (1.1,), fid=4.96, fd_dinov2=53.45, **win),
        "swg-edm2-s-cfg-mswg": Preset(s, MODELS["raw-img512-xs-uncond"], "cfg-swg", (0.3, 0.3), fid=7.57,
                                      fd_dinov2=51.86, **win),
    }


def _negative_presets() -> dict[str, Preset]:
    """The paper's positive/negative pairs (RT, RCT, CFG) without fixed weights."""
    src = "SWG paper negatives"
    r = REFS["img512"]
    return {
        "swg-edm2-s-rt": Preset(MODELS["raw-img512-s"], MODELS["raw-img512-s-T16"], "wmg", ref_path=r, source=src),
        "swg-edm2-s-rct": Preset(MODELS["raw-img512-s"], MODELS["raw-img512-xs-T16"], "wmg", ref_path=r, source=src),
        "swg-edm2-s-cfg": Preset(MODELS["raw-img512-s"], MODELS["raw-img512-xs-uncond"], "cfg", ref_path=r,
                                 source=src),
        "swg-edm2-xxl-rt": Preset(MODELS["raw-img512-xxl"], MODELS["raw-img512-xxl-T8"], "wmg", ref_path=r,
                                  source=src),
        "swg-edm2-xxl-rct": Preset(MODELS["raw-img512-xxl"], MODELS["raw-img512-m-T8"], "wmg", ref_path=r,
                                   source=src),
    }


def _demo_presets() -> dict[str, Preset]:
    """The offline digits demo (``demo/run_demo.py``): the paper's EDM2-S weights, windows 12x12 of 16x16.

    ``demo-digits`` is M-SWG on the class-conditional model; ``-uncond`` / ``-rt`` /
    ``-rct`` pair it with the CFG / RT / RCT negative (cfg 0.4, wmg 1.2);
    ``-*-mswg`` are the combinations.  No weight was tuned on digits; measured
    demo FD / confidence are in ``demo/README.md`` (no guidance lowered FD there).
    """
    src = "offline digits demo (demo/README.md)"
    pos = MODELS["demo-digits-cond"]
    base = dict(ref_path=DEMO_REF, metrics="fd_digits", source=src)
    win = dict(swg_sizes=(12,), swg_steps=(2,), scale_window_guide=1, **base)
    neg = {k: MODELS[f"demo-digits-{k}"] for k in ("uncond", "rt", "rct")}
    return {
        "demo-digits": Preset(pos, None, "swg", (0.2,), **win),
        "demo-digits-none": Preset(pos, None, "none", **base),
        "demo-digits-uncond": Preset(pos, neg["uncond"], "cfg", (0.4,), **base),
        "demo-digits-rt": Preset(pos, neg["rt"], "wmg", (1.2,), **base),
        "demo-digits-rct": Preset(pos, neg["rct"], "wmg", (1.2,), **base),
        "demo-digits-rt-mswg": Preset(pos, neg["rt"], "wmg-swg", (1.2, 0.25), **win),
        "demo-digits-rct-mswg": Preset(pos, neg["rct"], "wmg-swg", (1.2, 0.14), **win),
        "demo-digits-cfg-mswg": Preset(pos, neg["uncond"], "cfg-swg", (0.3, 0.3), **win),
    }


# The methods of the guidance zoo at their papers' default parameters (guidance.table; docs/guidance.md).
# Weights in this project's convention D = D_pos + w rule(D_pos, D_neg) (diffusers' guidance_scale = 1 + w).
# None of these methods has published EDM2 or digits weights: the weight is the CFG weight of the
# same negative (EDM2-S: EDM2's guid-fid g = 1.4, w = 0.4; digits: the demo's cfg 0.4); FDG gives the
# high band that weight and the low band half of it (diffusers' example ratio 10 : 5).
ZOO_PARAMS = {
    "apg": ((0.4,), {"eta": 0.0, "momentum": -0.5, "norm_threshold": 0.0}),   # APG paper: eta 0, beta -0.5
    "cfg-zero": ((0.4,), {"zero_steps": 1}),                                 # CFG-Zero*: first ~4% of steps
    "fdg": ((0.2, 0.4), {}),
    "tcfg": ((0.4,), {}),
}


def _method_presets(name: str, weights: tuple, uncond: bool, **extra) -> dict[str, Preset]:
    """``name`` alone and with M-SWG (SWG weight 0.2) on EDM2-S and on the digits demo; with ``uncond``
    the negative is the unconditional network of each (XS-uncond for EDM2-S)."""
    s_win = dict(swg_sizes=(40,), swg_steps=(2,), scale_window_guide=1)
    d_win = dict(swg_sizes=(12,), swg_steps=(2,), scale_window_guide=1)
    edm2 = dict(ref_path=REFS["img512"], **extra)
    demo = dict(ref_path=DEMO_REF, metrics="fd_digits", **extra)
    s, s_neg = MODELS["raw-img512-s"], MODELS["raw-img512-xs-uncond"] if uncond else None
    d, d_neg = MODELS["demo-digits-cond"], MODELS["demo-digits-uncond"] if uncond else None
    return {f"swg-edm2-s-{name}": Preset(s, s_neg, name, weights, **edm2),
            f"swg-edm2-s-{name}-mswg": Preset(s, s_neg, f"{name}-swg", (*weights, 0.2), **s_win, **edm2),
            f"demo-digits-{name}": Preset(d, d_neg, name, weights, **demo),
            f"demo-digits-{name}-mswg": Preset(d, d_neg, f"{name}-swg", (*weights, 0.2), **d_win, **demo)}


def _zoo_presets() -> dict[str, Preset]:
    """Each zoo rule alone and with M-SWG, against the unconditional network (ZOO_PARAMS)."""
    p: dict[str, Preset] = {}
    for name, (weights, params) in ZOO_PARAMS.items():
        p.update(_method_presets(name, weights, True, g_params=params or None,
                                 source="zoo defaults (sampling/presets.py ZOO_PARAMS)"))
    return p


def _perturb_presets() -> dict[str, Preset]:
    """PAG, SEG, SLG (no second network) at the weights their papers publish (the table's ``example``:
    PAG 3.0, SEG 3.0, SLG 2.8), default blocks, alone and with M-SWG."""
    p: dict[str, Preset] = {}
    for name in (n for n, spec in METHODS.items() if spec.perturbation and not spec.pairing):
        p.update(_method_presets(name, METHODS[name].example, False, source="published default weight "
                                 "(guidance.table), default blocks (guidance.perturb)"))
    return p


PRESETS: dict[str, Preset] = {**_edm2_presets(), **_swg_presets(), **_negative_presets(), **_demo_presets(),
                              **_zoo_presets(), **_perturb_presets()}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        close = close_names(name, PRESETS)
        hint = f"did you mean {', '.join(close)}?" if close else "`list_presets` lists them"
        raise UsageError(f"unknown preset {name!r}; {hint}") from None


def _short(address: Optional[str]) -> str:
    """A model's name in :data:`networks.zoo.MODELS`, else its file name."""
    if not address:
        return "-"
    names = [k for k, v in MODELS.items() if v == address]
    return names[0] if names else address.rsplit("/", 1)[-1]


def format_presets() -> str:
    """The presets as a text table: name, method, weights, windows, networks, published scores."""
    rows = [("preset", "method", "g_weight", "swg_sizes", "positive", "negative", "FID", "FD-DINOv2", "params")]
    for name in preset_names():
        p = PRESETS[name]
        params = ",".join(f"{k}={v:g}" for k, v in (p.g_params or {}).items()) or "-"
        rows.append((name, p.g_method, ",".join(f"{w:g}" for w in p.g_weight or ()) or "-",
                     ",".join(map(str, p.swg_sizes or ())) or "-", _short(p.net_pos_pkl), _short(p.net_neg_pkl),
                     f"{p.fid:g}" if p.fid is not None else "-",
                     f"{p.fd_dinov2:g}" if p.fd_dinov2 is not None else "-", params))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
