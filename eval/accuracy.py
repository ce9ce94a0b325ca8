"""Clean accuracy of a classifier with and without a purifier in front, and the purifier's seconds per batch."""

from __future__ import annotations

import time
import zlib

import torch
from tqdm.auto import tqdm

from core.checkpoint import load_classifier
from core.datasets import load_dataset, to_tensors
from purify import load_purifier
from robust_data.squeeze import accuracy


def default_device() -> torch.device:
    """The accelerator when there is one: inference-only commands run there as the training loops do."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batch_seed(seed: int, batch: int) -> int:
    """The purifier seed of one batch: every purifier reseeded with it draws the same diffusion noise at t_star."""
    return zlib.crc32(f"{seed}/batch/{batch}".encode()) & 0x7FFFFFFF


@torch.no_grad()
def purify_batches(purifier, x: torch.Tensor, batch_size: int = 64, seed: int | None = None,
                   desc: str | None = None) -> tuple[torch.Tensor, float]:
    """Purify x in batches; returns (outputs, median s per full batch).

    With `seed`, the purifier is reseeded before every batch (`batch_seed`): its first draw, the noise that
    diffuses x to t_star, is then the same for every purifier on every batch, however many draws each makes."""
    outs, times = [], []
    device = next((q.device for q in purifier.parameters()), torch.device("cpu"))
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=desc is None):
        if seed is not None:
            purifier.manual_seed(batch_seed(seed, i // batch_size))
        t0 = time.perf_counter()
        outs.append(purifier(x[i:i + batch_size].to(device)).cpu())  # .cpu() waits for an accelerator
        if len(outs[-1]) == batch_size or not times:
            times.append(time.perf_counter() - t0)
    return torch.cat(outs), sorted(times)[len(times) // 2]


def purified_accuracy(purifier_dir, classifier_dir, dataset: str = "digits", n: int | None = None,
                      batch_size: int = 64, seed: int = 0, data_root=None) -> dict:
    """Accuracy on the test split, bare and through the purifier (seeded), with timing per batch."""
    device = default_device()
    clf, pur = load_classifier(classifier_dir, device), load_purifier(purifier_dir).to(device)
    x, y = to_tensors(load_dataset(dataset, "test", root=data_root)[0], n)
    x_pure, seconds = purify_batches(pur, x, batch_size, seed)
    return {"examples": len(y), "clean_accuracy": accuracy(clf, x, y, device=device),
            "purified_accuracy": accuracy(clf, x_pure, y, device=device),
            "nfe": pur.nfe, "t_star": pur.t_star, "seconds_per_batch": seconds, "batch_size": batch_size}
