"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019): certified L2 robustness of classifier(purifier(.)).

A DiffPure purifier is a smoothed classifier as it stands: its first step x_t = sqrt(ab) (2x - 1) + sqrt(1 - ab) eps
equals 2 sqrt(ab) ((x + sigma eps) - 1/2) with sigma = sqrt((1 - ab) / ab) / 2 in [0, 1] pixels, and everything
after is a function of x + sigma eps and of noise independent of x. So Cohen's CERTIFY applies to
classifier(purifier(.)) unchanged: denoised smoothing, Carlini et al.'s DDS ("(Certified!!) Adversarial Robustness
for Free!", ICLR 2023) when the purifier is the teacher's one-shot denoiser. A bare classifier is smoothed with
Gaussian noise of a given sigma (`GaussianSmoothing`), Cohen's own setting."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from core.errors import InputError

from .binomial import binom_test_p, clopper_pearson_lower

ABSTAIN = -1
RADII = (0.0, 0.25, 0.5, 0.75, 1.0)


def purifier_sigma(purifier) -> float:
    """The smoothing noise a purifier adds, in [0, 1] pixels: sqrt((1 - alpha_bar(t_star)) / alpha_bar(t_star)) / 2."""
    ab = purifier.schedule.alpha_bar(torch.tensor(float(purifier.t_star), dtype=torch.float64)).item()
    return math.sqrt((1 - ab) / ab) / 2


def t_star_for_sigma(schedule, sigma: float) -> float:
    """The diffusion time whose noise is `sigma` in [0, 1] pixels: alpha_bar(t_star) = 1 / (1 + 4 sigma^2)."""
    if not sigma > 0:
        raise InputError(f"sigma must be positive, got {sigma}")
    target = 1 / (1 + 4 * sigma**2)
    if schedule.alpha_bar(torch.tensor(1.0, dtype=torch.float64)).item() > target:
        raise InputError(f"sigma {sigma} lies beyond the schedule: even t = 1 adds less noise")
    lo, hi = 0.0, 1.0
    for _ in range(60):  # alpha_bar decreases in t
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if schedule.alpha_bar(torch.tensor(mid, dtype=torch.float64)).item() > target else (lo, mid)
    return (lo + hi) / 2


class GaussianSmoothing(nn.Module):
    """x + sigma N(0, I) from its own generator: Cohen's smoothing noise in front of a bare classifier."""

    def __init__(self, sigma: float, seed: int = 0):
        super().__init__()
        if not sigma > 0:
            raise InputError(f"sigma must be positive, got {sigma}")
        self.sigma = float(sigma)
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "GaussianSmoothing":
        self.seed, self._gens = int(seed), {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=x.device).manual_seed(self.seed)
        return x + self.sigma * torch.randn(x.shape, generator=self._gens[key], device=x.device, dtype=x.dtype)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma}"


@torch.inference_mode()
def sample_counts(model: nn.Module, x: torch.Tensor, num: int, batch: int, n_classes: int) -> torch.Tensor:
    """Class counts of `model` on `num` independent draws at one image x (C, H, W), `batch` draws per forward."""
    counts = torch.zeros(n_classes, dtype=torch.long)
    left = num
    while left > 0:
        b = min(batch, left)
        pred = model(x.unsqueeze(0).expand(b, *x.shape).contiguous()).argmax(1)
        counts += torch.bincount(pred.cpu(), minlength=n_classes)
        left -= b
    return counts


@dataclass(frozen=True)
class Smoothing:
    """Cohen's parameters: n0 draws choose the class, n draws bound its probability, at level alpha."""

    n0: int = 100
    n: int = 100_000
    alpha: float = 0.001
    batch: int = 1000

    def check(self) -> None:
        if self.n0 < 1 or self.n < 1 or self.batch < 1:
            raise InputError(f"n0, n and batch must be at least 1, got n0={self.n0}, n={self.n}, batch={self.batch}")
        if self.n0 > self.n:
            raise InputError(f"n0 ({self.n0}) must not exceed n ({self.n}): the selection draws are the cheap ones")
        if not 0 < self.alpha < 1:
            raise InputError(f"alpha must lie in (0, 1), got {self.alpha}")


def certify(model: nn.Module, x: torch.Tensor, sigma: float, s: Smoothing, n_classes: int) -> dict:
    """Cohen's CERTIFY at one image: (prediction or ABSTAIN, radius, p_A lower bound, counts)."""
    t0 = time.perf_counter()
    c_a = int(sample_counts(model, x, s.n0, s.batch, n_classes).argmax())
    counts = sample_counts(model, x, s.n, s.batch, n_classes)
    p_a = clopper_pearson_lower(int(counts[c_a]), s.n, s.alpha)
    certified = p_a > 0.5
    return {"prediction": c_a if certified else ABSTAIN, "radius": sigma * NormalDist().inv_cdf(p_a) if certified else 0.0,
            "p_a_lower": p_a, "count_a": int(counts[c_a]), "seconds": time.perf_counter() - t0,
            "draws": s.n0 + s.n}


def predict(model: nn.Module, x: torch.Tensor, s: Smoothing, n_classes: int) -> int:
    """Cohen's PREDICT: the top class of n draws, or ABSTAIN when the binomial test cannot tell it from the runner-up."""
    counts = sample_counts(model, x, s.n, s.batch, n_classes)
    top2 = counts.topk(2).indices.tolist() if n_classes > 1 else [0, 0]
    n_a, n_b = int(counts[top2[0]]), int(counts[top2[1]]) if n_classes > 1 else 0
    return top2[0] if binom_test_p(n_a, n_b) <= s.alpha else ABSTAIN


def summarize(records: list[dict], radii=RADII) -> dict:
    """Certified accuracy at each radius (correct and certified at least that far), the average certified radius
    (0 where wrong or abstained), the abstention rate, seconds per image and purifications per second."""
    n = len(records)
    ok = [r["prediction"] == r["label"] for r in records]
    seconds = sum(r["seconds"] for r in records)
    return {"examples": n,
            "certified_accuracy": {f"{r:g}": sum(o and rec["radius"] >= r for o, rec in zip(ok, records)) / n
                                   for r in radii},
            "certified_accuracy_se": {f"{r:g}": math.sqrt(p * (1 - p) / max(1, n - 1)) for r, p in
                                      ((r, sum(o and rec["radius"] >= r for o, rec in zip(ok, records)) / n)
                                       for r in radii)},
            "acr": sum(rec["radius"] for o, rec in zip(ok, records) if o) / n,
            "abstain": sum(r["prediction"] == ABSTAIN for r in records) / n,
            "seconds_per_image": seconds / n,
            "draws_per_second": sum(r["draws"] for r in records) / max(seconds, 1e-9)}


# --- `python -m eval certify`: several defenses, the same images and N, resumable, sharded --------------------

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
    rows, labels = [], set()
    for d in cfg.defenses:
        d = {"purifier": d} if isinstance(d, str) else dict(d)
        unknown = set(d) - {"purifier", "label", "sigma", "steps", "mode", "classifier"}
        if unknown:
            raise InputError(f"unknown key(s) {', '.join(sorted(unknown))} in a defenses entry; valid: purifier, "
                             "label, sigma, steps, mode, classifier")
        bare = d.get("purifier") in (None, "none")
        if bare and not d.get("sigma"):
            raise InputError("a bare-classifier defense needs sigma (the Gaussian smoothing noise, [0, 1] pixels)")
        if not bare and not Path(d["purifier"]).is_dir():
            raise FileNotFoundError(f"purifier folder {d['purifier']} does not exist")
        clf = d.get("classifier") or cfg.classifier
        if not Path(clf).is_dir():
            raise FileNotFoundError(f"classifier folder {clf} does not exist")
        label = d.get("label") or (f"gaussian-{d['sigma']:g}" if bare else _label_of(d["purifier"]))
        base, i = label, 2
        while label in labels:
            label, i = f"{base}-{i}", i + 1
        labels.add(label)
        rows.append({"label": label, "purifier": None if bare else str(d["purifier"]), "sigma": d.get("sigma"),
                     "overrides": {k: d[k] for k in ("steps", "mode") if k in d}, "classifier": clf})
    return rows


def _label_of(folder: str) -> str:
    """A purifier's own label (kind and NFE, e.g. consistency-1), else its folder's name."""
    from core.io import read_json
    from purify.purifier import label_of

    meta = Path(folder) / "purifier.json"
    return label_of(read_json(meta)) if meta.is_file() else Path(folder).name


def open_defense(row: dict, seed: int):
    """(smoothed model, sigma) for one row: the purifier at the t_star its sigma asks for, or Gaussian noise."""
    from core.checkpoint import load_classifier
    from purify import load_purifier

    from .defended import Defended

    classifier = load_classifier(row["classifier"])
    if row["purifier"] is None:
        return Defended(GaussianSmoothing(row["sigma"], seed), classifier), float(row["sigma"])
    purifier = load_purifier(row["purifier"], **row["overrides"], **_t_star_of(row)).manual_seed(seed)
    return Defended(purifier, classifier), purifier_sigma(purifier)


def _t_star_of(row: dict) -> dict:
    """{t_star: the time whose noise is the row's sigma}, refused beyond what the purifier was trained for; {}
    without a sigma."""
    from purify import load_purifier

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


def run_certify(cfg: CertifyConfig, out) -> dict:
    """Certify every defense on the same seeded test images; OUT/<label>/records.jsonl (resumed), report.{json,md},
    certified_vs_radius.png."""
    from core.datasets import load_dataset, to_tensors
    from core.io import append_jsonl, atomic_write_json, atomic_write_text, module_digest, read_jsonl, tensor_digest
    from core.runs import make_accelerator, same_config_or_fail, same_or_fail

    from .harness import gather_all

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
    out = Path(out)
    same_config_or_fail(out, cfg, rows="defenses")  # a row added to a run: the others' certificates reused
    acc = make_accelerator()
    test, _ = load_dataset(cfg.dataset, "test", root=cfg.data_root)
    x, y = to_tensors(test, cfg.examples, seed=cfg.seed)
    if acc.is_main_process:
        from core.config import save_config

        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    results = {}
    for i, row in enumerate(rows):
        model, sigma = open_defense(row, cfg.seed)
        model = model.to(acc.device).eval()
        folder = out / row["label"]
        settings = {"model": module_digest(model), "images": tensor_digest(x, y), "sigma": sigma, "n0": s.n0,
                    "n": s.n, "alpha": s.alpha, "seed": cfg.seed}
        same_or_fail(folder / "settings.json", settings, "certificates", write=acc.is_main_process)
        acc.wait_for_everyone()
        log = folder / "records.jsonl"
        done = {r["index"]: r for r in read_jsonl(log)}
        todo = [j for j in range(len(y)) if j not in done]
        with torch.no_grad():
            n_classes = model(x[:1].to(acc.device)).shape[1]
        bar = tqdm(total=len(y), initial=len(done), desc=f"[{i + 1}/{len(rows)}] certify {row['label']}",
                   disable=not acc.is_main_process)
        for start in range(0, len(todo), acc.num_processes):
            j = todo[start + acc.process_index] if start + acc.process_index < len(todo) else None
            rec = None
            if j is not None:
                # every example from (seed, index) alone: the same certificate on any process, after any kill
                _reseed(model, cfg.seed * 1_000_003 + j)
                rec = {"index": j, "label": int(y[j]), **certify(model, x[j].to(acc.device), sigma, s, n_classes)}
            got = [r for r in gather_all(acc, rec) if r is not None]
            if acc.is_main_process:
                folder.mkdir(parents=True, exist_ok=True)
                append_jsonl(log, got)
            for r in got:
                done[r["index"]] = r
            bar.update(len(got))
        bar.close()
        records = [done[j] for j in range(len(y))]
        results[row["label"]] = {**summarize(records, cfg.radii), "sigma": sigma, "purifier": row["purifier"],
                                 "classifier": row["classifier"], "nfe": getattr(model.purifier, "nfe", 0),
                                 "t_star": getattr(model.purifier, "t_star", None),
                                 **_batch_summary(model, x[0].to(acc.device), s.batch, folder, len(todo),
                                                  len(y), acc.is_main_process)}
        if cfg.attack_steps > 0:
            from .smoothed_attack import SmoothedAttack, attack_row

            a = SmoothedAttack(cfg.attack_steps, cfg.attack_votes, cfg.attack_n, s.alpha)
            results[row["label"]]["attack"] = attack_row(acc, model, x, y, records, folder / "attack", a, cfg.radii,
                                                         cfg.seed, n_classes, s.batch, row["label"])
    report = {"dataset": cfg.dataset, "n0": s.n0, "n": s.n, "alpha": s.alpha, "batch": s.batch, "examples": len(y),
              "defenses": results, "raised": [f"{label}: r = {k}" for label, r in results.items()
                                              for k, c in r.get("attack", {}).items() if c["flag"]]}
    if cfg.attack_steps > 0:
        report["attack"] = {"steps": cfg.attack_steps, "votes": cfg.attack_votes, "n": cfg.attack_n}
    if acc.is_main_process:
        atomic_write_json(out / "report.json", report, sort_keys=False)
        from .certify_report import certified_plot, render

        atomic_write_text(out / "report.md", render(report))
        certified_plot(results, out / "certified_vs_radius.png")
    return report


def batch_throughput(model: nn.Module, x: torch.Tensor, batch: int) -> float:
    """Draws per second of one plain forward pass of `batch` copies of x (what `eval latency` times): the ceiling
    that certification's counting can approach."""
    from .latency import time_module

    long = getattr(getattr(model, "purifier", None), "nfe", 0) > 8  # a 100-step teacher: one timed pass is plenty
    xs = x.unsqueeze(0).expand(batch, *x.shape).contiguous()
    return batch / time_module(model, xs, 0 if long else 1, 1 if long else 3)["median_s"]


def _batch_summary(model, x, batch: int, folder: Path, certified_now: int, examples: int, write: bool) -> dict:
    """The batch throughput that draws / s is compared to, and whether both come from one session: timed and
    stored when this run certified every record; the stored figure when it certified none; else (a killed run
    resumed, or records from a run that kept no timing) timed now and marked as not comparable."""
    from core.io import atomic_write_json, read_json

    stored = folder / "batch_rate.json"
    kept = read_json(stored) if not certified_now and stored.is_file() else {}
    if kept.get("batch") == batch:
        return {"batch_draws_per_second": float(kept["draws_per_second"]), "batch_rate_same_session": True}
    rate = batch_throughput(model, x, batch)
    if certified_now == examples and write:
        atomic_write_json(stored, {"batch": batch, "draws_per_second": rate})
    return {"batch_draws_per_second": rate, "batch_rate_same_session": certified_now == examples}


def _reseed(model, seed: int) -> None:
    p = getattr(model, "purifier", None)
    if p is not None and hasattr(p, "manual_seed"):
        p.manual_seed(seed)
