"""The main job: both tracks on one dataset, every classifier behind every purifier under the harness, latency.

Stages (each reused when its config and inputs are unchanged, resumed when interrupted):
1. the standard classifier (squeeze, cross-entropy) and the DiffPure teacher;
2. progressive and consistency students (1, 2 and 4 steps);
3. SRe2L and GUARD distilled data (recover from the standard / the GUARD-squeezed classifier) and
   classifiers trained on them;
4. every classifier bare and behind the teacher and each student, under standard and adaptive attacks;
5. latency of every defense; then report.{md,json} and the plots.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.checkpoint import classifier_meta, load_classifier
from core.config import load_config, replace, save_config, to_dict
from core.datasets import load_dataset, to_tensors
from core.io import atomic_write_json, atomic_write_text, load_tensors, read_json
from core.plots import image_grid
from core.training import process_state, run_stage, same_inputs_or_fail
from distill.consistency import ConsistencyConfig, train_consistency
from distill.progressive import ProgressiveConfig, rounds, train_progressive
from distill.teacher import TeacherConfig, train_teacher
from purify import load_purifier
from robust_data.pipeline import PipelineConfig, pipeline
from robust_data.recover import RecoverConfig
from robust_data.relabel import RelabelConfig
from robust_data.squeeze import SqueezeConfig, train_squeeze
from robust_data.train import TrainConfig

from .attacks import preset_eps
from .budget import Budget
from .latency import benchmark, device_name, time_module
from .plots import pareto_front, robust_vs_eps, robust_vs_latency, training_curves
from .robustness import EvalConfig, run_robustness


@dataclass
class HarnessBudget:
    """How hard the quickstart attacks (reduced budgets; `python -m eval robustness` runs the full ones): `budget`
    for every purified row, with `bare` and `teacher` changing fields of it for those rows."""

    budget: Budget = field(default_factory=lambda: Budget(
        attacks=["pgd", "pgd-eot", "bpda-eot"], n=64, evals=2, eot=2, steps={"pgd": 10, "pgd-eot": 10, "bpda-eot": 10},
        sweep_eps=[0.05, 0.1, 0.2, 0.5], sweep_n=32, check_n=32))
    bare: dict = field(default_factory=lambda: {"attacks": ["pgd", "autoattack"], "steps": {}})
    # the 100-step teacher: full gradients through it cost ~100 student steps, so BPDA only, fewer images
    teacher: dict = field(default_factory=lambda: {"n": 32, "evals": 1, "eot": 1, "attacks": ["bpda-eot"],
                                                   "steps": {"bpda-eot": 5}})
    eps: float | None = None  # None: the dataset's preset (digits: Linf 0.1)
    sweep_defenses: list[str] = field(default_factory=lambda: ["undefended", "consistency-1"])
    check_defenses: list[str] = field(default_factory=lambda: ["undefended", "progressive-1", "consistency-1"])


@dataclass
class LatencyBudget:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    warmup: int = 1
    repeats: int = 3


@dataclass
class QuickstartConfig:
    """Every stage's config; the defaults are the digits budget that fits 15 minutes on 2 CPU cores."""

    dataset: str = "digits"
    data_root: str | None = None
    seed: int = 0
    # start from trained models instead of training them: a classifier folder (e.g. a WideResNet-28-10), and a
    # purifier folder, a diffusers UNet folder or a hub id such as google/ddpm-cifar10-32 (teacher.t_star,
    # purify_steps and mode then set the DiffPure purification)
    classifier_from: str | None = None
    teacher_from: str | None = None
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])  # the students evaluated (both methods)
    classifier: SqueezeConfig = field(default_factory=SqueezeConfig)
    teacher: TeacherConfig = field(default_factory=lambda: TeacherConfig(train_steps=500, checkpoint_every=250))
    progressive: ProgressiveConfig = field(default_factory=lambda: ProgressiveConfig(
        start_steps=8, steps_per_round=120, checkpoint_every=120))
    consistency: ConsistencyConfig = field(default_factory=lambda: ConsistencyConfig(
        train_steps=320, checkpoint_every=160))
    robust_objective: str = "guard"  # the squeeze objective of the robust distilled data (SRe2L: ce)
    recover: RecoverConfig = field(default_factory=lambda: RecoverConfig(
        ipc=10, iterations=500, crop=False, jitter=2))
    relabel: RelabelConfig = field(default_factory=lambda: RelabelConfig(epochs=300, min_crop=0.5, flip=False))
    distilled_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=300, temperature=20.0, min_crop=0.5, flip=False))
    harness: HarnessBudget = field(default_factory=HarnessBudget)
    latency: LatencyBudget = field(default_factory=LatencyBudget)


# --fast: a smoke run of every stage in about 3 minutes; its numbers are not results
FAST = {
    "classifier": {"epochs": 5.0},
    "teacher": {"train_steps": 150, "checkpoint_every": 50},
    "progressive": {"steps_per_round": 40, "checkpoint_every": 40},
    "consistency": {"train_steps": 100, "checkpoint_every": 50},
    "recover": {"iterations": 100},
    "relabel": {"epochs": 50},
    "distilled_train": {"epochs": 50},
    "harness": {"budget": {"n": 32, "evals": 1, "eot": 1, "steps": {"pgd": 5, "pgd-eot": 5, "bpda-eot": 5},
                           "sweep_eps": [0.1, 0.5], "sweep_n": 16, "check_n": 16},
                "bare": {"attacks": ["pgd"], "steps": {}},
                "teacher": {"n": 16, "evals": 1, "eot": 1, "attacks": ["bpda-eot"], "steps": {"bpda-eot": 2}}},
    "latency": {"repeats": 1},
}


def quickstart_config(fast: bool = False, path: str | Path | None = None, overrides: list[str] | None = None,
                      changes: dict | None = None) -> QuickstartConfig:
    """The default (or --fast) budget, then a YAML file, `key=value` overrides and `changes` on top."""
    base = replace(QuickstartConfig(), FAST) if fast else QuickstartConfig()
    return replace(load_config(QuickstartConfig, path, overrides, base=base), changes or {})


def stage_configs(cfg: QuickstartConfig) -> dict:
    """Each training stage's config with the run's dataset and seed filled in."""
    data = {"dataset": cfg.dataset, "data_root": cfg.data_root, "seed": cfg.seed}
    return {"classifier": replace(cfg.classifier, {**data, "objective": "ce"}),
            "teacher": replace(cfg.teacher, data), "progressive": replace(cfg.progressive, data),
            "consistency": replace(cfg.consistency, {**data, "student_steps": sorted(cfg.student_steps)}),
            "robust_squeeze": replace(cfg.classifier, {**data, "objective": cfg.robust_objective}),
            "distilled_train": replace(cfg.distilled_train, data)}


def eval_config(cfg: QuickstartConfig, classifier: Path, purifiers: dict[str, Path]) -> EvalConfig:
    """The harness run for one classifier: bare, then behind every purifier, at the quickstart's budget."""
    h = cfg.harness

    def entry(label: str, folder, changes: dict) -> dict:
        return {"purifier": str(folder), "label": label, **changes,
                **({} if label in h.sweep_defenses else {"sweep_eps": []}),
                "check_steps": label in h.check_defenses}

    defenses = [entry("undefended", "none", h.bare)]
    defenses += [entry(label, folder, h.teacher if label == "teacher" else {}) for label, folder in purifiers.items()]
    return EvalConfig(dataset=cfg.dataset, data_root=cfg.data_root, classifier=str(classifier), defenses=defenses,
                      eps=h.eps, budget=replace(h.budget, {"seed": cfg.seed}))


def measure_latency(cfg: QuickstartConfig, purifiers: dict[str, Path], classifiers: dict[str, Path],
                    folder: Path) -> dict:
    """Every purifier and every classifier alone at each batch size; reused when nothing changed."""
    lat = cfg.latency
    settings = {**to_dict(lat), "machine": device_name("cuda" if torch.cuda.is_available() else "cpu")}
    same_inputs_or_fail(folder, {**purifiers, **{f"{k} classifier": v for k, v in classifiers.items()}})
    done = folder / "latency.json"
    if done.is_file() and read_json(done)["settings"] == settings:
        print(f"[{folder.name}] unchanged: reusing {done}")
        return read_json(done)
    loaded = {k: load_purifier(v) for k, v in purifiers.items()}
    shape = (loaded["teacher"].channels, *loaded["teacher"].image_size)
    rows = benchmark(loaded, None, lat.batch_sizes, lat.warmup, lat.repeats)
    device = torch.device(rows[0]["device"])
    for name, d in classifiers.items():
        clf = load_classifier(d, device)
        for b in lat.batch_sizes:
            x = torch.rand(b, *shape, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
            r = time_module(clf, x, lat.warmup, lat.repeats)
            rows.append({"variant": "plain", "device": str(device), "purifier": "none", "classifier": name,
                         "batch_size": b, "nfe": 0, **r, "images_per_s": b / r["median_s"],
                         "ms_per_image": 1000 * r["median_s"] / b})
    result = {"settings": settings, "rows": rows}
    atomic_write_json(done, result)
    return result


def ms_per_image(latency: dict, defense: str, classifier: str, batch: int) -> float:
    """Defense + classifier: the purifier's time alone plus the classifier's alone, per image."""
    rows = latency["rows"]
    clf = next(r for r in rows if r["purifier"] == "none" and r["classifier"] == classifier and r["batch_size"] == batch)
    pur = 0.0 if defense == "undefended" else next(
        r for r in rows if r["purifier"] == defense and r["batch_size"] == batch)["ms_per_image"]
    return pur + clf["ms_per_image"]


def pretrained_teacher(cfg: QuickstartConfig, folder: Path) -> Path:
    """`teacher_from` opened as a DiffPure purifier with the config's t_star / steps / mode, saved once to
    FOLDER/purifier so that every later stage reads one local folder."""
    product, source = folder / "purifier", folder / "pretrained.json"
    settings = {"teacher_from": cfg.teacher_from, "t_star": cfg.teacher.t_star, "steps": cfg.teacher.purify_steps,
                "mode": cfg.teacher.mode}
    if source.is_file():
        if read_json(source) != settings:
            raise FileExistsError(f"{folder} holds another pretrained teacher ({read_json(source)}); pass another "
                                  "--out or delete that folder")
        print(f"[{folder.name}] unchanged: reusing {product}")
        return product
    if process_state().is_main_process:
        p = load_purifier(cfg.teacher_from, t_star=cfg.teacher.t_star, steps=cfg.teacher.purify_steps,
                          mode=cfg.teacher.mode)
        p.save(product)
        atomic_write_json(folder / "train.json", {"seconds": 0.0, "pretrained": cfg.teacher_from,
                                                  "unet_parameters": sum(t.numel() for t in p.unet.parameters())})
        atomic_write_json(source, settings)
    process_state().wait_for_everyone()
    return product


def quickstart(out: str | Path = "runs/quickstart", fast: bool = False, cfg: QuickstartConfig | None = None) -> dict:
    """Run (reuse, resume) the five stages into OUT and write OUT/report.{md,json} and the plots."""
    cfg = cfg or quickstart_config(fast)
    out = Path(out)
    stages = stage_configs(cfg)
    plan = rounds(stages["progressive"])  # bad budgets fail here, before any training
    if not cfg.student_steps or set(cfg.student_steps) - set(plan):
        raise ValueError(f"student_steps {cfg.student_steps} must be progressive rounds of "
                         f"start_steps {cfg.progressive.start_steps}: {plan}")
    if cfg.recover.ipc < 1:
        raise ValueError(f"recover.ipc must be a positive integer, got {cfg.recover.ipc}")
    if process_state().is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    clock, t_start = {}, time.perf_counter()

    def timed(name, fn):
        t0 = time.perf_counter()
        result = fn()
        clock[name] = round(time.perf_counter() - t0, 1)
        return result

    print("stage 1/5: the standard classifier and the DiffPure teacher")
    if cfg.classifier_from:
        clf = Path(cfg.classifier_from)
        load_classifier(clf)  # a wrong folder fails here, with the reason
    else:
        clf = timed("classifier", lambda: run_stage(out / "classifier", stages["classifier"], train_squeeze,
                                                    "classifier"))
    if cfg.teacher_from:
        teacher = timed("teacher", lambda: pretrained_teacher(cfg, out / "teacher"))
    else:
        teacher = timed("teacher", lambda: run_stage(out / "teacher", stages["teacher"], train_teacher, "purifier"))

    print("stage 2/5: progressive and consistency students")
    timed("progressive", lambda: run_stage(out / "progressive", stages["progressive"],
                                           lambda c, o, resume: train_progressive(c, teacher, o, resume), "students",
                                           inputs={"teacher": teacher}))
    timed("consistency", lambda: run_stage(out / "consistency", stages["consistency"],
                                           lambda c, o, resume: train_consistency(c, teacher, o, resume), "students",
                                           inputs={"teacher": teacher}))
    purifiers = {"teacher": teacher}
    for kind in ("progressive", "consistency"):
        purifiers.update({f"{kind}-{k}": out / kind / "students" / f"steps-{k}" for k in sorted(cfg.student_steps)})

    print(f"stage 3/5: SRe2L and {cfg.robust_objective} distilled data ({cfg.recover.ipc} images per class)")
    shared = {"dataset": cfg.dataset, "data_root": cfg.data_root, "recover": to_dict(cfg.recover),
              "relabel": to_dict(cfg.relabel), "train": to_dict(stages["distilled_train"])}
    sre2l = timed("sre2l", lambda: pipeline(replace(PipelineConfig(), {
        **shared, "squeezed": str(clf), "squeeze": to_dict(stages["classifier"])}), out / "sre2l"))
    robust = timed(cfg.robust_objective, lambda: pipeline(replace(PipelineConfig(), {
        **shared, "squeeze": to_dict(stages["robust_squeeze"])}), out / cfg.robust_objective))
    classifiers = {"standard": clf, "sre2l": Path(sre2l["classifier"]),
                   f"{cfg.robust_objective}": Path(robust["classifier"])}

    print("stage 4/5: every classifier bare and behind every purifier, standard and adaptive attacks")
    evals = {}
    for name, folder in classifiers.items():
        print(f"[eval] classifier: {name}")
        where = out / "eval" / name
        same_inputs_or_fail(where, {"classifier": folder, **purifiers})
        evals[name] = timed(f"eval {name}", lambda: run_robustness(eval_config(cfg, folder, purifiers), where))

    if not process_state().is_main_process:  # under `accelerate launch`: the main process times and reports
        return {}
    print("stage 5/5: latency of every defense")
    latency = timed("latency", lambda: measure_latency(cfg, purifiers, classifiers, out / "latency"))

    report = build_report(cfg, out, fast, classifiers, purifiers, evals, latency, {"sre2l": sre2l, "robust": robust})
    report["seconds"] = {"total": round(time.perf_counter() - t_start, 1), **clock}
    figures(cfg, out, report, evals, purifiers)
    atomic_write_json(out / "report.json", report, sort_keys=False)
    atomic_write_text(out / "report.md", render(report))
    print(render(report))
    return report


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
                         "raised": r["raised"], "sweep": r["sweep"],
                         "ms_per_image": ms_per_image(latency, label, clf, batch)})
    fronts = {}
    for clf in classifiers:
        mine = [r for r in rows if r["classifier"] == clf]
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
                        "accuracy": r["all_attacks"]} for r in rows], out / "robust_vs_latency.png",
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
    rows, st, h = r["rows"], r["stages"], r["config"]["harness"]
    present = {a for row in rows for a in row["attacks"]}
    attacks = [a for a in dict.fromkeys(h["bare"].get("attacks", []) + h["budget"]["attacks"] + sorted(present))
               if a in present]
    t = r["threat"]
    head = ["classifier", "defense", "NFE", "ms / image", "clean"] + attacks + ["all attacks", "flags"]
    lines = [f"# Quickstart report ({r['dataset']}{', --fast: a smoke run, not results' if r['fast'] else ''})", "",
             f"{t['norm']} epsilon {t['eps']:.4g}. Accuracy in %, average / worst case over R evaluations with fresh "
             "attack and purifier randomness (worst: robust only if the example survives all R); `all attacks`: "
             "survives every attack in every evaluation. ms / image: the defense plus the classifier at batch "
             f"{r['latency']['batch_size_for_ms']} on {r['machine']}.", "",
             "## Every classifier behind every defense", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["classifier"], row["defense"], str(row["nfe"]), f"{row['ms_per_image']:.2f}",
                 _aw(row["clean"], row["evals"])]
        cells += [_aw(row["attacks"][a], row["evals"]) if a in row["attacks"] else "n/a" for a in attacks]
        cells += [_pct(row["all_attacks"]), ", ".join(row["raised"]) or "none"]
        lines.append("| " + " | ".join(cells) + " |")
    budgets = {}
    for row in rows:
        budgets.setdefault(_budget_line(row), []).append(f"{row['classifier']}/{row['defense']}")
    lines += ["", "Budgets (reduced, to fit the quickstart; `python -m eval robustness --config "
              "configs/digits/eval.yaml` runs the full ones):", ""]
    for key, who in budgets.items():
        defenses = sorted({w.split("/", 1)[1] for w in who})
        lines.append(f"- {', '.join(defenses)}: {key}")
    lines += ["", "`pgd` on a purified classifier follows the full gradient of one purification per step; `pgd-eot` "
              "averages it over EOT purifications; `bpda-eot` replaces the purifier's backward pass by the identity "
              "(the only gradient attack the 100-step teacher gets here: full gradients through it cost a hundred "
              "student steps, so its row is an upper bound and not comparable to the students').", "",
              "## Robustness against latency", "", "![robust accuracy against ms per image](robust_vs_latency.png)", "",
              "The Pareto front, fastest first (no other defense is both faster and more robust, `all attacks`; "
              "the teacher's point comes from its weaker attack):", ""]
    lines += [f"- {clf}: " + " -> ".join(front) for clf, front in r["pareto"].items()]
    sweeps = [row for row in rows if row["sweep"]]
    if sweeps:
        lines += ["", "## Robust accuracy against epsilon", "", "![robust accuracy against epsilon](robust_vs_eps.png)",
                  ""]
        lines += [f"- {row['classifier']} / {row['defense']}: " +
                  ", ".join(f"{p['eps']:g}: {_pct(p['accuracy'])}" for p in row["sweep"]) for row in sweeps]
    lines += ["", "## Clean, adversarial, purified", "", "![clean / adversarial / purified](purification_grid.png)", "",
              "## Latency", "", "| purifier / classifier | NFE | batch | median s | ms / image | images / s | "
              "speed-up vs teacher |", "|---|---|---|---|---|---|---|"]
    for x in r["latency"]["rows"]:
        who = x["purifier"] if x["purifier"] != "none" else f"{x['classifier']} classifier alone"
        sp = "-" if x["speedup_vs_teacher"] is None else f"{x['speedup_vs_teacher']:.1f}x"
        lines.append(f"| {who} | {x['nfe']} | {x['batch_size']} | {x['median_s']:.4f} | {x['ms_per_image']:.2f} | "
                     f"{x['images_per_s']:.1f} | {sp} |")
    robust = r["config"]["robust_objective"]
    lines += ["", "## What each stage made", "", "| stage | result | training s | folder |", "|---|---|---|---|",
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
    raised = [f"{row['classifier']}/{row['defense']}: {', '.join(row['raised'])}" for row in rows if row["raised"]]
    lines += ["", "## Gradient-masking checks", "",
              ("Raised: " + "; ".join(raised) + ". See `eval/<classifier>/report.md` for each flag's numbers and "
               "meaning." if raised else "No flag raised on any row (`eval/<classifier>/report.md` lists every "
               "check with its numbers)."),
              "", "Seconds this run (a reused stage takes about 0): " +
              ", ".join(f"{k} {v:.0f}" for k, v in r.get("seconds", {}).items()) + ".", "",
              f"Per-classifier harness reports: `eval/<classifier>/report.md`; per-example records: "
              f"`eval/<classifier>/<defense>/examples.jsonl`; n = {h['budget']['n']} test images per purified row.", ""]
    return "\n".join(lines)


def _aw(s: dict, evals: int) -> str:
    return _pct(s["average"]) if evals == 1 else f"{_pct(s['average'])} / {_pct(s['worst'])}"


def _budget_line(row: dict) -> str:
    return "; ".join(f"{a}: {b}" for a, b in row["budgets"].items()) + f"; n {row['examples']}, R {row['evals']}"
