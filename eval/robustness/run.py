"""`python -m eval robustness`: the harness on every defense of a config, the ladders and escalations it asks
for, the matched comparison, and one report."""

from __future__ import annotations

from pathlib import Path

import torch

from core.checkpoint import load_classifier
from core.config import save_config, to_dict
from core.datasets import load_dataset, to_tensors
from core.io import atomic_write_json, atomic_write_text, load_tensors
from core.plots import image_grid
from core.runs import make_accelerator, same_config_or_fail
from purify import load_purifier

from ..attacks import preset_eps
from ..defended import Defended
from ..harness import evaluate
from ..plots import robust_vs_eps
from .config import EvalConfig, check, scored
from .escalate import above_references, escalate
from .ladder import ladder_attack, run_ladder
from .matched import shared_examples, weaker
from .report import render
from .scores import bench_scores


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
    curves = {k: [(s["eps"], s["accuracy"]) for s in r["sweep"]] for k, r in results.items() if r["sweep"]}
    if curves:
        robust_vs_eps(curves, out / "robust_vs_eps.png", chance=next(iter(results.values())).get("chance"))
