"""Gradient-masking alarms in the spirit of AutoAttack's checks (Croce & Hein, 2020), each a named flag with its
meaning (`MEANINGS`), raised by the harness on every run."""

from __future__ import annotations

import math

import torch

from core.seeding import derive_seed

from ..attacks import ATTACKS
from ..stats import sign_test

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
    "gradients-near-orthogonal": "The input gradients of independent purification draws of the same image "
                                 "point in nearly unrelated directions: each draw's gradient is mostly noise, "
                                 "averaging a few of them (EOT) cancels rather than converges (DiffHammer's "
                                 "gradient dilemma), and an attack at this EOT is likely far from converged.",
    "escalation-beats-full-gradient": "A defense reported above a reference row (its teacher, plain distillation) "
                                      "lost examples, beyond chance, to transfer from the reference or to Square "
                                      "that its own full-gradient attacks left: its gradients mislead the "
                                      "attacker, and its figure stood above the reference only for that reason.",
    "approximation-beats-full-gradient": "BPDA, a transfer or a surrogate attack broke examples the full-gradient attack "
                                         "left, beyond chance (paired, the same examples): the exact gradient "
                                         "is less useful than an approximation of it, the signature of "
                                         "obfuscated gradients; the full-gradient number overstates robustness.",
}
SUITES = ("autoattack", "autoattack-rand")
APPROXIMATIONS = ("bpda-eot", "transfer", "surrogate-eot")
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


def gradient_probe(model, x: torch.Tensor, y: torch.Tensor, seed: int, draws: int = 4,
                   threshold: float = 0.1) -> dict:
    """The mean cosine between the input gradients (cross-entropy) of `draws` independent purifications of each
    image, over every pair, and the defended model's mean input-gradient norm against the bare classifier's;
    flagged when the mean cosine is below `threshold` (for random directions in d pixels it is about 0)."""
    import torch.nn.functional as F

    def grad(net, s=None):
        if s is not None:
            model.purifier.manual_seed(s)
        x_ = x.detach().clone().requires_grad_(True)
        return torch.autograd.grad(F.cross_entropy(net(x_), y, reduction="sum"), x_)[0].flatten(1)

    g = torch.stack([grad(model, derive_seed(seed, "probe", i)) for i in range(draws)])  # draws x n x d
    ratio = (g.norm(dim=2).mean() / grad(model.classifier).norm(dim=1).mean().clamp_min(1e-20)).item()
    ratio = round(ratio, 4) if ratio >= 1e-4 else ratio
    if ratio < 1e-6:  # no gradient at all: nothing to compare, and itself a masked gradient
        return {**flag("gradients-near-orthogonal", True, f"the input gradient is zero through the purifier "
                       f"({ratio:.3g}x the bare classifier's norm)"), "cosine": None, "norm_ratio": ratio}
    u = g / g.norm(dim=2, keepdim=True).clamp_min(1e-20)
    cos = torch.stack([(u[i] * u[j]).sum(1) for i in range(draws) for j in range(i + 1, draws)]).mean().item()
    return {**flag("gradients-near-orthogonal", cos < threshold,
                   f"mean cosine {cos:.3f} between the input gradients of {draws} purification draws ({len(x)} "
                   f"examples, every pair); input-gradient norm {ratio:.3g}x the bare classifier's"),
            "cosine": round(cos, 4), "norm_ratio": round(ratio, 4)}  # rounded: the same on any thread count


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
                    chance: float, base_tol: float, stochastic: bool, large: float,
                    paired: dict | None = None) -> list[dict]:
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
        flags.append(_doubled_check(doubled, base_tol))
    else:
        flags.append(flag("more-steps-change-result", None, "the doubled-steps check was not run"))
    flags.append(_suite_check(attacks, stochastic, lambda acc: tol(acc, two=True)))
    flags.append(_approximation_check(paired or {}, base_tol))
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


def _approximation_check(paired: dict, base_tol: float, level: float = 0.05) -> dict:
    """`paired`: attack -> {broken, recovered, approx, exact} against pgd-eot, worst case over R per example."""
    if not paired:
        return flag("approximation-beats-full-gradient", None, "pgd-eot was not run beside bpda-eot, transfer or surrogate-eot")
    raised, parts = False, []
    for a, d in paired.items():
        p = sign_test(d["broken"], d["recovered"])
        raised |= p <= level and d["exact"] - d["approx"] > base_tol
        parts.append(f"{a} {d['approx']:.3f} vs pgd-eot {d['exact']:.3f} ({d['broken']} broken only by {a}, "
                     f"{d['recovered']} only by pgd-eot; p = {p:.3f})")
    return flag("approximation-beats-full-gradient", raised, "; ".join(parts))


def _doubled_check(d: dict, base_tol: float, level: float = 0.05) -> dict:
    """Paired (McNemar's exact sign test on the same examples): the doubled run broke `broken` examples the base
    run left and left `recovered` that it broke; if doubling did not help, each flip is a fair coin. Raised when
    the one-sided p-value is at most `level` and the accuracy fell by more than `base_tol`."""
    k, j = d["broken"], d["recovered"]
    p = sign_test(k, j)
    raised = p <= level and d["base"] - d["doubled"] > base_tol
    return flag("more-steps-change-result", raised,
                f"{d['attack']}: {d['base']:.3f} at {d['steps']} steps, {d['doubled']:.3f} at {2 * d['steps']} "
                f"({d['examples']} examples; {k} broken only by the doubled run, {j} only by the base one; paired "
                f"sign test p = {p:.3f})")

