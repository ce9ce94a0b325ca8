"""`python -m eval accuracy`: clean accuracy of a classifier with and without a purifier in front, and the
purifier's seconds per batch."""

from __future__ import annotations

from core.checkpoint import load_classifier
from core.datasets import load_dataset, to_tensors
from core.metrics import accuracy, default_device, purify_batches
from purify import load_purifier


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
