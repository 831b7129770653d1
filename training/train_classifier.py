"""Train the demo's digit classifier and write the reference statistics of the training digits.

    python -m training.train_classifier --out demo/models/digits-classifier.safetensors \\
        --refs-out demo/refs/digits-ref.pkl

The classifier (:class:`metrics.digits.DigitsClassifier`) is trained
on the training split of :mod:`training.data` (16x16, ``[-1, 1]``) with Adam and
cross-entropy, with random integer shifts of up to one pixel and a little
Gaussian pixel noise as augmentation, and is evaluated on the stratified
hold-out (30 digits per class) that neither it nor the diffusion models see.
The reference file uses EDM2's layout ``{'num_images', 'fd_digits': {'mu', 'sigma'}}``
with the feature statistics of the training digits after a uint8 round trip
(exactly what generated images go through).
"""

from __future__ import annotations

import pathlib
import pickle
import sys
import time

import click
import numpy as np
import torch
import torch.nn.functional as F

from training.data import load_digits_images, to_uint8
from metrics.digits import METRIC, DigitsClassifier, DigitsDetector, save_classifier
from utils.atomic import write_bytes_atomic
from utils.cli import CONTEXT, run_command
from utils.errors import INTERRUPTED_RESTART, UsageError, exit_on_usage_error

__all__ = ["train_classifier", "accuracy", "reference_stats", "write_ref", "main"]


def _augment(x: torch.Tensor, gen: torch.Generator, noise: float) -> torch.Tensor:
    """Random shift by -1..1 pixels per image (edge padding with the background) plus pixel noise."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy = torch.randint(0, 3, (n,), generator=gen)
    dx = torch.randint(0, 3, (n,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return out + noise * torch.randn(out.shape, generator=gen)


def train_classifier(epochs: int = 30, batch: int = 64, lr: float = 2e-3, seed: int = 0, noise: float = 0.1,
                     channels: int = 32, log=None, data=None) -> tuple[DigitsClassifier, list[float]]:
    """Train on the training split; returns the network (eval mode) and per-epoch mean losses."""
    torch.manual_seed(seed)
    images, labels = data if data is not None else load_digits_images(16, split="train")
    net = DigitsClassifier(resolution=images.shape[-1], channels=channels)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed + 1)
    history = []
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(images), generator=gen)
        total = 0.0
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(net(_augment(images[idx], gen, noise)), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        sched.step()
        history.append(total / len(images))
        if log is not None:
            log(f"epoch {epoch + 1:3d}/{epochs}  loss {history[-1]:.4f}")
    return net.eval().requires_grad_(False), history


@torch.no_grad()
def accuracy(net: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy on ``[-1, 1]`` images after the uint8 round trip generated images take."""
    x = to_uint8(images).float() / 127.5 - 1
    return float((net(x).argmax(1) == labels).float().mean())


def reference_stats(detector: DigitsDetector, images_uint8) -> dict:
    """EDM2-layout reference dict of the detector features of ``images_uint8`` (uint8 NCHW), with their
    resolution ``[H, W]`` (so that images of another size are refused against it)."""
    feats = detector.features(images_uint8)
    return {"num_images": int(len(feats)), "resolution": [int(v) for v in images_uint8.shape[-2:]],
            METRIC: {"mu": feats.mean(axis=0), "sigma": np.cov(feats, rowvar=False)}}


def write_ref(ref: dict, path: str | pathlib.Path) -> None:
    """Pickle ``ref`` (plain dict of numpy arrays) atomically; refuses to overwrite."""
    path = pathlib.Path(path)
    if path.exists():
        raise UsageError(f"{path} already exists; remove it or choose another --refs-out")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, pickle.dumps(ref, protocol=4))


@click.command(context_settings=CONTEXT)
@click.option("--out", required=True, help="Classifier weights (.safetensors; a .json is written beside).")
@click.option("--refs-out", default=None, help="Also write the training-set reference statistics here (.pkl).")
@click.option("--epochs", type=int, default=30, show_default=True)
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--lr", type=float, default=2e-3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--threads", type=int, default=2, show_default=True)
@exit_on_usage_error(interrupted=INTERRUPTED_RESTART)
def main(out, refs_out, epochs, batch, lr, seed, threads):
    """Train the digit classifier used as the demo's feature detector."""
    out = pathlib.Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: use a .safetensors name, e.g. demo/models/digits-classifier.safetensors")
    for p in (out, out.with_suffix(".json")) + ((pathlib.Path(refs_out),) if refs_out else ()):
        if p.exists():
            raise UsageError(f"{p} already exists; remove it or choose another path")
    torch.set_num_threads(threads)
    t0 = time.time()
    net, history = train_classifier(epochs=epochs, batch=batch, lr=lr, seed=seed, log=print)
    test_x, test_y = load_digits_images(16, split="test")
    train_x, train_y = load_digits_images(16, split="train")
    acc = accuracy(net, test_x, test_y)
    print(f"held-out accuracy {acc:.4f} ({len(test_y)} digits), train accuracy {accuracy(net, train_x, train_y):.4f}, "
          f"{time.time() - t0:.0f}s")
    save_classifier(net, out, extra={"heldout_accuracy": round(acc, 4), "epochs": epochs, "seed": seed})
    print(f"saved {out}")
    if refs_out:
        ref = reference_stats(DigitsDetector(out), to_uint8(train_x))
        write_ref(ref, refs_out)
        print(f"saved {refs_out} ({ref['num_images']} images)")


if __name__ == "__main__":  # click's usage errors as one line, exit 2 (utils.cli.run_command)
    sys.exit(run_command(main, None, "python -m training.train_classifier"))
