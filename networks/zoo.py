"""Addresses of pretrained EDM2 models and reference statistics: one table, :data:`MODELS`.

Sampling presets (:mod:`sampling.presets`) refer to these names, and the samplers
accept a name wherever they take a network (``--net_pos_pkl raw-img512-s``).
Addresses follow NVlabs' layout:

* post-hoc EMA reconstructions:
  ``{EDM2_ROOT}/posthoc-reconstructions/edm2-img{res}-{size}-{kimg:07d}-{ema:.3f}.pkl``;
* raw training snapshots, one folder per training run named like the run:
  ``{EDM2_ROOT}/raw-snapshots/edm2-img{res}-{run}/edm2-img{res}-{run}-{kimg:07d}-{ema:.3f}.pkl``.
  (The paper's bash script points the XXL and M snapshots into ``edm2-img512-xl/``;
  the folder is the run's own, ``edm2-img512-xxl/`` and ``edm2-img512-m/``.)

The ``demo-digits-*`` names are the small digits models shipped in
``demo/models/`` (see ``demo/README.md``); their paths are absolute, resolved
from this file's location, so they work from any working directory.
"""

from __future__ import annotations

import difflib
import os
import pathlib
from typing import Optional

from utils.errors import UsageError

__all__ = ["EDM2_ROOT", "REFS", "VAE", "REPO", "DEMO_MODELS", "DEMO_REF", "posthoc_url", "raw_url", "MODELS",
           "resolve_model", "close_names"]

EDM2_ROOT = "https://nvlabs-fi-cdn.nvidia.com/edm2"
VAE = "stabilityai/sd-vae-ft-mse"
REFS = {
    "img512": f"{EDM2_ROOT}/dataset-refs/img512.pkl",
    "img64": f"{EDM2_ROOT}/dataset-refs/img64.pkl",
}

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO_MODELS = REPO / "demo" / "models"
DEMO_REF = str(REPO / "demo" / "refs" / "digits-ref.pkl")

FULL = 2147483          # 2^31 training images
T_16 = 134217           # 1/16 of the training
T_8 = 268435            # 1/8 of the training
XXL_FULL = 939524       # XXL's full run
L_FULL, XL_FULL = 1879048, 1342177


def posthoc_url(size: str, kimg: int, ema: float, res: int = 512) -> str:
    """Post-hoc EMA reconstruction ``edm2-img{res}-{size}-{kimg}-{ema}.pkl`` (size may end in ``-uncond``)."""
    return f"{EDM2_ROOT}/posthoc-reconstructions/edm2-img{res}-{size}-{kimg:07d}-{ema:.3f}.pkl"


def raw_url(run: str, kimg: int, ema: float = 0.100, res: int = 512) -> str:
    """Raw training snapshot; the folder is named after the run (``edm2-img512-xxl/...``)."""
    name = f"edm2-img{res}-{run}"
    return f"{EDM2_ROOT}/raw-snapshots/{name}/{name}-{kimg:07d}-{ema:.3f}.pkl"


def _models() -> dict[str, str]:
    m: dict[str, str] = {}
    # Raw snapshots used by the SWG paper (positives, RT/RCT negatives, unconditional XS for CFG).
    m["raw-img512-s"] = raw_url("s", FULL)
    m["raw-img512-s-T16"] = raw_url("s", T_16)                  # RT negative for S
    m["raw-img512-xs-T16"] = raw_url("xs", T_16)                # RCT negative for S
    m["raw-img512-xs-uncond"] = raw_url("xs-uncond", FULL)      # CFG negative for S
    m["raw-img512-xxl"] = raw_url("xxl", XXL_FULL)
    m["raw-img512-xxl-T8"] = raw_url("xxl", T_8)                # RT negative for XXL (T/3.5 of its run)
    m["raw-img512-m-T8"] = raw_url("m", T_8)                    # RCT negative for XXL
    for size in ("xs", "s", "m"):
        m[f"raw-img512-{size}"] = raw_url(size, FULL)
    m["raw-img512-l"] = raw_url("l", L_FULL)
    m["raw-img512-xl"] = raw_url("xl", XL_FULL)
    # The offline demo's digits models (16x16, one channel), shipped in the repository.
    for name in ("cond", "uncond", "rt", "rct"):
        m[f"demo-digits-{name}"] = str(DEMO_MODELS / f"digits-{name}.safetensors")
    return m


MODELS: dict[str, str] = _models()




def close_names(name: str, names, n: int = 3) -> list[str]:
    """Up to ``n`` of ``names`` close to ``name`` (typos, case, a missing part), best first."""
    names = list(names)
    low = {k.lower(): k for k in names}
    out = [low[m] for m in difflib.get_close_matches(name.lower(), list(low), n=n, cutoff=0.6)]
    out += [k for k in names if name.lower() in k.lower() and k not in out]
    return out[:n]


def resolve_model(value: Optional[str], param: str = "net_pos_pkl") -> Optional[str]:
    """A model name of :data:`MODELS` becomes its address; URLs and existing paths pass through.

    A value that is neither, but close to a model name, is refused with suggestions (a typo
    in a name would otherwise be reported as a missing file).
    """
    if value is None:
        return None
    value = str(value)
    if value in MODELS:
        return MODELS[value]
    if "://" in value or os.path.exists(os.path.expanduser(value)):
        return value
    close = close_names(value, MODELS)
    if close:
        raise UsageError(f"`{param}` {value} not found: no such file and no such model name; did you mean "
                         f"{', '.join(close)}? (`list_presets` lists the models)")
    return value
