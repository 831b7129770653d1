"""Window geometry and the sliding-window prediction shared by every SWG variant.

An H x W input is cut into ``n_h x n_w`` overlapping windows of ``k_h x k_w``
pixels.  Each window is denoised on its own at its native size (no rescaling);
the outputs are put back where they came from and averaged over the number of
windows that cover each pixel (the *coverage count*).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

from utils.errors import UsageError

__all__ = ["WindowError", "window_origins", "WindowGrid", "sliding_window_predict"]

Pair = Union[int, Sequence[int]]


class WindowError(UsageError, ValueError):
    """Raised for a window configuration that cannot cover the input."""


def _pair(value: Pair, what: str) -> Tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) == 1:
        return value[0], value[0]
    if len(value) != 2:
        raise WindowError(f"{what} must be one integer or two (height, width), got {value!r}")
    return value  # type: ignore[return-value]


def window_origins(size: int, k: int, n: int) -> list[int]:
    """Top/left origins of ``n`` windows of length ``k`` along an axis of ``size`` pixels.

    The reference places window ``i`` at ``i * ((size - k) // (n - 1))``.  When
    ``size - k`` is divisible by ``n - 1`` this is what we return.  Otherwise the
    reference leaves the last pixels uncovered; we spread the origins as
    ``(i * (size - k)) // (n - 1)`` instead, which keeps the first window flush
    with the start, the last flush with the end, and equals the reference's
    origins whenever those are valid.  Configurations that cannot cover the
    axis raise :class:`WindowError`, and so do more windows than the axis has
    distinct positions (``size - k + 1``): the extra ones repeat a position and
    only cost time.
    """
    if n < 1:
        raise WindowError(f"need at least one window per axis, got n={n}; use `window_steps` >= 1")
    if k <= 0:
        raise WindowError(f"window size must be positive, got k={k}; use `window_size` > 0")
    if k > size:
        raise WindowError(f"window size {k} exceeds the input size {size}; use `window_size` <= {size}")
    positions = size - k + 1  # distinct origins of a window of k pixels on size pixels
    if n > positions:
        raise WindowError(
            f"{n} windows per axis repeat positions: a window of {k} on {size} pixels has only {positions} "
            f"distinct position(s), and each repeat costs a network call; use `window_steps` <= {positions}")
    if n == 1:
        if k != size:
            raise WindowError(
                f"one window of size {k} cannot cover an input of size {size}; "
                f"use `window_steps` >= {-(-size // k)} or `window_size` {size}")
        return [0]
    origins = [(i * (size - k)) // (n - 1) for i in range(n)]
    # Consecutive windows must touch or overlap, else pixels in between are uncovered.
    for a, b in zip(origins[:-1], origins[1:]):
        if b > a + k:
            raise WindowError(
                f"{n} windows of size {k} leave gaps on an input of size {size}; "
                f"use `window_steps` >= {-(-size // k)} or a larger `window_size`")
    return origins


@dataclasses.dataclass(frozen=True)
class WindowGrid:
    """Windows of ``kh x kw`` pixels at ``ys x xs`` origins on an ``height x width`` input."""

    height: int
    width: int
    kh: int
    kw: int
    ys: Tuple[int, ...]
    xs: Tuple[int, ...]

    @classmethod
    def create(cls, height: int, width: int, size: Pair, steps: Pair) -> "WindowGrid":
        """Grid for window ``size`` (k or (k_h, k_w)) and ``steps`` windows per axis (n or (n_h, n_w))."""
        kh, kw = _pair(size, "window size")
        nh, nw = _pair(steps, "windows per axis")
        return cls(height, width, kh, kw,
                   tuple(window_origins(height, kh, nh)), tuple(window_origins(width, kw, nw)))

    @property
    def num_windows(self) -> int:
        return len(self.ys) * len(self.xs)

    def boxes(self):
        """Yield ``(top, left)`` of every window, row-major."""
        for y in self.ys:
            for x in self.xs:
                yield y, x

    def count(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """Coverage count, shape ``[height, width]``: how many windows cover each pixel."""
        count = torch.zeros(self.height, self.width, device=device, dtype=dtype)
        for y, x in self.boxes():
            count[y:y + self.kh, x:x + self.kw] += 1
        return count


def _repeat_batch(value: Optional[torch.Tensor], batch: int, times: int) -> Optional[torch.Tensor]:
    """Repeat a per-sample tensor once per window (window-major); scalars pass through."""
    if value is None or not torch.is_tensor(value) or value.ndim == 0 or value.shape[0] != batch:
        return value
    return value.repeat(times, *([1] * (value.ndim - 1)))


def sliding_window_predict(
    denoise: Callable[..., torch.Tensor],
    x: torch.Tensor,
    sigma,
    labels: Optional[torch.Tensor],
    grid: WindowGrid,
    max_batch: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Denoise every window of ``x`` on its own and average the outputs where they overlap.

    ``denoise(x, sigma, labels)`` is called on the windows of the whole batch at
    once (concatenated along the batch axis, window-major), split into chunks of
    at most ``max_batch`` samples when given.  Per-sample ``sigma`` and
    ``labels`` are repeated for each window.  The output may have more channels
    than the input (e.g. DiT's learned variance): the prediction is placed on the
    same spatial boxes.

    Returns ``(prediction, count)`` where ``count`` has shape ``[1, 1, H, W]``.
    """
    if x.shape[-2:] != (grid.height, grid.width):
        raise WindowError(f"input is {tuple(x.shape[-2:])} but the window grid was built "
                          f"for {(grid.height, grid.width)}")
    n, times = x.shape[0], grid.num_windows
    crops = torch.cat([x[:, :, y:y + grid.kh, l:l + grid.kw] for y, l in grid.boxes()])
    sigmas = _repeat_batch(sigma if torch.is_tensor(sigma) else torch.as_tensor(sigma), n, times)
    labels_rep = _repeat_batch(labels, n, times)

    chunk = crops.shape[0] if not max_batch else max(int(max_batch), 1)
    outs = []
    for start in range(0, crops.shape[0], chunk):
        sl = slice(start, start + chunk)
        s = sigmas[sl] if torch.is_tensor(sigmas) and sigmas.ndim > 0 and sigmas.shape[0] == crops.shape[0] else sigmas
        lab = labels_rep[sl] if labels_rep is not None and labels_rep.shape[0] == crops.shape[0] else labels_rep
        outs.append(denoise(crops[sl], s, lab))
    out = torch.cat(outs)

    pred = torch.zeros(n, out.shape[1], grid.height, grid.width, device=out.device, dtype=out.dtype)
    for i, (y, l) in enumerate(grid.boxes()):
        pred[:, :, y:y + grid.kh, l:l + grid.kw] += out[i * n:(i + 1) * n]
    count = grid.count(device=out.device, dtype=out.dtype)[None, None]
    return pred / count, count
