"""Convergence of an attack, as a report: robust accuracy on the same examples at a ladder of budgets (steps x
EOT), a paired test between consecutive rungs, and the smallest budget that the largest no longer improves on
beyond one paired standard error (after the convergence checks of Carlini et al., "On Evaluating Adversarial
Robustness", 2019, and Croce & Hein, 2020)."""

from __future__ import annotations

from pathlib import Path

import torch

from core.errors import InputError

from ..harness import Budget, evaluate, purifier_of, with_changes
from ..stats import accuracy_stats, paired_change


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
    return {"attack": attack, "examples": len(y), "evals": r["evals"], "rungs": rows, **every_rung(rows),
            **verdict(rows)}


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
    lines += ["", (f"Converged at **{v}**: the largest budget ({big['steps']} x {big['eot']}) changes its worst-case "
                   f"figure by {100 * c['change']:+.1f} ± {100 * c['se']:.1f} points (paired), within one standard error."
                   if v else
                   f"**Not converged**: the largest budget ({big['steps']} x {big['eot']}) still lowers the rung "
                   f"below it by {100 * -c['change']:.1f} ± {100 * c['se']:.1f} points (paired, p = {c['p']:.3f}); "
                   "every figure here is an upper bound that more effort may lower."), ""]
    lines += [f"Robust under every rung: {100 * lad['every_rung']:.1f} ± {100 * lad['every_rung_se']:.1f}% (an "
              "example counts only where no budget broke it: the figure to quote, since the rungs' own randomness "
              "can leave a larger rung above a smaller one).", ""]
    return lines
