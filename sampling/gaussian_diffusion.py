"""DiT's discrete Gaussian diffusion: linear betas, respacing, ancestral sampling with learned variance.

Forward process over ``T = 1000`` steps with ``beta_t`` linear from ``1e-4`` to
``0.02`` (scaled by ``1000 / T``) and ``abar_t = prod_{s<=t} (1 - beta_s)``::

    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps

Respacing keeps a subset ``S`` of the timesteps (``space_timesteps``) and
re-derives ``beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}}``; at respaced step ``i``
the network still receives the original timestep ``S_i``.

One reverse step with an epsilon-predicting network that also outputs
``v in [-1, 1]`` per value (learned-range variance)::

    x0_hat = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps
    mean   = c1_t x0_hat + c2_t x_t                  (posterior q(x_{t-1} | x_t, x0_hat))
    log s2 = (v+1)/2 log(beta_t) + (1-(v+1)/2) log(beta~_t)
    x_{t-1} = mean + [t > 0] exp(log s2 / 2) z,  z ~ N(0, I)

with ``beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t)`` (its log clipped at
``t = 0`` to the value at ``t = 1``), ``c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t)``
and ``c2_t = (1 - abar_{t-1}) sqrt(1 - beta_t) / (1 - abar_t)``.  As in DiT's
sampler, ``x0_hat`` is not clipped.  Tables are float64; values are taken per
step and cast to float32 before use, like the reference, so the results match it.

The sampler knows nothing of guidance: it calls ``model(x, t, labels)`` (the
same signature as the guided denoisers of :mod:`guidance`) and draws its step
noise from ``randn_like`` (per-sample generators, or a replayed sequence).
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from utils.errors import UsageError

__all__ = ["linear_betas", "space_timesteps", "GaussianDiffusion", "create_diffusion"]


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    """DDPM's linear schedule: ``linspace(1e-4 s, 0.02 s, T)`` with ``s = 1000 / T`` (float64)."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: Union[str, int, Sequence[int]]) -> list[int]:
    """Timesteps of the original process kept by a respacing spec, sorted ascending.

    ``section_counts`` is a step count (``250`` or ``"250"``), comma-separated
    counts per equal section (``"10,15,20"``: the first third of the process
    strided to 10 steps, ...), or ``"ddimN"``: the integer stride giving exactly
    ``N`` steps (DDIM's striding).  Within a section of ``size`` steps, ``n``
    steps are taken at ``round(k (size - 1) / (n - 1))``, ``k = 0..n-1``.
    """
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                want = int(spec[4:])
            except ValueError:
                raise UsageError(f"bad respacing {spec!r}; write ddimN with an integer N, e.g. ddim50") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == want:
                    return list(range(0, num_timesteps, stride))
            raise UsageError(f"no integer stride gives exactly {want} of {num_timesteps} steps; "
                             f"choose another ddim step count")
        try:
            section_counts = [int(s) for s in spec.split(",")]
        except ValueError:
            raise UsageError(f"bad respacing {spec!r}; use a step count such as 250, "
                             f"counts per section such as 10,15,20, or ddim50") from None
    counts = list(section_counts)
    if not counts or any(c < 1 for c in counts):
        raise UsageError(f"respacing needs positive step counts, got {counts}; e.g. --num-sampling-steps 250")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise UsageError(f"cannot take {count} steps from a section of {size} of the {num_timesteps} "
                             f"diffusion steps; use at most {num_timesteps} sampling steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        steps += [start + round(k * stride) for k in range(count)] if count > 1 else [start]
        start += size
    return sorted(set(steps))


class GaussianDiffusion:
    """Reverse process of a (possibly respaced) discrete Gaussian diffusion.

    ``betas`` are the (respaced) betas; ``timestep_map[i]`` is the original
    timestep fed to the network at respaced step ``i`` (identity by default).
    ``learn_sigma=True``: the network outputs ``2C`` channels ``[eps, v]``
    (learned-range variance); ``False``: ``C`` channels ``eps`` and the fixed
    large variance ``beta_t`` (``beta~_1`` at ``t = 0``).
    """

    def __init__(self, betas: Iterable[float], timestep_map: Optional[Sequence[int]] = None,
                 learn_sigma: bool = True):
        betas = np.asarray(list(betas), dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D array in (0, 1]")
        self.betas = betas
        self.num_timesteps = len(betas)
        self.timestep_map = np.asarray(timestep_map if timestep_map is not None else range(len(betas)),
                                       dtype=np.int64)
        self.learn_sigma = learn_sigma

        alphas = 1.0 - betas
        abar = np.cumprod(alphas)
        abar_prev = np.append(1.0, abar[:-1])
        self.alphas_cumprod = abar
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / abar)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / abar - 1.0)
        self.posterior_variance = betas * (1.0 - abar_prev) / (1.0 - abar)
        post = self.posterior_variance
        self.posterior_log_variance_clipped = (np.log(np.append(post[1], post[1:])) if len(post) > 1
                                               else np.log(np.maximum(post, betas)))
        self.posterior_mean_coef1 = betas * np.sqrt(abar_prev) / (1.0 - abar)
        self.posterior_mean_coef2 = (1.0 - abar_prev) * np.sqrt(alphas) / (1.0 - abar)
        self.log_betas = np.log(betas)
        fixed_large = np.append(post[1], betas[1:]) if len(post) > 1 else betas
        self.fixed_large_log_variance = np.log(fixed_large)

    # ------------------------------------------------------------------
    @staticmethod
    def _at(table: np.ndarray, i: int, like: torch.Tensor) -> torch.Tensor:
        """``table[i]`` as a float32 scalar tensor on ``like``'s device (the reference casts after indexing)."""
        return torch.tensor(table[i], dtype=torch.float64).float().to(like.device)

    def sigma_of(self, t) -> torch.Tensor:
        """The noise level ``sqrt(1 / alpha_bar - 1)`` of original timesteps ``t`` (what the model is given),
        the EDM-style sigma that guidance intervals compare."""
        t = torch.as_tensor(t)
        table = torch.zeros(int(self.timestep_map.max()) + 1, dtype=torch.float64)
        table[torch.as_tensor(self.timestep_map)] = torch.as_tensor(self.sqrt_recipm1_alphas_cumprod,
                                                                     dtype=torch.float64)
        return table[t.long().cpu()].to(t.device)

    def model_timesteps(self, i: int, batch: int, device=None) -> torch.Tensor:
        """The original timesteps ``[batch]`` the network sees at respaced step ``i``."""
        return torch.full((batch,), int(self.timestep_map[i]), dtype=torch.long, device=device)

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, i: int) -> dict:
        """Mean, log-variance and ``x0_hat`` of ``p(x_{i-1} | x_i)`` from the network output at step ``i``."""
        c = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * c:
                raise ValueError(f"learned-sigma model must output {2 * c} channels, got {model_output.shape[1]}")
            eps, v = model_output[:, :c], model_output[:, c:]
            frac = (v + 1) / 2
            log_var = frac * self._at(self.log_betas, i, x) + (1 - frac) * self._at(
                self.posterior_log_variance_clipped, i, x)
        else:
            eps = model_output[:, :c]
            log_var = self._at(self.fixed_large_log_variance, i, x).expand_as(x)
        x0 = self._at(self.sqrt_recip_alphas_cumprod, i, x) * x - self._at(self.sqrt_recipm1_alphas_cumprod, i, x) * eps
        mean = self._at(self.posterior_mean_coef1, i, x) * x0 + self._at(self.posterior_mean_coef2, i, x) * x
        return {"mean": mean, "log_variance": log_var, "pred_xstart": x0, "eps": eps}

    def p_sample(self, model: Callable, x: torch.Tensor, i: int, labels=None,
                 randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like) -> dict:
        """One ancestral step from respaced step ``i`` to ``i - 1`` (no noise added at ``i = 0``)."""
        t = self.model_timesteps(i, x.shape[0], x.device)
        out = self.p_mean_variance(model(x, t, labels), x, i)
        noise = randn_like(x)
        keep = 0.0 if i == 0 else 1.0
        out["sample"] = out["mean"] + keep * torch.exp(0.5 * out["log_variance"]) * noise
        return out

    def p_sample_loop(self, model: Callable, noise: torch.Tensor, labels=None,
                      randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
                      progress: bool = False) -> torch.Tensor:
        """Ancestral sampling from ``x_T = noise`` down to ``x_0``.

        ``model(x, t, labels)`` gets the original timesteps; ``model.begin_step(k)``
        is called first when it exists, with ``k = 0`` at the noisiest step (the
        step numbering of :func:`sampling.edm.edm_sampler`).  ``randn_like(x)``
        is called once per step, the last draw (at ``t = 0``) multiplied by zero.
        """
        x = noise
        steps = list(range(self.num_timesteps))[::-1]
        if progress:
            steps = tqdm(steps, desc="sampling", leave=False)
        for k, i in enumerate(steps):
            if hasattr(model, "begin_step"):
                model.begin_step(k)
            x = self.p_sample(model, x, i, labels, randn_like)["sample"]
        return x


def create_diffusion(timestep_respacing: Union[str, int, Sequence[int], None] = "",
                     diffusion_steps: int = 1000, learn_sigma: bool = True) -> GaussianDiffusion:
    """DiT's ``create_diffusion``: linear betas over ``diffusion_steps``, respaced by ``timestep_respacing``.

    ``""`` or ``None`` keeps every step; ``"250"``, ``"ddim50"``, ``"10,15,20"``
    as in :func:`space_timesteps`.
    """
    base = linear_betas(diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    keep = space_timesteps(diffusion_steps, timestep_respacing)
    abar = np.cumprod(1.0 - base)
    betas, last = [], 1.0
    for t in keep:
        betas.append(1.0 - abar[t] / last)
        last = abar[t]
    return GaussianDiffusion(betas, timestep_map=keep, learn_sigma=learn_sigma)
