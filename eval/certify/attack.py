"""The upper bound beside the certificate: an L2 attack on the smoothed classifier at each radius of the grid
(PGD on the soft vote over purifications, SmoothAdv's attack, Salman et al., NeurIPS 2019), judged by Cohen's
PREDICT on the attacked point. A certified example that the attack turns into a definite wrong prediction
contradicts the certificate: each side errs with probability at most alpha, so more such examples than
Bin(certified, 2 alpha) allows at level 0.01 means one of the two is wrong."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from tqdm.auto import tqdm

from core.io import append_jsonl, atomic_write_json, read_json, read_jsonl
from core.runs import same_or_fail
from core.seeding import derive_seed

from ..attacks import EOTPGD
from ..defended import Defended
from ..harness.records import gather_all
from ..stats import tail_limit
from .smoothing import ABSTAIN, Smoothing, predict, reseed


@dataclass(frozen=True)
class SmoothedAttack:
    """`steps` of L2 PGD at radius r on the mean softmax of `votes` purifications, `batch` images at a time; the
    attacked point judged by PREDICT with `judge`'s n draws at its alpha."""

    steps: int = 20
    votes: int = 8
    judge: Smoothing = Smoothing(n0=1, n=1000, alpha=0.001)
    batch: int = 32

    def settings(self) -> dict:
        return {"steps": self.steps, "votes": self.votes, "n": self.judge.n, "alpha": self.judge.alpha}


class FixedDraws(torch.nn.Module):
    """The soft vote on the same `votes` purification draws at every call (the purifier reseeded each time), as
    SmoothAdv keeps its noise samples fixed over the attack's steps: PGD then ascends one smooth function."""

    def __init__(self, model: Defended, votes: int, seed: int):
        super().__init__()
        self.voted, self.seed = Defended(model.purifier, model.classifier, votes=votes), seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.voted.purifier, "manual_seed"):
            self.voted.purifier.manual_seed(self.seed)
        return self.voted(x)


def attack_smoothed(model: Defended, x: torch.Tensor, y: torch.Tensor, radius: float, a: SmoothedAttack,
                    seed: int) -> torch.Tensor:
    """Adversarial points within L2 `radius` of x (one batch) against the soft vote of `model`'s purifications."""
    return EOTPGD(FixedDraws(model, a.votes, seed), "L2", radius, a.steps, eot=1, loss="ce", seed=seed)(x, y).detach()


def compare(records: list[dict], attacked: dict[str, dict[int, int]], alpha: float, radii) -> dict:
    """Per radius: the accuracy the attack leaves (abstain and misclassified-clean count as wrong), the certified
    accuracy, the certified examples the attack made PREDICT call wrong, and whether that is beyond chance."""
    n, out = len(records), {}
    for r in radii:
        key = f"{r:g}"
        if key not in attacked:
            continue
        preds = attacked[key]
        ok = {rec["index"] for rec in records if rec["prediction"] == rec["label"]}
        survive = sum(preds.get(rec["index"], ABSTAIN) == rec["label"] for rec in records if rec["index"] in ok)
        cert = [rec for rec in records if rec["index"] in ok and rec["radius"] >= r]
        wrong = [rec["index"] for rec in cert if preds.get(rec["index"], rec["label"]) not in (rec["label"], ABSTAIN)]
        limit = tail_limit(len(cert), min(1.0, 2 * alpha))
        out[key] = {"attacked_accuracy": survive / n, "certified_accuracy": len(cert) / n,
                    "contradictions": wrong, "limit": limit, "flag": len(wrong) >= limit}
    return out


def attack_row(acc, model: Defended, x: torch.Tensor, y: torch.Tensor, records: list[dict], folder, a: SmoothedAttack,
               radii, seed: int, n_classes: int, draw_batch: int, label: str = "") -> dict:
    """Attack one certified defense at every radius > 0 where some example is certified (elsewhere there is no
    certificate to test); FOLDER/r-<radius>.json per radius, resumed from the last finished batch of images
    (FOLDER/r-<radius>.part-<process>.jsonl until the radius is done); the comparison returned."""
    same_or_fail(folder / "settings.json", {**a.settings(), "seed": seed, "pgd": "best iterate, fixed draws",
                                         "seeds": "derive_seed(seed, smoothed-attack | predict, radius, index)"},
                 "attacks on the smoothed classifier", write=acc.is_main_process)
    acc.wait_for_everyone()
    ok = [rec["index"] for rec in records if rec["prediction"] == rec["label"]]
    s = replace(a.judge, batch=draw_batch)
    attacked = {}
    for r in radii:
        key, path = f"{r:g}", folder / f"r-{r:g}.json"
        if r <= 0 or not any(rec["radius"] >= r for rec in records if rec["prediction"] == rec["label"]):
            continue
        if path.is_file():
            attacked[key] = {int(i): p for i, p in read_json(path).items()}
            continue
        # batches of the examples in their global order, dealt round-robin: the same batches, seeds and
        # predictions on any number of processes
        batches = [ok[i:i + a.batch] for i in range(0, len(ok), a.batch)]
        # each process logs its batches as they finish: a killed run resumes from the last finished batch
        part = folder / f"r-{key}.part-{acc.process_index}.jsonl"
        preds = {rec["index"]: rec["prediction"] for p in folder.glob(f"r-{key}.part-*.jsonl") for rec in read_jsonl(p)}
        for batch in tqdm(batches[acc.process_index::acc.num_processes], desc=f"attack {label} r={key}",
                          leave=False, disable=not acc.is_main_process):
            if all(j in preds for j in batch):
                continue
            idx = torch.tensor(batch)
            adv = attack_smoothed(model, x[idx].to(acc.device), y[idx].to(acc.device), r, a,
                                  derive_seed(seed, "smoothed-attack", key, batch[0]))
            for j, xa in zip(batch, adv):
                reseed(model, derive_seed(seed, "predict", key, j))
                preds[j] = predict(model, xa, s, n_classes)
            append_jsonl(part, [{"index": j, "prediction": preds[j]} for j in batch])
        merged = {}
        for got in gather_all(acc, preds):
            merged.update(got)
        if acc.is_main_process:
            atomic_write_json(path, {str(i): p for i, p in sorted(merged.items())})
            for p in folder.glob(f"r-{key}.part-*.jsonl"):  # every process's, also of an earlier process count
                p.unlink()
        acc.wait_for_everyone()
        attacked[key] = merged
    return compare(records, attacked, s.alpha, radii)
