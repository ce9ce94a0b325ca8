"""The main job on the embedded digits: classifier, DiffPure teacher, purification, a report with plots."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from core.checkpoint import load_classifier
from core.config import replace
from core.datasets import load_dataset, to_tensors
from core.io import atomic_write_json, atomic_write_text, read_json
from core.plots import image_grid
from core.training import run_stage
from distill.teacher import TeacherConfig, train_teacher
from purify import load_purifier
from robust_data.squeeze import SqueezeConfig, accuracy, train_squeeze

from .accuracy import purify_batches
from .attacks import build_attack
from .plots import training_curves

EPS = 0.1  # Linf budget on digits (16x16, [0, 1]): PGD at 0.1 breaks the undefended ConvNet
FAST = {"squeeze": {"epochs": 5.0}, "teacher": {"train_steps": 300, "checkpoint_every": 100}}


def quickstart(out: str | Path = "runs/quickstart", fast: bool = False, n_eval: int | None = None,
               pgd_steps: int = 40, budget: dict | None = None) -> dict:
    """Train (or reuse) the digits classifier and teacher, purify the test set, write report.{md,json} + PNGs.

    `budget` ({"squeeze": {...}, "teacher": {...}} config changes) replaces the --fast budget.
    """
    out = Path(out)
    t_start = time.perf_counter()
    budget = budget if budget is not None else (FAST if fast else {})
    squeeze_cfg = replace(SqueezeConfig(), budget.get("squeeze", {}))
    teacher_cfg = replace(TeacherConfig(), budget.get("teacher", {}))
    if fast:
        n_eval = n_eval or 128
    print("stage 1/3: the standard classifier (squeeze, cross-entropy)")
    clf_dir = run_stage(out / "classifier", squeeze_cfg, train_squeeze, "classifier")
    print("stage 2/3: the DiffPure teacher (DDPM score network)")
    pur_dir = run_stage(out / "teacher", teacher_cfg, train_teacher, "purifier")

    print("stage 3/3: purification and accuracies on the test set")
    clf, teacher = load_classifier(clf_dir), load_purifier(pur_dir)
    test, _ = load_dataset("digits", "test")
    x, y = to_tensors(test, n_eval)
    t0 = time.perf_counter()
    x_pure, _ = purify_batches(teacher, x, seed=0, desc="teacher (clean)")
    purify_s = time.perf_counter() - t0
    torch.manual_seed(0)  # torchattacks' random start
    pgd = build_attack("pgd", clf, "Linf", EPS, n_classes=10, steps=pgd_steps)
    x_adv = torch.cat([pgd(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)])
    x_adv_pure, _ = purify_batches(teacher, x_adv, desc="teacher (adversarial)")
    results = {
        "clean_accuracy": accuracy(clf, x, y),
        "purified_clean_accuracy": accuracy(clf, x_pure, y),
        "pgd_accuracy_undefended": accuracy(clf, x_adv, y),
        "pgd_transfer_accuracy_purified": accuracy(clf, x_adv_pure, y),
    }
    report = {
        "dataset": "digits", "examples": len(y), "fast": fast, "results": results,
        "attack": {"name": "pgd", "norm": "Linf", "eps": EPS, "steps": pgd_steps, "random_start": True,
                   "crafted_on": "the undefended classifier (non-adaptive for the purified row)"},
        "teacher": {k: teacher.config()[k] for k in ("t_star", "steps", "mode", "nfe")},
        "teacher_seconds_per_image": purify_s / len(y),
        "classifier_train": read_json(out / "classifier" / "train.json"),
        "teacher_train": read_json(out / "teacher" / "train.json"),
        "seconds": time.perf_counter() - t_start,
    }
    image_grid({"clean": x[:12], "purified": x_pure[:12], f"PGD {EPS}": x_adv[:12], "adv. purified": x_adv_pure[:12]},
               out / "purification_grid.png", labels=[str(int(v)) for v in y[:12]])
    training_curves({"classifier (squeeze)": out / "classifier" / "log.jsonl",
                     "teacher (DDPM loss)": out / "teacher" / "log.jsonl"}, out / "training_curves.png")
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render(report))
    print(render(report))
    return report


def render(r: dict) -> str:
    res, a, t = r["results"], r["attack"], r["teacher"]
    pct = lambda v: f"{100 * v:.1f}%"  # noqa: E731
    return "\n".join([
        f"# Quickstart report (digits{', --fast' if r['fast'] else ''})", "",
        f"{r['examples']} test images; teacher: DiffPure t_star={t['t_star']}, {t['steps']} {t['mode']} steps "
        f"(nfe {t['nfe']}), {1000 * r['teacher_seconds_per_image']:.1f} ms/image on this machine.", "",
        "| defense | clean | PGD Linf %.3g (%d steps) |" % (a["eps"], a["steps"]),
        "| --- | --- | --- |",
        f"| none | {pct(res['clean_accuracy'])} | {pct(res['pgd_accuracy_undefended'])} |",
        f"| DiffPure teacher | {pct(res['purified_clean_accuracy'])} | "
        f"{pct(res['pgd_transfer_accuracy_purified'])} (non-adaptive) |", "",
        "The purified PGD number is a *non-adaptive* one: the attack was crafted on the bare classifier "
        "and never saw the purifier, so it overstates robustness. Adaptive attacks (full gradients "
        "through the purifier, BPDA, EOT) are the attack harness's: "
        "`python -m eval robustness --config configs/digits/eval.yaml --out runs/eval`.", "",
        f"Classifier: test accuracy {pct(r['classifier_train']['test_accuracy'])}, "
        f"trained in {r['classifier_train']['train_seconds']:.0f} s. "
        f"Teacher: {r['teacher_train']['unet_parameters'] / 1e6:.2f}M-parameter UNet, "
        f"{r['teacher_train']['images_per_s']:.0f} images/s in training.",
        f"Total: {r['seconds']:.0f} s. Figures: purification_grid.png, training_curves.png.", ""])
