"""The DiffPure teacher: a diffusers UNet2DModel trained with the DDPM objective (Ho et al., 2020)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from core.errors import InputError
from core.io import atomic_write_json
from core.runs import open_run
from core.training import LoopConfig, ema_update, fit, make_ema, make_optimizer
from core.zoo import is_named
from purify import DiffPure, VPSchedule
from purify.denoisers import PREDICTION_TYPES, channels_last_on_cpu, cpu_layout
from purify.schedule import VARIANCE_TYPES


@dataclass
class UNetConfig:
    """A diffusers UNet2DModel: one entry of block_out_channels and attention per resolution."""

    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention: list[bool] = field(default_factory=lambda: [False, True, True])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int | None = None
    dropout: float = 0.0


@dataclass
class NoiseScheduleConfig:
    """The DDPM noise schedule, stored as a diffusers DDPMScheduler config beside the UNet."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    # the reverse SDE's step variance: fixed_large (beta, DiffPure's Euler-Maruyama step of the VP-SDE and
    # google/ddpm-cifar10-32's) or fixed_small (the DDPM posterior's, diffusers' default)
    variance_type: str = "fixed_large"


@dataclass
class TeacherConfig(LoopConfig):
    """Defaults are the embedded-digits teacher (configs/digits/teacher.yaml says the same)."""

    unet: UNetConfig = field(default_factory=UNetConfig)
    scheduler: NoiseScheduleConfig = field(default_factory=NoiseScheduleConfig)
    t_max: float = 0.3  # train on t ~ U(0, t_max]: purification never needs the score above t_star
    train_steps: int = 1200
    batch_size: int = 128
    lr: float = 0.001
    warmup_steps: int = 100
    ema_decay: float = 0.995
    hflip: bool = False
    checkpoint_every: int = 400
    log_every: int = 50
    # the curve that matters for purification: every `curve_every` steps (0: off) the EMA teacher purifies
    # `curve_n` test images (t_star, purify_steps, mode) for the classifier in `curve_classifier`; OUT/curve.jsonl
    curve_classifier: str | None = None
    curve_every: int = 0
    curve_n: int = 256
    # the purifier written to OUT/purifier at the end
    t_star: float = 0.1
    purify_steps: int = 100
    mode: str = "sde"


def validate(cfg: TeacherConfig) -> None:
    if cfg.curve_every and not cfg.curve_classifier:
        raise InputError("curve_every needs curve_classifier: the classifier folder the curve purifies for")
    if cfg.curve_classifier and not is_named(cfg.curve_classifier) and not Path(cfg.curve_classifier).is_dir():
        raise FileNotFoundError(f"curve_classifier {cfg.curve_classifier} is not a folder")
    if not 0 < cfg.t_max <= 1:
        raise InputError(f"t_max must be in (0, 1], got {cfg.t_max}")
    if cfg.t_star > cfg.t_max:
        raise InputError(f"t_star {cfg.t_star} lies above t_max {cfg.t_max}: the teacher would purify "
                         "with a score it was never trained on")
    if cfg.scheduler.variance_type not in VARIANCE_TYPES:
        raise InputError(f"scheduler.variance_type must be one of {', '.join(VARIANCE_TYPES)}, "
                         f"got {cfg.scheduler.variance_type!r}")
    if cfg.scheduler.prediction_type not in PREDICTION_TYPES:
        raise InputError(f"scheduler.prediction_type must be one of {', '.join(PREDICTION_TYPES)}")
    if len(cfg.unet.attention) != len(cfg.unet.block_out_channels):
        raise InputError("unet.attention needs one flag per entry of unet.block_out_channels")
    for name in ("train_steps", "batch_size", "grad_accum", "checkpoint_every", "purify_steps"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(cfg, name)}")


def build_unet(u: UNetConfig, channels: int, image_size: int):
    from diffusers import UNet2DModel

    attn = list(u.attention)
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        norm_num_groups=u.norm_num_groups, attention_head_dim=u.attention_head_dim, dropout=u.dropout)


def scheduler_config(s: NoiseScheduleConfig) -> dict:
    return {"num_train_timesteps": s.num_train_timesteps, "beta_schedule": s.beta_schedule,
            "beta_start": s.beta_start, "beta_end": s.beta_end, "prediction_type": s.prediction_type,
            "variance_type": s.variance_type, "clip_sample": False}


def ddpm_loss(unet, x0, schedule: VPSchedule, k_max: int, prediction_type: str, g: torch.Generator):
    """Simple DDPM loss on timesteps k ~ U{0..k_max-1}: MSE to the epsilon / v / x0 target."""
    k = torch.randint(0, k_max, (x0.shape[0],), generator=g, device=g.device).to(x0.device)
    ab = schedule.alphas_cumprod.to(x0.device)[k].view(-1, 1, 1, 1)
    noise = torch.randn(x0.shape, generator=g, device=g.device).to(x0)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    target = {"epsilon": noise, "v_prediction": ab.sqrt() * noise - (1 - ab).sqrt() * x0, "sample": x0}
    out = unet(cpu_layout(unet, x_t), k).sample
    return F.mse_loss(out.float(), target[prediction_type].float())


def purification_curve(cfg: TeacherConfig, out: Path, sched_cfg: dict, device):
    """A function (ema, step) that appends the EMA teacher's purified clean accuracy to OUT/curve.jsonl."""
    from core.checkpoint import load_classifier
    from core.datasets import load_dataset, to_tensors
    from core.metrics import accuracy, purify_batches

    clf = load_classifier(cfg.curve_classifier, device)
    x, y = to_tensors(load_dataset(cfg.dataset, "test", root=cfg.data_root, image_size=cfg.image_size)[0],
                      cfg.curve_n, seed=cfg.seed)
    bare = accuracy(clf, x, y, device=device)

    def record(ema, step: int) -> None:
        p = DiffPure(copy.deepcopy(ema), sched_cfg, cfg.t_star, cfg.purify_steps, cfg.mode, seed=cfg.seed)
        purified, _ = purify_batches(p, x, 256, cfg.seed)
        with (out / "curve.jsonl").open("a") as f:
            f.write(json.dumps({"step": step, "purified_accuracy": accuracy(clf, purified, y, device=device),
                                "clean_accuracy": bare, "examples": len(y)}) + "\n")

    return record


def train_teacher(cfg: TeacherConfig, out: str | Path, resume: bool = False) -> Path:
    """Train the score network and write OUT/purifier (a DiffPure teacher); returns that folder."""
    validate(cfg)
    run = open_run(cfg, out, resume)
    out, acc, info = run.out, run.acc, run.info
    sched_cfg = scheduler_config(cfg.scheduler)
    schedule = VPSchedule.from_scheduler_config(sched_cfg)
    k_max = max(1, math.ceil(cfg.t_max * schedule.T))

    torch.manual_seed(cfg.seed)  # weight init only; the loop uses step-seeded generators
    unet = channels_last_on_cpu(build_unet(cfg.unet, info.channels, info.image_size), acc.device)  # before DDP
    ema = make_ema(unet)
    opt, lr_sched = make_optimizer(cfg, unet.parameters())
    step = run.resume({"unet": unet, "ema": ema}, opt, lr_sched)
    model, opt = acc.prepare(unet, opt)
    ema.to(acc.device)

    def loss_fn(model, x, y, g):
        x = x * 2 - 1
        if cfg.hflip:
            flip = (torch.rand(x.shape[0], generator=g, device=g.device) < 0.5).to(x.device)
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return ddpm_loss(model, x, schedule, k_max, cfg.scheduler.prediction_type, g), {}

    curve = purification_curve(cfg, out, sched_cfg, acc.device) if cfg.curve_every and acc.is_main_process else None

    def on_step(s):
        ema_update(ema, acc.unwrap_model(model), min(cfg.ema_decay, (1 + s) / (10 + s)))
        if curve is not None and (s % cfg.curve_every == 0 or s == cfg.train_steps):
            curve(ema, s)

    stats = fit(run, cfg, model, opt, lr_sched, loss_fn, step, cfg.train_steps, on_step,
                {"unet": acc.unwrap_model(model), "ema": ema}, "teacher")
    seconds, seen = stats["seconds"], stats["images"]
    acc.wait_for_everyone()
    folder = out / "purifier"
    if acc.is_main_process:
        teacher = DiffPure(ema, sched_cfg, cfg.t_star, cfg.purify_steps, cfg.mode, seed=cfg.seed,
                           source={"trained_by": "distill teacher", "run": str(out), "steps": cfg.train_steps,
                                   "t_max": cfg.t_max, "dataset": cfg.dataset})
        teacher.save(folder)
        n_params = sum(p.numel() for p in ema.parameters())
        atomic_write_json(out / "train.json", {"seconds": seconds, "images_per_s": seen / max(seconds, 1e-9),
                                               "resumed_from": None if run.ckpt is None else run.ckpt.name,
                                               "unet_parameters": n_params, "processes": acc.num_processes})
    acc.wait_for_everyone()
    return folder
