"""Deprecated alias: the model table is :mod:`networks.zoo`, the sampling presets :mod:`sampling.presets`.

Kept only until ``demo/run_demo.py`` imports those modules; new code must not use it
(``tests/test_layers.py`` allows this one upward import and no other).
"""

from networks.zoo import *  # noqa: F401,F403
from networks.zoo import DEMO_REF, MODELS, REFS  # noqa: F401


def __getattr__(name):
    from sampling import presets

    return getattr(presets, name)
