"""A torchrun worker for tests/test_cluster.py: ``sample_edm2.main`` with test-side timing hooks.

Not a library switch: this file only patches the sampler from the outside, as a slow GPU or
a cluster's scheduler would act on it.  Environment:

* ``JOB_DELAY``: seconds each batch takes on top of sampling (so a signal can land mid-run);
* ``JOB_HOOK``: one event, at most once per process, on the rank ``JOB_RANK`` (default 0) and only
  in the first torchrun attempt (``TORCHELASTIC_RESTART_COUNT`` 0):
    ``term-launcher@N``   SIGTERM to the torchrun launcher before batch N (it forwards it to every worker),
    ``term-in-save``      SIGTERM to the launcher while the first streaming save is being written,
    ``term-in-metrics``   SIGTERM to the launcher once the final metrics have started,
    ``kill-self@N``       SIGKILL to this worker before batch N (a crashed rank);
* ``JOB_READY``: ``<JOB_READY>.<rank>`` gets this worker's pid after its first batch (the test waits for it);
* ``JOB_SAVE_EVERY``: images between two streaming saves (default: the library's).
"""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from metrics import api, detectors, stream  # noqa: E402
from sampling import run  # noqa: E402
from tests.tiny_detectors import TinyInception  # noqa: E402

import sample_edm2  # noqa: E402

Inception = functools.partial(TinyInception, dim=24, seed=1, sharpness=3, zero_from=500)
detectors.LOADERS["inception"] = lambda device, **kw: Inception()

if os.environ.get("JOB_SAVE_EVERY"):
    stream.DEFAULT_SAVE_EVERY = int(os.environ["JOB_SAVE_EVERY"])
HOOK = os.environ.get("JOB_HOOK", "")
ACTIVE = (int(os.environ.get("RANK", "0")) == int(os.environ.get("JOB_RANK", "0"))
          and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")
DELAY = float(os.environ.get("JOB_DELAY", "0"))
state = {"batches": 0, "fired": False}


def fire(kind: str) -> bool:
    if not ACTIVE or state["fired"] or not HOOK.startswith(kind):
        return False
    state["fired"] = True
    return True


real_images = run.Backend.images


def images(self, seeds, device):
    state["batches"] += 1
    n = state["batches"]
    if HOOK.startswith(("term-launcher@", "kill-self@")) and n == int(HOOK.split("@")[1]):
        if fire("term-launcher"):
            os.kill(os.getppid(), signal.SIGTERM)
            time.sleep(5)  # the forwarded signal lands here: this batch is dropped
        elif fire("kill-self"):
            os.kill(os.getpid(), signal.SIGKILL)
    if DELAY:
        time.sleep(DELAY)
    out = real_images(self, seeds, device)
    if n == 1 and os.environ.get("JOB_READY"):
        pathlib.Path(os.environ["JOB_READY"] + f".{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
    return out


real_save = stream.StreamingStats.save


def save(self):
    if self._unsaved and fire("term-in-save"):
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(1)  # the signal arrives while the state is being written
    return real_save(self)


real_calc = api.calc_metrics_from_stats
real_metrics = api.calc_metrics


def calc_from_stats(*args, **kwargs):
    if fire("term-in-metrics"):
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(5)
    return real_calc(*args, **kwargs)


def calc(*args, **kwargs):
    if fire("term-in-metrics"):
        os.kill(os.getppid(), signal.SIGTERM)
        time.sleep(5)
    return real_metrics(*args, **kwargs)


run.Backend.images = images
stream.StreamingStats.save = save
for module in [api, *(sys.modules[m] for m in ("sampling.outputs",) if m in sys.modules)]:
    for name, hook in (("calc_metrics_from_stats", calc_from_stats), ("calc_metrics", calc)):
        if hasattr(module, name):
            setattr(module, name, hook)

if __name__ == "__main__":
    sys.exit(sample_edm2.main(sys.argv[1:]))
