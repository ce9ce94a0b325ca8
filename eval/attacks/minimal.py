"""Minimal-perturbation attacks, unbounded: DeepFool (Moosavi-Dezfooli et al., CVPR 2016) and Carlini-Wagner L2
(S&P 2017), as the robust-distillation benchmark BEARD runs them (torchattacks, untargeted). They search for the
smallest L2 change that flips the label, with no epsilon: the harness reports accuracy on their points (BEARD's
figure) and the median L2 distance they needed, beside the threat model, never inside its all-attacks figure."""

from __future__ import annotations

import torch
import torchattacks

from .base import AttackContext, ContiguousGrad


class _Contiguous:
    """torchattacks' DeepFool indexes per image and CW optimises in atanh space: both take a contiguous float32
    batch; the harness hands one over already, this keeps a direct caller's permuted batch working too."""

    def __init__(self, attack):
        self.attack = attack

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attack(x.contiguous(), y).to(x.dtype)


def build_deepfool(model, ctx: AttackContext, overshoot: float = 0.02):
    """DeepFool, `ctx.steps` linearisations (BEARD: 50), overshoot 0.02 (torchattacks' and BEARD's)."""
    return _Contiguous(torchattacks.DeepFool(ContiguousGrad(model), steps=ctx.steps, overshoot=overshoot))


def build_cw_l2(model, ctx: AttackContext, c: float = 1.0, kappa: float = 0.0, lr: float = 0.01):
    """Carlini-Wagner L2, `ctx.steps` Adam steps (BEARD: 100) at c 1, kappa 0, lr 0.01 (BEARD's settings)."""
    return _Contiguous(torchattacks.CW(ContiguousGrad(model), c=c, kappa=kappa, steps=ctx.steps, lr=lr))
