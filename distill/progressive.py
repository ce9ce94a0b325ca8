"""Progressive distillation (Salimans & Ho, ICLR 2022) of the teacher's DDIM sampler on [0, t_star]."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from core.checkpoint import load_classifier
from core.errors import InputError
from core.io import atomic_write_json, read_json
from core.runs import load_train_state, open_run
from core.training import ema_update, fit, make_ema, make_optimizer
from purify import ProgressiveStudent, UNetDenoiser, load_purifier
from purify.denoisers import channels_last_on_cpu
from purify.samplers import ddim_step, sample_ode

from .loop import StudentBatch, StudentConfig, check_adversarial, k_step_purify, peak_memory_mb, student_dir, student_loss


@dataclass
class ProgressiveConfig(StudentConfig):
    """Rounds halve the steps: start_steps -> start_steps / 2 -> ... -> final_steps."""

    start_steps: int = 64  # the round-1 teacher: DDIM with this many steps on [0, t_star]
    final_steps: int = 1
    # "teacher": the teacher UNet's own prediction type, the only one in which the copied weights start out as
    # the teacher; v_prediction / sample / epsilon re-read them (the round-1 student then starts elsewhere)
    parameterization: str = "teacher"
    steps_per_round: int = 300


def progressive_target(z_t, z_s, ab_t, ab_s):
    """The x that makes one DDIM step t -> s from z_t land exactly on z_s (the teacher's two-step result)."""
    a_t, s_t, a_s, s_s = ab_t.sqrt(), (1 - ab_t).sqrt(), ab_s.sqrt(), (1 - ab_s).sqrt()
    ratio = s_s / s_t
    return (z_s - ratio * z_t) / (a_s - ratio * a_t)


def progressive_loss(student, teacher, batch: StudentBatch, t_star: float, student_steps: int, g):
    """Truncated-SNR weighted MSE between the student's x0 and the closed-form two-teacher-step target.

    The student sees z_t of `batch.x`; the teacher's two steps start from z_t of `batch.x_ref` under the same
    noise (the same point unless adversarial rows take their target from the clean image)."""
    sched, x0 = teacher.schedule, batch.x
    n = x0.shape[0]
    i = torch.randint(1, student_steps + 1, (n,), generator=g, device=g.device).to(x0.device).double()
    t = t_star * i / student_steps
    t_mid, t_next = t - t_star / (2 * student_steps), t - t_star / student_steps
    ab_t, ab_mid, ab_next = (sched.alpha_bar(v).float().view(-1, 1, 1, 1) for v in (t, t_mid, t_next))
    eps = torch.randn(x0.shape, generator=g, device=g.device).to(x0)
    z_t = ab_t.sqrt() * x0 + (1 - ab_t).sqrt() * eps
    z_ref = z_t if batch.x_ref is x0 else ab_t.sqrt() * batch.x_ref + (1 - ab_t).sqrt() * eps
    with torch.no_grad():
        z_mid = ddim_step(z_ref, teacher(z_ref, t.float()), ab_t, ab_mid)
        z_next = ddim_step(z_mid, teacher(z_mid, t_mid.float()), ab_mid, ab_next)
        target = progressive_target(z_ref, z_next, ab_t, ab_next)
        if batch.clean_target:
            target = torch.where(batch.adv.view(-1, 1, 1, 1), batch.clean, target)
    x_hat = student(z_t, t.float())
    weight = (ab_t / (1 - ab_t)).clamp(min=1.0).flatten()  # max(SNR, 1)
    per_example = (x_hat.float() - target.float()).square().flatten(1).mean(1)
    return (weight * per_example).mean(), {"mse_x": per_example.mean().detach()}


def student_parameterization(requested: str, teacher: str) -> str:
    """The students' prediction type: the teacher's for "teacher"; another one is honoured with a warning, since
    the round-1 student (the teacher's weights read another way) then does not start at its teacher."""
    if requested in ("teacher", teacher):
        return teacher
    warnings.warn(f"progressive students predict {requested} from a {teacher}-predicting teacher: the round-1 "
                  "student starts away from its teacher (parameterization=teacher keeps them aligned)", stacklevel=3)
    return requested


def rounds(cfg: ProgressiveConfig) -> list[int]:
    """The student step counts, one per round: [start/2, start/4, ..., final]."""
    r = math.log2(cfg.start_steps / cfg.final_steps) if cfg.final_steps >= 1 else -1
    if cfg.final_steps < 1 or r < 1 or r != int(r):
        raise InputError(f"start_steps ({cfg.start_steps}) must be final_steps ({cfg.final_steps}) times a power of 2")
    return [cfg.start_steps >> k for k in range(1, int(r) + 1)]


def train_progressive(cfg: ProgressiveConfig, teacher_dir: str | Path, out: str | Path, resume: bool = False) -> list[Path]:
    """Distil the teacher round by round; every round's student lands in OUT/students/steps-K."""
    plan = rounds(cfg)
    if cfg.parameterization not in ("teacher", "v_prediction", "sample", "epsilon"):
        raise InputError(f"parameterization must be teacher, v_prediction, sample or epsilon, got "
                         f"{cfg.parameterization!r}")
    check_adversarial(cfg.adversarial)
    teacher_p = load_purifier(teacher_dir)
    param = student_parameterization(cfg.parameterization, teacher_p.x0_net.prediction_type)
    t_star = cfg.t_star or teacher_p.t_star
    run = open_run(cfg, out, resume)
    out, ckpt, acc, log = run.out, run.ckpt, run.acc, run.log
    classifier = load_classifier(cfg.adversarial.classifier, acc.device) if cfg.adversarial.classifier else None
    sched_cfg = teacher_p.schedule.config
    step, spr, stats = (read_json(ckpt / "state.json")["step"] if ckpt else 0), cfg.steps_per_round, []
    if ckpt is not None:
        log.drop_after(step)
    for r, k in enumerate(plan):
        if step >= (r + 1) * spr and (student_dir(out, k) / "purifier.json").is_file():
            continue  # this round finished before the resume
        prev = teacher_p if r == 0 else load_purifier(student_dir(out, plan[r - 1]))
        teacher = prev.x0_net.to(acc.device).eval().requires_grad_(False)
        unet = channels_last_on_cpu(copy.deepcopy(prev.unet), acc.device).requires_grad_(True)  # before DDP
        ema = make_ema(unet)
        opt, lr_sched = make_optimizer(cfg, unet.parameters())
        if ckpt is not None and step > r * spr:
            load_train_state(ckpt, {"student": unet, "ema": ema}, opt, lr_sched)
        model, opt = acc.prepare(unet, opt)
        ema.to(acc.device)
        student = UNetDenoiser(model, teacher.schedule, param)
        # the adaptive attack runs through the unwrapped network (no gradient sync for input gradients)
        attacked = k_step_purify(UNetDenoiser(acc.unwrap_model(model), teacher.schedule, param), sample_ode,
                                 teacher.schedule, t_star, k)
        trained = k_step_purify(student, sample_ode, teacher.schedule, t_star, k)

        def loss_fn(model, x, y, g, k=k, attacked=attacked, trained=trained, student=student, teacher=teacher):
            return student_loss(x, y, g, classifier, cfg.adversarial,
                                lambda b: progressive_loss(student, teacher, b, t_star, k, g), attacked, trained)

        def on_step(s):
            ema_update(ema, acc.unwrap_model(model), min(cfg.ema_decay, (1 + s - r * spr) / (10 + s - r * spr)))

        stats.append(fit(run, cfg, model, opt, lr_sched, loss_fn, step, (r + 1) * spr, on_step,
                         {"student": acc.unwrap_model(model), "ema": ema}, f"progressive {2 * k}->{k}",
                         state={"round": r + 1, "student_steps": k}))
        step = (r + 1) * spr
        acc.wait_for_everyone()
        if acc.is_main_process:
            ProgressiveStudent(copy.deepcopy(ema).cpu(), sched_cfg, t_star, k, prediction_type=param,
                               seed=cfg.seed, source={"trained_by": "distill progressive", "teacher": str(teacher_dir),
                                                      "round": r + 1, "teacher_steps": 2 * k, "run": str(out),
                                                      "adversarial": cfg.adversarial.describe()}
                               ).save(student_dir(out, k))
        acc.wait_for_everyone()
        ckpt = None
    if acc.is_main_process:
        atomic_write_json(out / "train.json", {"seconds": sum(s["seconds"] for s in stats),
                                               "images": sum(s["images"] for s in stats),
                                               "rounds": plan, "processes": acc.num_processes,
                                               "peak_memory_mb": peak_memory_mb(acc.device)})
    return [student_dir(out, k) for k in plan]
