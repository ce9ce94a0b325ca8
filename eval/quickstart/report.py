"""The main job's report: one JSON document, the markdown a person reads, and the figures."""

from __future__ import annotations

from pathlib import Path

import torch

from core.checkpoint import classifier_meta
from core.config import to_dict
from core.datasets import load_dataset, to_tensors
from core.io import load_tensors, read_json
from core.plots import image_grid
from purify import load_purifier

from ..attacks import preset_eps
from ..certify.report import body as certify_body
from ..plots import pareto_front, robust_vs_eps, robust_vs_latency, training_curves
from ..stats import paired_counts, pm
from .config import QuickstartConfig


def ms_per_image(latency: dict, defense: str, classifier: str, batch: int) -> float:
    """Defense + classifier: the purifier's time alone plus the classifier's alone, per image."""
    rows = latency["rows"]
    clf = next(r for r in rows if r["purifier"] == "none" and r["classifier"] == classifier and r["batch_size"] == batch)
    pur = 0.0 if defense == "undefended" else next(
        r for r in rows if r["purifier"] == defense and r["batch_size"] == batch)["ms_per_image"]
    return pur + clf["ms_per_image"]

def _convergence(rows: list[dict]) -> list[str]:
    """Did the budget converge? The rows' doubled-steps reruns, paired on the same examples."""
    checked = [row for row in rows if row.get("doubled_steps")]
    if not checked:
        return []
    lines = ["", "Did this budget converge? Each row below was attacked again with its primary attack at twice the "
             "steps on the same examples (paired; McNemar's exact p that doubling lowers it). A change beyond one "
             "paired standard error means the budget had not converged and the row's figures are upper bounds "
             "(`configs/digits/converged/` climbs a ladder of budgets to where they stop moving):", ""]
    for row in checked:
        d = row["doubled_steps"]
        n, b, c = d["examples"], d["broken"], d["recovered"]
        pc = paired_counts(b, c, n)
        moved = -pc["change"] > pc["se"] + 1e-12
        lines.append(f"- {row['classifier']} / {row['defense']}: {d['attack']} {100 * d['base']:.1f}% at {d['steps']} "
                     f"steps, {100 * d['doubled']:.1f}% at {2 * d['steps']} ({n} examples, {b} broken only by the "
                     f"doubled run, {c} the other way, p = {pc['p']:.3f}): " +
                     ("**not converged**" if moved else "converged within one paired standard error"))
    return lines


def build_report(cfg: QuickstartConfig, out: Path, fast: bool, classifiers: dict, purifiers: dict, evals: dict,
                 latency: dict, pipelines: dict) -> dict:
    """One JSON document: what each stage made, every (classifier, defense) row, latency, the Pareto fronts."""
    batch = max(cfg.latency.batch_sizes)
    rows = []
    for clf, rep in evals.items():
        for label, r in rep["defenses"].items():
            rows.append({"classifier": clf, "defense": label, "nfe": r["nfe"], "evals": r["evals"],
                         "examples": r["examples"], "clean": _avg_worst(r["clean"]),
                         "attacks": {a: _avg_worst(s) for a, s in r["attacks"].items()},
                         "all_attacks": r["worst_over_attacks"], "budgets": r["budgets"], "skipped": r["skipped"],
                         "raised": r["raised"], "sweep": r["sweep"], "doubled_steps": r.get("doubled_steps"),
                         "weaker": rep.get("matched", {}).get("weaker", {}).get(label, []),
                         "ms_per_image": ms_per_image(latency, label, clf, batch)})
    fronts = {}
    for clf in classifiers:
        mine = [r for r in rows if r["classifier"] == clf and not r["weaker"]]  # a weaker attack never makes the front
        front = pareto_front([(r["ms_per_image"], r["all_attacks"]) for r in mine])
        fronts[clf] = [r["defense"] for r in sorted(mine, key=lambda r: r["ms_per_image"])
                       if (r["ms_per_image"], r["all_attacks"]) in front]
    train = {stage: read_json(out / stage / "train.json") for stage in ("teacher", "progressive", "consistency")}
    teacher_lat = {r["batch_size"]: r["median_s"] for r in latency["rows"] if r["purifier"] == "teacher"}
    std = classifier_meta(classifiers["standard"])
    stages = {
        "classifier": {"folder": str(classifiers["standard"]), "test_accuracy": std.get("test_accuracy"),
                       "seconds": std.get("train_seconds", 0.0)},
        "teacher": {"folder": str(purifiers["teacher"]), "seconds": train["teacher"]["seconds"],
                    "unet_parameters": train["teacher"]["unet_parameters"],
                    **{k: read_json(purifiers["teacher"] / "purifier.json").get(k) for k in ("t_star", "steps", "mode")}},
        "progressive": {"students": [str(p) for k, p in purifiers.items() if k.startswith("progressive")],
                        "seconds": train["progressive"]["seconds"]},
        "consistency": {"students": [str(p) for k, p in purifiers.items() if k.startswith("consistency")],
                        "seconds": train["consistency"]["seconds"]},
        **{name: {k: p[k] for k in ("objective", "ipc", "squeezed_classifier", "distilled", "classifier",
                                    "squeeze_test_accuracy", "test_accuracy")}
           for name, p in (("sre2l", pipelines["sre2l"]), (cfg.robust_objective, pipelines["robust"]))},
    }
    return {
        "dataset": cfg.dataset, "fast": fast, "out": str(out),
        "threat": {"norm": "Linf", "eps": cfg.harness.eps if cfg.harness.eps is not None
                   else preset_eps(cfg.dataset, "Linf")},
        "machine": latency["settings"]["machine"], "stages": stages, "rows": rows, "pareto": fronts,
        "shared": {clf: rep.get("matched", {}).get("shared") for clf, rep in evals.items()},
        "latency": {"batch_size_for_ms": batch, "rows": [
            {**{k: r[k] for k in ("purifier", "batch_size", "nfe", "median_s", "p90_s", "ms_per_image", "images_per_s")},
             "classifier": r.get("classifier"),
             "speedup_vs_teacher": (teacher_lat[r["batch_size"]] / r["median_s"]) if r["purifier"] != "none" else None}
            for r in latency["rows"]]},
        "figures": ["robust_vs_latency.png", "robust_vs_eps.png", "purification_grid.png", "training_curves.png"],
        "config": to_dict(cfg),
    }

def _avg_worst(s: dict) -> dict:
    return {"average": s["average"], "worst": s["worst"]}

def figures(cfg: QuickstartConfig, out: Path, report: dict, evals: dict, purifiers: dict) -> None:
    """robust_vs_latency.png, robust_vs_eps.png, purification_grid.png, training_curves.png."""
    rows = report["rows"]
    robust_vs_latency([{"classifier": r["classifier"], "defense": r["defense"], "ms": r["ms_per_image"],
                        "accuracy": r["all_attacks"], "weaker": bool(r["weaker"])} for r in rows],
                      out / "robust_vs_latency.png",
                      chance=next(iter(evals.values()))["defenses"]["undefended"]["chance"])
    curves = {f"{r['classifier']} / {r['defense']}": [(s["eps"], s["accuracy"]) for s in r["sweep"]]
              for r in rows if r["sweep"]}
    robust_vs_eps(curves, out / "robust_vs_eps.png")
    _grid(cfg, out, purifiers)
    logs = {"classifier (squeeze)": out / "classifier" / "log.jsonl", "teacher (DDPM)": out / "teacher" / "log.jsonl",
            "progressive": out / "progressive" / "log.jsonl", "consistency": out / "consistency" / "log.jsonl",
            f"{cfg.robust_objective} squeeze": out / cfg.robust_objective / "squeeze" / "log.jsonl",
            f"student on {cfg.robust_objective} data": out / cfg.robust_objective / "train" / "log.jsonl"}
    training_curves(logs, out / "training_curves.png")

def _grid(cfg: QuickstartConfig, out: Path, purifiers: dict) -> None:
    """Clean test images, their adversarial versions (the standard classifier's first purified defense with saved
    samples), and what each purifier makes of the adversarial ones."""
    test, _ = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    x, y = to_tensors(test, cfg.harness.budget.n, seed=cfg.seed)
    for label in sorted(purifiers, key=lambda k: k != "consistency-1"):
        for a in ("pgd-eot", "bpda-eot", "pgd"):
            f = out / "eval" / "standard" / label / "samples" / f"{a}_0.safetensors"
            if f.is_file():
                adv = load_tensors(f)["adversarial"][:10]
                rows = {"clean": x[:len(adv)], f"{a} vs {label}": adv}
                with torch.no_grad():
                    for name, d in purifiers.items():
                        rows[name] = load_purifier(d).manual_seed(cfg.seed)(adv)
                image_grid(rows, out / "purification_grid.png", labels=[str(int(v)) for v in y[:len(adv)]])
                return

def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"

def render(r: dict) -> str:
    """The report a person reads."""
    rows = r["rows"]
    lines = _main_table(r, rows) + _weaker(rows) + _shared(r, rows) + _budgets(rows) + _convergence(rows)
    lines += _front(r, rows) + _sweeps(rows) + _certified(r) + _latency(r) + _stages(r) + _closing(r, rows)
    return "\n".join(lines)


def _main_table(r: dict, rows: list[dict]) -> list[str]:
    h = r["config"]["harness"]
    present = {a for row in rows for a in row["attacks"]}
    attacks = [a for a in dict.fromkeys(h["bare"].get("attacks", []) + h["budget"]["attacks"] + sorted(present))
               if a in present]
    t = r["threat"]
    head = ["classifier", "defense", "NFE", "ms / image", "clean"] + attacks + ["all attacks", "flags"]
    lines = [f"# Quickstart report ({r['dataset']}{', reduced budget: a smoke run, not results' if r['fast'] else ''})", "",
             f"{t['norm']} epsilon {t['eps']:.4g}. Accuracy in %, average / worst case over R evaluations with fresh "
             "attack and purifier randomness (worst: robust only if the example survives all R); `all attacks`: "
             "survives every attack in every evaluation. ms / image: the defense plus the classifier at batch "
             f"{r['latency']['batch_size_for_ms']} on {r['machine']}.", "",
             "## Every classifier behind every defense", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["classifier"], row["defense"] + (" *" if row["weaker"] else ""), str(row["nfe"]),
                 f"{row['ms_per_image']:.2f}", _aw(row["clean"], row["evals"])]
        cells += [_aw(row["attacks"][a], row["evals"]) if a in row["attacks"] else "n/a" for a in attacks]
        cells += [_pct(row["all_attacks"]), ", ".join(row["raised"]) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _weaker(rows: list[dict]) -> list[str]:
    weak = [row for row in rows if row["weaker"]]
    if not weak:
        return []
    return ["", "\\* attacked more weakly than the other rows of its classifier (an upper bound, drawn hollow "
            "in the plot and kept off the Pareto front): " +
            "; ".join(f"{row['classifier']}/{row['defense']} ({', '.join(row['weaker'])})" for row in weak) + "."]


def _shared(r: dict, rows: list[dict]) -> list[str]:
    """The teacher and every student of a classifier on the teacher's examples."""
    lines = []
    for clf, sh in r.get("shared", {}).items():
        if not sh:
            continue
        found = list(dict.fromkeys(k for row in sh["rows"].values() for k in row))
        cols = ["clean"] + [k for k in found if k not in ("clean", "all attacks")] + ["all attacks"]
        starred = {row["defense"] for row in rows if row["classifier"] == clf and row["weaker"]}
        lines += ["", f"### {clf} classifier: every purified defense on the same {sh['examples']} examples", "",
                  "The teacher's examples (a subset of every student's, same seed), so that the teacher and its "
                  "students face the same attacks on the same images: average / worst over R, ± standard error.", "",
                  "| defense | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
        lines += [f"| {label}{' *' if label in starred else ''} | " +
                  " | ".join(f"{pm(v[c], 'average')} / {pm(v[c], 'worst')}" if c in v else "-" for c in cols) + " |"
                  for label, v in sh["rows"].items()]
    return lines


def _budgets(rows: list[dict]) -> list[str]:
    budgets = {}
    for row in rows:
        budgets.setdefault(_budget_line(row), []).append(f"{row['classifier']}/{row['defense']}")
    lines = ["", "Budgets (reduced, to fit the quickstart; `python -m eval robustness --config FILE` runs any other, "
             "e.g. the matched teacher-and-students budget of `configs/digits/inheritance.yaml`):", ""]
    for key, who in budgets.items():
        defenses = sorted({w.split("/", 1)[1] for w in who})
        lines.append(f"- {', '.join(defenses)}: {key}")
    return lines


def _front(r: dict, rows: list[dict]) -> list[str]:
    teacher_nfe = next((row["nfe"] for row in rows if row["defense"] == "teacher"), "DiffPure")
    lines = ["", "`pgd` on a purified classifier follows the full gradient of one purification per step; `pgd-eot` "
             "averages it over EOT purifications; `bpda-eot` replaces the purifier's backward pass by the identity. "
             f"Behind the standard classifier the {teacher_nfe}-step teacher faces the students' attacks (full "
             f"gradients through every step, checkpointed) on fewer images ({teacher_nfe} network calls per "
             "gradient); behind the distilled-data classifiers it gets a BPDA bound only, marked *.", "",
             "## Robustness against latency", "", "![robust accuracy against ms per image](robust_vs_latency.png)", "",
             "The Pareto front, fastest first (no other defense is both faster and more robust, `all attacks`; "
             "rows attacked more weakly, hollow in the plot, are left out):", ""]
    return lines + [f"- {clf}: " + " -> ".join(front) for clf, front in r["pareto"].items()]


def _sweeps(rows: list[dict]) -> list[str]:
    sweeps = [row for row in rows if row["sweep"]]
    if not sweeps:
        return []
    lines = ["", "## Robust accuracy against epsilon", "", "![robust accuracy against epsilon](robust_vs_eps.png)", ""]
    return lines + [f"- {row['classifier']} / {row['defense']}: " +
                    ", ".join(f"{p['eps']:g}: {_pct(p['accuracy'])}" for p in row["sweep"]) for row in sweeps]


def _certified(r: dict) -> list[str]:
    if not r.get("certify"):
        return []
    return ["", "## Certified robustness (randomized smoothing)", "",
            "A lower bound beside the attacks' upper bounds: the standard classifier behind DDS (the teacher's "
            "one-shot denoiser) and the 1-step students, and under Gaussian noise of the same sigma bare and "
            "trained with that noise (`certify/report.md`; `python -m eval certify` for Cohen's N).", "",
            *certify_body(r["certify"], "###", "certify/")]


def _latency(r: dict) -> list[str]:
    lines = ["", "## Clean, adversarial, purified", "", "![clean / adversarial / purified](purification_grid.png)", "",
             "## Latency", "", "| purifier / classifier | NFE | batch | median s | ms / image | images / s | "
             "speed-up vs teacher |", "|---|---|---|---|---|---|---|"]
    for x in r["latency"]["rows"]:
        who = x["purifier"] if x["purifier"] != "none" else f"{x['classifier']} classifier alone"
        sp = "-" if x["speedup_vs_teacher"] is None else f"{x['speedup_vs_teacher']:.1f}x"
        lines.append(f"| {who} | {x['nfe']} | {x['batch_size']} | {x['median_s']:.4f} | {x['ms_per_image']:.2f} | "
                     f"{x['images_per_s']:.1f} | {sp} |")
    return lines


def _stages(r: dict) -> list[str]:
    st, robust = r["stages"], r["config"]["robust_objective"]
    lines = ["", "## What each stage made", "", "| stage | result | training s | folder |", "|---|---|---|---|",
             f"| standard classifier | test accuracy {_pct(st['classifier']['test_accuracy'])}% | "
             f"{st['classifier']['seconds']:.0f} | `{st['classifier']['folder']}` |",
             f"| DiffPure teacher | {st['teacher']['unet_parameters'] / 1e6:.2f}M-parameter UNet, t_star "
             f"{st['teacher']['t_star']}, {st['teacher']['steps']} {st['teacher']['mode']} steps | "
             f"{st['teacher']['seconds']:.0f} | `{st['teacher']['folder']}` |",
             f"| progressive students | {len(st['progressive']['students'])} students | "
             f"{st['progressive']['seconds']:.0f} | `{Path(st['progressive']['students'][0]).parent}` |",
             f"| consistency students | {len(st['consistency']['students'])} students | "
             f"{st['consistency']['seconds']:.0f} | `{Path(st['consistency']['students'][0]).parent}` |"]
    for name in ("sre2l", robust):
        p = st[name]
        lines.append(f"| {name} data ({p['ipc']} per class, squeeze {p['objective']}) | squeezed model "
                     f"{_pct(p['squeeze_test_accuracy'])}%, student trained on the data {_pct(p['test_accuracy'])}% | "
                     f"- | `{p['distilled']}` |")
    return lines


def _closing(r: dict, rows: list[dict]) -> list[str]:
    h = r["config"]["harness"]
    raised = [f"{row['classifier']}/{row['defense']}: {', '.join(row['raised'])}" for row in rows if row["raised"]]
    return ["", "## Gradient-masking checks", "",
            ("Raised: " + "; ".join(raised) + ". See `eval/<classifier>/report.md` for each flag's numbers and "
             "meaning." if raised else "No flag raised on any row (`eval/<classifier>/report.md` lists every "
             "check with its numbers)."),
            "", "Seconds this run (a reused stage takes about 0): " +
            ", ".join(f"{k} {v:.0f}" for k, v in r.get("seconds", {}).items()) + ".", "",
            f"Per-classifier harness reports: `eval/<classifier>/report.md`; per-example records: "
            f"`eval/<classifier>/<defense>/examples.jsonl`; n = {h['budget']['n']} test images per purified row.", ""]


def _aw(s: dict, evals: int) -> str:
    return _pct(s["average"]) if evals == 1 else f"{_pct(s['average'])} / {_pct(s['worst'])}"

def _budget_line(row: dict) -> str:
    return "; ".join(f"{a}: {b}" for a, b in row["budgets"].items()) + f"; n {row['examples']}, R {row['evals']}"
