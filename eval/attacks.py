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
AA_TARGETS = 9  # standard AutoAttack: APGD-T and FAB-T against the 9 highest-scoring wrong classes


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


@dataclass
class Composed:
    """AutoAttack's protocol for a deterministic model (Croce & Hein, 2020): each attack runs on the examples
    that survived the ones before.

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


@dataclass
class Strongest:
    """The AutoAttack family on a stochastic defense: every sub-attack runs on every example (no pre-filter on
    a noisy pass), and each example keeps the candidate that fools the most of `draws` forward passes (what the
    report counts is whether a draw is fooled), the mean margin loss breaking ties; never the clean point because
    the attack's own draw was not fooled. Every candidate is scored on the same draws: the purifier is reseeded
    with `seed` before each score.

    `attacks`: (name, fn(x, y) -> list of candidate batches). Returns (x_adv, source): per example, the name
    of the sub-attack whose candidate was kept."""

    model: nn.Module
    attacks: list[tuple[str, Callable]]
    norm: str
    eps: float
    draws: int = 1
    seed: int = 0

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fraction of the draws fooled, mean margin) per example, on the draws that `seed` fixes."""
        purifier = getattr(self.model, "purifier", None)
        if purifier is not None and hasattr(purifier, "manual_seed"):
            purifier.manual_seed(self.seed)
        m = torch.stack([margin_loss(self.model(x), y) for _ in range(self.draws)])
        return (m > 0).float().mean(0), m.mean(0)

    def inside(self, cand: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Candidates within the threat model (FAB's boundary points may lie beyond eps)."""
        d = (cand - x).flatten(1)
        dist = d.abs().amax(1) if self.norm == "Linf" else d.norm(dim=1)
        return (dist <= self.eps * (1 + 1e-5)) & (cand.flatten(1).amin(1) >= 0) & (cand.flatten(1).amax(1) <= 1)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
        best, source = x.clone(), [""] * len(x)
        best_fooled = torch.full((len(x),), -1.0, device=x.device)
        best_margin = torch.full((len(x),), -float("inf"), device=x.device)
        for name, run in self.attacks:
            for cand in run(x, y):
                fooled, margin = self.score(cand, y)
                better = (fooled > best_fooled) | ((fooled == best_fooled) & (margin > best_margin))
                better &= self.inside(cand, x)
                best[better] = cand[better].to(best.dtype)
                best_fooled[better], best_margin[better] = fooled[better], margin[better]
                for i in better.nonzero().flatten().tolist():
                    source[i] = name
        return best, source


# --- candidates of torchattacks' AutoAttack components, without their keep-only-if-fooled filter -------------

def _apgd_best(attack):
    """APGD(-DLR) in best-loss mode: the highest-loss point of the run for every example."""
    return lambda x, y: [attack.perturb(x, y, best_loss=True)[1]]


def _per_target(attack, single_run):
    """One candidate per target class (the 2nd, 3rd, ... highest-scoring classes), as torchattacks' loop does."""
    def run(x, y):
        torch.manual_seed(attack.seed)
        out = []
        for target in range(2, attack.n_target_classes + 2):
            attack.target_class = target
            out.append(single_run(x, y))
        return out
    return run


def _apgdt_best(attack):
    """APGD-T: the highest-loss point against each target class."""
    return _per_target(attack, lambda x, y: attack.attack_single_run(x, y)[0])


def _fab_points(attack):
    """FAB-T: the boundary point it found against each target class (the input where it found none)."""
    return _per_target(attack, torch.no_grad()(attack.attack_single_run_targeted))


def _square_best(attack):
    """Square: the lowest-margin point of the search for every example."""
    def run(x, y):
        attack.init_hyperparam(x)
        torch.manual_seed(attack.seed)
        with torch.no_grad():
            return [attack.attack_single_run(x, y)[1]]
    return run


def _targets(ctx: AttackContext) -> int:
    """torchattacks' n_classes for APGD-T / FAB-T: it attacks n_classes - 1 targets, so 10 gives AutoAttack's 9."""
    return min(ctx.n_classes, AA_TARGETS + 1)


def _square(model, ctx: AttackContext):
    return torchattacks.Square(model, norm=ctx.norm, eps=ctx.eps, n_queries=ctx.queries, n_restarts=1, p_init=0.8,
                               seed=ctx.seed)


def _autoattack_parts(model, ctx: AttackContext) -> list[tuple[str, object]]:
    ta = torchattacks
    return [("apgd-ce", ta.APGD(model, norm=ctx.norm, eps=ctx.eps, steps=ctx.steps, n_restarts=1, loss="ce",
                                seed=ctx.seed)),
            ("apgd-t", ta.APGDT(model, norm=ctx.norm, eps=ctx.eps, steps=ctx.steps, n_restarts=1,
                                n_classes=_targets(ctx), seed=ctx.seed)),
            ("fab-t", ta.FAB(model, norm=ctx.norm, eps=ctx.eps, steps=ctx.steps, n_restarts=1, multi_targeted=True,
                             n_classes=_targets(ctx), seed=ctx.seed)),
            ("square", _square(model, ctx))]


def build_autoattack(model, ctx: AttackContext):
    """AutoAttack (Croce & Hein, 2020): APGD-CE, APGD-T, FAB-T (9 targets), Square, composed as the original,
    at `steps` (100) per gradient attack (torchattacks' own AutoAttack runs 10); on a stochastic defense each
    example keeps its strongest candidate (`Strongest`)."""
    parts = _autoattack_parts(model, ctx)
    if not ctx.stochastic:
        return Composed(model, parts)
    wrap = {"apgd-ce": _apgd_best, "apgd-t": _apgdt_best, "fab-t": _fab_points, "square": _square_best}
    return Strongest(model, [(name, wrap[name](a)) for name, a in parts], ctx.norm, ctx.eps, draws=ctx.eot,
                     seed=ctx.seed + 2)


def build_autoattack_rand(model, ctx: AttackContext):
    """AutoAttack's version for randomized defenses: APGD-CE and APGD-DLR with EOT over `eot` passes per step."""
    parts = [(f"apgd-{loss}", torchattacks.APGD(model, norm=ctx.norm, eps=ctx.eps, steps=ctx.steps, loss=loss,
                                                eot_iter=ctx.eot, seed=ctx.seed)) for loss in ("ce", "dlr")]
    if not ctx.stochastic:
        return Composed(model, parts)
    return Strongest(model, [(name, _apgd_best(a)) for name, a in parts], ctx.norm, ctx.eps, draws=ctx.eot,
                     seed=ctx.seed + 2)


def build_square(model, ctx: AttackContext):
    """Square (Andriushchenko et al., 2020), margin loss; on a stochastic defense, its lowest-margin point."""
    attack = _square(model, ctx)
    if not ctx.stochastic:
        return attack
    return Strongest(model, [("square", _square_best(attack))], ctx.norm, ctx.eps, draws=ctx.eot, seed=ctx.seed + 2)


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
