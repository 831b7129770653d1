"""The method table: every guidance method's facts, declared once.

Each :class:`MethodSpec` says what a method is called (and which other spellings
mean it), which weights it takes, which second network it needs, whether it uses
the sliding windows and how its :class:`guidance.methods.Guider` is built.  The
samplers, presets, sweeps, search, results and the diffusers integration read
this table; nothing else lists methods.

>>> spec = method_spec("cfg_swg")          # aliases resolve to the canonical name
>>> spec.name, spec.weights, spec.negative
('cfg-swg', ('w_neg', 'w_swg'), 'uncond')
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Callable, Dict, List, Optional, Tuple

from utils.errors import UsageError

from .methods import (CFG, FDG, SWG, TCFG, WMG, APGuidance, CFGZeroStar, Guider, NegSWG, NoGuidance,
                      PerturbedGuidance, PlusSWG)

__all__ = ["GuidanceError", "MethodSpec", "Param", "METHODS", "method_spec", "method_names", "NEGATIVES",
           "check_sigma_interval", "method_params", "method_param_names", "method_param_help", "parse_sigma_interval"]


class GuidanceError(UsageError, ValueError):
    """A guidance configuration that cannot work (unknown method, wrong weight count, missing negative ...)."""


# What a method's second network is: the key is MethodSpec.negative.
NEGATIVES = {"uncond": "an unconditional network", "weak": "a weaker network"}


@dataclasses.dataclass(frozen=True)
class Param:
    """A method parameter besides the weights (APG's ``eta`` ...): default, range, one-line help."""

    name: str
    default: float
    help: str
    lo: float = -math.inf
    hi: float = math.inf
    integer: bool = False

    def check(self, value, method: str) -> float:
        try:
            v = int(value) if self.integer and float(value) == int(float(value)) else float(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            v = math.nan
        if not math.isfinite(v) and str(value).strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise GuidanceError(f"`{self.name}`: '{value}' is not finite; give ordinary numbers")
        if self.integer and not isinstance(v, int) or not (self.lo <= v <= self.hi):
            kind = "an integer" if self.integer else "a number"
            raise GuidanceError(f"`{self.name}` of method {method} must be {kind} in [{self.lo:g}, {self.hi:g}], "
                                f"got {value!r}; e.g. `{self.name}` {self.default:g} (its default)")
        return v


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One guidance method.

    ``build(weights, **options)`` returns the method's guider; ``weights`` has one float per
    name in :attr:`weights`; ``options`` holds only the keys listed in :attr:`options`
    (``masked``, ``reference_quirks`` ...) and the names of :attr:`params` (validated,
    defaults filled), each with a default in the builder.
    """

    name: str                                   # canonical spelling, e.g. "cfg-swg"
    equation: str                               # one line, for tables and --help
    weights: Tuple[str, ...]                    # weight names in order; len() is the count
    build: Callable[..., Guider]
    negative: Optional[str] = None              # None, or a key of NEGATIVES
    windows: bool = False                       # uses the sliding windows (needs a window size)
    options: Tuple[str, ...] = ()               # builder keywords besides the weights
    aliases: Tuple[str, ...] = ()               # other accepted spellings
    example: Tuple[float, ...] = ()             # example weights for error messages
    label: str = ""                             # display name, "SWG" read as "M-SWG" when masked
    params: Tuple[Param, ...] = ()              # method parameters besides the weights
    paper: str = ""                             # where the method comes from
    base: str = ""                              # for "X-swg" pairings: the method X
    perturbation: Optional[str] = None          # a perturbed pass of the positive network (guidance.perturb.KINDS)
    pairing: bool = False                       # an "X-swg" made from X by _swg_pair (not one of the paper's)

    @property
    def num_weights(self) -> int:
        return len(self.weights)

    @property
    def needs_neg(self) -> bool:
        return self.negative is not None

    def param_values(self, **given) -> Dict[str, float]:
        """This method's parameters: ``given`` values checked (None keeps the default)."""
        return {p.name: p.default if given.get(p.name) is None else p.check(given[p.name], self.name)
                for p in self.params}

    def make(self, weights=(), **options) -> Guider:
        """Build the guider from ``weights`` (checked against the count), the known ``options`` and parameters.

        ``sigma_interval=(lo, hi)`` limits the terms of the negative (CFG, autoguidance ...) to
        ``lo < sigma <= hi``; ``swg_sigma_interval`` limits the window term the same way.
        """
        ws = tuple(float(w) for w in weights)
        if len(ws) != self.num_weights:
            raise GuidanceError(f"method {self.name!r} takes {self.num_weights} weight(s), got {len(ws)} "
                                f"({weights!r}); e.g. `weight` {self.example_text()}")
        params = self.param_values(**options)
        guider = self.build(ws, **{k: v for k, v in options.items() if k in self.options}, **params)
        for key, windows in (("sigma_interval", False), ("swg_sigma_interval", True)):
            lo_hi = options.get(key)
            if lo_hi is not None:
                lo_hi = check_sigma_interval(lo_hi, key)
                if windows and not self.windows:
                    raise GuidanceError(f"`{key}` limits the window term, but method {self.name} has none")
                guider.limit(sigmas=lo_hi, windows=windows)
        return guider

    def display(self, masked: bool = True) -> str:
        """Name for tables and plots: ``CFG+M-SWG`` for a masked ``cfg-swg``."""
        label = self.label or self.name
        return label.replace("SWG", "M-SWG") if self.windows and masked else label

    def example_text(self) -> str:
        return ",".join(f"{w:g}" for w in self.example) if self.example else "(none)"


def method_params(spec: MethodSpec, given: dict, param: str = "method") -> Dict[str, float]:
    """``spec``'s parameters from ``given`` (None = unset): checked, defaults filled; another method's refused."""
    given = {k: v for k, v in given.items() if v is not None}
    stray = sorted(set(given) - {p.name for p in spec.params})
    if stray:
        owners = sorted({s.base or s.name for s in METHODS.values() if any(p.name == stray[0] for p in s.params)})
        raise GuidanceError(f"`{stray[0]}` is a parameter of {' / '.join(owners) or 'no method'}; `{param}` "
                            f"{spec.name} does not use it (drop it" + (f" or choose e.g. `{param}` {owners[0]})"
                                                                       if owners else ")"))
    return spec.param_values(**given)


def method_param_names() -> List[str]:
    """Every method parameter of the table (APG's ``eta`` ...), each once: the keywords and flags that set them."""
    return list(dict.fromkeys(p.name for s in METHODS.values() for p in s.params))


def method_param_help() -> List[Tuple[str, str, type]]:
    """``(name, help, type)`` of every method parameter, for the command lines' flags (``type``: int or float)."""
    seen: Dict[str, Tuple[str, str, type]] = {}
    for spec in METHODS.values():
        for p in spec.params:
            seen.setdefault(p.name, (p.name, f"{p.help} [default: {p.default:g}]", int if p.integer else float))
    return list(seen.values())


def check_sigma_interval(lo_hi, what: str = "sigma_interval", given=None) -> Tuple[float, float]:
    """``(lo, hi)`` with ``0 <= lo < hi`` (``hi`` may be inf): the noise levels ``lo < sigma <= hi``
    (``given``: the value as the user wrote it, for the message)."""
    try:
        lo, hi = (float(v) for v in lo_hi)
    except (TypeError, ValueError):
        raise GuidanceError(f"`{what}` must be two noise levels lo,hi (guidance where lo < sigma <= hi, e.g. "
                            f"0.28,2.9), got {lo_hi if given is None else given!r}") from None
    if not (0 <= lo < hi) or math.isnan(hi):
        raise GuidanceError(f"`{what}` must satisfy 0 <= lo < hi, got {lo:g},{hi:g}; e.g. 0.28,2.9")
    return lo, hi


def parse_sigma_interval(text, what: str) -> Optional[Tuple[float, float]]:
    """``"lo,hi"`` / ``(lo, hi)`` -> checked ``(lo, hi)``; None, ``""`` or ``"none"`` -> None."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "")):
        return None
    return check_sigma_interval(text.split(",") if isinstance(text, str) else text, what, given=text)


_APG_PARAMS = (
    Param("eta", 0.0, "APG: weight of the part of D_pos - D_neg parallel to D_pos (1 = CFG)"),
    Param("norm_threshold", 0.0, "APG: cap r on the norm of D_pos - D_neg per sample (0 = no cap)", lo=0.0),
    Param("momentum", 0.0, "APG: momentum beta of the running difference (negative in the paper; 0 = off)",
          lo=-1.0, hi=1.0),
)
_ZERO_PARAMS = (Param("zero_steps", 1, "CFG-Zero*: sampler steps with the zero output (0 = none)", lo=0,
                      integer=True),)


def _swg_pair(spec: "MethodSpec", example_swg: float) -> "MethodSpec":
    """``X-swg``: method X plus an (M-)SWG term ``w_swg m (D_pos - D_win)`` with one more weight."""
    def build(ws, masked=True, **params):
        return PlusSWG(base=spec.build(ws[:-1], **params), w_swg=ws[-1], masked=masked)

    return MethodSpec(f"{spec.name}-swg", f"{spec.equation} + w_swg m (D_pos - D_win)", (*spec.weights, "w_swg"),
                      build, negative=spec.negative, windows=True, options=("masked",),
                      aliases=tuple(f"{a}-swg" for a in spec.aliases if "_" not in a) + (f"{spec.name}_swg",),
                      example=(*spec.example, example_swg), label=f"{spec.label}+SWG", params=spec.params,
                      paper=spec.paper, base=spec.name, perturbation=spec.perturbation, pairing=True)


_NEW = (
    MethodSpec("apg", "D = D_pos + w (d_orth + eta d_par), d = D_pos - D_uncond (momentum beta, norm cap r)", ("w",),
               lambda ws, eta=0.0, norm_threshold=0.0, momentum=0.0: APGuidance(
                   w=ws[0], eta=eta, norm_threshold=norm_threshold, momentum=momentum),
               negative="uncond", example=(1.0,), label="APG", params=_APG_PARAMS,
               paper="Sadat et al. 2024, Eliminating oversaturation and artifacts of high guidance scales"),
    MethodSpec("cfg-zero", "D = D_pos + w (D_pos - s* D_uncond), s* = <D_pos,D_uncond>/|D_uncond|^2; "
               "first K steps: zero output", ("w",),
               lambda ws, zero_steps=1: CFGZeroStar(w=ws[0], zero_steps=zero_steps),
               negative="uncond", aliases=("cfg-zero-star", "cfgzero", "cfg-zero*", "cfg_zero"), example=(0.4,),
               label="CFG-Zero*", params=_ZERO_PARAMS, paper="Fan et al. 2025, CFG-Zero*"),
    MethodSpec("fdg", "D = D_pos + w_low L(D_pos - D_uncond) + w_high H(D_pos - D_uncond)", ("w_low", "w_high"),
               lambda ws: FDG(w_low=ws[0], w_high=ws[1]), negative="uncond", example=(0.2, 1.0), label="FDG",
               paper="Sadat et al. 2025, Guidance in the frequency domain"),
    MethodSpec("tcfg", "D = D_pos + w (D_pos - P D_uncond), P: first right singular vector of [D_pos; D_uncond]",
               ("w",), lambda ws: TCFG(w=ws[0]), negative="uncond", example=(0.4,), label="TCFG",
               paper="Kwon et al. 2025, TCFG: tangential damping classifier-free guidance"),
)

# The positive network run once more with chosen blocks changed (guidance/perturb.py: blocks, seg_sigma).
_PERTURBED = (
    MethodSpec("pag", "D = D_pos + w (D_pos - D_pag), D_pag: identity self-attention maps in the chosen blocks",
               ("w",), lambda ws: PerturbedGuidance(w=ws[0], kind="pag"), perturbation="pag", example=(3.0,),
               label="PAG", paper="Ahn et al. 2024, Self-rectifying diffusion sampling with perturbed-attention guidance"),
    MethodSpec("seg", "D = D_pos + w (D_pos - D_seg), D_seg: self-attention queries blurred (Gaussian of width "
               "seg_sigma, inf = mean query) in the chosen blocks", ("w",),
               lambda ws: PerturbedGuidance(w=ws[0], kind="seg"), perturbation="seg", example=(3.0,), label="SEG",
               paper="Hong 2024, Smoothed energy guidance"),
    MethodSpec("slg", "D = D_pos + w (D_pos - D_slg), D_slg: the chosen blocks skipped", ("w",),
               lambda ws: PerturbedGuidance(w=ws[0], kind="slg"), perturbation="slg", example=(2.8,), label="SLG",
               paper="Stability AI 2024, skip-layer guidance (SD 3.5)"),
)

METHODS: Dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("none", "D = D_pos", (), lambda ws: NoGuidance(), label="no guidance"),
    MethodSpec("cfg", "D = D_pos + w (D_pos - D_uncond)", ("w",), lambda ws: CFG(w=ws[0]),
               negative="uncond", example=(1.0,), label="CFG", paper="Ho and Salimans 2022"),
    MethodSpec("wmg", "D = D_pos + w (D_pos - D_weak)", ("w",), lambda ws: WMG(w=ws[0]),
               negative="weak", aliases=("autoguidance",), example=(1.0,), label="WMG",
               paper="Karras et al. 2024, Guiding a diffusion model with a bad version of itself"),
    MethodSpec("swg", "D = D_pos + w m (D_pos - D_win)", ("w",),
               lambda ws, masked=True: SWG(w=ws[0], masked=masked),
               windows=True, options=("masked",), aliases=("mswg", "m-swg"), example=(0.2,), label="SWG",
               paper="Adaloglou, Kaiser et al. 2025, Guiding a diffusion model using sliding windows (arXiv 2411.10257)"),
    MethodSpec("wmg-swg", "D = D_pos + w1 (D_pos - D_weak) + w2 m (D_pos - D_win)", ("w_neg", "w_swg"),
               lambda ws, masked=True, reference_quirks=False: NegSWG(
                   w_neg=ws[0], w_swg=ws[1], masked=masked, reference_quirks=reference_quirks, neg_labels=True),
               negative="weak", windows=True, options=("masked", "reference_quirks"), aliases=("wmg_swg",),
               example=(1.2, 0.14), label="WMG+SWG", base="wmg"),
    MethodSpec("cfg-swg", "D = D_pos + w1 (D_pos - D_uncond) + w2 m (D_pos - D_win)", ("w_neg", "w_swg"),
               lambda ws, masked=True, reference_quirks=False: NegSWG(
                   w_neg=ws[0], w_swg=ws[1], masked=masked, reference_quirks=reference_quirks, neg_labels=False),
               negative="uncond", windows=True, options=("masked", "reference_quirks"), aliases=("cfg_swg",),
               example=(0.3, 0.5), label="CFG+SWG", base="cfg"),
    *(entry for spec in _NEW for entry in (spec, _swg_pair(spec, 0.2))),
    *(entry for spec in _PERTURBED for entry in (spec, _swg_pair(spec, 0.2))),
)}

_LOOKUP: Dict[str, str] = {**{n: n for n in METHODS}, **{a: s.name for s in METHODS.values() for a in s.aliases}}


def method_names(pairings: bool = True) -> List[str]:
    """Canonical method names, in table order (``pairings=False``: without the ``X-swg`` pairings of the
    other papers' methods, which ``--help`` summarises as "X-swg")."""
    return [name for name, spec in METHODS.items() if pairings or not spec.pairing]


def method_spec(name: str, param: str = "method", offered: Optional[List[str]] = None) -> MethodSpec:
    """The spec of ``name`` (canonical or alias, any case); an unknown name raises with a suggestion among
    ``offered`` (default: every method; a caller that runs only some names them)."""
    key = str(name).strip().lower()
    if key in _LOOKUP:
        return METHODS[_LOOKUP[key]]
    offered = list(METHODS) if offered is None else offered
    spellings = [k for k, v in _LOOKUP.items() if v in offered]
    close = difflib.get_close_matches(key, spellings, n=1)
    hint = f"did you mean {_LOOKUP[close[0]]}? " if close else ""
    raise GuidanceError(f"unknown `{param}` {name!r}; {hint}choose one of {', '.join(offered)}")
