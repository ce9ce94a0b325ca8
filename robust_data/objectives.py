"""Squeeze-stage training objectives: small callables (model, x, y) -> (loss, stats)."""

from __future__ import annotations

import torch.nn.functional as F


def cross_entropy(model, x, y, label_smoothing: float = 0.0):
    """Plain cross-entropy: SRe2L's squeeze objective."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return loss, {"ce": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}


OBJECTIVES = {"ce": cross_entropy}


def get_objective(name: str):
    if name not in OBJECTIVES:
        raise ValueError(f"unknown squeeze objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
