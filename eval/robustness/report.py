"""The robustness report a person reads: one table over defenses, the matched and escalated rows, budgets, flags
with their meaning, benchmark scores, ladders and the epsilon sweep."""

from __future__ import annotations

from ..stats import pm
from .ladder import render_ladder


def render(report: dict) -> str:
    """The report a person reads: one table over defenses, budgets, flags with their meaning."""
    res = report["defenses"]
    m = report.get("matched") or {"weaker": {}, "shared": None}
    attacks = list(dict.fromkeys(a for r in res.values() for a in r["attacks"]))
    lines = _table(report, res, m, attacks) + _beside(res) + _weaker(m) + _shared(m, attacks)
    lines += _budgets(res) + _flags(res) + _escalations(res) + render_scores(res) + _ladders(res) + _sweeps(res)
    lines += ["", "Images: `<defense>/grid.png` (clean / adversarial / purified); per-example results: "
              "`<defense>/report.json` (`per_example`) and `<defense>/examples.jsonl`.", ""]
    return "\n".join(lines)


def _table(report: dict, res: dict, m: dict, attacks: list) -> list[str]:
    beside = {a for r in res.values() for a in r.get("beside_threat", [])}
    head = ["defense", "NFE", "R", "n", "clean avg / worst"] + [
        f"{a}{' †' if a in beside else ''} avg / worst" for a in attacks] + ["all attacks"]
    lines = [f"# Robustness on {report['dataset']}", "",
             f"Classifier `{report['classifier']}`. Accuracy in %, average over R evaluations / worst case "
             "(robust only if the example survives all R), each ± its standard error over the n examples. "
             "`all attacks`: survives every attack in every evaluation. A defense marked * was attacked more "
             "weakly than the others (see below): its numbers are upper bounds, not comparable.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, r in res.items():
        cells = [label + (" *" if label in m["weaker"] else ""), str(r["nfe"]), str(r["evals"]), str(r["examples"]),
                 _aw(r["clean"])]
        for a in attacks:
            s = r["attacks"].get(a)
            cells.append(_aw(s) if s else "skipped" if a in r["skipped"] else "-")
        e = r.get("escalation")
        cells.append(_pct(r["worst_over_attacks"]) if not e else
                     f"{_pct(e['before'])} -> {_pct(r['worst_over_attacks'])} (escalated)")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _beside(res: dict) -> list[str]:
    """The attacks beside the threat model, and the median distance of the minimal-perturbation ones."""
    beside = {a for r in res.values() for a in r.get("beside_threat", [])}
    if not beside:
        return []
    return ["", "† beside the threat model (its own norm and epsilon, or unbounded: see the budgets), so "
            "outside `all attacks`." + "".join(
                f" {a}: median L2 distance to its points, over the examples correct on clean (inf: it failed on most) "
                + ", ".join(f"{k} {r['attacks'][a]['median_l2']:.3g}" for k, r in res.items()
                            if "median_l2" in r["attacks"].get(a, {})) + "."
                for a in sorted(beside) if any("median_l2" in r["attacks"].get(a, {}) for r in res.values()))]


def _weaker(m: dict) -> list[str]:
    if not m["weaker"]:
        return []
    return ["", "\\* attacked more weakly than the others: " +
            "; ".join(f"**{k}** ({', '.join(v)})" for k, v in m["weaker"].items()) + "."]


def _shared(m: dict, attacks: list) -> list[str]:
    """Every purified defense on the examples the smallest row saw."""
    sh = m["shared"]
    if not sh:
        return []
    cols = ["clean"] + [a for a in attacks if any(a in row for row in sh["rows"].values())] + ["all attacks"]
    lines = ["", f"## Every purified defense on the same {sh['examples']} examples", "",
             "The examples the smallest row saw (a subset of every larger row's, same seed): average / worst "
             "over R, ± standard error.", "", "| defense | " + " | ".join(cols) + " |",
             "|" + "---|" * (len(cols) + 1)]
    for label, row in sh["rows"].items():
        lines.append(f"| {label}{' *' if label in m['weaker'] else ''} | " +
                     " | ".join(_aw(row[c]) if c in row else "-" for c in cols) + " |")
    return lines


def _budgets(res: dict) -> list[str]:
    lines = ["", "## Threat model and budgets", ""]
    for label, r in res.items():
        t = r["threat"]
        lines.append(f"- **{label}**: {t['norm']} eps {t['eps']:.4g}; " +
                     "; ".join(f"{a}: {b}" for a, b in r["budgets"].items()) +
                     "".join(f"; {a} skipped ({why})" for a, why in r["skipped"].items()))
    return lines


def _flags(res: dict) -> list[str]:
    lines = ["", "## Gradient-masking checks", ""]
    for label, r in res.items():
        lines.append(f"### {label}: " + (", ".join(f"**{f}**" for f in r["raised"]) or "no flag raised"))
        lines += [""] + [f"- {'RAISED' if f['raised'] else 'ok' if f['checked'] else 'not checked'} "
                         f"`{f['name']}`: {f['detail']}." + (f" {f['meaning']}" if f["raised"] else "")
                         for f in r["flags"]] + [""]
    return lines


ESCALATION = ("Escalation: rows above a reference, attacked again",
              "Each defense whose all-attacks figure exceeded a reference row's (on the examples both saw) was attacked "
              "again by transfer from every reference (PGD-EOT crafted on it, scored here) and by Square; worst case "
              "over R per example.")
LADDERS = ("Convergence of the attacks",
           "Each defense's ladder attack alone at growing budgets on its examples; a rung's figure is the worst case "
           "over R per example, each change paired (the same examples) with McNemar's one-sided exact p. Converged: "
           "the smallest budget whose figure the largest lowers by at most one paired standard error.")


def _escalations(res: dict) -> list[str]:
    """The rows that were escalated: their attacks again, and the flag."""
    rows = _having(res, "escalation")
    lines = _section(*ESCALATION, ["defense", "above", "all attacks before", "escalation attacks (worst ± se)",
                                   "all attacks after"]) if rows else []
    for label, e in rows.items():
        parts = ", ".join(f"{n} {100 * s['worst']:.1f} ± {100 * s['worst_se']:.1f}" for n, s in e["attacks"].items())
        lines.append(f"| {label} | {', '.join(e['above'])} | {100 * e['before']:.1f} | {parts} | "
                     f"{100 * e['worst_over_attacks']:.1f} |")
    return lines + ([""] + [f"- {label}: {'RAISED' if e['flag']['raised'] else 'ok'} `{e['flag']['name']}`: "
                            f"{e['flag']['detail']}." for label, e in rows.items()] + [""] if rows else [])


def _ladders(res: dict) -> list[str]:
    ladders = _having(res, "ladder")
    lines = _section(*LADDERS) if ladders else []
    for k, lad in ladders.items():
        lines += render_ladder(k, lad)
    return lines


def _sweeps(res: dict) -> list[str]:
    sweeps = _having(res, "sweep")
    if not sweeps:
        return []
    lines = _section("Robust accuracy against epsilon", "![robust accuracy against epsilon](robust_vs_eps.png)")
    return lines + [f"- {k}: " + ", ".join(f"eps {p['eps']:g}: {_pct(p['accuracy'])}" for p in s)
                    for k, s in sweeps.items()]


def render_scores(res: dict) -> list[str]:
    """BEARD's and ROME's scores per defense, when the config asked for them."""
    rows = _having(res, "scores")
    if not rows:
        return []
    lines = _section("Benchmark scores (BEARD's RR, AE, CREI; ROME's I-RR)",
                     "In percent, from the average accuracies and the attacks' seconds on this machine, as BEARD's "
                     "`auto_metrics.py` computes them: RR = 1 - (clean - mean attacked) / (clean - min attacked), AE = "
                     "(mean attack time - clean time) / (max attack time - clean time), CREI = (RR + AE) / 2, I-RR = 1 "
                     "- (clean - mean attacked)(clean - min attacked) / clean^2. They depend on which attacks are in "
                     "the set.", ["defense", "attacks", "RR", "AE", "CREI", "I-RR"])
    for k, s in rows.items():
        lines.append(f"| {k} | {', '.join(s['attacks'])} | {s['rr']:.1f} | {s['ae']:.1f} | {s['crei']:.1f} | "
                     f"{s['i_rr']:.1f} |")
    return lines + [""]


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _aw(s: dict) -> str:
    """'avg ± se / worst ± se' in percent."""
    return f"{pm(s, 'average')} / {pm(s, 'worst')}"


def _having(res: dict, key: str) -> dict:
    """Each defense's `key` entry, for the defenses that have one."""
    return {k: r[key] for k, r in res.items() if r.get(key)}


def _section(title: str, intro: str, head: list[str] | None = None) -> list[str]:
    """A section's title, its one paragraph and, given a head, the start of its table."""
    return [f"## {title}", "", intro, ""] + (["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] if head else [])
