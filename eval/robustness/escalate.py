"""Escalation: a defense reported above a reference row (its teacher, plain distillation) is attacked again, by
transfer from each reference and by Square, before its figure is believed (Tramer et al., "On Adaptive Attacks
to Adversarial Example Defenses", 2020: a defense that beats its own baseline is the one to attack hardest)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..attacks import ATTACKS
from ..harness import Budget, evaluate, with_changes
from ..harness.checks import flag
from ..stats import accuracy_stats, flips, sign_test
from .matched import on_examples, subset_positions


def _worst_all(result: dict, positions: list[int] | None = None) -> list[bool]:
    """Per example: correct clean and under every attack of the threat model in every evaluation."""
    pe = result["per_example"]
    keys = ["clean", *(a for a in result["attacks"] if a not in result.get("beside_threat", []))]
    idx = range(len(pe["label"])) if positions is None else positions
    return [all(all(pe[k][i]) for k in keys) for i in idx]


def above_references(results: dict, references: list[str], total: int) -> dict[str, list[str]]:
    """label -> the references whose all-attacks figure it exceeds, on the examples both saw (one seed: the
    smaller draw is a subset of the larger)."""
    out = {}
    for label, r in results.items():
        if label in references or not r.get("stochastic"):
            continue
        for ref in references:
            q = results[ref]
            if q["seed"] != r["seed"]:  # different draws of examples: only the whole rows compare
                if r["worst_over_attacks"] > q["worst_over_attacks"]:
                    out.setdefault(label, []).append(ref)
                continue
            small, big = sorted((r, q), key=lambda s: s["examples"])
            pos = subset_positions(total, small["examples"], big["examples"], r["seed"])
            mine = on_examples(r, pos if r is big else list(range(r["examples"])))["all attacks"]["worst"]
            theirs = on_examples(q, pos if q is big else list(range(q["examples"])))["all attacks"]["worst"]
            if mine > theirs:
                out.setdefault(label, []).append(ref)
    return out


def escalate(model, x, y, budget: Budget, sources: dict, base: dict, out: str | Path | None, tolerance: float,
             **kw) -> dict:
    """Transfer from each of `sources` (name -> defended model to craft on) and Square on `model`; the row's
    all-attacks figure again as the worst case over its own attacks and these, and a flag, paired as
    `approximation-beats-full-gradient`: transfer or Square beat the row's strongest full-gradient attack beyond
    chance (per example, worst case over R; McNemar's exact sign test)."""
    quiet = {"sweep_eps": [], "check_steps": False}
    runs = {}
    for name, src in sources.items():
        runs[f"transfer from {name}"] = evaluate(
            model, x, y, budget=with_changes(budget, {**quiet, "attacks": ["transfer"]}), transfer_source=src,
            out=None if out is None else Path(out) / f"transfer-{name}", **{"progress": None, **kw})
    runs["square"] = evaluate(model, x, y, budget=with_changes(budget, {**quiet, "attacks": ["square"]}),
                              out=None if out is None else Path(out) / "square", **{"progress": None, **kw})
    before = _worst_all(base)
    pe = base["per_example"]
    white = [a for a in base["attacks"] if ATTACKS[a].white_box and not ATTACKS[a].needs_purifier
             and a not in base.get("beside_threat", [])]
    exact = min(white, key=lambda a: base["attacks"][a]["worst"]) if white else None
    exact_worst = [all(v) for v in pe[exact]] if exact else before
    attacks, worst, paired = {}, torch.tensor(before), []
    for name, r in runs.items():
        a = "transfer" if name.startswith("transfer") else "square"
        m = torch.tensor(r["per_example"][a]).T.bool()  # R x n
        attacks[name] = accuracy_stats(m)
        w = m.all(0)
        worst &= w
        broken, recovered = flips(exact_worst, w.tolist())  # paired against the row's strongest full gradient
        paired.append((name, broken, recovered, sign_test(broken, recovered), attacks[name]["worst"]))
    n, base_acc = len(before), sum(exact_worst) / len(before)
    raised = any(p <= 0.05 and base_acc - acc > tolerance for _, _, _, p, acc in paired)
    detail = "; ".join(f"{name} {100 * acc:.1f}% worst against {exact or 'all attacks'} {100 * base_acc:.1f}% ({b} "
                       f"examples broken only by {name}, {c} only by {exact or 'the row'}; p = {p:.3f})"
                       for name, b, c, p, acc in paired)
    return {"attacks": attacks, "before": sum(before) / n, "worst_over_attacks": worst.float().mean().item(),
            "flag": flag("escalation-beats-full-gradient", raised, detail)}

