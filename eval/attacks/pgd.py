"""PGD with expectation over transformation, BPDA and transfer targets: the adaptive attacks on purification."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack

from core.errors import InputError

from ..defended import Defended
from .base import AttackContext, check_norm, margin_loss

LOSSES = ("ce", "margin", "dlr")


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Croce & Hein's difference of logits ratio: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), scale-invariant."""
    top = logits.sort(1, descending=True).values
    return margin_loss(logits, y) / (top[:, 0] - top[:, 2] + 1e-12)


def loss_of(name: str, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example attack loss: cross-entropy, the CW margin or DLR."""
    if name == "margin":
        return margin_loss(logits, y)
    return dlr_loss(logits, y) if name == "dlr" else F.cross_entropy(logits, y, reduction="none")


class EOTPGD(Attack):
    """PGD (Madry et al., 2018) with expectation over transformation (Athalye et al., 2018), Linf or L2.

    Each step follows the mean input gradient of `eot` independent forward passes (for a stochastic
    defense: `eot` purifications), drawn together as one batch of `eot` copies (in chunks of at most
    `eot_batch` copies, to bound memory). Each example returns the iterate of highest EOT-averaged loss seen
    over the run (`best`), not the last one. Loss: cross-entropy, the Carlini-Wagner margin (CW-Linf/L2) or
    DLR. Step size 2.5 eps / steps, a random start drawn from the attack's own generator."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, eot: int = 1,
                 loss: str = "ce", alpha: float | None = None, random_start: bool = True, seed: int = 0,
                 best: bool = True, eot_batch: int | None = None):
        super().__init__("EOTPGD", model)
        check_norm(norm)
        if loss not in LOSSES:
            raise InputError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        if steps < 1 or eot < 1 or (eot_batch is not None and eot_batch < 1):
            raise InputError(f"steps, eot and eot_batch must be at least 1, got steps={steps}, eot={eot}, "
                             f"eot_batch={eot_batch}")
        self.norm, self.eps, self.steps, self.eot, self.loss = norm, eps, steps, eot, loss
        self.alpha = alpha if alpha is not None else 2.5 * eps / steps
        self.random_start, self.seed, self.best = random_start, seed, best
        self.eot_batch = eot_batch or eot

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-example loss of one forward pass."""
        return loss_of(self.loss, self.get_logits(x), y)

    def gradient(self, x: torch.Tensor, y: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the EOT gradient, the EOT-averaged loss per example): `eot` passes as stacked copies of the batch."""
        g, total, left = torch.zeros_like(x) if grad else None, torch.zeros(len(x), device=x.device), self.eot
        while left > 0:
            k = min(left, self.eot_batch)
            x_ = x.detach().repeat(k, *([1] * (x.dim() - 1))).requires_grad_(grad)
            with torch.enable_grad() if grad else torch.no_grad():
                loss = self.losses(x_, y.repeat(k))
            if grad:
                g += torch.autograd.grad(loss.sum(), x_)[0].view(k, *x.shape).sum(0)
            total += loss.detach().view(k, len(x)).sum(0)
            left -= k
        return (g / self.eot if grad else None), total / self.eot

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = x_adv - x
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (self.eps / norms).clamp(max=1).view(-1, 1, 1, 1)
        return (x + delta).clamp(0, 1)

    def step(self, g: torch.Tensor) -> torch.Tensor:
        if self.norm == "Linf":
            return self.alpha * g.sign()
        return self.alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        """A random point of the unit ball (Linf: uniform per pixel; L2: a uniform direction, a uniform radius)."""
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        noise = torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1
        if self.norm == "L2":
            noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            noise = noise * torch.rand(len(x), 1, 1, 1, generator=gen).to(x.device)
        return noise

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, y = images.detach().to(self.device), labels.detach().to(self.device)
        x_adv = self.project(x + self.eps * self._start(x), x) if self.random_start else x.clone()
        best, best_loss = x_adv.clone(), torch.full((len(x),), -float("inf"), device=x.device)
        for _ in range(self.steps):
            g, loss = self.gradient(x_adv, y)
            better = loss > best_loss
            best[better], best_loss[better] = x_adv[better], loss[better]
            x_adv = self.project(x_adv + self.step(g), x).detach()
        if not self.best:
            return x_adv
        _, loss = self.gradient(x_adv, y, grad=False)  # the last iterate competes too
        better = loss > best_loss
        best[better] = x_adv[better]
        return best


class BPDA(nn.Module):
    """Backward pass differentiable approximation (Athalye et al., 2018): purify forward, identity backward."""

    def __init__(self, purifier: nn.Module):
        super().__init__()
        self.purifier = purifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.purifier(x)
        return x + (out - x).detach()


def build_pgd(model, ctx: AttackContext):
    cls = torchattacks.PGD if ctx.norm == "Linf" else torchattacks.PGDL2
    return cls(model, eps=ctx.eps, alpha=2.5 * ctx.eps / ctx.steps, steps=ctx.steps, random_start=True)


def build_eotpgd(model, ctx: AttackContext, loss: str = "ce"):
    return EOTPGD(model, ctx.norm, ctx.eps, ctx.steps, eot=ctx.eot, loss=ctx.loss or loss, seed=ctx.seed,
                  eot_batch=ctx.eot_batch)


def bpda_target(model: Defended, transfer_source=None) -> nn.Module:
    return Defended(BPDA(model.purifier), model.classifier, model.votes)


def transfer_target(model, transfer_source) -> nn.Module:
    return transfer_source
