"""`python -m eval robustness`: one classifier, several defenses in front of it, the harness on each, one report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.checkpoint import load_classifier
from core.config import save_config, to_dict
from core.datasets import load_dataset, to_tensors
from core.errors import InputError
from core.io import atomic_write_json, atomic_write_text, load_tensors, read_json
from core.runs import make_accelerator, same_config_or_fail
from core.zoo import is_named
from purify import label_of, load_purifier

from .attacks import ATTACKS, NORMS, check_attack, preset_eps
from .budget import Budget, with_changes
from .convergence import check_ladder, ladder_attack, render_ladder, run_ladder
from .defended import Defended
from .escalate import above_references, escalate, render_escalation
from .harness import evaluate
from .matched import pm, shared_examples, weaker
from .scores import bench_scores


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
    transfer_from: str | None = None  # purifier folder the transfer attack crafts on
    grad_checkpoint: str = "auto"  # auto: on for purifiers with more than 8 steps; "true" / "false"
    # labels of reference rows (the teacher, plain distillation): a defense above one is attacked again by
    # transfer from each reference and by Square (eval/escalate.py); crafting on a 100-step teacher costs its attack
    escalate: list = field(default_factory=list)
    # attacks (of every defense's budget) to score as the robust-distillation benchmarks do: BEARD's RR, AE, CREI
    # and ROME's I-RR from their accuracies and times (eval/scores.py); ["all"]: every attack run
    scores: list = field(default_factory=list)


def defenses(cfg: EvalConfig) -> list[dict]:
    """Each defense as {label, purifier, budget}, checked before any work."""
    out, labels = [], set()
    for d in cfg.defenses:
        d = {"purifier": d} if isinstance(d, str) else dict(d)
        if "purifier" not in d:
            raise InputError(f"a defenses entry needs a purifier (a folder or 'none'), got {d}")
        changes = {k: v for k, v in d.items() if k not in ("purifier", "label")}
        budget = with_changes(cfg.budget, changes, where="a defenses entry (besides purifier and label)")
        bare = d["purifier"] in (None, "none")
        if not bare and not Path(d["purifier"]).is_dir():
            raise FileNotFoundError(f"purifier folder {d['purifier']} does not exist")
        label = d.get("label") or ("undefended" if bare else _label(d["purifier"]))
        base, i = label, 2
        while label in labels:
            label, i = f"{base}-{i}", i + 1
        labels.add(label)
        for a in budget.attacks:
            check_attack(a, cfg.norm)
        if budget.ladder:
            check_ladder(budget.ladder)
            if budget.ladder_attack:
                check_attack(budget.ladder_attack, cfg.norm)
        out.append({"label": label, "purifier": None if bare else str(d["purifier"]), "budget": budget})
    return out


def _label(folder) -> str:
    """'consistency-1' from a purifier folder's purifier.json, else the folder's name."""
    meta = Path(folder) / "purifier.json"
    return label_of(read_json(meta)) if meta.is_file() else Path(folder).name


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
    if any(a == "transfer" for d in plan for a in d["budget"].attacks) and not cfg.transfer_from:
        raise InputError("the transfer attack needs transfer_from: the purifier folder to craft the examples on")
    return plan


def scored(scores: list, attacks: list) -> list:
    """The attacks `scores` names (all of `attacks` for ["all"])."""
    return list(attacks) if "all" in scores else [a for a in attacks if a in scores]


def _scores(cfg: EvalConfig, r: dict) -> dict | None:
    names = scored(cfg.scores, list(r["attacks"]))
    if len(names) < 2:
        return None
    return bench_scores(r["clean"]["average"], {a: r["attacks"][a]["average"] for a in names},
                        r["seconds"]["clean"], {a: r["seconds"][a] for a in names})


def run_robustness(cfg: EvalConfig, out: str | Path) -> dict:
    """Evaluate every defense in `cfg`; write OUT/report.{json,md}, OUT/<label>/ records and the plots."""
    plan = check(cfg)
    out = Path(out)
    same_config_or_fail(out, cfg, rows="defenses")  # a row added to a run: the others' records reused
    acc = make_accelerator()
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.wait_for_everyone()
    eps = cfg.eps if cfg.eps is not None else preset_eps(cfg.dataset, cfg.norm)
    classifier = load_classifier(cfg.classifier)
    transfer = (Defended(load_purifier(cfg.transfer_from), classifier) if cfg.transfer_from else None)
    test, _ = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    gc = {"auto": "auto", "true": True, "false": False}[cfg.grad_checkpoint]
    results = {}
    for i, d in enumerate(plan):
        b = d["budget"]
        x, y = to_tensors(test, b.n, seed=b.seed)
        purifier = load_purifier(d["purifier"]) if d["purifier"] else None
        model = Defended(purifier, classifier, b.votes)
        results[d["label"]] = r = evaluate(
            model, x, y, budget=b, norm=cfg.norm, eps=eps, transfer_source=transfer, grad_checkpoint=gc,
            out=out / d["label"], accelerator=acc, progress=f"[{i + 1}/{len(plan)}] {d['label']}")
        r.update(label=d["label"], purifier=d["purifier"], votes=b.votes)
        if cfg.scores:
            r["scores"] = _scores(cfg, r)
        attack = ladder_attack(b, purifier is not None)
        if b.ladder and attack:
            lad = run_ladder(model, x, y, attack, b.ladder, b, out / d["label"] / "ladder", norm=cfg.norm, eps=eps,
                             transfer_source=transfer, grad_checkpoint=gc, accelerator=acc)
            if lad:
                r["ladder"] = lad
        if acc.is_main_process:
            atomic_write_json(out / d["label"] / "report.json", r)
            _grid(out / d["label"], x, purifier, b.attacks, b.seed)
    if cfg.escalate:
        _escalate(cfg, plan, results, classifier, test, eps, gc, acc, out)
    report = {"dataset": cfg.dataset, "classifier": cfg.classifier, "config": to_dict(cfg), "defenses": results,
              "matched": matched(results, len(test))}
    if acc.is_main_process:
        atomic_write_json(out / "report.json", report, sort_keys=False)
        atomic_write_text(out / "report.md", render(report))
        _plots(out, results)
    return report


def _escalate(cfg, plan, results, classifier, test, eps, gc, acc, out: Path) -> None:
    """Rows above a reference (cfg.escalate), attacked again by transfer from each reference and by Square."""
    by_label = {d["label"]: d for d in plan}
    for label, refs in above_references(results, cfg.escalate, len(test)).items():
        d, b = by_label[label], by_label[label]["budget"]
        x, y = to_tensors(test, b.n, seed=b.seed)
        model = Defended(load_purifier(d["purifier"]), classifier, b.votes)
        sources = {ref: Defended(load_purifier(by_label[ref]["purifier"]), classifier) for ref in refs}
        e = escalate(model, x, y, b, sources, results[label], out / label / "escalation", b.tolerance,
                     norm=cfg.norm, eps=eps, grad_checkpoint=gc, accelerator=acc)
        r = results[label]
        r["escalation"] = {**e, "above": refs}
        r["worst_over_attacks"] = e["worst_over_attacks"]  # every later table and plot reads the escalated figure
        r["flags"] = r["flags"] + [e["flag"]]
        r["raised"] = [f["name"] for f in r["flags"] if f["raised"]]
        if acc.is_main_process:
            atomic_write_json(out / label / "report.json", r)


def matched(results: dict, total: int) -> dict:
    """Which defenses were attacked more weakly than the others, and every stochastic defense on the examples
    they all saw (when some saw fewer)."""
    shared = shared_examples(results, total)
    return {"weaker": weaker(results),
            "shared": None if shared is None else {"examples": shared[0], "rows": shared[1]}}


def _grid(folder: Path, x: torch.Tensor, purifier, attacks, seed: int) -> None:
    """clean / adversarial / purified images for the first attack that saved samples."""
    from core.plots import image_grid

    for a in attacks:
        f = folder / "samples" / f"{a}_0.safetensors"
        if f.is_file():
            adv = load_tensors(f)["adversarial"]
            rows = {"clean": x[:len(adv)], f"adversarial ({a})": adv}
            if purifier is not None:
                with torch.no_grad():
                    rows["purified"] = purifier.manual_seed(seed)(adv)
            image_grid(rows, folder / "grid.png")
            return


def _plots(out: Path, results: dict) -> None:
    from .plots import robust_vs_eps

    curves = {k: [(s["eps"], s["accuracy"]) for s in r["sweep"]] for k, r in results.items() if r["sweep"]}
    if curves:
        robust_vs_eps(curves, out / "robust_vs_eps.png", chance=next(iter(results.values())).get("chance"))


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def render(report: dict) -> str:
    """The report a person reads: one table over defenses, budgets, flags with their meaning."""
    res = report["defenses"]
    m = report.get("matched") or {"weaker": {}, "shared": None}
    attacks = list(dict.fromkeys(a for r in res.values() for a in r["attacks"]))
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
    if beside:
        lines += ["", "† beside the threat model (its own norm and epsilon, or unbounded: see the budgets), so "
                  "outside `all attacks`." + "".join(
                      f" {a}: median L2 distance to its points, over the examples correct on clean (inf: it failed on most) " + ", ".join(
                          f"{k} {r['attacks'][a]['median_l2']:.3g}" for k, r in res.items()
                          if "median_l2" in r["attacks"].get(a, {})) + "."
                      for a in sorted(beside) if any("median_l2" in r["attacks"].get(a, {}) for r in res.values()))]
    if m["weaker"]:
        lines += ["", "\\* attacked more weakly than the others: " +
                  "; ".join(f"**{k}** ({', '.join(v)})" for k, v in m["weaker"].items()) + "."]
    if m["shared"]:
        sh = m["shared"]
        cols = ["clean"] + [a for a in attacks if any(a in row for row in sh["rows"].values())] + ["all attacks"]
        lines += ["", f"## Every purified defense on the same {sh['examples']} examples", "",
                  "The examples the smallest row saw (a subset of every larger row's, same seed): average / worst "
                  "over R, ± standard error.", "", "| defense | " + " | ".join(cols) + " |",
                  "|" + "---|" * (len(cols) + 1)]
        for label, row in sh["rows"].items():
            lines.append(f"| {label}{' *' if label in m['weaker'] else ''} | " +
                         " | ".join(_aw(row[c]) if c in row else "-" for c in cols) + " |")
    lines += ["", "## Threat model and budgets", ""]
    for label, r in res.items():
        t = r["threat"]
        lines.append(f"- **{label}**: {t['norm']} eps {t['eps']:.4g}; " +
                     "; ".join(f"{a}: {b}" for a, b in r["budgets"].items()) +
                     "".join(f"; {a} skipped ({why})" for a, why in r["skipped"].items()))
    lines += ["", "## Gradient-masking checks", ""]
    for label, r in res.items():
        lines.append(f"### {label}: " + (", ".join(f"**{f}**" for f in r["raised"]) or "no flag raised"))
        lines += [""] + [f"- {'RAISED' if f['raised'] else 'ok' if f['checked'] else 'not checked'} "
                         f"`{f['name']}`: {f['detail']}." + (f" {f['meaning']}" if f["raised"] else "")
                         for f in r["flags"]] + [""]
    lines += render_escalation(res)
    lines += render_scores(res)
    ladders = {k: r["ladder"] for k, r in res.items() if r.get("ladder")}
    if ladders:
        lines += ["## Convergence of the attacks", "",
                  "Each defense's ladder attack alone at growing budgets on its examples; a rung's figure is the "
                  "worst case over R per example, each change paired (the same examples) with McNemar's one-sided "
                  "exact p. Converged: the smallest budget whose figure the largest lowers by at most one paired "
                  "standard error.", ""]
        for k, lad in ladders.items():
            lines += render_ladder(k, lad)
    sweeps = {k: r["sweep"] for k, r in res.items() if r["sweep"]}
    if sweeps:
        lines += ["## Robust accuracy against epsilon", "", "![robust accuracy against epsilon](robust_vs_eps.png)",
                  ""]
        for k, s in sweeps.items():
            lines.append(f"- {k}: " + ", ".join(f"eps {p['eps']:g}: {_pct(p['accuracy'])}" for p in s))
    lines += ["", "Images: `<defense>/grid.png` (clean / adversarial / purified); per-example results: "
              "`<defense>/report.json` (`per_example`) and `<defense>/examples.jsonl`.", ""]
    return "\n".join(lines)


def render_scores(res: dict) -> list[str]:
    """BEARD's and ROME's scores per defense, when the config asked for them."""
    rows = {k: r["scores"] for k, r in res.items() if r.get("scores")}
    if not rows:
        return []
    lines = ["## Benchmark scores (BEARD's RR, AE, CREI; ROME's I-RR)", "",
             "In percent, from the average accuracies and the attacks' seconds on this machine, as BEARD's "
             "`auto_metrics.py` computes them: RR = 1 - (clean - mean attacked) / (clean - min attacked), AE = (mean "
             "attack time - clean time) / (max attack time - clean time), CREI = (RR + AE) / 2, I-RR = 1 - (clean - "
             "mean attacked)(clean - min attacked) / clean^2. They depend on which attacks are in the set.", "",
             "| defense | attacks | RR | AE | CREI | I-RR |", "|---|---|---|---|---|---|"]
    for k, s in rows.items():
        lines.append(f"| {k} | {', '.join(s['attacks'])} | {s['rr']:.1f} | {s['ae']:.1f} | {s['crei']:.1f} | "
                     f"{s['i_rr']:.1f} |")
    return lines + [""]


def _aw(s: dict) -> str:
    """'avg ± se / worst ± se' in percent."""
    return f"{pm(s, 'average')} / {pm(s, 'worst')}"
