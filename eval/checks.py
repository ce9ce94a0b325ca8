"""Gradient-masking alarms in the spirit of AutoAttack's checks (Croce & Hein, 2020), each a named flag."""

from __future__ import annotations

import math

import torch

from .attacks import ATTACKS

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
    "suite-above-simpler-attack": "An attack suite left more examples correct than a simpler attack in it or beside "
                                  "it (PGD, PGD-EOT) on the same defense: on a deterministic model the suite is "
                                  "misused (wrong loss, too few steps, a wrapper that hides the gradient); on a "
                                  "stochastic one its attacks follow single noisy draws and it needs EOT: use "
                                  "autoattack-rand, and report the stronger number.",
}
SUITES = ("autoattack", "autoattack-rand")
SIMPLER = ("pgd", "pgd-eot")


def tolerance(base: float, accuracy: float, n: int, stochastic: bool, two_sample: bool = False) -> float:
    """Slack before a flag: `base`, plus, when the defense is random, two standard errors of a proportion over
    `n` examples (of the difference of two independent evaluations when `two_sample`)."""
    se = math.sqrt(max(accuracy * (1 - accuracy), 1 / n) / n) * (math.sqrt(2) if two_sample else 1.0)
    return base + (2 * se if stochastic else 0.0)


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


def accuracy_checks(clean: float, attacks: dict, sweep: list[dict] | None, doubled: dict | None, n: int,
                    chance: float, base_tol: float, stochastic: bool, large: float) -> list[dict]:
    """Flags from the aggregated accuracies (averages over evaluations); each uses its own sample size."""
    def tol(acc, m=n, two=False):
        return tolerance(base_tol, acc, m, stochastic, two)

    flags = []
    above = {k: v["average"] for k, v in attacks.items() if v["average"] > clean + tol(clean)}
    flags.append(flag("robust-above-clean", bool(above) if attacks else None,
                      f"clean {clean:.3f}; " + (", ".join(f"{k} {v:.3f}" for k, v in above.items()) or
                                                "every attack at or below clean")))
    flags += _sweep_checks(sorted(sweep or [], key=lambda p: p["eps"]), chance, large, tol)
    white = {k: v["average"] for k, v in attacks.items() if ATTACKS[k].white_box and k not in SUITES}
    square = attacks.get("square", {}).get("average")
    by_square = attacks["autoattack"].get("broken_by", {}).get("square", 0.0) if "autoattack" in attacks else None
    if square is not None and white:
        best = min(white, key=white.get)
        flags.append(flag("square-beats-white-box", square < white[best] - tol(white[best], two=True),
                          f"square {square:.3f} vs best white-box {best} {white[best]:.3f}"))
    elif by_square is not None:
        flags.append(flag("square-beats-white-box", by_square > tol(0.0),
                          f"inside autoattack, Square broke {by_square:.3f} of the examples that survived "
                          "APGD-CE, APGD-T and FAB-T"))
    else:
        flags.append(flag("square-beats-white-box", None, "neither square nor autoattack was run"))
    if doubled:
        m, base = doubled["examples"], doubled["base"]
        flags.append(flag("more-steps-change-result", doubled["doubled"] < base - tol(base, m, two=True),
                          f"{doubled['attack']}: {base:.3f} at {doubled['steps']} steps, "
                          f"{doubled['doubled']:.3f} at {2 * doubled['steps']} ({m} examples)"))
    else:
        flags.append(flag("more-steps-change-result", None, "the doubled-steps check was not run"))
    flags.append(_suite_check(attacks, stochastic, lambda acc: tol(acc, two=True)))
    return flags


def _sweep_checks(sweep: list[dict], chance: float, large: float, tol) -> list[dict]:
    """Accuracy must not rise with epsilon; at an epsilon of at least `large` it must reach chance."""
    if not sweep:
        return [flag("accuracy-rises-with-epsilon", None, "no epsilon sweep was run"),
                flag("large-eps-not-chance", None, "no epsilon sweep was run")]
    rises = [(p, q) for p, q in zip(sweep, sweep[1:])
             if q["accuracy"] > p["accuracy"] + tol(p["accuracy"], min(p["examples"], q["examples"]), True)]
    out = [flag("accuracy-rises-with-epsilon", bool(rises),
                "; ".join(f"eps {p['eps']:g}: {p['accuracy']:.3f} -> eps {q['eps']:g}: {q['accuracy']:.3f}"
                          for p, q in rises) or "accuracy falls or stays as epsilon grows")]
    big = [p for p in sweep if p["eps"] >= large - 1e-9]
    if not big:
        out.append(flag("large-eps-not-chance", None, f"the sweep stops at eps {sweep[-1]['eps']:g}, below the "
                                                      f"large epsilon {large:g} that must reach chance"))
    else:
        p = big[-1]
        out.append(flag("large-eps-not-chance", p["accuracy"] > chance + 0.1 + tol(p["accuracy"], p["examples"]),
                        f"eps {p['eps']:g}: accuracy {p['accuracy']:.3f} (chance {chance:.3f}, "
                        f"{p['examples']} examples)"))
    return out


def _suite_check(attacks: dict, stochastic: bool, tol) -> dict:
    """An attack suite must not score above a simpler attack on the same defense."""
    simpler = {k: attacks[k]["average"] for k in SIMPLER if k in attacks}
    suites = {k: attacks[k]["average"] for k in SUITES if k in attacks}
    if not simpler or not suites:
        return flag("suite-above-simpler-attack", None, "no attack suite beside pgd or pgd-eot was run")
    best = min(simpler, key=simpler.get)
    above = {k: v for k, v in suites.items() if v > simpler[best] + tol(simpler[best])}
    why = ("the defense is stochastic: the suite needs EOT (autoattack-rand) and the stronger number is the one "
           "to report" if stochastic else "the model is deterministic: the suite is misused")
    detail = ", ".join(f"{k} {v:.3f}" for k, v in suites.items()) + f" vs {best} {simpler[best]:.3f}"
    return flag("suite-above-simpler-attack", bool(above), detail + (f"; {why}" if above else ""))
