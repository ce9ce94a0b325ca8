"""The variance-preserving (VP) schedule of a DDPM on continuous time t in [0, 1]."""

from __future__ import annotations

import torch

from core.errors import InputError

VARIANCE_TYPES = {"fixed_small": "posterior", "fixed_small_log": "posterior", "fixed_large": "beta",
                  "fixed_large_log": "beta"}


class VPSchedule:
    """alpha_bar(t) from a diffusers scheduler config, log-linearly interpolated between DDPM steps.

    The clean image sits at t = 0 (alpha_bar = 1) and diffusers timestep k (0-based, k = 0 is one
    noising step) at t = (k + 1) / T. So DiffPure's t* = 0.1 with T = 1000 noises with
    alphas_cumprod[99] and its 100 reverse steps are diffusers timesteps 99, 98, ..., 0.
    """

    def __init__(self, alphas_cumprod: torch.Tensor, config: dict | None = None):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        if acp.ndim != 1 or not ((acp > 0) & (acp < 1)).all() or not (acp[1:] <= acp[:-1]).all():
            raise InputError("alphas_cumprod must be a decreasing 1-D sequence in (0, 1)")
        self.T = len(acp)
        self.config = dict(config or {})
        # the reverse SDE's step variance: the DDPM posterior's (fixed_small, diffusers' default) or beta
        # (fixed_large: DiffPure's Euler-Maruyama step, and google/ddpm-cifar10-32's config)
        variance = self.config.get("variance_type") or "fixed_small"
        if variance not in VARIANCE_TYPES:
            raise InputError(f"variance_type {variance!r} is not supported (a learned variance needs a UNet with "
                             f"twice the output channels); supported: {', '.join(VARIANCE_TYPES)}")
        self.variance_type = VARIANCE_TYPES[variance]
        self.alphas_cumprod = acp.float()
        self._log_ab = torch.cat([torch.zeros(1, dtype=torch.float64), acp.log()])  # at t = 0, 1/T, ..., 1

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "VPSchedule":
        """Build from any DDPM-family scheduler config (beta_schedule, beta_start, beta_end, ...)."""
        from diffusers import DDPMScheduler

        config = {k: v for k, v in config.items() if not k.startswith("_")}
        return cls(DDPMScheduler.from_config(config).alphas_cumprod, config)

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar(t), same shape, dtype and device as t."""
        t = torch.as_tensor(t)
        u = (t.double() * self.T).clamp(0, self.T)
        lo = u.floor().long().clamp(max=self.T - 1)
        grid = self._log_ab.to(u.device)
        log_ab = torch.lerp(grid[lo], grid[lo + 1], u - lo)
        return log_ab.exp().to(t.dtype if t.is_floating_point() else torch.float32)

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The (fractional) diffusers timestep the UNet is conditioned on at time t."""
        return torch.as_tensor(t) * self.T - 1
