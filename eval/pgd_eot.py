"""Adaptive PGD-EOT through a purifier (Athalye et al., 2018): full gradients through every purifier step."""

from __future__ import annotations

import torch

from core.checkpoint import load_classifier
from core.datasets import load_dataset, to_tensors
from purify import load_purifier
from robust_data.squeeze import accuracy

from .defended import Defended


def pgd_eot(model, x, y, eps: float, steps: int, eot: int, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """torchattacks EOTPGD (Linf, step 2.5 eps / steps, random start), `eot` gradient samples per step."""
    import torchattacks

    attack = torchattacks.EOTPGD(model, eps=eps, alpha=2.5 * eps / steps, steps=steps, eot_iter=eot,
                                 random_start=True)
    torch.manual_seed(seed)  # torchattacks' random start uses the global RNG; purifiers have their own
    return torch.cat([attack(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def evaluate_pgd_eot(purifier_dir, classifier_dir, dataset: str = "digits", n: int = 128, eps: float = 0.1,
                     steps: int = 40, eot: int = 4, seed: int = 0, data_root=None) -> dict:
    """Clean and PGD-EOT robust accuracy of classifier(purifier(x)); the purifier is reseeded for scoring."""
    clf, pur = load_classifier(classifier_dir), load_purifier(purifier_dir, seed=seed)
    x, y = to_tensors(load_dataset(dataset, "test", root=data_root)[0], n)
    model = Defended(pur, clf)
    x_adv = pgd_eot(model, x, y, eps, steps, eot, seed)
    with torch.no_grad():
        pur.manual_seed(seed + 1)
        clean = accuracy(model, x, y)
        pur.manual_seed(seed + 2)
        robust = accuracy(model, x_adv, y)
    return {"purifier": str(purifier_dir), "nfe": pur.nfe, "examples": len(y), "clean_accuracy": clean,
            "robust_accuracy": robust, "attack": {"name": "pgd-eot", "norm": "Linf", "eps": eps, "steps": steps,
                                                  "eot": eot, "gradient": "full, through every purifier step"}}
