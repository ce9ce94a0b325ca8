"""Like-for-like comparison of defenses: which rows were attacked more weakly, and every row on shared examples."""

from __future__ import annotations

import torch

from core.datasets import sample_indices

from ..stats import accuracy_stats


def subset_positions(total: int, small: int, big: int, seed: int) -> list[int]:
    """Where the examples of `to_tensors(ds, small, seed)` sit in the batch of `to_tensors(ds, big, seed)` (the
    smaller draw is the first `small` of the same seeded permutation, so it is a subset)."""
    where = {v: i for i, v in enumerate(sample_indices(total, big, seed).tolist())}
    return [where[v] for v in sample_indices(total, small, seed).tolist()]


def weaker(results: dict) -> dict[str, list[str]]:
    """For each stochastic defense (harness results by label), how it was attacked more weakly than the others:
    an attack the others faced and it did not, fewer steps or EOT samples, or fewer evaluations R. Deterministic
    rows (no purifier) are compared among themselves."""
    out = {}
    for stochastic in (True, False):
        rows = {k: r for k, r in results.items() if r.get("stochastic", False) == stochastic and "strength" in r}
        if len(rows) < 2:
            continue
        best: dict = {}
        for r in rows.values():
            for a, s in r["strength"].items():
                b = best.setdefault(a, {"steps": 0, "eot": 0})
                b["steps"], b["eot"] = max(b["steps"], s["steps"] or 0), max(b["eot"], s["eot"])
        most_evals = max(r["evals"] for r in rows.values())
        for label, r in rows.items():
            why = [f"no {a}" for a in best if a not in r["strength"]]
            for a, s in r["strength"].items():
                if (s["steps"] or 0) < best[a]["steps"]:
                    why.append(f"{a} {s['steps']} steps < {best[a]['steps']}")
                if s["eot"] < best[a]["eot"]:
                    why.append(f"{a} EOT {s['eot']} < {best[a]['eot']}")
            if r["evals"] < most_evals:
                why.append(f"R {r['evals']} < {most_evals}")
            if why:
                out[label] = why
    return out


def on_examples(result: dict, positions: list[int]) -> dict:
    """A harness result's clean, per-attack and all-attacks accuracy (average and worst over R, with standard
    errors) on the examples at `positions` of its batch."""
    pe = result["per_example"]
    mats = {k: torch.tensor([pe[k][i] for i in positions], dtype=torch.bool).T for k in ["clean", *result["attacks"]]}
    out = {k: accuracy_stats(m) for k, m in mats.items()}
    inside = [m for k, m in mats.items() if k not in result.get("beside_threat", [])]  # the threat model's
    out["all attacks"] = accuracy_stats(torch.stack(inside).all(0).all(0, keepdim=True))
    return out


def shared_examples(results: dict, total: int) -> tuple[int, dict] | None:
    """When the stochastic defenses saw different numbers of examples (one seed), every one of them on the
    examples the smallest saw: (n, {label: on_examples(...)}). None when they all saw the same ones."""
    rows = {k: r for k, r in results.items() if r.get("stochastic") and "seed" in r}
    sizes = {r["examples"] for r in rows.values()}
    if len(sizes) < 2 or len({r["seed"] for r in rows.values()}) > 1:
        return None
    small = min(sizes)
    seed = next(iter(rows.values()))["seed"]
    return small, {k: on_examples(r, subset_positions(total, small, r["examples"], seed)) for k, r in rows.items()}
