"""SRe2L's squeeze stage (Yin et al., NeurIPS 2023): train the classifier that recover and relabel use."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from core.checkpoint import save_classifier
from core.datasets import load_dataset, to_tensors
from core.errors import InputError
from core.io import atomic_write_json
from core.metrics import accuracy
from core.models import build_classifier, classifier_config_for
from core.runs import open_run
from core.training import LoopConfig, cosine_schedule, fit

from .objectives import get_objective


@dataclass
class SqueezeConfig(LoopConfig):
    """Defaults are the embedded-digits classifier (configs/digits/squeeze.yaml says the same)."""

    arch: str = "convnet-bn"
    width: int = 64
    depth: int = 3
    objective: str = "ce"  # ce | guard | guard-loss | gradnorm | adversarial (robust_data/objectives.py)
    reg_lambda: float = 100.0  # guard, guard-loss, gradnorm
    reg_h: float = 3.0  # guard, guard-loss: finite-difference step, normalised-pixel units
    adv_eps: float = 1 / 255  # adversarial: Linf budget in [0, 1] pixels
    adv_steps: int = 10
    label_smoothing: float = 0.0
    noise_sd: float = 0.0  # Gaussian noise augmentation (Cohen et al., 2019): the smoothing sigma, [0, 1] pixels
    epochs: float = 30.0
    batch_size: int = 128
    optimizer: str = "adamw"  # or sgd (momentum 0.9, nesterov)
    lr: float = 0.002
    weight_decay: float = 0.0005
    grad_clip: float = 0.0
    crop_padding: int = 2  # random translation by up to this many pixels (0: none)
    hflip: bool = False
    checkpoint_every: int = 500
    log_every: int = 50
    eval_batch_size: int = 512


def augment(x: torch.Tensor, padding: int, hflip: bool, g: torch.Generator) -> torch.Tensor:
    """Random translation (pad-and-crop, reflect padding) and optional horizontal flip, per example."""
    n, _, h, w = x.shape
    if padding > 0:
        xp = F.pad(x, (padding,) * 4, mode="reflect")
        dx, dy = (torch.randint(0, 2 * padding + 1, (2, n), generator=g, device=g.device).cpu().tolist())
        x = torch.stack([xp[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if hflip:
        flip = (torch.rand(n, generator=g, device=g.device) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


def training_inputs(x: torch.Tensor, cfg: SqueezeConfig, g: torch.Generator) -> torch.Tensor:
    """What the objective sees: the augmented batch, plus N(0, noise_sd^2) per pixel when the classifier is
    trained for randomized smoothing (Cohen et al.: the base classifier must classify x + sigma eps; unclamped)."""
    x = augment(x, cfg.crop_padding, cfg.hflip, g)
    if cfg.noise_sd > 0:
        x = x + cfg.noise_sd * torch.randn(x.shape, generator=g, device=g.device, dtype=x.dtype).to(x.device)
    return x


def train_squeeze(cfg: SqueezeConfig, out: str | Path, resume: bool = False) -> Path:
    """Train the squeezed classifier with `cfg.objective`; writes OUT/classifier and returns it."""
    objective = get_objective(cfg.objective, cfg)
    if not cfg.noise_sd >= 0:
        raise InputError(f"noise_sd must be >= 0 (the smoothing sigma in [0, 1] pixels), got {cfg.noise_sd}")
    if cfg.optimizer not in ("adamw", "sgd"):
        raise InputError(f"optimizer must be 'adamw' or 'sgd', got {cfg.optimizer!r}")
    run = open_run(cfg, out, resume)
    out, acc, train, info = run.out, run.acc, run.dataset, run.info
    test, _ = load_dataset(cfg.dataset, "test", root=cfg.data_root, image_size=cfg.image_size)
    mcfg = classifier_config_for(info, cfg.arch, width=cfg.width, depth=cfg.depth)
    total = max(1, math.ceil(cfg.epochs * len(train) / (cfg.batch_size * cfg.grad_accum * acc.num_processes)))

    torch.manual_seed(cfg.seed)
    model = build_classifier(mcfg)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, nesterov=True,
                              weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = cosine_schedule(opt, total, cfg.warmup_steps)
    step = run.resume({"model": model}, opt, lr_sched)
    model, opt = acc.prepare(model, opt)

    def loss_fn(model, x, y, g):
        return objective(model, training_inputs(x, cfg, g), y, label_smoothing=cfg.label_smoothing)

    seconds = fit(run, cfg, model, opt, lr_sched, loss_fn, step, total, lambda s: None,
                  {"model": acc.unwrap_model(model)}, f"squeeze ({cfg.objective})")["seconds"]
    return save_trained(acc, model, mcfg, test, out, cfg, {"objective": cfg.objective, "noise_sd": cfg.noise_sd,
                                                          "train_steps": total, "train_seconds": seconds})


def save_trained(acc, model, mcfg, test, out: Path, cfg, meta: dict) -> Path:
    """Test accuracy, then OUT/classifier (config + safetensors + meta) and OUT/train.json, on the main process."""
    acc.wait_for_everyone()
    folder = out / "classifier"
    if acc.is_main_process:
        net = acc.unwrap_model(model)
        x_test, y_test = to_tensors(test)
        test_acc = accuracy(net, x_test, y_test, cfg.eval_batch_size, acc.device)
        meta = {"test_accuracy": test_acc, "test_examples": len(y_test), "dataset": cfg.dataset, **meta,
                "run": str(out)}
        save_classifier(net, folder, mcfg, meta)
        atomic_write_json(out / "train.json", meta)
        acc.print(f"test accuracy {test_acc:.4f} on {len(y_test)} {cfg.dataset} test images")
    acc.wait_for_everyone()
    return folder
