"""Gradient-masking alarms in the spirit of AutoAttack's checks (Croce & Hein, 2020), each a named flag."""

from __future__ import annotations

import math

import torch

from .attacks import WHITE_BOX

MEANINGS = {
    "robust-above-clean": "An attack left more examples correct than no attack at all: it is not finding "
                          "even the unperturbed point, so its gradients are broken or uninformative.",
    "accuracy-rises-with-epsilon": "Robust accuracy went up as the budget grew: a working attack with a larger "
                                   "budget can always do at least as well, so the attack is being misled.",
    "large-eps-not-chance": "At an epsilon large enough to erase the image, accuracy stayed above chance: the "
                            "attack cannot move the model even when everything is allowed.",
    "square-beats-white-box": "Square, which never looks at gradients, broke examples the white-box attacks "
                              "could not: the gradients are masked, and the white-box numbers overstate robustness.",
    "more-steps-change-result": "Doubling the attack's steps lowered robust accuracy noticeably: the attack had "
                                "not converged and the reported number is an overestimate.",
    "purifier-ignores-seed": "The purifier gave the same output under two different seeds: its randomness is "
                             "frozen, so one fixed function is being evaluated, not the stochastic defense.",
    "purifier-not-reproducible": "The purifier gave different outputs under the same seed: it draws noise from "
                                 "the global RNG, which attacks such as APGD and Square reseed.",
}


def tolerance(base: float, accuracy: float, n: int, stochastic: bool) -> float:
    """Slack before a flag: `base`, plus two standard errors of a proportion when the defense is random."""
    return base + (2 * math.sqrt(max(accuracy * (1 - accuracy), 1 / n) / n) if stochastic else 0.0)


def flag(name: str, raised: bool | None, detail: str) -> dict:
    """raised None means the check could not run (e.g. no Square in the attack list)."""
    return {"name": name, "checked": raised is not None, "raised": bool(raised), "detail": detail,
            "meaning": MEANINGS[name]}


@torch.no_grad()
def seed_checks(purifier, x: torch.Tensor, seed: int) -> list[dict]:
    """Purify one batch under seeds s, s and s + 1: outputs must repeat for s and differ for s + 1."""
    a = purifier.manual_seed(seed)(x)
    b = purifier.manual_seed(seed)(x)
    c = purifier.manual_seed(seed + 1)(x)
    same, diff = (a - b).abs().max().item(), (a - c).abs().max().item()
    return [flag("purifier-ignores-seed", diff < 1e-6, f"max |difference| between seeds {seed} and {seed + 1}: "
                 f"{diff:.3g}"),
            flag("purifier-not-reproducible", same > 1e-4, f"max |difference| between two runs with seed {seed}: "
                 f"{same:.3g}")]


def accuracy_checks(clean: float, attacks: dict, sweep: list | None, doubled: dict | None, n: int, chance: float,
                    base_tol: float, stochastic: bool) -> list[dict]:
    """Flags from the aggregated accuracies (averages over evaluations)."""
    tol = lambda acc: tolerance(base_tol, acc, n, stochastic)  # noqa: E731
    flags = []
    above = {k: v["average"] for k, v in attacks.items() if v["average"] > clean + tol(clean)}
    flags.append(flag("robust-above-clean", bool(above) if attacks else None,
                      f"clean {clean:.3f}; " + (", ".join(f"{k} {v:.3f}" for k, v in above.items()) or
                                                "every attack at or below clean")))
    if sweep:
        rises = [(e0, a0, e1, a1) for (e0, a0), (e1, a1) in zip(sweep, sweep[1:]) if a1 > a0 + tol(a0)]
        flags.append(flag("accuracy-rises-with-epsilon", bool(rises),
                          "; ".join(f"eps {e0:g}: {a0:.3f} -> eps {e1:g}: {a1:.3f}" for e0, a0, e1, a1 in rises)
                          or "accuracy falls or stays as epsilon grows"))
        eps_max, acc_max = sweep[-1]
        flags.append(flag("large-eps-not-chance", acc_max > chance + 0.1 + tol(acc_max),
                          f"eps {eps_max:g}: accuracy {acc_max:.3f} (chance {chance:.3f})"))
    else:
        flags.append(flag("accuracy-rises-with-epsilon", None, "no epsilon sweep was run"))
        flags.append(flag("large-eps-not-chance", None, "no epsilon sweep was run"))
    white = {k: v["average"] for k, v in attacks.items() if k in WHITE_BOX and k != "autoattack"}
    square = attacks.get("square", {}).get("average")
    by_square = attacks["autoattack"].get("broken_by", {}).get("square", 0.0) if "autoattack" in attacks else None
    if square is not None and white:
        best = min(white, key=white.get)
        flags.append(flag("square-beats-white-box", square < white[best] - tol(white[best]),
                          f"square {square:.3f} vs best white-box {best} {white[best]:.3f}"))
    elif by_square is not None:
        flags.append(flag("square-beats-white-box", by_square > tol(0.0),
                          f"inside autoattack, Square broke {by_square:.3f} of the examples that survived "
                          "APGD-CE, APGD-T and FAB-T"))
    else:
        flags.append(flag("square-beats-white-box", None, "neither square nor autoattack was run"))
    if doubled:
        flags.append(flag("more-steps-change-result", doubled["doubled"] < doubled["base"] - tol(doubled["base"]),
                          f"{doubled['attack']}: {doubled['base']:.3f} at {doubled['steps']} steps, "
                          f"{doubled['doubled']:.3f} at {2 * doubled['steps']}"))
    else:
        flags.append(flag("more-steps-change-result", None, "the doubled-steps check was not run"))
    return flags
