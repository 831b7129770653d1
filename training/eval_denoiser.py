"""Quick quality check of a digits denoiser: unguided samples -> classifier accuracy and Fréchet distance.

    python -m training.eval_denoiser demo/models/digits-cond.safetensors --num 256

Used by the tests and to compare training settings; the full demo with every
guidance method is ``demo/run_demo.py``.
"""

from __future__ import annotations

import json
import pickle
import sys

import click
import numpy as np
import torch

from training.data import NUM_CLASSES, to_uint8
from metrics.digits import DEFAULT_CLASSIFIER, DEFAULT_REF, METRIC, DigitsDetector, confidence_score
from utils.cli import CONTEXT, run_command
from utils.errors import INTERRUPTED_RESTART, exit_on_usage_error

__all__ = ["sample_digits", "frechet_to_ref", "evaluate", "main"]


@torch.no_grad()
def sample_digits(denoise, num: int, seed: int = 0, num_steps: int = 32, label_dim: int = NUM_CLASSES,
                  resolution: int = 16, device="cpu", batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` samples (uint8 ``[N, 1, R, R]``) from ``denoise(x, sigma, labels)`` with EDM's Heun sampler.

    Image ``i`` uses seed ``seed + i`` (the samplers' per-seed draw, :func:`sampling.seeds.draw_edm2`)
    and class ``i % 10`` (balanced classes).  Returns the images and the requested classes.
    """
    from sampling.edm import edm_sampler
    from sampling.seeds import draw_edm2

    classes = torch.arange(num) % NUM_CLASSES
    out = []
    for i in range(0, num, batch):
        seeds = list(range(seed + i, seed + min(i + batch, num)))
        draw = draw_edm2(seeds, [1, resolution, resolution], label_dim, device,
                         classes=classes[i:i + len(seeds)].tolist())
        x = edm_sampler(denoise, draw.noise, draw.labels, num_steps=num_steps, randn_like=draw.rnd.randn_like)
        out.append(to_uint8(x).cpu())
    return torch.cat(out), classes


def frechet_to_ref(feats: np.ndarray, ref: dict, metric: str = METRIC) -> float:
    """Fréchet distance between the Gaussian fit of ``feats`` and the reference statistics."""
    mu, sigma = feats.mean(axis=0), np.cov(feats, rowvar=False)
    mu_r, sigma_r = np.asarray(ref[metric]["mu"]), np.asarray(ref[metric]["sigma"])
    # tr((S1 S2)^(1/2)) = sum sqrt(eig(S1 S2)); the eigenvalues of a product of PSD matrices are >= 0.
    eig = np.linalg.eigvals(sigma @ sigma_r).real.clip(min=0)
    return float(np.square(mu - mu_r).sum() + np.trace(sigma) + np.trace(sigma_r) - 2 * np.sqrt(eig).sum())


def load_ref_pickle(path=DEFAULT_REF) -> dict:
    """The shipped reference statistics (restricted unpickling via ``metrics.refs`` when present)."""
    try:
        from metrics.refs import load_ref
    except ImportError:  # metrics package absent: plain dict of numpy arrays written by us
        with open(path, "rb") as f:
            return pickle.load(f)
    return load_ref(str(path))


def evaluate(images: torch.Tensor, classes: torch.Tensor, detector: DigitsDetector, ref: dict) -> dict:
    """FD to the reference, IS-like confidence score, and agreement of predicted with requested classes."""
    feats, probs = detector.features_and_probs(images)
    return {"fd": frechet_to_ref(feats, ref), "confidence": confidence_score(probs),
            "class_match": float((probs.argmax(1) == classes.numpy()).mean()),
            "max_prob": float(probs.max(1).mean())}


@click.command(context_settings=CONTEXT)
@click.argument("checkpoints", nargs=-1, required=True)
@click.option("--num", type=int, default=256, show_default=True)
@click.option("--steps", type=int, default=32, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@exit_on_usage_error(interrupted=INTERRUPTED_RESTART)
def main(checkpoints, num, steps, seed, device):
    """Print FD / confidence / class match of unguided samples for each checkpoint."""
    from networks.edm2_pickle import load_checkpoint

    detector, ref = DigitsDetector(DEFAULT_CLASSIFIER), load_ref_pickle()
    for path in checkpoints:
        net = load_checkpoint(path).net.to(device)
        images, classes = sample_digits(lambda x, s, l: net(x, s, l), num, seed, steps, net.label_dim,
                                        net.img_resolution, device)
        res = evaluate(images, classes, detector, ref)
        print(json.dumps({"checkpoint": str(path), **{k: round(v, 4) for k, v in res.items()}}))


if __name__ == "__main__":  # click's usage errors as one line, exit 2 (utils.cli.run_command)
    sys.exit(run_command(main, None, "python -m training.eval_denoiser"))
