"""The main job's budget: every stage's config, the --fast and --smoke budgets, and the harness run per classifier."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.config import load_config, replace
from distill.consistency import ConsistencyConfig
from distill.progressive import ProgressiveConfig
from distill.teacher import TeacherConfig
from robust_data.recover import RecoverConfig
from robust_data.relabel import RelabelConfig
from robust_data.squeeze import SqueezeConfig
from robust_data.train import TrainConfig

from ..harness import Budget
from ..robustness import EvalConfig


@dataclass
class HarnessBudget:
    """How hard the quickstart attacks (reduced budgets; `python -m eval robustness` runs the full ones): `budget`
    for every purified row, with `bare` and `teacher` changing fields of it for those rows."""

    budget: Budget = field(default_factory=lambda: Budget(
        attacks=["pgd-eot", "bpda-eot"], n=64, evals=2, eot=2, steps={"pgd-eot": 10, "bpda-eot": 10},
        sweep_eps=[0.05, 0.1, 0.2, 0.5], sweep_n=32, check_n=32))
    bare: dict = field(default_factory=lambda: {"attacks": ["pgd", "autoattack"], "steps": {}})
    # the 100-step teacher behind the standard classifier: the students' attacks (full gradients through all
    # 100 steps, checkpointed) on the first `n` of their examples; the report compares all rows on those
    teacher: dict = field(default_factory=lambda: {"n": 16})
    # behind the distilled-data classifiers the teacher gets a cheap BPDA bound only (marked, drawn hollow)
    teacher_elsewhere: dict = field(default_factory=lambda: {"n": 16, "evals": 1, "eot": 1, "attacks": ["bpda-eot"],
                                                             "steps": {"bpda-eot": 5}})
    elsewhere: list[str] = field(default_factory=lambda: ["undefended", "teacher", "progressive-1", "consistency-1",
                                                          "consistency-4"])  # defenses behind those classifiers
    eps: float | None = None  # None: the dataset's preset (digits: Linf 0.1)
    sweep_defenses: list[str] = field(default_factory=lambda: ["undefended", "consistency-1"])
    check_defenses: list[str] = field(default_factory=lambda: ["undefended", "progressive-1", "consistency-1"])

@dataclass
class CertifyBudget:
    """Randomized-smoothing certificates in the main job (eval/certify.py): the standard classifier behind DDS (the
    teacher's one-shot denoiser) and the 1-step students, bare under Gaussian noise, and a classifier trained with
    that noise, on `examples` test images at `n` draws (`python -m eval certify` runs Cohen's N)."""

    examples: int = 32
    n0: int = 50
    n: int = 500
    alpha: float = 0.001
    batch: int = 550
    attack_steps: int = 10  # the L2 attack on each smoothed classifier beside its certificate; 0: none
    attack_votes: int = 4  # purifications in the soft vote it differentiates
    attack_n: int = 100  # PREDICT's draws on each attacked point (most of the attack's cost)


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
    certify: CertifyBudget = field(default_factory=CertifyBudget)
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
    "harness": {"budget": {"n": 32, "evals": 1, "eot": 1, "steps": {"pgd-eot": 5, "bpda-eot": 5},
                           "sweep_eps": [0.1, 0.5], "sweep_n": 16, "check_n": 16},
                "bare": {"attacks": ["pgd"], "steps": {}}, "teacher": {"n": 4},
                "teacher_elsewhere": {"n": 4, "evals": 1, "eot": 1, "attacks": ["bpda-eot"], "steps": {"bpda-eot": 2}}},
    "certify": {"examples": 8, "n0": 20, "n": 100, "batch": 120, "attack_steps": 2, "attack_n": 100},
    "latency": {"repeats": 1},
}

_ONE_STEP = {a: 1 for a in ("pgd", "pgd-eot", "bpda-eot", "transfer", "cw", "mim", "autoattack", "autoattack-rand")}
_SMOKE_ATTACK = {"evals": 2, "eot": 1, "steps": _ONE_STEP}
# --smoke: every stage of a config (a paper-scale one above all) once, with its models at full size, its schedules,
# checkpointing and mixed-precision settings, but a few steps and images: a config that would die hours into a
# GPU run dies here in minutes. Its numbers are not results. One checkpoint per stage: a paper-size UNet's
# checkpoint (weights, EMA, optimizer) is over half a gigabyte.
_SMOKE_LOOP = {"batch_size": 2, "checkpoint_every": 1, "keep_checkpoints": 1, "log_every": 1, "num_workers": 0}
SMOKE = {
    "classifier": {"epochs": 1e-9, "batch_size": 4, "num_workers": 0},
    "teacher": {**_SMOKE_LOOP, "train_steps": 2, "warmup_steps": 1},
    "progressive": {**_SMOKE_LOOP, "steps_per_round": 1},
    "consistency": {**_SMOKE_LOOP, "train_steps": 2},
    "recover": {"ipc": 1, "iterations": 2},
    "relabel": {"epochs": 1},
    "distilled_train": {"epochs": 1, "online_epochs": 1, "batch_size": 4, "num_workers": 0},
    "harness": {"budget": {"n": 2, **_SMOKE_ATTACK, "queries": 10, "sweep_n": 2, "check_n": 2, "batch_size": 2},
                "bare": {"steps": _ONE_STEP}, "teacher": {"n": 2, **_SMOKE_ATTACK},
                "teacher_elsewhere": {"n": 2, "evals": 1, "eot": 1, "attacks": ["bpda-eot"], "steps": _ONE_STEP}},
    "certify": {"examples": 2, "n0": 2, "n": 4, "batch": 6, "attack_steps": 1, "attack_n": 4},
    "latency": {"batch_sizes": [1], "warmup": 0, "repeats": 1},
}


def quickstart_config(fast: bool = False, path: str | Path | None = None, overrides: list[str] | None = None,
                      changes: dict | None = None, smoke: bool = False) -> QuickstartConfig:
    """The default (or --fast) budget, then a YAML file, `key=value` overrides and `changes` on top; `smoke`
    then shrinks every budget (SMOKE) and keeps everything else."""
    base = replace(QuickstartConfig(), FAST) if fast else QuickstartConfig()
    cfg = replace(load_config(QuickstartConfig, path, overrides, base=base), changes or {})
    return replace(cfg, SMOKE) if smoke else cfg

def stage_configs(cfg: QuickstartConfig) -> dict:
    """Each training stage's config with the run's dataset and seed filled in."""
    data = {"dataset": cfg.dataset, "data_root": cfg.data_root, "seed": cfg.seed}
    return {"classifier": replace(cfg.classifier, {**data, "objective": "ce"}),
            "teacher": replace(cfg.teacher, data), "progressive": replace(cfg.progressive, data),
            "consistency": replace(cfg.consistency, {**data, "student_steps": sorted(cfg.student_steps)}),
            "robust_squeeze": replace(cfg.classifier, {**data, "objective": cfg.robust_objective}),
            "distilled_train": replace(cfg.distilled_train, data)}

def eval_config(cfg: QuickstartConfig, classifier: Path, purifiers: dict[str, Path],
                standard: bool = True) -> EvalConfig:
    """The harness run for one classifier: bare, then behind every purifier (the standard classifier) or the
    `elsewhere` ones (the distilled-data classifiers), at the quickstart's budget."""
    h = cfg.harness

    def entry(label: str, folder, changes: dict) -> dict:
        return {"purifier": str(folder), "label": label, **changes,
                **({} if label in h.sweep_defenses else {"sweep_eps": []}),
                "check_steps": label in h.check_defenses}

    teacher = h.teacher if standard else h.teacher_elsewhere
    defenses = [entry("undefended", "none", h.bare)]
    defenses += [entry(label, folder, teacher if label == "teacher" else {}) for label, folder in purifiers.items()
                 if standard or label in h.elsewhere]
    return EvalConfig(dataset=cfg.dataset, data_root=cfg.data_root, classifier=str(classifier), defenses=defenses,
                      eps=h.eps, budget=replace(h.budget, {"seed": cfg.seed}))
