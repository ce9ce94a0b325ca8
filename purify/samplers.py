"""Reverse-time samplers over [t_star, 0] as plain functions of (denoiser, x, times, generator)."""

from __future__ import annotations

import torch

from .denoisers import eps_from_x0


def ddpm_step(x_t, x0, ab_t, ab_s, noise=None, variance: str = "posterior"):
    """One ancestral step t -> s < t: the DDPM posterior mean of q(x_s | x_t, x0_hat) plus noise of the
    posterior's variance ("posterior", diffusers' fixed_small) or of beta_ts = 1 - ab_t / ab_s ("beta",
    fixed_large: DiffPure's Euler-Maruyama step of the reverse VP-SDE)."""
    alpha_ts = ab_t / ab_s
    mean = (ab_s.sqrt() * (1 - alpha_ts) * x0 + alpha_ts.sqrt() * (1 - ab_s) * x_t) / (1 - ab_t)
    if noise is None:
        return mean
    beta = 1 - alpha_ts
    var = beta if variance == "beta" else ((1 - ab_s) / (1 - ab_t) * beta).clamp(min=1e-20)
    return mean + var.sqrt() * noise


def ddim_step(x_t, x0, ab_t, ab_s):
    """One deterministic DDIM step t -> s (eta = 0): the probability-flow ODE's exponential integrator."""
    return ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps_from_x0(x0, x_t, ab_t)


def heun_step(denoiser, x_t, t, s, ab_t, ab_s):
    """One Heun (2nd-order) step t -> s of the probability-flow ODE, in the scaled variables x / alpha and
    sigma / alpha where the ODE reads dx/dsigma = eps_hat (Karras et al., 2022); Euler there is DDIM.
    Steps that end at sigma = 0 stay first order, as in EDM."""
    sig_t, sig_s = ((1 - ab_t) / ab_t).sqrt(), ((1 - ab_s) / ab_s).sqrt()
    y = x_t / ab_t.sqrt()
    d1 = eps_from_x0(denoiser(x_t, t), x_t, ab_t)
    y_euler = y + (sig_s - sig_t) * d1
    x_euler = y_euler * ab_s.sqrt()
    last = ab_s >= 1
    ab_safe = torch.where(last, torch.full_like(ab_s, 0.5), ab_s)  # keeps the unused branch finite
    d2 = eps_from_x0(denoiser(x_euler, s), x_euler, ab_safe)
    x_heun = (y + (sig_s - sig_t) * (d1 + d2) / 2) * ab_s.sqrt()
    return torch.where(last, x_euler, x_heun)


def randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Gaussian noise shaped like x from `generator`: a torch.Generator (never the global RNG when one is given),
    or an injected noise source, a callable like -> tensor (an exported graph's noise inputs, in draw order)."""
    if callable(generator):
        return generator(x)
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def _pairs(denoiser, times: torch.Tensor):
    ab = denoiser.schedule.alpha_bar(times.double()).float()
    return [(times[i], times[i + 1], ab[i], ab[i + 1]) for i in range(len(times) - 1)]


def sample_sde(denoiser, x: torch.Tensor, times: torch.Tensor, generator: torch.Generator | None = None):
    """Reverse VP-SDE solved by DDPM ancestral steps (DiffPure's solver on the DDPM grid), with the step
    variance the schedule's `variance_type` names."""
    variance = denoiser.schedule.variance_type
    for t, _, ab_t, ab_s in _pairs(denoiser, times):
        x0 = denoiser(x, t)
        x = ddpm_step(x, x0, ab_t.to(x), ab_s.to(x), randn_like(x, generator) if ab_s < 1 else None, variance)
    return x


def sample_ode(denoiser, x: torch.Tensor, times: torch.Tensor, generator: torch.Generator | None = None):
    """Probability-flow ODE solved by DDIM steps; deterministic given x."""
    for t, _, ab_t, ab_s in _pairs(denoiser, times):
        x = ddim_step(x, denoiser(x, t), ab_t.to(x), ab_s.to(x))
    return x


SAMPLERS = {"sde": sample_sde, "ode": sample_ode}
