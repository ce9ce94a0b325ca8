"""A defended model: purifier in front of a classifier, one nn.Module on [0, 1] inputs."""

from __future__ import annotations

import torch
import torch.nn as nn

from core.errors import InputError


class Defended(nn.Module):
    """classifier(purifier(x)); with `votes` > 1, the mean softmax over that many independent purifications.

    Always in eval mode: torchattacks calls `model.train()` after an attack on a model it found in training
    mode, which would let BatchNorm layers of a shared classifier update their statistics while scoring."""

    def __init__(self, purifier: nn.Module | None, classifier: nn.Module, votes: int = 1):
        super().__init__()
        if votes < 1:
            raise InputError(f"votes must be at least 1, got {votes}")
        self.purifier, self.classifier, self.votes = purifier, classifier, votes
        self.eval()

    def train(self, mode: bool = True) -> "Defended":
        return super().train(False)

    def extra_repr(self) -> str:
        return f"votes={self.votes}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.purifier is None:
            return self.classifier(x)
        if self.votes == 1:
            return self.classifier(self.purifier(x))
        probs = torch.stack([self.classifier(self.purifier(x)).softmax(1) for _ in range(self.votes)]).mean(0)
        return probs.clamp_min(1e-12).log()  # log of the vote: argmax and cross-entropy both behave
