"""The attack harness: clean and robust accuracy of any classifier, with or without a purifier, under named
attacks; R independent evaluations (average and worst case) for stochastic defenses; gradient-masking checks.

`evaluate` plans (jobs: R evaluations of each attack, the epsilon sweep, the doubled-steps rerun), runs its
(job, batch) items through the record loop (`records.py`: seeded from (seed, job, batch) alone, sharded,
resumed from `examples.jsonl`) and summarizes them into the report."""

from __future__ import annotations

import contextlib
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from core.errors import InputError
from core.io import atomic_save_tensors, module_digest, tensor_digest
from core.runs import make_accelerator
from core.seeding import derive_seed

from ..attacks import ATTACKS, build_attack, large_eps, preset_eps, within_threat
from ..defended import Defended
from ..stats import accuracy_stats, flips
from .budget import Budget, budgets, check_budget, with_changes
from .checks import APPROXIMATIONS, accuracy_checks, flag, gradient_probe, seed_checks
from .memory import checkpoint_share
from .records import open_records, run_records

SOURCED = ("transfer", "surrogate-eot")  # the attacks that read transfer_source


@dataclass(frozen=True)
class Job:
    """One pass over (a prefix of) the examples: `attack` None is the clean evaluation."""

    key: str
    attack: str | None
    eps: float
    steps: int | None
    r: int = 0
    n: int | None = None


def n_batches(job: Job, n: int, batch_size: int) -> int:
    """Batches of a job over the first min(job.n, n) examples."""
    return -(-min(job.n or n, n) // batch_size)


def item_seed(seed: int, key: str, batch: int) -> int:
    """The seed of one (job, batch) item: its attack, purifier and scoring draw from it alone."""
    return derive_seed(seed, key, batch)


def purifier_of(model: nn.Module):
    return model.purifier if isinstance(model, Defended) else None


class _Runner:
    """Runs one (job, batch) item: seeds, crafts, scores."""

    def __init__(self, model, x, y, *, norm, n_classes, seed, eot, queries, batch_size, grad_checkpoint,
                 transfer_source, samples_dir, losses=None, eot_batch=None):
        self.model, self.x, self.y = model, x, y
        self.losses, self.eot_batch = losses or {}, eot_batch
        self.norm, self.n_classes, self.seed, self.eot, self.queries = norm, n_classes, seed, eot, queries
        self.batch_size, self.transfer_source, self.samples_dir = batch_size, transfer_source, samples_dir
        self.purifier = purifier_of(model)
        self.grad_checkpoint = grad_checkpoint

    def target(self, attack: str) -> nn.Module:
        spec = ATTACKS[attack]
        return spec.target(self.model, self.transfer_source) if spec.target else self.model

    def __call__(self, job: Job, batch: int) -> dict:
        sl = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
        x, y = self.x[sl], self.y[sl]
        s = item_seed(self.seed, job.key, batch)
        torch.manual_seed(s)  # torchattacks' PGD/MIM random starts draw from the global RNG
        for p in (self.purifier, purifier_of(self.transfer_source) if self.transfer_source is not None else None):
            if p is not None:
                p.manual_seed(s)
        t0 = time.perf_counter()
        broken = None
        if job.attack is None:
            x_adv = x
        else:
            target = self.target(job.attack)
            attack = build_attack(job.attack, target, self.norm, job.eps, n_classes=self.n_classes, seed=s,
                                  eot=self.eot, steps=job.steps, queries=self.queries,
                                  stochastic=purifier_of(target) is not None, loss=self.losses.get(job.attack),
                                  eot_batch=self.eot_batch)
            with self.checkpointing(job.attack, len(x) * min(self.eot, self.eot_batch or self.eot)):  # rows held at once
                out = attack(x, y)
            x_adv, broken = out if isinstance(out, tuple) else (out, None)
        if self.purifier is not None:
            self.purifier.manual_seed(derive_seed(self.seed, job.key, batch, "score"))  # noise the attacker did not see
        with torch.no_grad():
            correct = (self.model(x_adv).argmax(1) == y).tolist()
        if broken is not None and self.purifier is not None:
            # a stochastic row counts what the scoring breaks, credited to the sub-attack whose candidate it was
            broken = ["" if ok else (who or "clean") for ok, who in zip(correct, broken)]
        if batch == 0 and job.attack is not None and self.samples_dir is not None:
            atomic_save_tensors({"adversarial": x_adv[:8].detach().cpu().contiguous()},
                                self.samples_dir / f"{job.key.replace('/', '_')}.safetensors")
        rec = {"key": job.key, "batch": batch, "correct": correct, "seconds": time.perf_counter() - t0}
        if job.attack is not None and ATTACKS[job.attack].threat == "unbounded":  # how far it had to go
            dist = (x_adv.detach() - x).flatten(1).norm(dim=1)  # a failed point counts as infinitely far
            rec["l2"] = torch.where(torch.tensor(correct, device=dist.device), float("inf"), dist).tolist()
        if broken is not None:
            rec["broken_by"] = broken
        return rec

    @contextlib.contextmanager
    def checkpointing(self, attack: str, rows: int):
        """Gradient checkpointing through long purifiers while a full-gradient attack runs on them: always (True),
        never (False), or "auto": for a purifier of more than 8 steps, the share of its UNet calls to recompute in
        backward (a second forward pass each) so that the activations kept for `rows` images take at most half
        the memory available; none when they fit. It changes the time taken, never a gradient."""
        p = purifier_of(self.target(attack)) if not ATTACKS[attack].needs_purifier else None
        share = 0.0
        if p is not None and hasattr(p, "set_grad_checkpoint"):
            if self.grad_checkpoint is True:
                share = 1.0
            elif self.grad_checkpoint == "auto" and getattr(p, "nfe", 0) > 8:
                share = checkpoint_share(p, self.x[:1], rows)
        if share:
            p.set_grad_checkpoint(share)
        try:
            yield
        finally:
            if share:
                p.set_grad_checkpoint(False)


def plan(b: Budget, R: int, stochastic: bool, eps: float, n: int) -> tuple[list[Job], dict]:
    """The jobs of one evaluation (R evaluations of each attack, the epsilon sweep in increasing order, the
    doubled-steps rerun) and the attacks skipped, with the reason."""
    jobs = [Job(f"clean/{r}", None, eps, None, r) for r in range(R)]
    skipped = {}
    for a in b.attacks:
        if ATTACKS[a].needs_purifier and not stochastic:
            skipped[a] = "needs a purifier in front of the classifier"
            continue
        jobs += [Job(f"{a}/{r}", a, b.attack_eps.get(a, eps), b.steps.get(a), r) for r in range(R)]
    primary = next((a for a in (("pgd-eot", "pgd") if stochastic else ("pgd", "pgd-eot")) if a in b.attacks), None)
    if primary and b.sweep_eps:
        jobs += [Job(f"sweep/{primary}/{e:g}", primary, float(e), b.steps.get(primary), 0, min(b.sweep_n or n, n))
                 for e in sorted(set(b.sweep_eps))]
    if primary and b.check_steps:
        base = b.steps.get(primary) or ATTACKS[primary].steps
        jobs.append(Job(f"check/{primary}/x2", primary, eps, 2 * base, 0, min(b.check_n or n, n)))
    return jobs, skipped


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attacks=None, *, budget: Budget | None = None,
             norm: str = "Linf", eps: float | None = None, dataset: str | None = None,
             transfer_source: nn.Module | None = None, grad_checkpoint="auto", out: str | Path | None = None,
             accelerator=None, progress: str | None = "eval", **changes) -> dict:
    """Clean and robust accuracy of `model` on (x, y) under each named attack (see `eval.attacks.ATTACKS`).

    The budget is `budget` (an `eval.Budget`) with `attacks` and any of its fields given by name on top
    (`evals=3, eot=4, steps={"pgd-eot": 50}`). A model with a purifier (`eval.Defended`) is evaluated `evals`
    times with fresh randomness (attack and purifier): the report gives the average robust accuracy and the
    worst case (an example counts as robust only if it survives every evaluation). `out`: a folder for
    per-example records, resumed when present. Any memory layout of `x` or of the model gives the same result."""
    b = with_changes(budget or Budget(), {**({"attacks": list(attacks)} if attacks is not None else {}), **changes})
    norm = norm or "Linf"
    eps = eps if eps is not None else preset_eps(dataset or "", norm)
    check_budget(b, norm)
    sourced = [a for a in b.attacks if a in SOURCED and (purifier_of(model) is not None or not ATTACKS[a].needs_purifier)]
    if sourced and transfer_source is None:
        raise InputError(f"{' and '.join(sourced)} need(s) transfer_source (the defense to craft on, or whose purifier "
                         "is the surrogate)")
    x, y = check_batch(x, y)
    acc = accelerator or make_accelerator()
    model, transfer_source, x, y = _on_device(model, transfer_source, x, y, acc.device)
    p = plan_run(model, x, y, b, norm, eps)
    out = Path(out) if out is not None else None
    runner = _Runner(model, x, y, norm=norm, n_classes=p.n_classes, seed=b.seed, eot=p.eot, queries=b.queries,
                     batch_size=b.batch_size, grad_checkpoint="auto" if grad_checkpoint is None else grad_checkpoint,
                     transfer_source=transfer_source, samples_dir=out / "samples" if out is not None else None,
                     losses=b.losses, eot_batch=b.eot_batch)
    flags = seed_checks(purifier_of(model), x[:min(16, len(y))], b.seed) if p.stochastic else []
    records = {}
    if out is not None:
        settings = _settings(p, b, norm, eps, x, y, model, transfer_source)
        models = [model, transfer_source] if set(b.attacks) & set(SOURCED) else [model]
        records = {(r["key"], r["batch"]): r for r in open_records(out, settings, "attack records", acc, models)}
        if acc.is_main_process:
            runner.samples_dir.mkdir(parents=True, exist_ok=True)
    if p.stochastic and hasattr(model, "classifier") and acc.is_main_process:  # the main process writes the report
        flags = flags + [_probe(model, x, y, b, runner)]
    items = [(j, i) for j in p.jobs for i in range(n_batches(j, len(y), b.batch_size)) if (j.key, i) not in records]
    run_records(items, lambda item: runner(*item), out / "examples.jsonl" if out is not None else None, acc,
                lambda r: (r["key"], r["batch"]), records, progress)
    return report(p, b, norm, eps, records, y.cpu(), flags, x.shape[1:])


@dataclass(frozen=True)
class Plan:
    """What one evaluation runs: its jobs, the attacks it skips (with the reason), R and EOT, the model's kind."""

    jobs: list
    skipped: dict
    evals: int
    eot: int
    n_classes: int
    stochastic: bool
    nfe: int


def plan_run(model, x, y, b: Budget, norm: str, eps: float) -> Plan:
    """The jobs of one evaluation of `model`, or an InputError before any work."""
    stochastic = purifier_of(model) is not None
    with torch.no_grad():
        n_classes = model(x[:2]).shape[1]
    if n_classes < 3 and "dlr" in b.losses.values():
        raise InputError(f"the dlr loss needs at least 3 classes (it divides by z_1 - z_3); this model has {n_classes}")
    R, eot = (b.evals, b.eot) if stochastic else (1, 1)  # a deterministic model: one evaluation, no EOT
    jobs, skipped = plan(b, R, stochastic, eps, len(y))
    return Plan(jobs, skipped, R, eot, n_classes, stochastic, getattr(purifier_of(model), "nfe", 0))


def _on_device(model, transfer_source, x, y, device):
    """The models in eval mode without parameter gradients, and one standard layout in the model's dtype: a
    permuted (HWC-built) or channels-last batch must not reach attacks that .view() it, and a float64 / float16
    batch is attacked in the model's own precision."""
    model = model.to(device).eval().requires_grad_(False)
    if transfer_source is not None:
        transfer_source = transfer_source.to(device).eval().requires_grad_(False)
    return model, transfer_source, x.to(device, _dtype_of(model)).contiguous(), y.to(device)


def _settings(p: Plan, b: Budget, norm: str, eps: float, x, y, model, transfer_source) -> dict:
    """What the records are keyed on: the weights of every model involved, the examples themselves, the budget."""
    return {"examples": len(y), "labels": zlib.crc32(y.cpu().numpy().tobytes()), "norm": norm, "eps": eps,
            "eot": p.eot, "queries": b.queries, "batch_size": b.batch_size, "seed": b.seed,
            "losses": {a: b.losses[a] for a in sorted(b.losses) if a in b.attacks}, "eot_batch": b.eot_batch,
            "pgd": "best iterate (fooled first), batched eot, apgd-eot in autoattack-rand",  # how PGD-EOT crafts
            "seeds": "derive_seed(seed, job, batch[, score])",  # how every draw is seeded
            "jobs": [[j.key, j.eps, j.steps, j.n] for j in p.jobs],
            "images": tensor_digest(x, y), "model": module_digest(model),
            "transfer_source": module_digest(transfer_source) if set(b.attacks) & set(SOURCED) else None,
            **({"diffhammer": "weights normalized in log space; agreement as its name says"}
               if any(a.startswith("diffhammer") for a in b.attacks) else {})}


def _probe(model, x, y, b: Budget, runner: "_Runner") -> dict:
    """The gradient probe, where a full-gradient attack runs (it reads the gradient those attacks follow and
    costs their backward pass)."""
    if not [a for a in b.attacks if ATTACKS[a].white_box and not ATTACKS[a].needs_purifier]:
        return flag("gradients-near-orthogonal", None, "no full-gradient attack in this budget")
    k = min(8, len(y))
    with runner.checkpointing("pgd-eot", k):
        return gradient_probe(model, x[:k], y[:k], b.seed)


def report(p: Plan, b: Budget, norm: str, eps: float, records: dict, y, flags: list, shape) -> dict:
    """The records summarized, with the threat model, the budgets in words and how hard each attack was run."""
    names = [a for a in b.attacks if a not in p.skipped]
    big = large_eps(norm, shape)
    n = len(y)
    result = summarize(names, p.evals, p.jobs, records, y, n, b.batch_size, p.stochastic, chance=1 / p.n_classes,
                       tolerance=b.tolerance, flags=flags, large=big,
                       inside=[a for a in names if within_threat(a, norm)])
    result.update(threat={"norm": norm, "eps": eps, "large_eps": big},
                  budgets=budgets(names, b, norm, eps, p.eot, p.n_classes, p.stochastic), skipped=p.skipped,
                  evals=p.evals, beside_threat=[a for a in names if not within_threat(a, norm)],
                  strength={a: {"steps": b.steps.get(a) or ATTACKS[a].steps, "eot": p.eot, "queries": b.queries}
                            for a in names}, seed=b.seed,
                  stochastic=p.stochastic, examples=n, nfe=p.nfe, chance=1 / p.n_classes)
    return result


def check_batch(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """The examples as the harness takes them, or an InputError naming what is wrong, before any work: a
    non-empty float NCHW batch in [0, 1] (any float dtype) and as many integer labels."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise InputError(f"expected torch tensors of images and labels, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
        raise InputError(f"expected a non-empty NCHW batch and as many labels, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if not x.is_floating_point():
        raise InputError(f"images must be float pixels in [0, 1], got dtype {x.dtype} (divide 0..255 images by 255)")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise InputError(f"labels must be integer class indices, got dtype {y.dtype}")
    if not torch.isfinite(x).all():
        raise InputError(f"images hold {(~torch.isfinite(x)).sum().item()} NaN or Inf value(s)")
    if x.min() < 0 or x.max() > 1:
        raise InputError(f"images must be in [0, 1], got [{x.min().item():.3g}, {x.max().item():.3g}]")
    return x, y.long()


def _dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype a model computes in: its classifier's first floating parameter (float32 without any)."""
    body = getattr(model, "classifier", model)
    return next((p.dtype for p in body.parameters() if p.is_floating_point()), torch.float32)


def paired_against(mats: dict, exact: str, others) -> dict:
    """Each of `others` against `exact` on the same examples, worst case over the R evaluations per example."""
    if exact not in mats:
        return {}
    e = mats[exact].all(0)
    out = {}
    for a in others:
        if a in mats:
            o = mats[a].all(0)
            broken, recovered = flips(e.tolist(), o.tolist())
            out[a] = {"broken": broken, "recovered": recovered, "approx": o.float().mean().item(),
                      "exact": e.float().mean().item()}
    return out


def summarize(names, R, jobs, records, y, n, batch_size, stochastic, chance, tolerance, flags, large,
              inside=None) -> dict:
    """Aggregate per-example records into the report: averages, worst cases, per-example results, flags.
    `inside`: the attacks of the run's threat model (default all); the others are reported beside it."""
    inside = list(names) if inside is None else inside
    by_key = {j.key: j for j in jobs}

    def collect(key: str, field: str = "correct") -> list:
        """A job's per-example values over exactly its examples (its last batch may run past them)."""
        job = by_key[key]
        recs = [records[key, i] for i in range(n_batches(job, n, batch_size))]
        return [v for rec in recs for v in rec.get(field, [])][:min(job.n or n, n)]

    def matrix(name: str) -> torch.Tensor:
        return torch.tensor([collect(f"{name}/{r}") for r in range(R)], dtype=torch.bool)

    def stats(m):
        return {**accuracy_stats(m), "per_eval": m.float().mean(1).tolist()}

    def seconds(name: str) -> float:
        keys = [f"{name}/{r}" for r in range(R)]
        return sum(records[k, i]["seconds"] for k in keys for i in range(n_batches(by_key[k], n, batch_size)))

    clean_m = matrix("clean")
    attacks, mats = {}, {}
    for name in names:
        mats[name] = matrix(name)
        attacks[name] = stats(mats[name])
        broken = [v for r in range(R) for v in collect(f"{name}/{r}", "broken_by")]
        if broken:
            attacks[name]["broken_by"] = {k: broken.count(k) / (R * n) for k in dict.fromkeys(broken) if k}
        dist = [d for r in range(R) for d, ok in zip(collect(f"{name}/{r}", "l2"), clean_m[r].tolist()) if ok]
        if dist:  # a minimal-perturbation attack: the median L2 distance it needed, over the examples clean got right
            attacks[name]["median_l2"] = torch.tensor(dist).median().item()
    sweep = [{"eps": j.eps, "accuracy": sum(c) / len(c), "examples": len(c)}
             for j in jobs if j.key.startswith("sweep/") for c in [collect(j.key)]]
    doubled = next((_doubled(j, collect(j.key), mats) for j in jobs if j.key.startswith("check/")), None)
    clean = stats(clean_m)
    flags = flags + accuracy_checks(clean["average"], {k: v for k, v in attacks.items() if k in inside}, sweep, doubled,
                                    n, chance, tolerance, stochastic, large,
                                    paired_against(mats, "pgd-eot", APPROXIMATIONS))
    # robust to all attacks of the threat model: correct in every clean evaluation and under every such attack in
    # every evaluation
    within = [m for k, m in mats.items() if k in inside]
    worst_all = torch.stack([clean_m, *within]).all(0).all(0).float().mean().item() if within else None
    per_example = {"label": y.tolist(), "clean": clean_m.T.tolist(), **{k: m.T.tolist() for k, m in mats.items()}}
    return {"clean": clean, "attacks": attacks, "worst_over_attacks": worst_all, "sweep": sweep,
            "doubled_steps": doubled, "flags": flags, "raised": [f["name"] for f in flags if f["raised"]],
            "per_example": per_example, "seconds": {name: seconds(name) for name in [*names, "clean"]}}


def _doubled(job: Job, c2: list, mats: dict) -> dict:
    """The doubled-steps rerun against the first evaluation of its attack, paired on the same examples."""
    c1 = mats[job.attack][0, :len(c2)].tolist()
    return {"attack": job.attack, "steps": job.steps // 2, "base": sum(c1) / len(c1), "doubled": sum(c2) / len(c2),
            "examples": len(c2), **dict(zip(("broken", "recovered"), flips(c1, c2)))}
