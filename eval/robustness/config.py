"""`python -m eval robustness`'s config: one classifier, several defenses in front of it, and how hard to attack
each; everything that can be wrong with it is found here, before any work."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InputError
from core.zoo import is_named

from ..attacks import ATTACKS, NORMS, check_attack
from ..defended import defense_entries
from ..harness import Budget, with_changes
from ..harness.evaluate import SOURCED
from .ladder import check_ladder, ladder_attack, second_optimizer


@dataclass
class EvalConfig:
    """What to evaluate and how hard to attack it (the defaults: digits, the quickstart's folders)."""

    dataset: str = "digits"
    data_root: str | None = None
    classifier: str = "runs/quickstart/classifier/classifier"
    # "none" (the bare classifier), a purifier folder, or {purifier: DIR, label: ..., and any budget key for
    # that defense (n, evals, eot, steps, attacks, sweep_eps, ...)}
    defenses: list = field(default_factory=lambda: ["none", "runs/quickstart/teacher/purifier"])
    norm: str = "Linf"
    eps: float | None = None  # None: the dataset's preset (eval.attacks.EPS_PRESETS)
    budget: Budget = field(default_factory=lambda: Budget(
        attacks=["pgd", "autoattack", "pgd-eot", "bpda-eot"], n=256, evals=3, sweep_n=64, check_n=64))
    transfer_from: str | None = None  # purifier folder the transfer attack crafts on (surrogate-eot: its backward)
    grad_checkpoint: str = "auto"  # auto: on for purifiers with more than 8 steps; "true" / "false"
    # labels of reference rows (the teacher, plain distillation): a defense above one is attacked again by
    # transfer from each reference and by Square (eval/robustness/escalate.py); crafting on a 100-step teacher costs its attack
    escalate: list = field(default_factory=list)
    # attacks (of every defense's budget) to score as the robust-distillation benchmarks do: BEARD's RR, AE, CREI
    # and ROME's I-RR from their accuracies and times (eval/robustness/scores.py); ["all"]: every attack run
    scores: list = field(default_factory=list)


def defenses(cfg: EvalConfig) -> list[dict]:
    """Each defense as {label, purifier, budget}, checked before any work."""
    out = []
    for d in defense_entries(cfg.defenses):
        changes = {k: v for k, v in d.items() if k not in ("purifier", "label")}
        budget = with_changes(cfg.budget, changes, where="a defenses entry (besides purifier and label)")
        for a in budget.attacks:
            check_attack(a, cfg.norm)
        if budget.ladder:
            check_ladder(budget.ladder)
            if budget.ladder_attack:
                check_attack(budget.ladder_attack, cfg.norm)
            attack = ladder_attack(budget, d["purifier"] is not None)
            if attack:
                second_optimizer(budget, attack)
        out.append({"label": d["label"], "purifier": d["purifier"], "budget": budget})
    return out


def check(cfg: EvalConfig) -> list[dict]:
    """Everything that can be wrong with `cfg`, before any work; returns the defenses to evaluate."""
    if cfg.norm not in NORMS:
        raise InputError(f"unknown norm {cfg.norm!r}; known: {', '.join(NORMS)}")
    if set(cfg.budget.steps) - set(ATTACKS):
        raise InputError(f"steps for unknown attack(s) {sorted(set(cfg.budget.steps) - set(ATTACKS))}")
    if cfg.grad_checkpoint not in ("auto", "true", "false"):
        raise InputError(f"grad_checkpoint must be auto, true or false, got {cfg.grad_checkpoint!r}")
    if not is_named(cfg.classifier) and not Path(cfg.classifier).is_dir():
        raise FileNotFoundError(f"classifier folder {cfg.classifier} does not exist (train one with "
                                "`python -m robust_data squeeze` or `python -m eval quickstart`)")
    plan = defenses(cfg)
    purified = {d["label"] for d in plan if d["purifier"]}
    if set(cfg.escalate) - purified:
        raise InputError(f"escalate names {', '.join(sorted(set(cfg.escalate) - purified))}, not a purified defense "
                         f"of this config; purified defenses: {', '.join(sorted(purified)) or 'none'}")
    for d in plan:
        missing = sorted(set(cfg.scores) - {"all"} - set(d["budget"].attacks))
        if missing or (cfg.scores and len(scored(cfg.scores, d["budget"].attacks)) < 2):
            raise InputError(f"scores needs two or more attacks of the budget of {d['label']}" +
                             (f"; it does not run {', '.join(missing)}" if missing else ""))
    if any(a in SOURCED for d in plan for a in d["budget"].attacks) and not cfg.transfer_from:
        raise InputError("the transfer and surrogate-eot attacks need transfer_from: the purifier folder to craft the "
                         "examples on, or whose backward pass the surrogate attack follows")
    return plan


def scored(scores: list, attacks: list) -> list:
    """The attacks `scores` names (all of `attacks` for ["all"])."""
    return list(attacks) if "all" in scores else [a for a in attacks if a in scores]
