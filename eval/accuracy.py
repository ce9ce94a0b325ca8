"""Clean accuracy of a classifier with and without a purifier in front, and the purifier's seconds per batch."""

from __future__ import annotations

import time

import torch

from core.checkpoint import load_classifier
from core.datasets import load_dataset, to_tensors
from purify import load_purifier
from robust_data.squeeze import accuracy


@torch.no_grad()
def purified_accuracy(purifier_dir, classifier_dir, dataset: str = "digits", n: int | None = None,
                      batch_size: int = 64, seed: int = 0, data_root=None) -> dict:
    """Accuracy on the test split, bare and through the purifier (seeded), with timing per batch."""
    clf, pur = load_classifier(classifier_dir), load_purifier(purifier_dir, seed=seed)
    x, y = to_tensors(load_dataset(dataset, "test", root=data_root)[0], n)
    times, outs = [], []
    for i in range(0, len(x), batch_size):
        t0 = time.perf_counter()
        outs.append(pur(x[i:i + batch_size]))
        times.append((time.perf_counter() - t0, len(outs[-1])))
    full = [s for s, m in times if m == batch_size] or [s for s, _ in times]
    return {"examples": len(y), "clean_accuracy": accuracy(clf, x, y),
            "purified_accuracy": accuracy(clf, torch.cat(outs), y), "nfe": pur.nfe, "t_star": pur.t_star,
            "seconds_per_batch": sorted(full)[len(full) // 2], "batch_size": batch_size}
