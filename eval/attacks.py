"""Attacks by name (torchattacks, plus the adaptive ones for purifiers) and per-dataset epsilon presets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack

# Linf / L2 budgets on [0, 1] pixels: CIFAR-10 8/255 and 0.5 as in DiffPure; the ImageNet family 4/255
# (DiffPure; GUARD also reports 1/255: pass eps=0.00392); digits 0.1, where PGD breaks the bare ConvNet.
EPS_PRESETS = {
    "digits": {"Linf": 0.1, "L2": 1.0},
    "cifar10": {"Linf": 8 / 255, "L2": 0.5},
    "cifar10-jpeg": {"Linf": 8 / 255, "L2": 0.5},
    "imagenette": {"Linf": 4 / 255, "L2": 3.0},
    "tiny-imagenet": {"Linf": 4 / 255, "L2": 3.0},
    "imagenet": {"Linf": 4 / 255, "L2": 3.0},
}
NORMS = ("Linf", "L2")
STEPS = {"pgd": 100, "pgd-eot": 100, "bpda-eot": 100, "transfer": 100, "cw": 100, "mim": 10, "fgsm": 1,
         "autoattack": 100, "autoattack-rand": 100, "square": 0}
WHITE_BOX = ("pgd", "pgd-eot", "bpda-eot", "cw", "mim", "fgsm", "autoattack", "autoattack-rand")
NEEDS_PURIFIER = ("bpda-eot",)
ATTACKS = tuple(STEPS)


def preset_eps(dataset: str, norm: str = "Linf") -> float:
    """The threat model's epsilon for a dataset (see EPS_PRESETS)."""
    check_norm(norm)
    if dataset not in EPS_PRESETS:
        raise ValueError(f"no epsilon preset for dataset {dataset!r} (presets: {', '.join(EPS_PRESETS)}); "
                         "pass eps explicitly")
    return EPS_PRESETS[dataset][norm]


def large_eps(norm: str, shape) -> float:
    """An epsilon at which any working attack must reach chance: Linf 0.5 can turn every image grey."""
    return 0.5 if norm == "Linf" else 0.5 * math.sqrt(math.prod(shape))


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")


def check_attack(name: str, norm: str) -> None:
    """Raise before any work for an unknown attack name or one that does not exist in this norm."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    if norm == "L2" and name in ("mim", "fgsm"):
        raise ValueError(f"{name} is an Linf attack; under L2 use pgd, cw or autoattack")


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: the best wrong logit minus the true one (positive once misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -float("inf")).amax(1)
    return wrong - true


class EOTPGD(Attack):
    """PGD (Madry et al., 2018) with expectation over transformation (Athalye et al., 2018), Linf or L2.

    Each step follows the mean input gradient of `eot` independent forward passes (for a stochastic
    defense: `eot` purifications); with loss="margin" it is the Carlini-Wagner PGD attack (CW-Linf/L2).
    Step size 2.5 eps / steps, a random start drawn from the attack's own generator."""

    def __init__(self, model, norm: str = "Linf", eps: float = 8 / 255, steps: int = 100, eot: int = 1,
                 loss: str = "ce", alpha: float | None = None, random_start: bool = True, seed: int = 0):
        super().__init__("EOTPGD", model)
        check_norm(norm)
        if loss not in ("ce", "margin"):
            raise ValueError(f"unknown loss {loss!r}; known: ce, margin")
        if steps < 1 or eot < 1:
            raise ValueError(f"steps and eot must be at least 1, got steps={steps}, eot={eot}")
        self.norm, self.eps, self.steps, self.eot, self.loss = norm, eps, steps, eot, loss
        self.alpha = alpha if alpha is not None else 2.5 * eps / steps
        self.random_start, self.seed = random_start, seed

    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.get_logits(x)
        return margin_loss(logits, y).sum() if self.loss == "margin" else F.cross_entropy(logits, y, reduction="sum")

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The EOT gradient: mean over `eot` passes, one backward each (memory of one pass)."""
        g = torch.zeros_like(x)
        for _ in range(self.eot):
            x_ = x.detach().requires_grad_(True)
            g += torch.autograd.grad(self.objective(x_, y), x_)[0]
        return g / self.eot

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

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x, y = images.detach().to(self.device), labels.detach().to(self.device)
        x_adv = x.clone()
        if self.random_start:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            noise = torch.rand(x.shape, generator=gen).to(x.device) * 2 - 1
            if self.norm == "L2":
                noise = noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
                noise = noise * torch.rand(len(x), 1, 1, 1, generator=gen).to(x.device)
            x_adv = self.project(x + self.eps * noise, x)
        for _ in range(self.steps):
            x_adv = self.project(x_adv + self.step(self.gradient(x_adv, y)), x).detach()
        return x_adv


class BPDA(nn.Module):
    """Backward pass differentiable approximation (Athalye et al., 2018): purify forward, identity backward."""

    def __init__(self, purifier: nn.Module):
        super().__init__()
        self.purifier = purifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            out = self.purifier(x)
        return x + (out - x).detach()


@dataclass
class Composed:
    """AutoAttack's protocol (Croce & Hein, 2020): each attack runs on the examples that survived the ones before.

    Returns (x_adv, broken_by): the name of the attack that first broke each example, "clean" when it was
    misclassified without attack, "" when it survived all."""

    model: nn.Module
    attacks: list[tuple[str, object]]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        x_adv = x.clone()
        with torch.no_grad():
            alive = self.model(x).argmax(1) == y
        broken = ["" if a else "clean" for a in alive.tolist()]
        for name, attack in self.attacks:
            idx = alive.nonzero().flatten()
            if len(idx) == 0:
                break
            adv = attack(x[idx], y[idx])
            with torch.no_grad():
                fooled = self.model(adv).argmax(1) != y[idx]
            x_adv[idx[fooled]] = adv[fooled]
            alive[idx[fooled]] = False
            for i in idx[fooled].tolist():
                broken[i] = name
        return x_adv, broken


def build_attack(name: str, model: nn.Module, norm: str, eps: float, *, n_classes: int, seed: int = 0,
                 eot: int = 1, steps: int | None = None, queries: int = 5000):
    """The named attack on `model` ([0, 1] in, logits out): a callable (x, y) -> x_adv or (x_adv, broken_by).

    pgd: PGD, 100 steps, step 2.5 eps/steps, random start (torchattacks PGD / PGDL2).
    autoattack: APGD-CE, APGD-T (9 targets), FAB-T (9 targets), Square (5000 queries), 100 steps each,
    composed as in the original AutoAttack (torchattacks' own AutoAttack runs 10 steps).
    autoattack-rand: APGD-CE and APGD-DLR with EOT over `eot` passes (the original's version for
    randomized defenses, EOT 20). square: Square, 5000 queries, margin loss. cw: PGD on the Carlini-Wagner
    margin loss. mim: MI-FGSM, 10 steps, decay 1. fgsm: one signed-gradient step.
    pgd-eot / bpda-eot: EOTPGD with `eot` samples; for bpda-eot pass the defended model with the
    purifier wrapped in BPDA. transfer: crafted elsewhere (see eval.harness)."""
    check_attack(name, norm)
    steps = steps or STEPS[name]
    ta = torchattacks
    if name == "pgd":
        cls = ta.PGD if norm == "Linf" else ta.PGDL2
        return cls(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, random_start=True)
    if name in ("pgd-eot", "bpda-eot", "transfer"):
        return EOTPGD(model, norm, eps, steps, eot=eot, seed=seed)
    if name == "cw":
        return EOTPGD(model, norm, eps, steps, eot=eot, loss="margin", seed=seed)
    if name == "mim":
        return ta.MIFGSM(model, eps=eps, alpha=eps / steps, steps=steps, decay=1.0)
    if name == "fgsm":
        return ta.FGSM(model, eps=eps)
    if name == "square":
        return ta.Square(model, norm=norm, eps=eps, n_queries=queries, n_restarts=1, p_init=0.8, seed=seed)
    if name == "autoattack":
        return Composed(model, [
            ("apgd-ce", ta.APGD(model, norm=norm, eps=eps, steps=steps, n_restarts=1, loss="ce", seed=seed)),
            ("apgd-t", ta.APGDT(model, norm=norm, eps=eps, steps=steps, n_restarts=1, n_classes=n_classes,
                                seed=seed)),
            ("fab-t", ta.FAB(model, norm=norm, eps=eps, steps=steps, n_restarts=1, multi_targeted=True,
                             n_classes=n_classes, seed=seed)),
            ("square", ta.Square(model, norm=norm, eps=eps, n_queries=queries, n_restarts=1, p_init=0.8,
                                 seed=seed)),
        ])
    # autoattack-rand
    return Composed(model, [
        ("apgd-ce", ta.APGD(model, norm=norm, eps=eps, steps=steps, loss="ce", eot_iter=eot, seed=seed)),
        ("apgd-dlr", ta.APGD(model, norm=norm, eps=eps, steps=steps, loss="dlr", eot_iter=eot, seed=seed)),
    ])
