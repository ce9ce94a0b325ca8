"""How hard the harness attacks one defense: the one settings object that `evaluate`, `python -m eval robustness`
(and its per-defense overrides) and the quickstart all use."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from core.config import from_dict, to_dict
from core.errors import InputError

from ..attacks import ATTACKS, AttackContext, attack_norm, check_attack, check_loss


@dataclass(frozen=True)
class Budget:
    """The attacks and their budget; a defense overrides fields of its config's budget by name."""

    attacks: list[str] = field(default_factory=lambda: ["pgd"])
    n: int | None = None  # test examples (None: all); `evaluate` attacks the batch it is given
    evals: int = 1  # R independent evaluations of a stochastic defense (a deterministic one gets 1)
    eot: int = 20  # EOT samples per gradient (and per candidate score) on a stochastic defense
    steps: dict = field(default_factory=dict)  # per-attack steps, e.g. {pgd-eot: 50}; default: the attack's own
    attack_eps: dict = field(default_factory=dict)  # per-attack epsilon, e.g. {pgd-l2: 0.5} (an attack with its own norm)
    losses: dict = field(default_factory=dict)  # per-attack loss of the PGD-EOT family, e.g. {pgd-eot: margin}
    eot_batch: int | None = None  # EOT copies per forward pass (None: all `eot` in one pass; lower to save memory)
    queries: int = 5000  # Square
    votes: int = 1  # the defense's majority vote over that many purifications
    sweep_eps: list[float] = field(default_factory=list)  # robust accuracy against epsilon (the primary attack)
    sweep_n: int | None = None  # examples of each sweep point (None: all)
    check_steps: bool = True  # rerun the primary attack at twice its steps (a gradient-masking check)
    check_n: int | None = None  # examples of that rerun (None: all)
    ladder: list = field(default_factory=list)  # [[steps, eot], ...]: the primary attack at each, a convergence report
    ladder_attack: str | None = None  # the attack the ladder climbs (None: the primary, pgd-eot or pgd)
    # a second optimizer at the ladder's largest budget, which must agree within one paired standard error (None:
    # apgd-eot, or pgd-eot when the ladder climbs apgd-eot; "none": no second optimizer, and no convergence shown)
    ladder_second: str | None = None
    tolerance: float = 0.02  # slack of the gradient-masking flags, before the standard errors
    batch_size: int = 64
    seed: int = 0


BUDGET_KEYS = tuple(f.name for f in fields(Budget))
_NONE_MEANS_ALL = ("n", "sweep_n", "check_n")  # fields whose None is itself a value: all examples


def with_changes(budget: Budget, changes: dict, where: str = "a budget") -> Budget:
    """`budget` with `changes` (field -> value), validated like a config; an unknown key names the valid ones.
    A value of None means the field's default (the budget's own value), as everywhere in the toolkit."""
    changes = {k: v for k, v in changes.items() if v is not None or k in _NONE_MEANS_ALL}
    unknown = sorted(set(changes) - set(BUDGET_KEYS))
    if unknown:
        raise InputError(f"unknown key(s) {', '.join(unknown)} in {where}; valid: {', '.join(BUDGET_KEYS)}")
    return from_dict(Budget, {**to_dict(budget), **changes})


def check_budget(b: Budget, norm: str) -> None:
    """Everything about a budget that can be wrong under a threat model, before any work."""
    for a in b.attacks:
        check_attack(a, norm)
        own = ATTACKS[a].threat
        if a in b.attack_eps and own in (None, norm):
            raise InputError(f"attack_eps is for attacks under another norm than the run's; {a} attacks the run's "
                             f"threat model ({norm}, eps from the run)")
        if own not in (None, "unbounded", norm) and a not in b.attack_eps:
            raise InputError(f"{a} attacks under {own} in a {norm} run: give its epsilon as budget attack_eps: "
                             f"{{{a}: EPS}}")
    unknown = sorted((set(b.steps) | set(b.losses) | set(b.attack_eps)) - set(ATTACKS))
    if unknown:
        raise InputError(f"steps, losses or attack_eps given for unknown attack(s) {', '.join(unknown)}; known: "
                         f"{', '.join(ATTACKS)}")
    for a, loss in b.losses.items():
        check_loss(a, loss)
    if any(not v > 0 for v in b.attack_eps.values()):
        raise InputError(f"attack_eps must be positive, got {b.attack_eps}")
    if b.eot_batch is not None and b.eot_batch < 1:
        raise InputError(f"eot_batch must be at least 1 (or None: all EOT copies at once), got {b.eot_batch}")
    if b.evals < 1:
        raise InputError(f"evals must be at least 1, got {b.evals}")


def budgets(attacks, b: Budget, norm: str, eps: float, eot: int, n_classes: int, stochastic: bool) -> dict:
    """What each attack was allowed, in words a reader can check."""
    def ctx(a):
        return AttackContext(attack_norm(a, norm), b.attack_eps.get(a, eps), b.steps.get(a) or ATTACKS[a].steps,
                             n_classes, b.seed, eot, b.queries, stochastic, b.losses.get(a))

    return {a: ATTACKS[a].budget(ctx(a)) for a in attacks}
