"""PGD with expectation over transformation, BPDA and transfer targets: the adaptive attacks on purification."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack

from core.errors import InputError

from ..defended import Defended
from .base import AttackContext, ContiguousGrad, check_norm, margin_loss

LOSSES = ("ce", "margin", "dlr")
SCHEDULES = ("constant", "apgd")


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
    DLR. Step size 2.5 eps / steps, or APGD's schedule (`schedule="apgd"`, Croce & Hein 2020: step 2 eps,
    momentum 0.75, halved at checkpoints where the loss stalled, restarting from the best point); a random start
    drawn from the attack's own generator."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, eot: int = 1,
                 loss: str = "ce", alpha: float | None = None, random_start: bool = True, seed: int = 0,
                 best: bool = True, eot_batch: int | None = None, schedule: str = "constant"):
        super().__init__("EOTPGD", model)
        check_norm(norm)
        if loss not in LOSSES:
            raise InputError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}")
        if schedule not in SCHEDULES:
            raise InputError(f"unknown step-size schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
        if steps < 1 or eot < 1 or (eot_batch is not None and eot_batch < 1):
            raise InputError(f"steps, eot and eot_batch must be at least 1, got steps={steps}, eot={eot}, "
                             f"eot_batch={eot_batch}")
        self.norm, self.eps, self.steps, self.eot, self.loss = norm, eps, steps, eot, loss
        self.alpha = alpha if alpha is not None else 2.5 * eps / steps
        self.random_start, self.seed, self.best = random_start, seed, best
        self.eot_batch, self.schedule = eot_batch or eot, schedule

    def gradient(self, x: torch.Tensor, y: torch.Tensor, grad: bool = True):
        """(the EOT gradient, the EOT-averaged loss, the share of the EOT draws fooled) per example: `eot` passes as
        stacked copies of the batch."""
        g, left = torch.zeros_like(x) if grad else None, self.eot
        total, fooled = torch.zeros(len(x), device=x.device), torch.zeros(len(x), device=x.device)
        while left > 0:
            k = min(left, self.eot_batch)
            x_, y_ = x.detach().repeat(k, *([1] * (x.dim() - 1))).requires_grad_(grad), y.repeat(k)
            with torch.enable_grad() if grad else torch.no_grad():
                logits = self.get_logits(x_)
                loss = loss_of(self.loss, logits, y_)
            if grad:
                g += torch.autograd.grad(loss.sum(), x_)[0].view(k, *x.shape).sum(0)
            total += loss.detach().view(k, len(x)).sum(0)
            fooled += (logits.detach().argmax(1) != y_).float().view(k, len(x)).sum(0)
            left -= k
        return (g / self.eot if grad else None), total / self.eot, fooled / self.eot

    def project(self, x_adv: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        delta = x_adv - x
        if self.norm == "Linf":
            delta = delta.clamp(-self.eps, self.eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
            delta = delta * (self.eps / norms).clamp(max=1).view(-1, 1, 1, 1)
        return (x + delta).clamp(0, 1)

    def step(self, g: torch.Tensor, alpha: float | torch.Tensor | None = None) -> torch.Tensor:
        alpha = self.alpha if alpha is None else alpha
        if self.norm == "Linf":
            return alpha * g.sign()
        return alpha * g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)

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
        if self.schedule == "apgd":
            return self._apgd(x, y, x_adv)
        keep = _Best(x_adv)
        for _ in range(self.steps):
            g, loss, fooled = self.gradient(x_adv, y)
            keep.offer(x_adv, fooled, loss)
            x_adv = self.project(x_adv + self.step(g), x).detach()
        if not self.best:
            return x_adv
        _, loss, fooled = self.gradient(x_adv, y, grad=False)  # the last iterate competes too
        keep.offer(x_adv, fooled, loss)
        return keep.x

    def _apgd(self, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """APGD's iteration (Croce & Hein, 2020, Algorithm 1) on the EOT gradient; returns each example's best point."""
        n, shape = self.steps, (-1,) + (1,) * (x.dim() - 1)
        k, k_min, k_decr = max(int(0.22 * n), 1), max(int(0.06 * n), 1), max(int(0.03 * n), 1)
        eta = torch.full((len(x),), 2.0 * self.eps, device=x.device)
        g, loss, fooled = self.gradient(x_adv, y)
        best, best_loss, best_g = x_adv.clone(), loss.clone(), g.clone()  # highest loss: where a halved step restarts
        keep = _Best(x_adv)  # what the attack returns: most draws fooled, then highest loss (APGD's x_best_adv)
        keep.offer(x_adv, fooled, loss)
        losses, prev = [loss], x_adv.clone()
        # as fra31/auto-attack: no "not reduced and no better" halving at the first checkpoint
        last_check_loss, reduced, since = best_loss.clone(), torch.ones_like(best_loss, dtype=torch.bool), 0
        for i in range(n):
            a = 0.75 if i > 0 else 1.0
            z = self.project(x_adv + self.step(g, eta.view(shape)), x)
            x_new = self.project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - prev), x)
            prev, x_adv = x_adv, x_new.detach()
            g, loss, fooled = self.gradient(x_adv, y)
            keep.offer(x_adv, fooled, loss)
            losses.append(loss)
            better = loss > best_loss
            best[better], best_loss[better], best_g[better] = x_adv[better], loss[better], g[better]
            since += 1
            if since == k:  # a checkpoint: halve the step where fewer than 75% of steps raised the loss or it stalled
                rises = sum((losses[-j] > losses[-j - 1]).float() for j in range(1, k + 1))
                halve = (rises <= 0.75 * k) | (~reduced & (last_check_loss >= best_loss))
                eta[halve] /= 2
                x_adv[halve], g[halve] = best[halve], best_g[halve]
                reduced, last_check_loss, since, k = halve, best_loss.clone(), 0, max(k - k_decr, k_min)
        return keep.x if self.best else x_adv


class _Best:
    """Each example's best point so far: the most EOT draws fooled, then the highest EOT-averaged loss (with CE a
    point that fools the model can have a lower loss than one that does not)."""

    def __init__(self, x: torch.Tensor):
        self.x = x.clone()
        self.fooled = torch.full((len(x),), -1.0, device=x.device)
        self.loss = torch.full((len(x),), -float("inf"), device=x.device)

    def offer(self, x: torch.Tensor, fooled: torch.Tensor, loss: torch.Tensor) -> None:
        better = (fooled > self.fooled) | ((fooled == self.fooled) & (loss > self.loss))
        self.x[better], self.fooled[better], self.loss[better] = x[better], fooled[better], loss[better]


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
    return cls(ContiguousGrad(model), eps=ctx.eps, alpha=2.5 * ctx.eps / ctx.steps, steps=ctx.steps, random_start=True)


def build_eotpgd(model, ctx: AttackContext, loss: str = "ce", schedule: str = "constant"):
    return EOTPGD(model, ctx.norm, ctx.eps, ctx.steps, eot=ctx.eot, loss=ctx.loss or loss, seed=ctx.seed,
                  eot_batch=ctx.eot_batch, schedule=schedule)


def build_apgd_eot(model, ctx: AttackContext, loss: str = "dlr"):
    """APGD with EOT, batched (the `autoattack-rand` components); DLR needs three classes, else the margin."""
    loss = ctx.loss or loss
    return build_eotpgd(model, replace(ctx, loss=None), loss if ctx.n_classes >= 3 or loss != "dlr" else "margin",
                        schedule="apgd")


class SurrogateGrad(nn.Module):
    """The surrogate process (Lee & Kim, ICCV 2023): the defense's purification forward, the surrogate's (a
    shorter purifier, e.g. a student of the teacher) backward. Both draw from their own generators, so the value
    is exactly the defense's and the gradient exactly the surrogate's."""

    def __init__(self, purifier: nn.Module, surrogate: nn.Module):
        super().__init__()
        self.purifier, self.surrogate = purifier, surrogate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        through = self.surrogate(x)
        with torch.no_grad():
            out = self.purifier(x)
        return through + (out - through).detach()


def surrogate_target(model: Defended, transfer_source) -> nn.Module:
    """The defense with the transfer source's purifier as its backward pass."""
    return Defended(SurrogateGrad(model.purifier, transfer_source.purifier), model.classifier, model.votes)


def bpda_target(model: Defended, transfer_source=None) -> nn.Module:
    return Defended(BPDA(model.purifier), model.classifier, model.votes)


def transfer_target(model, transfer_source) -> nn.Module:
    return transfer_source
