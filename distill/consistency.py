"""Consistency distillation (Song et al., ICML 2023) of the teacher's probability-flow ODE on [t_min, t_star]."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.checkpoint import load_classifier
from core.errors import InputError
from core.io import atomic_write_json
from core.runs import open_run
from core.training import ema_update, fit, make_ema, make_optimizer
from purify import ConsistencyDenoiser, ConsistencyStudent, UNetDenoiser, load_purifier
from purify.denoisers import channels_last_on_cpu
from purify.samplers import ddim_step, heun_step
from purify.students import sample_consistency

from .distances import get_distance
from .loop import StudentBatch, StudentConfig, check_adversarial, k_step_purify, peak_memory_mb, student_dir, student_loss

SOLVERS = ("ddim", "heun")


@dataclass
class ConsistencyConfig(StudentConfig):
    train_steps: int = 1200
    num_scales: int = 20  # N: the segment [t_min, t_star] is cut into N equal steps
    t_min: float = 0.0  # f is exactly the identity here; 0 is the clean image (alpha_bar = 1)
    solver: str = "ddim"  # the teacher's ODE step: ddim (1 evaluation) or heun (2)
    distance: str = "pseudo-huber"  # or l2, lpips (needs cached backbone weights)
    huber_c: float | None = None  # default 0.00054 sqrt(d)
    target_ema: float = 0.95  # fixed rate of the target network theta^-
    sigma_data: float = 0.5
    timestep_scaling: float = 10.0
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])


def validate(cfg: ConsistencyConfig, t_star: float) -> None:
    if cfg.solver not in SOLVERS:
        raise InputError(f"unknown solver {cfg.solver!r}; known: {', '.join(SOLVERS)}")
    if not 0 <= cfg.t_min < t_star:
        raise InputError(f"t_min must lie in [0, t_star={t_star}), got {cfg.t_min}")
    if cfg.num_scales < 1 or not cfg.student_steps or min(cfg.student_steps) < 1:
        raise InputError("num_scales and every entry of student_steps must be at least 1")
    if not 0 <= cfg.target_ema < 1:
        raise InputError(f"target_ema must be in [0, 1), got {cfg.target_ema}")


def consistency_loss(student_f, target_f, teacher, batch: StudentBatch, cfg: ConsistencyConfig, t_star: float,
                     distance, g):
    """d(f_theta(x_{t_n+1}, t_n+1), f_theta-(x_hat_{t_n}, t_n)) with x_hat_{t_n} one teacher ODE step from x_{t_n+1}.

    The student sees x_{t_n+1} of `batch.x`; the teacher's step and the target network start from that of
    `batch.x_ref` under the same noise (the same point unless adversarial rows take the clean image's target)."""
    sched, n_scales, x0 = teacher.schedule, cfg.num_scales, batch.x
    n = torch.randint(0, n_scales, (x0.shape[0],), generator=g, device=g.device).to(x0.device).double()
    t_hi = cfg.t_min + (t_star - cfg.t_min) * (n + 1) / n_scales
    t_lo = cfg.t_min + (t_star - cfg.t_min) * n / n_scales
    ab_hi, ab_lo = (sched.alpha_bar(v).float().view(-1, 1, 1, 1) for v in (t_hi, t_lo))
    eps = torch.randn(x0.shape, generator=g, device=g.device).to(x0)
    z = ab_hi.sqrt() * x0 + (1 - ab_hi).sqrt() * eps
    z_ref = z if batch.x_ref is x0 else ab_hi.sqrt() * batch.x_ref + (1 - ab_hi).sqrt() * eps
    with torch.no_grad():
        if cfg.solver == "ddim":
            z_lo = ddim_step(z_ref, teacher(z_ref, t_hi.float()), ab_hi, ab_lo)
        else:
            z_lo = heun_step(teacher, z_ref, t_hi.float(), t_lo.float(), ab_hi, ab_lo)
        target = target_f(z_lo, t_lo.float())
        if batch.clean_target:
            target = torch.where(batch.adv.view(-1, 1, 1, 1), batch.clean, target)
    pred = student_f(z, t_hi.float())
    return distance(pred, target).mean(), {"mse": (pred - target).float().square().mean().detach()}


def train_consistency(cfg: ConsistencyConfig, teacher_dir: str | Path, out: str | Path, resume: bool = False) -> list[Path]:
    """Train one consistency function; save it as K-step students for each K in cfg.student_steps."""
    teacher_p = load_purifier(teacher_dir)
    t_star = cfg.t_star or teacher_p.t_star
    validate(cfg, t_star)
    check_adversarial(cfg.adversarial)
    distance = get_distance(cfg.distance, cfg.huber_c)
    run = open_run(cfg, out, resume)
    out, acc = run.out, run.acc
    classifier = load_classifier(cfg.adversarial.classifier, acc.device) if cfg.adversarial.classifier else None
    if isinstance(distance, torch.nn.Module):
        distance.to(acc.device)

    teacher = teacher_p.x0_net.to(acc.device).eval().requires_grad_(False)
    scalings = {"t_min": cfg.t_min, "sigma_data": cfg.sigma_data, "timestep_scaling": cfg.timestep_scaling}
    unet = channels_last_on_cpu(copy.deepcopy(teacher_p.unet), acc.device).requires_grad_(True)  # before DDP
    ema, target = make_ema(unet), make_ema(unet)
    opt, lr_sched = make_optimizer(cfg, unet.parameters())
    step = run.resume({"student": unet, "ema": ema, "target": target}, opt, lr_sched)
    model, opt = acc.prepare(unet, opt)
    ema.to(acc.device), target.to(acc.device)
    kind = teacher.prediction_type
    student_f = ConsistencyDenoiser(UNetDenoiser(model, teacher.schedule, kind), **scalings)
    target_f = ConsistencyDenoiser(UNetDenoiser(target, teacher.schedule, kind), **scalings)

    attacked_f = ConsistencyDenoiser(UNetDenoiser(acc.unwrap_model(model), teacher.schedule, kind), **scalings)

    def loss_fn(model, x, y, g):
        attacked = trained = None
        if classifier is not None:  # the adaptive attack and classifier term use a K drawn from student_steps
            k = cfg.student_steps[int(torch.randint(len(cfg.student_steps), (1,), generator=g, device=g.device))]
            attacked, trained = (k_step_purify(f, sample_consistency, teacher.schedule, t_star, k)
                                 for f in (attacked_f, student_f))
        return student_loss(x, y, g, classifier, cfg.adversarial,
                            lambda b: consistency_loss(student_f, target_f, teacher, b, cfg, t_star, distance, g),
                            attacked, trained)

    def on_step(s):
        net = acc.unwrap_model(model)
        ema_update(target, net, cfg.target_ema)
        ema_update(ema, net, min(cfg.ema_decay, (1 + s) / (10 + s)))

    stats = fit(run, cfg, model, opt, lr_sched, loss_fn, step, cfg.train_steps, on_step,
                {"student": acc.unwrap_model(model), "ema": ema, "target": target}, "consistency")
    acc.wait_for_everyone()
    if acc.is_main_process:
        for k in cfg.student_steps:
            ConsistencyStudent(copy.deepcopy(ema).cpu(), teacher_p.schedule.config, t_star, k, prediction_type=kind,
                               seed=cfg.seed, consistency=scalings,
                               source={"trained_by": "distill consistency", "teacher": str(teacher_dir),
                                       "run": str(out), "solver": cfg.solver, "distance": cfg.distance,
                                       "adversarial": cfg.adversarial.describe()}
                               ).save(student_dir(out, k))
        atomic_write_json(out / "train.json", {**stats, "processes": acc.num_processes,
                                               "peak_memory_mb": peak_memory_mb(acc.device)})
    acc.wait_for_everyone()
    return [student_dir(out, k) for k in cfg.student_steps]
