"""Squeeze-stage training objectives: small callables (model, x, y, ...) -> (loss, stats) on [0, 1] pixels.

The curvature terms work where GUARD's code does, on normalised inputs (x - mean) / std, so `h` is in
normalised-pixel units (h = 3 is GUARD's CIFAR setting; for a classifier without a normalising front it is
in [0, 1] pixel units). They use gradients of the batch-mean loss, as GUARD's code does, so lambda's effect
scales with 1 / batch size: lambda 100 at batch 128 is GUARD's CIFAR-10 setting."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.errors import InputError

OBJECTIVES: dict[str, tuple] = {}  # name -> (objective, the SqueezeConfig keys it takes)


def register_objective(name: str, settings: tuple[str, ...] = ()):
    """Make a squeeze objective known by name; `settings` are the SqueezeConfig keys bound to its keywords."""
    def add(fn):
        OBJECTIVES[name] = (fn, tuple(settings))
        return fn
    return add


@register_objective("ce")
def cross_entropy(model, x, y, label_smoothing: float = 0.0):
    """Plain cross-entropy: SRe2L's squeeze objective."""
    logits = model(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
    return loss, {"ce": loss.detach(), "acc": (logits.argmax(1) == y).float().mean()}


def split_normalization(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """(network behind the normalising front, normalised x); (model, x) when there is no such front."""
    inner = getattr(model, "module", model)  # DDP
    if hasattr(inner, "net") and hasattr(inner, "mean") and hasattr(inner, "std"):
        return inner.net, (x - inner.mean) / inner.std
    return inner, x


@contextlib.contextmanager
def eval_mode(net: nn.Module):
    """BatchNorm on running statistics while the regularizer probes the loss (as GUARD's code does)."""
    was = net.training
    net.eval()
    try:
        yield
    finally:
        net.train(was)


def input_grad(net, x, y, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(gradient of the batch-mean cross-entropy with respect to x, x as a leaf)."""
    x = x.detach().requires_grad_(True)
    g = torch.autograd.grad(F.cross_entropy(net(x), y), x, create_graph=create_graph)[0]
    return g, x


def unit_step(g: torch.Tensor, h: float, floor: float = 1e-12) -> torch.Tensor:
    """GUARD's paper probe z = h g / ||g|| per example, so ||z|| <= h always.

    GUARD's code writes h (g + 1e-7) / (||g|| + 1e-7): once the model is confident, g of the batch-mean loss
    is tiny and z turns into h times the all-ones direction (||z|| up to h sqrt(d)), a brightness shift rather
    than a local probe. Here a vanishing gradient gives a vanishing z (the floor only avoids 0 / 0)."""
    return h * g / g.flatten(1).norm(dim=1).clamp_min(floor).view(-1, *[1] * (g.dim() - 1))


def curvature_direction(net, xn, y, h: float) -> torch.Tensor:
    """GUARD's z = h g / ||g|| per example, g the input gradient of the loss (detached)."""
    return unit_step(input_grad(net, xn, y)[0], h)


def guard_penalty(net, xn, y, h: float) -> torch.Tensor:
    """Per-example ||grad_x L(x + z) - grad_x L(x)||, differentiable in the weights (double backprop).

    grad_x [L(x + z) - L(x)] with z held fixed, as GUARD writes it, is the difference of the two input
    gradients; computing grad_x L(x) once, in the graph, also gives z, which saves a forward and a backward."""
    g, _ = input_grad(net, xn, y, create_graph=True)
    g_z, _ = input_grad(net, xn.detach() + unit_step(g.detach(), h), y, create_graph=True)
    return (g_z - g).flatten(1).norm(dim=1)


def loss_difference(net, xn, y, h: float) -> torch.Tensor:
    """|L(x + z) - L(x)| of the batch-mean loss, L(x) computed once for both z and the difference."""
    x = xn.detach().requires_grad_(True)
    loss_x = F.cross_entropy(net(x), y)
    z = unit_step(torch.autograd.grad(loss_x, x, retain_graph=True)[0], h)
    return (F.cross_entropy(net(xn.detach() + z), y) - loss_x).abs()


def input_grad_norm(net, xn, y) -> torch.Tensor:
    """Per-example ||grad_x L||, kept in the graph."""
    return input_grad(net, xn, y, create_graph=True)[0].flatten(1).norm(dim=1)


def penalized(model, x, y, penalty, reg_lambda: float, label_smoothing: float = 0.0):
    """cross-entropy + reg_lambda * mean penalty(net, normalised x, y), the penalty probed in eval mode."""
    loss, stats = cross_entropy(model, x, y, label_smoothing)
    net, xn = split_normalization(model, x)
    with eval_mode(net):
        reg = penalty(net, xn, y).mean()
    return loss + reg_lambda * reg, {**stats, "reg": reg.detach()}


@register_objective("guard", ("reg_lambda", "reg_h"))
def guard(model, x, y, reg_lambda: float = 100.0, reg_h: float = 3.0, label_smoothing: float = 0.0):
    """GUARD (Xue et al., AAAI 2025): cross-entropy + lambda * mean ||grad L(x + z) - grad L(x)||."""
    return penalized(model, x, y, functools.partial(guard_penalty, h=reg_h), reg_lambda, label_smoothing)


@register_objective("guard-loss", ("reg_lambda", "reg_h"))
def guard_loss(model, x, y, reg_lambda: float = 100.0, reg_h: float = 3.0, label_smoothing: float = 0.0):
    """GUARD's ImageNet-code variant: cross-entropy + lambda * |L(x + z) - L(x)| (batch-mean losses)."""
    return penalized(model, x, y, functools.partial(loss_difference, h=reg_h), reg_lambda, label_smoothing)


@register_objective("gradnorm", ("reg_lambda",))
def gradnorm(model, x, y, reg_lambda: float = 100.0, label_smoothing: float = 0.0):
    """Input-gradient norm penalty, the ablation: lambda * mean ||grad_x L||, kept in the graph.

    (GUARD's ablation script detaches this gradient, so its penalty never reaches the weights.)"""
    return penalized(model, x, y, input_grad_norm, reg_lambda, label_smoothing)


@register_objective("adversarial", ("adv_eps", "adv_steps"))
def adversarial(model, x, y, adv_eps: float = 1 / 255, adv_steps: int = 10, label_smoothing: float = 0.0):
    """PGD adversarial training (Madry et al., 2018): cross-entropy on Linf PGD examples in [0, 1] pixels.

    Steps of 2.5 eps / steps from the clean image (no random start, like GUARD's baseline)."""
    net = getattr(model, "module", model)
    alpha = 2.5 * adv_eps / adv_steps
    with eval_mode(net):
        x_adv = x.detach()
        # a loop of its own, not the harness's EOTPGD: training may not import eval, and it needs no EOT or best iterate
        for _ in range(adv_steps):
            g, _ = input_grad(net, x_adv, y)
            x_adv = torch.min(torch.max(x_adv + alpha * g.sign(), x - adv_eps), x + adv_eps).clamp(0, 1).detach()
    loss, stats = cross_entropy(model, x_adv, y, label_smoothing)
    stats["adv_acc"] = stats.pop("acc")
    return loss, stats


def get_objective(name: str, cfg=None):
    """The named objective with its settings (reg_lambda, reg_h, adv_eps, adv_steps) bound from `cfg`."""
    if name not in OBJECTIVES:
        raise InputError(f"unknown squeeze objective {name!r}; known: {', '.join(OBJECTIVES)}")
    fn, settings = OBJECTIVES[name]
    return fn if cfg is None else functools.partial(fn, **{k: getattr(cfg, k) for k in settings})
