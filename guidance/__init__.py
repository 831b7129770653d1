"""Guidance methods shared by the EDM2 and DiT samplers.

``guide(denoiser, method=..., weight=..., ...)`` wraps any ``D(x, sigma, labels)``
callable; see :mod:`guidance.methods` for the equations and
:mod:`guidance.windows` for the window geometry, :mod:`guidance.perturb` for the perturbed
passes of PAG, SEG and SLG.
"""

from .guided import GuidanceError, GuidedDenoiser, guide, method_names
from .methods import (CFG, FDG, SWG, TCFG, WMG, APGuidance, CFGZeroStar, Composite, Evaluation, Guider, NegSWG,
                      NoGuidance, PerturbedGuidance, PlusSWG, Term)
from .perturb import Perturbation, PerturbationError, perturbation, perturber
from .table import METHODS, MethodSpec, method_spec
from .windows import WindowError, WindowGrid, sliding_window_predict, window_origins

__all__ = [
    "guide", "GuidedDenoiser", "GuidanceError", "method_names",
    "Guider", "Composite", "Term", "NoGuidance", "CFG", "WMG", "SWG", "NegSWG", "APGuidance", "CFGZeroStar",
    "FDG", "TCFG", "PlusSWG", "PerturbedGuidance", "Evaluation", "METHODS", "MethodSpec", "method_spec",
    "WindowGrid", "WindowError", "window_origins", "sliding_window_predict",
    "Perturbation", "PerturbationError", "perturbation", "perturber",
]
