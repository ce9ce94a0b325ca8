"""Convergence of an attack, as a report: robust accuracy on the same examples at a ladder of budgets (steps x
EOT), a paired test between consecutive rungs, the smallest budget that the largest no longer improves on
beyond one paired standard error, and a second optimizer at the largest budget (after the convergence checks of
Carlini et al., "On Evaluating Adversarial Robustness", 2019, and Croce & Hein, 2020).

Doubling the budget of one fixed-step optimizer does not show convergence: it can plateau where another step
schedule does not. So a ladder is called converged only when its largest rung runs at least MIN_STEPS steps,
the largest rung no longer lowers the figure, and a second optimizer (APGD-EOT's schedule beside a fixed-step
ladder, or fixed-step PGD-EOT beside an APGD one) at the largest budget lowers the every-rung figure by no more
than one paired standard error; otherwise the report says "not shown converged" and why."""

from __future__ import annotations

from pathlib import Path

import torch

from core.errors import InputError

from ..harness import Budget, evaluate, purifier_of, with_changes
from ..stats import accuracy_stats, paired_change

MIN_STEPS = 100  # a ladder whose largest rung runs fewer steps shows no convergence


def check_ladder(rungs) -> list[tuple[int, int]]:
    """[[steps, eot], ...] with both at least 1 and the budget growing rung by rung, or an InputError."""
    try:
        out = [(int(s), int(e)) for s, e in rungs]
    except (TypeError, ValueError):
        raise InputError(f"ladder must be a list of [steps, eot] pairs, got {rungs!r}") from None
    if len(out) < 2 or any(s < 1 or e < 1 for s, e in out):
        raise InputError(f"ladder needs at least two rungs of [steps >= 1, eot >= 1], got {rungs!r}")
    if any(s2 * e2 <= s1 * e1 or s2 < s1 or e2 < e1 for (s1, e1), (s2, e2) in zip(out, out[1:])):
        raise InputError(f"every rung of the ladder must spend more than the one before (steps and eot never "
                         f"fewer), got {rungs!r}")
    return out


def verdict(rows: list[dict]) -> dict:
    """The smallest rung from which on the largest rung lowers no figure by more than one paired standard error
    (None when the rung below the largest already fails: the largest budget still helped, so even its figure is
    an upper bound that more effort may lower)."""
    last, found = rows[-1], None
    for row in reversed(rows[:-1]):
        c = paired_change(row["correct"], last["correct"])
        if -c["change"] > c["se"] + 1e-12:  # one flip alone is exactly one standard error: within
            break
        found = (row, c)
    if found is None:
        return {"converged": None, "against_largest": paired_change(rows[-2]["correct"], last["correct"])}
    return {"converged": f"{found[0]['steps']}x{found[0]['eot']}", "against_largest": found[1]}


def every_rung(rows: list[dict]) -> dict:
    """The share of examples no rung broke (an attacker who ran every budget keeps whichever broke an example:
    the upper bound to quote), with the harness's standard error of a worst-case figure."""
    s = accuracy_stats(torch.tensor([row["correct"] for row in rows]))  # worst: survives every row
    return {"every_rung": s["worst"], "every_rung_se": s["worst_se"]}


def run_ladder(model, x, y, attack: str, rungs, budget: Budget, out: str | Path | None = None,
               **kw) -> dict | None:
    """`attack` alone at each (steps, eot) of `rungs` on the same examples (`eval.evaluate` with `budget`'s R,
    seed and losses; sweep and doubled-steps check off). A row's figure is the worst case over R per example.
    A model without a purifier climbs the steps alone (EOT 1); None when that leaves fewer than two rungs."""
    rungs = check_ladder(rungs)
    second = second_optimizer(budget, attack)  # a wrong one is refused before any rung runs
    if purifier_of(model) is None:  # a deterministic model is attacked without EOT: only the steps climb
        rungs = list(dict.fromkeys((s, 1) for s, _ in rungs))
        if len(rungs) < 2:
            return None  # the ladder climbs only EOT, which a deterministic model does not use
    rows = []
    for steps, eot in rungs:
        b = with_changes(budget, {"attacks": [attack], "steps": {**budget.steps, attack: steps}, "eot": eot,
                                  "sweep_eps": [], "check_steps": False})
        r = evaluate(model, x, y, budget=b, out=None if out is None else Path(out) / f"{steps}x{eot}",
                     **{"progress": None, **kw})
        s = r["attacks"][attack]
        rows.append({"steps": steps, "eot": eot, "average": s["average"], "worst": s["worst"],
                     "worst_se": s["worst_se"], "seconds": r["seconds"][attack],
                     "correct": [all(v) for v in r["per_example"][attack]]})
    for prev, row in zip(rows, rows[1:]):
        row["vs_previous"] = paired_change(prev["correct"], row["correct"])
    check = None
    if second is not None:
        steps, eot = rungs[-1]
        b = with_changes(budget, {"attacks": [second], "steps": {**budget.steps, second: steps}, "eot": eot,
                                  "sweep_eps": [], "check_steps": False})
        r2 = evaluate(model, x, y, budget=b, out=None if out is None else Path(out) / f"second-{second}-{steps}x{eot}",
                      **{"progress": None, **kw})
        check = cross_check(rows, second, steps, eot, [all(v) for v in r2["per_example"][second]],
                            r2["seconds"][second])
    single = verdict(rows)
    return {"attack": attack, "examples": len(y), "evals": r["evals"], "rungs": rows, **every_rung(rows), **single,
            "second": check, **shown(single, check, rungs[-1][0])}


SECOND_OPTIMIZERS = ("pgd-eot", "apgd-eot", "diffhammer", "diffhammer-purified", "autoattack-rand", "pgd", "cw")


def second_optimizer(budget: Budget, attack: str) -> str | None:
    """The optimizer that checks a ladder: the budget's `ladder_second`, else the other step schedule."""
    if budget.ladder_second == "none":
        return None
    second = budget.ladder_second or ("pgd-eot" if attack == "apgd-eot" else "apgd-eot")
    if second == attack or second not in SECOND_OPTIMIZERS:
        raise InputError(f"ladder_second must be another white-box optimizer of the threat model than the ladder's "
                         f"{attack}: one of {', '.join(a for a in SECOND_OPTIMIZERS if a != attack)}, got {second!r}")
    return second


def cross_check(rows: list[dict], attack: str, steps: int, eot: int, correct: list, seconds: float) -> dict:
    """The second optimizer beside the ladder, paired on the same examples: the examples it breaks that no rung
    broke, as a change of the every-rung figure (it agrees when that is at most one paired standard error), and
    the share robust under every rung and it (the figure to quote)."""
    every = [all(v) for v in zip(*(row["correct"] for row in rows))]
    both = [e and c for e, c in zip(every, correct)]
    c = paired_change(every, both)  # only losses: examples the ladder's rungs all missed and it broke
    s = accuracy_stats(torch.tensor([both]))
    return {"attack": attack, "steps": steps, "eot": eot, "worst": sum(correct) / len(correct), "seconds": seconds,
            "against_every_rung": c, "agrees": -c["change"] <= c["se"] + 1e-12, "robust_under_both": s["worst"],
            "robust_under_both_se": s["worst_se"]}


def shown(single: dict, check: dict | None, largest_steps: int) -> dict:
    """Whether convergence is shown (the ladder converged, it reached MIN_STEPS, a second optimizer agrees), and
    if not, why not."""
    why = []
    if single["converged"] is None:
        why.append("its largest rung still lowers the figure")
    if largest_steps < MIN_STEPS:
        why.append(f"its largest rung runs {largest_steps} steps, fewer than {MIN_STEPS}")
    if check is None:
        why.append("no second optimizer was run")
    elif not check["agrees"]:
        c = check["against_every_rung"]
        why.append(f"{check['attack']} at the largest budget lowers it by {100 * -c['change']:.1f} ± "
                   f"{100 * c['se']:.1f} points (paired)")
    return {"shown_converged": not why, "not_shown_because": why}


def ladder_attack(budget: Budget, stochastic: bool) -> str | None:
    """The attack a budget's ladder climbs: `ladder_attack`, else the defense's primary attack (the harness's)."""
    if budget.ladder_attack:
        return budget.ladder_attack
    order = ("pgd-eot", "pgd") if stochastic else ("pgd", "pgd-eot")
    return next((a for a in order if a in budget.attacks), None)


def render_ladder(label: str, lad: dict) -> list[str]:
    """Markdown lines: one table of the rungs, the verdict and the figure robust under every rung."""
    v = lad["converged"]
    lines = [f"### {label}: {lad['attack']}, {lad['examples']} examples, R = {lad['evals']}", "",
             "| steps x EOT | average | worst ± se | change vs previous rung (paired ± se) | broken / recovered | p | "
             "seconds |",
             "|---|---|---|---|---|---|---|"]
    for row in lad["rungs"]:
        c = row.get("vs_previous")
        ch = "-" if c is None else f"{100 * c['change']:+.1f} ± {100 * c['se']:.1f}"
        fl = "-" if c is None else f"{c['broken']} / {c['recovered']}"
        p = "-" if c is None else f"{c['p']:.3f}"
        lines.append(f"| {row['steps']} x {row['eot']} | {100 * row['average']:.1f} | {100 * row['worst']:.1f} ± "
                     f"{100 * row['worst_se']:.1f} | {ch} | {fl} | {p} | {row['seconds']:.0f} |")
    c = lad["against_largest"]
    big = lad["rungs"][-1]
    lines += ["", (f"Levels off at **{v}**: the largest budget ({big['steps']} x {big['eot']}) changes its worst-case "
                   f"figure by {100 * c['change']:+.1f} ± {100 * c['se']:.1f} points (paired), within one standard error."
                   if v else
                   f"**Does not level off**: the largest budget ({big['steps']} x {big['eot']}) still lowers the rung "
                   f"below it by {100 * -c['change']:.1f} ± {100 * c['se']:.1f} points (paired, p = {c['p']:.3f}); "
                   "every figure here is an upper bound that more effort may lower."), ""]
    lines += [f"Robust under every rung: {100 * lad['every_rung']:.1f} ± {100 * lad['every_rung_se']:.1f}% (an "
              "example counts only where no budget broke it: the figure to quote, since the rungs' own randomness "
              "can leave a larger rung above a smaller one).", ""]
    s = lad.get("second")
    if s:
        c = s["against_every_rung"]
        lines += [f"Second optimizer: {s['attack']} at {s['steps']} x {s['eot']} leaves {100 * s['worst']:.1f}% and breaks "
                  f"{c['broken']} examples that no rung broke ({100 * c['change']:+.1f} ± {100 * c['se']:.1f} points "
                  f"on the every-rung figure, paired; p = {c['p']:.3f}): "
                  + ("agrees." if s["agrees"] else "**disagrees**.") + f" Robust under every rung and it: "
                  f"{100 * s['robust_under_both']:.1f} ± {100 * s['robust_under_both_se']:.1f}%.", ""]
    if "shown_converged" in lad:
        lines += ["**Convergence shown** (the ladder converged, reached " f"{MIN_STEPS} steps, and a second optimizer "
                  "agrees)." if lad["shown_converged"] else
                  "**Not shown converged**: " + "; ".join(lad["not_shown_because"]) + ". Quote the all-attacks "
                  "worst case, an upper bound.", ""]
    return lines
