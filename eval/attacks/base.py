"""What every attack family shares: the threat models, the context a builder gets, the margin loss."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import InputError

NORMS = ("Linf", "L2")


@dataclass(frozen=True)
class AttackContext:
    """What a builder needs beyond the model: the threat model and the budget of this one run."""

    norm: str
    eps: float
    steps: int
    n_classes: int
    seed: int = 0
    eot: int = 1
    queries: int = 5000
    stochastic: bool = False
    loss: str | None = None  # PGD-EOT family: ce, margin or dlr (None: the attack's own)
    eot_batch: int | None = None  # EOT copies per forward pass (None: all `eot` at once)


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise InputError(f"unknown norm {norm!r}; known: {', '.join(NORMS)}")



def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Carlini-Wagner margin: the best wrong logit minus the true one (positive once misclassified)."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    wrong = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), -float("inf")).amax(1)
    return wrong - true


class _Contiguous(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class ContiguousGrad(nn.Module):
    """The model, with the input gradient handed back in the standard layout: a channels-last model's gradient is
    channels-last, and torchattacks' PGD-L2 (and DeepFool, CW) `.view` it, which fails on such strides."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(_Contiguous.apply(x))
