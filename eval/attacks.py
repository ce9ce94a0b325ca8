"""Attacks by name: one table (`ATTACKS`) of torchattacks and adaptive attacks, and per-dataset epsilon presets.

Adding an attack is one `register_attack(AttackSpec(...))` with its builder; the harness, the budget lines,
the checks and the config validation all read the table."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchattacks
from torchattacks.attack import Attack

from core.errors import InputError

from .autoattack import AA_TARGETS, build_autoattack, build_autoattack_rand, build_square, margin_loss
from .defended import Defended

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


@dataclass(frozen=True)
class AttackContext:
    """What a builder needs beyond the model: the threat model and the budget of this one run."""

    norm: str
    eps: float
    steps: int
    n_classes: int
    seed: int = 0
    eot: int = 1
    queries: int = 5000
    stochastic: bool = False


@dataclass(frozen=True)
class AttackSpec:
    """One attack: its name, default steps, kind, the norms it exists in, how its budget reads, its builder.

    `build(model, ctx)` returns a callable (x, y) -> x_adv, or (x_adv, source) where source names, per example,
    the sub-attack whose candidate was kept. `target(model, transfer_source)` is what the attack differentiates
    (default: the defended model itself)."""

    name: str
    steps: int
    white_box: bool
    build: Callable
    budget: Callable[[AttackContext], str]
    norms: tuple[str, ...] = NORMS
    needs_purifier: bool = False
    target: Callable | None = None


ATTACKS: dict[str, AttackSpec] = {}


def register_attack(spec: AttackSpec) -> AttackSpec:
    """Make an attack known by name to the harness, the configs and the checks."""
    ATTACKS[spec.name] = spec
    return spec


def preset_eps(dataset: str, norm: str = "Linf") -> float:
    """The threat model's epsilon for a dataset (see EPS_PRESETS)."""
    check_norm(norm)
    if dataset not in EPS_PRESETS:
        raise InputError(f"no epsilon preset for dataset {dataset!r} (presets: {', '.join(EPS_PRESETS)}); "
                         "pass eps explicitly")
    return EPS_PRESETS[dataset][norm]


def large_eps(norm: str, shape) -> float:
    """An epsilon at which any working attack must reach chance: Linf 0.5 can turn every image grey."""
    return 0.5 if norm == "Linf" else 0.5 * math.sqrt(math.prod(shape))


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")


def check_attack(name: str, norm: str) -> AttackSpec:
    """The attack's table entry; raises before any work for an unknown name or a norm it does not exist in."""
    if name not in ATTACKS:
        raise InputError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    spec = ATTACKS[name]
    if norm not in spec.norms:
        raise InputError(f"{name} is an {'/'.join(spec.norms)} attack; under {norm} use "
                         f"{', '.join(a for a, s in ATTACKS.items() if norm in s.norms and s.white_box)}")
    return spec


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
            raise InputError(f"unknown loss {loss!r}; known: ce, margin")
        if steps < 1 or eot < 1:
            raise InputError(f"steps and eot must be at least 1, got steps={steps}, eot={eot}")
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


def build_pgd(model, ctx: AttackContext):
    cls = torchattacks.PGD if ctx.norm == "Linf" else torchattacks.PGDL2
    return cls(model, eps=ctx.eps, alpha=2.5 * ctx.eps / ctx.steps, steps=ctx.steps, random_start=True)


def build_eotpgd(model, ctx: AttackContext, loss: str = "ce"):
    return EOTPGD(model, ctx.norm, ctx.eps, ctx.steps, eot=ctx.eot, loss=loss, seed=ctx.seed)


def bpda_target(model: Defended, transfer_source=None) -> nn.Module:
    return Defended(BPDA(model.purifier), model.classifier, model.votes)


def transfer_target(model, transfer_source) -> nn.Module:
    return transfer_source


for _spec in (
    AttackSpec("pgd", 100, True, build_pgd, lambda c: f"{c.steps} steps, step 2.5 eps/{c.steps}, random start"),
    AttackSpec("pgd-eot", 100, True, build_eotpgd,
               lambda c: f"{c.steps} steps x EOT {c.eot}, full gradient through every purifier step"),
    AttackSpec("bpda-eot", 100, True, build_eotpgd,
               lambda c: f"{c.steps} steps x EOT {c.eot}, identity backward through the purifier",
               needs_purifier=True, target=bpda_target),
    AttackSpec("transfer", 100, False, build_eotpgd,
               lambda c: f"pgd-eot on the source defense, {c.steps} steps x EOT {c.eot}", target=transfer_target),
    AttackSpec("cw", 100, True, lambda m, c: build_eotpgd(m, c, "margin"),
               lambda c: f"{c.steps} steps on the CW margin loss"),
    AttackSpec("mim", 10, True, lambda m, c: torchattacks.MIFGSM(m, eps=c.eps, alpha=c.eps / c.steps,
                                                                 steps=c.steps, decay=1.0),
               lambda c: f"{c.steps} steps, decay 1.0", norms=("Linf",)),
    AttackSpec("fgsm", 1, True, lambda m, c: torchattacks.FGSM(m, eps=c.eps), lambda c: "one step", norms=("Linf",)),
    AttackSpec("autoattack", 100, True, build_autoattack,
               lambda c: f"APGD-CE, APGD-T, FAB-T {c.steps} steps each ({min(c.n_classes - 1, AA_TARGETS)} targets), "
                         f"Square {c.queries} queries" + (", strongest candidate per example over EOT "
                                                          f"{c.eot}" if c.stochastic else "")),
    AttackSpec("autoattack-rand", 100, True, build_autoattack_rand,
               lambda c: f"APGD-CE, APGD-DLR {c.steps} steps x EOT {c.eot}" + (
                   ", strongest candidate per example" if c.stochastic else "")),
    AttackSpec("square", 0, False, build_square, lambda c: f"{c.queries} queries"),
):
    register_attack(_spec)


def build_attack(name: str, model: nn.Module, norm: str, eps: float, *, n_classes: int, seed: int = 0,
                 eot: int = 1, steps: int | None = None, queries: int = 5000, stochastic: bool = False):
    """The named attack on `model` ([0, 1] in, logits out): a callable (x, y) -> x_adv or (x_adv, source)."""
    spec = check_attack(name, norm)
    ctx = AttackContext(norm, eps, steps or spec.steps, n_classes, seed, eot, queries, stochastic)
    return spec.build(model, ctx)
