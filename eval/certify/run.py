"""`python -m eval certify`: Cohen's CERTIFY of one classifier behind several defenses on the same seeded images,
each example a record of the shared record loop (resumed, sharded), the attack beside each certificate, one
report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from core.checkpoint import load_classifier
from core.config import save_config
from core.datasets import load_dataset, to_tensors
from core.errors import InputError
from core.io import atomic_write_json, atomic_write_text, module_digest, read_json, tensor_digest
from core.runs import make_accelerator, same_config_or_fail
from core.seeding import derive_seed
from purify import load_purifier

from ..bench.latency import time_module
from ..defended import Defended, defense_entries
from ..harness.records import open_records, run_records
from .attack import SmoothedAttack, attack_row
from .report import certified_plot, render
from .smoothing import RADII, GaussianSmoothing, Smoothing, certify, purifier_sigma, reseed, summarize, t_star_for_sigma


@dataclass
class CertifyConfig:
    """What to certify: one classifier behind several defenses, each an entry of `defenses`:
    "none" (needs `sigma`: Gaussian smoothing of the bare classifier), a purifier folder, or {purifier: DIR or
    none, label, sigma (picks t_star; refused beyond what the purifier was trained for), steps, mode (e.g.
    steps 1, mode ode: the teacher's one-shot denoiser, DDS), classifier (this row's own classifier folder)}."""

    dataset: str = "digits"
    data_root: str | None = None
    classifier: str = "runs/quickstart/classifier/classifier"
    defenses: list = dataclasses.field(default_factory=lambda: ["runs/quickstart/consistency/students/steps-1"])
    examples: int = 100  # test images (a seeded sample, the same for every defense)
    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000  # draws per forward pass
    radii: list = dataclasses.field(default_factory=lambda: list(RADII))
    seed: int = 0
    attack_steps: int = 0  # > 0: also attack the smoothed classifier at each radius (eval/smoothed_attack.py)
    attack_votes: int = 8  # purifications in the soft vote the attack differentiates
    attack_n: int = 1000  # PREDICT's draws on each attacked point


def _defense_rows(cfg: CertifyConfig) -> list[dict]:
    """Each defense as {label, purifier, sigma, overrides, classifier}, checked before any work."""
    rows = []
    for d in defense_entries(cfg.defenses, ("sigma", "steps", "mode", "classifier"), purifier_optional=True,
                             bare_label=lambda d: f"gaussian-{d['sigma']:g}" if d.get("sigma") else "gaussian"):
        if d["purifier"] is None and not d.get("sigma"):
            raise InputError("a bare-classifier defense needs sigma (the Gaussian smoothing noise, [0, 1] pixels)")
        clf = d.get("classifier") or cfg.classifier
        if not Path(clf).is_dir():
            raise FileNotFoundError(f"classifier folder {clf} does not exist")
        rows.append({"label": d["label"], "purifier": d["purifier"], "sigma": d.get("sigma"),
                     "overrides": {k: d[k] for k in ("steps", "mode") if k in d}, "classifier": clf})
    return rows


def open_defense(row: dict, seed: int):
    """(smoothed model, sigma) for one row: the purifier at the t_star its sigma asks for, or Gaussian noise."""
    classifier = load_classifier(row["classifier"])
    if row["purifier"] is None:
        return Defended(GaussianSmoothing(row["sigma"], seed), classifier), float(row["sigma"])
    purifier = load_purifier(row["purifier"], **row["overrides"], **_t_star_of(row)).manual_seed(seed)
    return Defended(purifier, classifier), purifier_sigma(purifier)


def _t_star_of(row: dict) -> dict:
    """{t_star: the time whose noise is the row's sigma}, refused beyond what the purifier was trained for; {}
    without a sigma."""
    if not row["sigma"] or row["purifier"] is None:
        return {}
    probe = load_purifier(row["purifier"])
    t_star = t_star_for_sigma(probe.schedule, float(row["sigma"]))
    trained = _trained_up_to(probe)
    if t_star > trained + 1e-9:
        raise InputError(f"sigma {row['sigma']} needs t_star {t_star:.4f}, beyond the {trained:g} that "
                         f"{row['purifier']} was trained for; train or distil one for that time")
    return {"t_star": t_star}


def _trained_up_to(purifier) -> float:
    """How far a purifier may be diffused: a student only to its own t_star, a trained teacher to its t_max,
    a pretrained full-range UNet to 1."""
    if purifier.kind != "diffpure":
        return purifier.t_star
    return float((purifier.source or {}).get("t_max", 1.0))


def run_certify(cfg: CertifyConfig, out, rows_decide: bool = False) -> dict:
    """Certify every defense on the same seeded test images; OUT/<label>/records.jsonl (resumed), report.{json,md},
    certified_vs_radius.png. A folder holding another config is refused, unless `rows_decide` (a folder the caller
    owns, as the main job does): then each row's records are reused only where that row's own settings match."""
    s, rows = check(cfg)
    out = Path(out)
    if not rows_decide:
        same_config_or_fail(out, cfg, rows="defenses")  # a row added to a run: the others' certificates reused
    acc = make_accelerator()
    test, _ = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    x, y = to_tensors(test, cfg.examples, seed=cfg.seed)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    results = {row["label"]: certify_row(cfg, s, row, x, y, out / row["label"], acc, f"[{i + 1}/{len(rows)}]")
               for i, row in enumerate(rows)}
    report = {"dataset": cfg.dataset, "n0": s.n0, "n": s.n, "alpha": s.alpha, "batch": s.batch, "examples": len(y),
              "defenses": results, "raised": [f"{label}: r = {k}" for label, r in results.items()
                                              for k, c in r.get("attack", {}).items() if c["flag"]]}
    if cfg.attack_steps > 0:
        report["attack"] = {"steps": cfg.attack_steps, "votes": cfg.attack_votes, "n": cfg.attack_n}
    if acc.is_main_process:
        atomic_write_json(out / "report.json", report, sort_keys=False)
        atomic_write_text(out / "report.md", render(report))
        certified_plot(results, out / "certified_vs_radius.png")
    return report


def check(cfg: CertifyConfig) -> tuple[Smoothing, list[dict]]:
    """Cohen's parameters and the defenses to certify, or an InputError, before any work."""
    s = Smoothing(cfg.n0, cfg.n, cfg.alpha, cfg.batch)
    s.check()
    if cfg.examples < 1 or not cfg.radii or min(cfg.radii) < 0:
        raise InputError("examples must be at least 1 and radii a non-empty list of radii >= 0")
    if cfg.attack_steps < 0 or cfg.attack_votes < 1 or cfg.attack_n < 1:
        raise InputError(f"attack_steps must be >= 0 and attack_votes, attack_n >= 1, got {cfg.attack_steps}, "
                         f"{cfg.attack_votes}, {cfg.attack_n}")
    rows = _defense_rows(cfg)
    for row in rows:
        _t_star_of(row)  # a sigma no purifier reaches: refused before any work
    return s, rows


def certify_row(cfg: CertifyConfig, s: Smoothing, row: dict, x, y, folder: Path, acc, step: str) -> dict:
    """One defense's certificates (FOLDER/records.jsonl, one record per example, resumed), their summary, and the
    attack beside them when the config asks for it."""
    model, sigma = open_defense(row, cfg.seed)
    model = model.to(acc.device).eval()
    settings = {"model": module_digest(model), "images": tensor_digest(x, y), "sigma": sigma, "n0": s.n0,
                "n": s.n, "alpha": s.alpha, "seed": cfg.seed, "seeds": "derive_seed(seed, certify, index)"}
    done = {r["index"]: r for r in open_records(folder, settings, "certificates", acc, [model], "records.jsonl")}
    with torch.no_grad():
        n_classes = model(x[:1].to(acc.device)).shape[1]

    def work(j: int) -> dict:
        # every example from (seed, index) alone: the same certificate on any process, after any kill
        reseed(model, derive_seed(cfg.seed, "certify", j))
        return {"index": j, "label": int(y[j]), **certify(model, x[j].to(acc.device), sigma, s, n_classes)}

    todo = [j for j in range(len(y)) if j not in done]
    run_records(todo, work, folder / "records.jsonl", acc, lambda r: r["index"], done,
                f"{step} certify {row['label']}", total=len(y))
    records = [done[j] for j in range(len(y))]
    result = {**summarize(records, cfg.radii), "sigma": sigma, "purifier": row["purifier"],
              "classifier": row["classifier"], "nfe": getattr(model.purifier, "nfe", 0),
              "t_star": getattr(model.purifier, "t_star", None),
              **_batch_summary(model, x[0].to(acc.device), s.batch, folder, len(todo), len(y), acc.is_main_process)}
    if cfg.attack_steps > 0:
        a = SmoothedAttack(cfg.attack_steps, cfg.attack_votes, Smoothing(1, cfg.attack_n, s.alpha))
        result["attack"] = attack_row(acc, model, x, y, records, folder / "attack", a, cfg.radii, cfg.seed,
                                      n_classes, s.batch, row["label"])
    return result


def batch_throughput(model: nn.Module, x: torch.Tensor, batch: int) -> float:
    """Draws per second of one plain forward pass of `batch` copies of x (what `eval latency` times): the ceiling
    that certification's counting can approach."""
    long = getattr(getattr(model, "purifier", None), "nfe", 0) > 8  # a 100-step teacher: one timed pass is plenty
    xs = x.unsqueeze(0).expand(batch, *x.shape).contiguous()
    return batch / time_module(model, xs, 0 if long else 1, 1 if long else 3)["median_s"]


def _batch_summary(model, x, batch: int, folder: Path, certified_now: int, examples: int, write: bool) -> dict:
    """The batch throughput that draws / s is compared to, and whether both come from one session: timed and
    stored when this run certified every record; the stored figure when it certified none; else (a killed run
    resumed, or records from a run that kept no timing) timed now and marked as not comparable."""
    stored = folder / "batch_rate.json"
    kept = read_json(stored) if not certified_now and stored.is_file() else {}
    if kept.get("batch") == batch:
        return {"batch_draws_per_second": float(kept["draws_per_second"]), "batch_rate_same_session": True}
    rate = batch_throughput(model, x, batch)
    if certified_now == examples and write:
        atomic_write_json(stored, {"batch": batch, "draws_per_second": rate})
    return {"batch_draws_per_second": rate, "batch_rate_same_session": certified_now == examples}
