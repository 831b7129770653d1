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
from typing import Callable, Dict, List, Optional, Tuple

from utils.errors import UsageError

from .methods import CFG, SWG, WMG, Guider, NegSWG, NoGuidance

__all__ = ["GuidanceError", "MethodSpec", "METHODS", "method_spec", "method_names", "NEGATIVES"]


class GuidanceError(UsageError, ValueError):
    """A guidance configuration that cannot work (unknown method, wrong weight count, missing negative ...)."""


# What a method's second network is: the key is MethodSpec.negative.
NEGATIVES = {"uncond": "an unconditional network", "weak": "a weaker network"}


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One guidance method.

    ``build(weights, **options)`` returns the method's guider; ``weights`` has one float per
    name in :attr:`weights`; ``options`` holds only the keys listed in :attr:`options`
    (``masked``, ``reference_quirks`` ...), each with a default in the builder.
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

    @property
    def num_weights(self) -> int:
        return len(self.weights)

    @property
    def needs_neg(self) -> bool:
        return self.negative is not None

    def make(self, weights=(), **options) -> Guider:
        """Build the guider from ``weights`` (checked against the count) and the known ``options``."""
        ws = tuple(float(w) for w in weights)
        if len(ws) != self.num_weights:
            raise GuidanceError(f"method {self.name!r} takes {self.num_weights} weight(s), got {len(ws)} "
                                f"({weights!r}); e.g. `weight` {self.example_text()}")
        return self.build(ws, **{k: v for k, v in options.items() if k in self.options})

    def display(self, masked: bool = True) -> str:
        """Name for tables and plots: ``CFG+M-SWG`` for a masked ``cfg-swg``."""
        label = self.label or self.name
        return label.replace("SWG", "M-SWG") if self.windows and masked else label

    def example_text(self) -> str:
        return ",".join(f"{w:g}" for w in self.example) if self.example else "(none)"


METHODS: Dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("none", "D = D_pos", (), lambda ws: NoGuidance(), label="no guidance"),
    MethodSpec("cfg", "D = D_pos + w (D_pos - D_uncond)", ("w",), lambda ws: CFG(w=ws[0]),
               negative="uncond", example=(1.0,), label="CFG"),
    MethodSpec("wmg", "D = D_pos + w (D_pos - D_weak)", ("w",), lambda ws: WMG(w=ws[0]),
               negative="weak", aliases=("autoguidance",), example=(1.0,), label="WMG"),
    MethodSpec("swg", "D = D_pos + w m (D_pos - D_win)", ("w",),
               lambda ws, masked=True: SWG(w=ws[0], masked=masked),
               windows=True, options=("masked",), aliases=("mswg", "m-swg"), example=(0.2,), label="SWG"),
    MethodSpec("wmg-swg", "D = D_pos + w1 (D_pos - D_weak) + w2 m (D_pos - D_win)", ("w_neg", "w_swg"),
               lambda ws, masked=True, reference_quirks=False: NegSWG(
                   w_neg=ws[0], w_swg=ws[1], masked=masked, reference_quirks=reference_quirks, neg_labels=True),
               negative="weak", windows=True, options=("masked", "reference_quirks"), aliases=("wmg_swg",),
               example=(1.2, 0.14), label="WMG+SWG"),
    MethodSpec("cfg-swg", "D = D_pos + w1 (D_pos - D_uncond) + w2 m (D_pos - D_win)", ("w_neg", "w_swg"),
               lambda ws, masked=True, reference_quirks=False: NegSWG(
                   w_neg=ws[0], w_swg=ws[1], masked=masked, reference_quirks=reference_quirks, neg_labels=False),
               negative="uncond", windows=True, options=("masked", "reference_quirks"), aliases=("cfg_swg",),
               example=(0.3, 0.5), label="CFG+SWG"),
)}

_LOOKUP: Dict[str, str] = {**{n: n for n in METHODS}, **{a: s.name for s in METHODS.values() for a in s.aliases}}


def method_names() -> List[str]:
    """Canonical method names, in table order."""
    return list(METHODS)


def method_spec(name: str, param: str = "method") -> MethodSpec:
    """The spec of ``name`` (canonical or alias, any case); an unknown name raises with a suggestion."""
    key = str(name).strip().lower()
    if key in _LOOKUP:
        return METHODS[_LOOKUP[key]]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1)
    hint = f"did you mean {_LOOKUP[close[0]]}? " if close else ""
    raise GuidanceError(f"unknown `{param}` {name!r}; {hint}choose one of {', '.join(METHODS)}")
