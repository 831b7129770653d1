"""EDM's stochastic Heun sampler (Karras et al. 2022, Algorithm 2) as a function of a denoiser.

The sampler only knows a callable ``denoise(x, sigma, labels) -> D(x; sigma)``;
guidance, windows and networks live elsewhere.  Every evaluation, including the
second-order correction, goes through that callable.  If the callable has a
``begin_step(i)`` method it is told which step is starting (guidance intervals
by step index use it).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["edm_sigma_steps", "edm_sampler"]


def edm_sigma_steps(num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80, rho: float = 7,
                    dtype=torch.float32, device=None) -> torch.Tensor:
    """Noise levels ``t_0 > ... > t_{N-1}`` spaced uniformly in ``sigma^(1/rho)``, followed by ``t_N = 0``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    i = torch.arange(num_steps, dtype=dtype, device=device)
    denom = max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + i / denom * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


def edm_sampler(
    denoise:    Callable[..., torch.Tensor],    # D(x, sigma, labels) -> denoised x.
    noise:      torch.Tensor,                   # Unit-variance initial noise [N, C, H, W].
    labels:     Optional[torch.Tensor] = None,  # Class labels passed through to the denoiser.
    num_steps:  int = 32,                       # Number of noise levels.
    sigma_min:  float = 0.002,                  # Lowest noise level.
    sigma_max:  float = 80,                     # Highest noise level.
    rho:        float = 7,                      # Schedule curvature.
    S_churn:    float = 0,                      # Stochasticity strength.
    S_min:      float = 0,                      # Churn only for t in [S_min, S_max].
    S_max:      float = float("inf"),
    S_noise:    float = 1,                      # Churn noise scale.
    dtype=torch.float32,                        # Integration dtype.
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,  # Churn noise source.
) -> torch.Tensor:
    """Integrate the probability-flow ODE (plus optional churn) from ``sigma_max`` to 0 with Heun's method."""
    t_steps = edm_sigma_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype, device=noise.device)
    begin_step = getattr(denoise, "begin_step", None)

    def D(x, t):
        return denoise(x, t, labels).to(dtype)

    x_next = noise.to(dtype) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        if begin_step is not None:
            begin_step(i)
        x_cur = x_next
        if S_churn > 0 and S_min <= t_cur <= S_max:
            gamma = min(S_churn / num_steps, np.sqrt(2) - 1)
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)
        else:
            t_hat, x_hat = t_cur, x_cur

        d_cur = (x_hat - D(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:  # second-order correction
            d_prime = (x_next - D(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next
