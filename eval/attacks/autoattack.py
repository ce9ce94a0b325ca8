"""AutoAttack (Croce & Hein, 2020) on our threat models: composed for a deterministic model, strongest candidate
per example for a stochastic one, over torchattacks' components."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torchattacks

from core.seeding import derive_seed

from .base import AttackContext, margin_loss
from .pgd import build_apgd_eot

AA_TARGETS = 9  # standard AutoAttack: APGD-T and FAB-T against the 9 highest-scoring wrong classes


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
                     seed=derive_seed(ctx.seed, "candidates"))


def build_autoattack_rand(model, ctx: AttackContext):
    """AutoAttack's version for randomized defenses: APGD-CE and APGD-DLR with EOT over `eot` passes per step,
    drawn as one batch (ours, `apgd-eot`: torchattacks' APGD draws its `eot_iter` passes one after another)."""
    parts = [(f"apgd-{loss}", build_apgd_eot(model, ctx, loss)) for loss in ("ce", "dlr")]
    if not ctx.stochastic:
        return Composed(model, parts)
    return Strongest(model, [(name, lambda x, y, a=a: [a(x, y)]) for name, a in parts], ctx.norm, ctx.eps,
                     draws=ctx.eot, seed=derive_seed(ctx.seed, "candidates"))


def build_square(model, ctx: AttackContext):
    """Square (Andriushchenko et al., 2020), margin loss; on a stochastic defense, its lowest-margin point."""
    attack = _square(model, ctx)
    if not ctx.stochastic:
        return attack
    return Strongest(model, [("square", _square_best(attack))], ctx.norm, ctx.eps, draws=ctx.eot,
                     seed=derive_seed(ctx.seed, "candidates"))
