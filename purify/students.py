"""Few-step students on [0, t_star]: progressive-distillation (DDIM) and consistency (multistep) purifiers."""

from __future__ import annotations

import torch
import torch.nn as nn

from core.errors import InputError

from .purifier import DiffPure, register_purifier
from .samplers import randn_like


class ConsistencyDenoiser(nn.Module):
    """Consistency function f(x_t, t) = c_skip(t) x_t + c_out(t) x0_hat(x_t, t) (Song et al., ICML 2023).

    c_skip(t_min) = 1 and c_out(t_min) = 0, so f is exactly the identity at the smallest time. The
    scalings use the time distance s = timestep_scaling * (t - t_min) * T (as diffusers' LCM
    scheduler does): on a short segment [0, t_star] the EDM sigma-based scalings would keep
    c_skip near 1 everywhere, while these hand over to the network within a few DDPM steps, so
    a student initialised from the teacher starts out as the teacher's one-step x0 prediction.
    """

    def __init__(self, base: nn.Module, t_min: float = 0.0, sigma_data: float = 0.5,
                 timestep_scaling: float = 10.0):
        super().__init__()
        self.base, self.t_min, self.sigma_data, self.timestep_scaling = base, float(t_min), sigma_data, timestep_scaling

    @property
    def schedule(self):
        return self.base.schedule

    def scalings(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.timestep_scaling * (t - self.t_min).clamp(min=0) * self.schedule.T
        c_skip = self.sigma_data**2 / (s**2 + self.sigma_data**2)
        c_out = s / (s**2 + self.sigma_data**2).sqrt()
        return c_skip, c_out

    def forward(self, x_t: torch.Tensor, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device).expand(x_t.shape[0])
        c_skip, c_out = (c.to(x_t.dtype).view(-1, 1, 1, 1) for c in self.scalings(t))
        return c_skip * x_t + c_out * self.base(x_t, t)


def sample_consistency(denoiser, x: torch.Tensor, times: torch.Tensor, generator: torch.Generator | None = None):
    """Multistep consistency sampling: f at times[0], then re-noise to each later time > 0 and apply f again."""
    x = denoiser(x, times[0])
    for t in times[1:]:
        if t <= denoiser.t_min:
            break
        ab = denoiser.schedule.alpha_bar(t.double()).item()
        x = ab**0.5 * x + (1 - ab) ** 0.5 * randn_like(x, generator)
        x = denoiser(x, t)
    return x


class _Student(DiffPure):
    """What the students share: a sampler their kind fixes (an override may only repeat it)."""

    sampler_mode = "ode"

    @classmethod
    def from_config(cls, unet, scheduler_config, meta, **overrides):
        mode = overrides.pop("mode", cls.sampler_mode)
        if mode != cls.sampler_mode:
            raise InputError(f"a {cls.kind} student samples with mode {cls.sampler_mode!r} only, got mode {mode!r}")
        return super().from_config(unet, scheduler_config, meta, **overrides)

    @classmethod
    def arguments(cls, meta: dict) -> dict:
        """purifier.json's constructor arguments, less the sampler, which the student's kind fixes."""
        args = super().arguments(meta)
        if args.pop("mode") != cls.sampler_mode:
            raise InputError(f"a {cls.kind} student samples with mode {cls.sampler_mode!r}, its purifier.json says "
                             f"{meta['mode']!r}")
        return args


@register_purifier
class ProgressiveStudent(_Student):
    """A progressive-distillation student (Salimans & Ho, ICLR 2022): K DDIM steps from t_star with an x- or v-predicting UNet."""

    kind = "progressive"

    def __init__(self, unet, scheduler_config, t_star=0.1, steps=1, prediction_type="v_prediction", seed=0,
                 source=None, clip_x0=False):
        super().__init__(unet, scheduler_config, t_star, steps, "ode", prediction_type, clip_x0, seed, source)


@register_purifier
class ConsistencyStudent(_Student):
    """A consistency-distillation student (Song et al., ICML 2023): K-step multistep consistency sampling from t_star."""

    kind = "consistency"
    sampler_mode = "consistency"

    def __init__(self, unet, scheduler_config, t_star=0.1, steps=1, prediction_type=None, seed=0, source=None,
                 clip_x0=False, consistency: dict | None = None):
        DiffPure.__init__(self, unet, scheduler_config, t_star, steps, "ode", prediction_type, clip_x0, seed, source)
        self.mode = "consistency"
        self.denoiser = ConsistencyDenoiser(self.denoiser, **(consistency or {}))

    @classmethod
    def arguments(cls, meta: dict) -> dict:
        return {**super().arguments(meta), "consistency": meta.get("consistency")}

    @property
    def consistency(self) -> dict:
        """The boundary scalings' settings, as stored in purifier.json."""
        d = self.denoiser
        return {"t_min": d.t_min, "sigma_data": d.sigma_data, "timestep_scaling": d.timestep_scaling}

    @property
    def x0_net(self):
        return self.denoiser.base

    def purify(self, x, generator):
        return sample_consistency(self.denoiser, self.diffuse(x, generator), self.times.to(x.device), generator)

    def config(self) -> dict:
        cfg = super().config()
        cfg.update(mode="consistency", sampler="multistep-consistency", consistency=self.consistency)
        return cfg
