"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): certified L2 robustness of classifier(purifier(.)).

A DiffPure purifier is a smoothed classifier as it stands: its first step x_t = sqrt(ab) (2x - 1) + sqrt(1 - ab) eps
equals 2 sqrt(ab) ((x + sigma eps) - 1/2) with sigma = sqrt((1 - ab) / ab) / 2 in [0, 1] pixels, and everything
after is a function of x + sigma eps and of noise independent of x. So Cohen's CERTIFY applies to
classifier(purifier(.)) unchanged: denoised smoothing, Carlini et al.'s DDS ("(Certified!!) Adversarial Robustness
for Free!", ICLR 2023) when the purifier is the teacher's one-shot denoiser. A bare classifier is smoothed with
Gaussian noise of a given sigma (`GaussianSmoothing`), Cohen's own setting."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn as nn

from core.errors import InputError

from ..stats import binom_test_p, clopper_pearson_lower, proportion_se

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def purifier_sigma(purifier) -> float:
    """The smoothing noise a purifier adds, in [0, 1] pixels: sqrt((1 - alpha_bar(t_star)) / alpha_bar(t_star)) / 2."""
    ab = purifier.schedule.alpha_bar(torch.tensor(float(purifier.t_star), dtype=torch.float64)).item()
    return math.sqrt((1 - ab) / ab) / 2


def t_star_for_sigma(schedule, sigma: float) -> float:
    """The diffusion time whose noise is `sigma` in [0, 1] pixels: alpha_bar(t_star) = 1 / (1 + 4 sigma^2)."""
    if not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}")
    target = 1 / (1 + 4 * sigma**2)
    if schedule.alpha_bar(torch.tensor(1.0, dtype=torch.float64)).item() > target:
        raise InputError(f"sigma {sigma} lies beyond the schedule: even t = 1 adds less noise")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # alpha_bar decreases in t
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if schedule.alpha_bar(torch.tensor(mid, dtype=torch.float64)).item() > target else (lo, mid)
    return (lo + hi) / 2


class GaussianSmoothing(nn.Module):
    """x + sigma N(0, I) from its own generator: Cohen's smoothing noise in front of a bare classifier."""

    def __init__(self, sigma: float, seed: int = 0):
        super().__init__()
        if not sigma > 0:
            raise InputError(f"sigma must be positive, got {sigma}")
        self.sigma = float(sigma)
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "GaussianSmoothing":
        self.seed, self._gens = int(seed), {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=x.device).manual_seed(self.seed)
        return x + self.sigma * torch.randn(x.shape, generator=self._gens[key], device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


@torch.inference_mode()
def sample_counts(model: nn.Module, x: torch.Tensor, num: int, batch: int, n_classes: int) -> torch.Tensor:
    """Class counts of `model` on `num` independent draws at one image x (C, H, W), `batch` draws per forward."""
    counts = torch.zeros(n_classes, dtype=torch.long)
    left = num
    while left > 0:
        b = min(batch, left)
        pred = model(x.unsqueeze(0).expand(b, *x.shape).contiguous()).argmax(1)
        counts += torch.bincount(pred.cpu(), minlength=n_classes)
        left -= b
    return counts


@dataclass(frozen=True)
class Smoothing:
    """Cohen's parameters: n0 draws choose the class, n draws bound its probability, at level alpha."""

    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000

    def check(self) -> None:
        if self.n0 < 1 or self.n < 1 or self.batch < 1:
            raise InputError(f"n0, n and batch must be at least 1, got n0={self.n0}, n={self.n}, batch={self.batch}")
        if self.n0 > self.n:
            raise InputError(f"n0 ({self.n0}) must not exceed n ({self.n}): the selection draws are the cheap ones")
        if not 0 < self.alpha < 1:
            raise InputError(f"alpha must lie in (0, 1), got {self.alpha}")


def certify(model: nn.Module, x: torch.Tensor, sigma: float, s: Smoothing, n_classes: int) -> dict:
    """Cohen's CERTIFY at one image: (prediction or ABSTAIN, radius, p_A lower bound, counts)."""
    t0 = time.perf_counter()
    c_a = int(sample_counts(model, x, s.n0, s.batch, n_classes).argmax())
    counts = sample_counts(model, x, s.n, s.batch, n_classes)
    p_a = clopper_pearson_lower(int(counts[c_a]), s.n, s.alpha)
    certified = p_a > 0.5
    return {"prediction": c_a if certified else ABSTAIN, "radius": sigma * NormalDist().inv_cdf(p_a) if certified else 0.0,
            "p_a_lower": p_a, "count_a": int(counts[c_a]), "seconds": time.perf_counter() - t0,
            "draws": s.n0 + s.n}


def predict(model: nn.Module, x: torch.Tensor, s: Smoothing, n_classes: int) -> int:
    """Cohen's PREDICT: the top class of n draws, or ABSTAIN when the binomial test cannot tell it from the runner-up."""
    counts = sample_counts(model, x, s.n, s.batch, n_classes)
    top2 = counts.topk(2).indices.tolist() if n_classes > 1 else [0, 0]
    n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]]) if n_classes > 1 else 0
    return top2[0] if binom_test_p(n_a, n_b) <= s.alpha else ABSTAIN


def summarize(records: list[dict], radii=RADII) -> dict:
    """Certified accuracy at each radius (correct and certified at least that far), the average certified radius
    (0 where wrong or abstained), the abstention rate, seconds per image and purifications per second."""
    n = len(records)
    ok = [r["prediction"] == r["label"] for r in records]
    seconds = sum(r["seconds"] for r in records)
    return {"examples": n,
            "certified_accuracy": {f"{r:g}": sum(o and rec["radius"] >= r for o, rec in zip(ok, records)) / n
                                   for r in radii},
            "certified_accuracy_se": {f"{r:g}": proportion_se(p, n) for r, p in
                                      ((r, sum(o and rec["radius"] >= r for o, rec in zip(ok, records)) / n)
                                       for r in radii)},
            "acr": sum(rec["radius"] for o, rec in zip(ok, records) if o) / n,
            "abstain": sum(r["prediction"] == ABSTAIN for r in records) / n,
            "seconds_per_image": seconds / n,
            "draws_per_second": sum(r["draws"] for r in records) / max(seconds, 1e-9)}


def reseed(model, seed: int) -> None:
    """Reseed a smoothed model's noise (its purifier's or Gaussian noise's generator), where it has one."""
    p = getattr(model, "purifier", None)
    if p is not None and hasattr(p, "manual_seed"):
        p.manual_seed(seed)
