"""SRe2L's validation stage: a classifier trained from scratch on the distilled images, by KL divergence to
the squeezed model's soft labels at temperature T (stored FKD crops, or an online teacher on the same crops).

The robust-distillation benchmarks' evaluation (DD-RobustBench, BEARD: DC's `evaluate_synset`) is the same loop
with other keys: `configs/cifar10/dd-benchmark/train.yaml` (hard labels, SGD, the rate / 10 at the midpoint, DSA)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from core.checkpoint import load_classifier
from core.datasets import load_dataset
from core.errors import InputError
from core.io import load_tensors
from core.models import build_classifier, classifier_config_for
from core.runs import open_run
from core.training import LoopConfig, cosine_schedule, fit

from .condense import dsa_augment, dsa_params
from .distilled import load_distilled
from .relabel import apply_crops, crop_params
from .squeeze import save_trained


@dataclass
class TrainConfig(LoopConfig):
    """SRe2L's train_FKD defaults: AdamW 1e-3, weight decay 0.01, cosine, T = 20, KL without a T^2 factor."""

    distilled: str = ""  # the recover stage's folder
    # the relabel stage's folder, "online" (the teacher labels the same crops live), or "hard": cross-entropy to
    # the distilled labels on the same crops (how DC-style condensed data is evaluated)
    soft_labels: str = ""
    teacher: str = ""  # the squeezed classifier (online soft labels only)
    arch: str = "convnet-bn"
    width: int = 64
    depth: int = 3
    epochs: int = 300
    batch_size: int = 100
    lr: float = 0.001
    weight_decay: float = 0.01
    grad_clip: float = 0.0
    temperature: float = 20.0
    online_epochs: int = 300  # online: crop sets cycled (as a stored relabel would)
    min_crop: float = 0.08  # online crops
    flip: bool = True
    crop_seed: int = 42
    optimizer: str = "adamw"  # or "sgd" (momentum below), as DC's evaluation
    momentum: float = 0.9
    lr_schedule: str = "cosine"  # or "step": the rate / 10 at the midpoint (DC's evaluate_synset)
    augment: str = "crops"  # random resized crops + flips, or "dsa": DSA's per-example augmentation (hard / online)
    epoch_batches: bool = False  # batches tile each epoch (DC's DataLoader's step count; batch <= batch_size)
    checkpoint_every: int = 500
    log_every: int = 50
    eval_batch_size: int = 512


def kd_loss(student_logits, teacher_logits, temperature: float) -> torch.Tensor:
    """KL(softmax(t / T) || softmax(s / T)), batch mean, as SRe2L's train_FKD (no T^2 factor)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, 1), F.softmax(teacher_logits / temperature, 1),
                    reduction="batchmean")


CHOICES = {"optimizer": ("adamw", "sgd"), "lr_schedule": ("cosine", "step"), "augment": ("crops", "dsa")}


def check(cfg: TrainConfig) -> None:
    for key, known in CHOICES.items():
        if getattr(cfg, key) not in known:
            raise InputError(f"{key} must be one of {', '.join(known)}, got {getattr(cfg, key)!r}")
    if cfg.augment == "dsa" and cfg.soft_labels not in ("hard", "online"):
        raise InputError("augment dsa needs soft_labels hard or online: stored soft labels belong to their stored "
                         "crops")


def dsa_pixels(x: torch.Tensor, p: dict, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A DSA draw on [0, 1] pixels, applied in normalised units as DC's evaluation applies it."""
    return dsa_augment((x - mean) / std, p) * std + mean


def step_schedule(opt, total: int):
    """DC's evaluate_synset: the rate times 0.1 from the middle of training on."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 if s >= total // 2 else 1.0)


def train_distilled(cfg: TrainConfig, out: str | Path, resume: bool = False) -> Path:
    """Train the student; writes OUT/classifier (with its test accuracy) and returns it."""
    if not cfg.distilled:
        raise InputError("train needs distilled: the recover stage's folder")
    check(cfg)
    images, labels, meta = load_distilled(cfg.distilled)
    if cfg.epoch_batches:  # equal batches that tile each epoch: ceil(images / batch_size) steps per epoch
        cfg = replace(cfg, batch_size=math.ceil(len(labels) / math.ceil(len(labels) / cfg.batch_size)))
    online, hard = cfg.soft_labels == "online", cfg.soft_labels == "hard"
    if hard:
        stored, n_sets = None, cfg.online_epochs
    elif online:
        if not cfg.teacher:
            raise InputError("soft_labels=online needs teacher: the squeezed classifier folder")
        teacher = load_classifier(cfg.teacher).eval().requires_grad_(False)
        stored, n_sets = None, cfg.online_epochs
    else:
        if not cfg.soft_labels:
            raise InputError("train needs soft_labels: the relabel stage's folder (or 'online' with teacher)")
        path = Path(cfg.soft_labels) / "soft_labels.safetensors"
        stored = load_tensors(path)
        if stored["logits"].shape[1] != len(labels):
            raise InputError(f"{path} labels {stored['logits'].shape[1]} images, the distilled folder has "
                             f"{len(labels)}: relabel this distilled data first")
        n_sets = stored["logits"].shape[0]
    run = open_run(cfg, out, resume)
    out, acc, info = run.out, run.acc, run.info
    test, _ = load_dataset(cfg.dataset, "test", root=cfg.data_root, image_size=cfg.image_size)
    if tuple(images.shape[1:]) != (info.channels, info.image_size, info.image_size):
        raise InputError(f"distilled images are {tuple(images.shape[1:])}, dataset {cfg.dataset} is "
                         f"{(info.channels, info.image_size, info.image_size)}")
    mcfg = classifier_config_for(info, cfg.arch, width=cfg.width, depth=cfg.depth)
    per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
    total = max(1, math.ceil(cfg.epochs * len(labels) / per_step))

    torch.manual_seed(cfg.seed)
    model = build_classifier(mcfg)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    lr_sched = step_schedule(opt, total) if cfg.lr_schedule == "step" else cosine_schedule(opt, total,
                                                                                          cfg.warmup_steps)
    step = run.resume({"model": model}, opt, lr_sched)
    model, opt = acc.prepare(model, opt)
    images = images.to(acc.device)
    if online:
        teacher = teacher.to(acc.device)
    micro = {"i": step * cfg.grad_accum}
    crop_cache: dict[int, torch.Tensor] = {}
    norm = tuple(torch.tensor(v, device=acc.device).view(1, -1, 1, 1) for v in (info.mean, info.std))

    def loss_fn(model, idx, y, g):
        epoch = micro["i"] * cfg.batch_size * acc.num_processes // len(labels)
        micro["i"] += 1
        e = epoch % n_sets
        if cfg.augment == "dsa":  # a CPU generator drawn from the step's
            cpu = torch.Generator().manual_seed(int(torch.randint(2**62, (1,), generator=g, device=g.device)))
            x = dsa_pixels(images[idx], dsa_params(len(idx), cpu, shared=False), *norm)
        elif online or hard:
            if e not in crop_cache:
                crop_cache.clear()
                crop_cache[e] = crop_params(len(labels), tuple(images.shape[-2:]), e, cfg.crop_seed,
                                            cfg.min_crop, cfg.flip)
            x = apply_crops(images[idx], crop_cache[e][idx.cpu()].to(acc.device))
        else:
            x = apply_crops(images[idx], stored["crops"][e, idx.cpu()].to(acc.device))
        if hard:
            s = model(x)
            loss = F.cross_entropy(s, y)
            return loss, {"ce": loss.detach(), "acc": (s.argmax(1) == y).float().mean()}
        with torch.no_grad():
            t = teacher(x) if online else stored["logits"][e, idx.cpu()].float().to(acc.device)
        s = model(x)
        loss = kd_loss(s, t, cfg.temperature)
        return loss, {"kd": loss.detach(), "agree": (s.argmax(1) == t.argmax(1)).float().mean()}

    data = TensorDataset(torch.arange(len(labels)), labels)
    seconds = fit(run, cfg, model, opt, lr_sched, loss_fn, step, total, lambda s: None,
                  {"model": acc.unwrap_model(model)}, "train on distilled data", dataset=data)["seconds"]
    return save_trained(acc, model, mcfg, test, out, cfg, {"distilled": cfg.distilled, "ipc": meta.get("ipc"),
                                                          "soft_labels": cfg.soft_labels, "train_steps": total,
                                                          "optimizer": cfg.optimizer, "lr_schedule": cfg.lr_schedule,
                                                          "augment": cfg.augment, "batch_size": cfg.batch_size,
                                                          "train_seconds": seconds})
