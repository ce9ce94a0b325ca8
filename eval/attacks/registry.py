"""Attacks by name: one table (`ATTACKS`) of torchattacks and adaptive attacks, and per-dataset epsilon presets.

Adding an attack is one `register_attack(AttackSpec(...))` with its builder; the harness, the budget lines,
the checks and the config validation all read the table."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch.nn as nn
import torchattacks

from core.errors import InputError

from .autoattack import AA_TARGETS, build_autoattack, build_autoattack_rand, build_square
from .base import NORMS, AttackContext, check_norm
from .diffhammer import LOSSES as HAMMER_LOSSES
from .diffhammer import build_diffhammer
from .minimal import build_cw_l2, build_deepfool
from .pgd import LOSSES, bpda_target, build_apgd_eot, build_eotpgd, build_pgd, surrogate_target, transfer_target

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
    losses: tuple[str, ...] = ()  # the losses a budget may choose for it (`Budget.losses`)
    # None: the run's threat model. "L2" / "Linf": its own norm whatever the run's (its epsilon from `Budget.attack_eps`
    # when the norms differ); "unbounded": a minimal-perturbation attack. Either way it is reported beside the
    # threat model: outside the all-attacks figure and the white-box comparisons, inside benchmark scores.
    threat: str | None = None


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


def check_loss(name: str, loss: str | None) -> None:
    """A loss chosen for an attack must be one that attack takes."""
    if loss is None:
        return
    spec = ATTACKS[name]
    if loss not in spec.losses:
        takes = [a for a, s in ATTACKS.items() if s.losses]
        raise InputError(f"{name} takes no loss {loss!r}" + (f"; it takes {', '.join(spec.losses)}" if spec.losses
                                                             else f"; attacks with a choice of loss: {', '.join(takes)}"))


def check_attack(name: str, norm: str) -> AttackSpec:
    """The attack's table entry; raises before any work for an unknown name or a norm it does not exist in."""
    if name not in ATTACKS:
        raise InputError(f"unknown attack {name!r}; known: {', '.join(ATTACKS)}")
    spec = ATTACKS[name]
    if spec.threat is None and norm not in spec.norms:
        raise InputError(f"{name} is an {'/'.join(spec.norms)} attack; under {norm} use "
                         f"{', '.join(a for a, s in ATTACKS.items() if norm in s.norms and s.white_box)}")
    return spec


for _spec in (
    AttackSpec("pgd", 100, True, build_pgd, lambda c: f"{c.steps} steps, step 2.5 eps/{c.steps}, random start"),
    AttackSpec("pgd-eot", 100, True, build_eotpgd,
               lambda c: f"{c.steps} steps x EOT {c.eot}, full gradient through every purifier step, "
                         f"{c.loss or 'ce'} loss, best iterate", losses=LOSSES),
    AttackSpec("apgd-eot", 100, True, build_apgd_eot,
               lambda c: f"{c.steps} steps x EOT {c.eot}, APGD step-size schedule and momentum, full gradient "
                         f"through every purifier step, {c.loss or 'dlr'} loss, best iterate", losses=LOSSES),
    AttackSpec("bpda-eot", 100, True, build_eotpgd,
               lambda c: f"{c.steps} steps x EOT {c.eot}, identity backward through the purifier, "
                         f"{c.loss or 'ce'} loss, best iterate", needs_purifier=True, target=bpda_target, losses=LOSSES),
    AttackSpec("transfer", 100, False, build_eotpgd,
               lambda c: f"pgd-eot on the source defense, {c.steps} steps x EOT {c.eot}, {c.loss or 'ce'} loss, "
                         "best iterate (on the source)", target=transfer_target, losses=LOSSES),
    AttackSpec("surrogate-eot", 100, True, build_eotpgd,
               lambda c: f"{c.steps} steps x EOT {c.eot}, the defense's purification forward and the transfer "
                         f"source's backward (the surrogate process), {c.loss or 'ce'} loss, best iterate",
               needs_purifier=True, target=surrogate_target, losses=LOSSES),
    AttackSpec("diffhammer", 100, True, build_diffhammer,
               lambda c: f"{c.steps} steps x {c.eot} draws, EM-selected weighted full gradient (DiffHammer), "
                         f"agreement on each draw's input gradient, {c.loss or 'margin'} loss, best iterate by draws "
                         "fooled", losses=HAMMER_LOSSES),
    AttackSpec("diffhammer-purified", 100, True, lambda m, c: build_diffhammer(m, c, "purified"),
               lambda c: f"{c.steps} steps x {c.eot} draws, DiffHammer with agreement at the purified image (the "
                         f"released code's), {c.loss or 'margin'} loss, best iterate by draws fooled",
               losses=HAMMER_LOSSES),
    AttackSpec("cw", 100, True, lambda m, c: build_eotpgd(m, c, "margin"),
               lambda c: f"{c.steps} steps on the CW margin loss, best iterate"),
    AttackSpec("mim", 10, True, lambda m, c: torchattacks.MIFGSM(m, eps=c.eps, alpha=c.eps / c.steps,
                                                                 steps=c.steps, decay=1.0),
               lambda c: f"{c.steps} steps, decay 1.0", norms=("Linf",)),
    AttackSpec("fgsm", 1, True, lambda m, c: torchattacks.FGSM(m, eps=c.eps), lambda c: "one step", norms=("Linf",)),
    AttackSpec("autoattack", 100, True, build_autoattack,
               lambda c: f"APGD-CE, APGD-T, FAB-T {c.steps} steps each ({min(c.n_classes - 1, AA_TARGETS)} targets), "
                         f"Square {c.queries} queries" + (", strongest candidate per example over EOT "
                                                          f"{c.eot}" if c.stochastic else "")),
    AttackSpec("autoattack-rand", 100, True, build_autoattack_rand,
               lambda c: f"APGD-CE, APGD-DLR {c.steps} steps x EOT {c.eot} (batched)" + (
                   ", strongest candidate per example" if c.stochastic else "")),
    AttackSpec("square", 0, False, build_square, lambda c: f"{c.queries} queries"),
    AttackSpec("pgd-l2", 10, True, lambda m, c: build_pgd(m, replace(c, norm="L2")),
               lambda c: f"L2 eps {c.eps:.4g}, {c.steps} steps, step 2.5 eps/{c.steps}, random start",
               threat="L2"),
    AttackSpec("deepfool", 50, True, build_deepfool,
               lambda c: f"unbounded (minimal L2), {c.steps} steps, overshoot 0.02", threat="unbounded"),
    AttackSpec("cw-l2", 100, True, build_cw_l2,
               lambda c: f"unbounded (minimal L2), {c.steps} Adam steps, c 1, kappa 0, lr 0.01", threat="unbounded"),
):
    register_attack(_spec)


def attack_norm(name: str, norm: str) -> str:
    """The norm an attack crafts under: its own (`AttackSpec.threat` "L2" / "Linf"), else the run's."""
    own = ATTACKS[name].threat
    return own if own in NORMS else norm


def within_threat(name: str, norm: str) -> bool:
    """Whether an attack attacks the run's threat model (norm and epsilon), so that its figure bounds it."""
    return ATTACKS[name].threat in (None, norm)


def build_attack(name: str, model: nn.Module, norm: str, eps: float, *, n_classes: int, seed: int = 0,
                 eot: int = 1, steps: int | None = None, queries: int = 5000, stochastic: bool = False,
                 loss: str | None = None, eot_batch: int | None = None):
    """The named attack on `model` ([0, 1] in, logits out): a callable (x, y) -> x_adv or (x_adv, source)."""
    spec = check_attack(name, norm)
    check_loss(name, loss)
    norm = attack_norm(name, norm)
    ctx = AttackContext(norm, eps, steps or spec.steps, n_classes, seed, eot, queries, stochastic, loss, eot_batch)
    return spec.build(model, ctx)
