"""The training loop every distill command shares, under accelerate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from core.training import save_train_state, step_batches, step_generator


@dataclass
class AdversarialConfig:
    """Beyond the papers: distil on adversarial inputs crafted by PGD against a classifier."""

    classifier: str | None = None  # classifier folder; None turns the option off
    eps: float = 0.1
    steps: int = 10
    fraction: float = 0.5  # share of each batch replaced by adversarial examples
    target: str = "teacher"  # "teacher": the teacher's purification of that input; "clean": the clean image


@dataclass
class StudentConfig:
    """What both student-distillation methods share."""

    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    t_star: float | None = None  # default: the teacher's
    batch_size: int = 64
    lr: float = 0.0002
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    mixed_precision: str = "no"
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 25
    num_workers: int = 0
    seed: int = 0
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


def fit(acc, cfg, model, opt, lr_sched, loss_fn, dataset, start: int, end: int, out: Path, log,
        on_step, modules: dict, desc: str, state: dict | None = None) -> dict:
    """Optimizer steps [start, end): step-seeded batches, accumulation, clipping, `on_step(step)` (EMA
    updates), log.jsonl, and train-state checkpoints every `cfg.checkpoint_every` steps and at `end`.

    `loss_fn(model, x, y, g) -> (loss, stats)` gets pixels in [-1, 1] and a generator seeded by
    (seed, micro-step, process); `modules` are the modules a checkpoint saves.
    """
    ga = cfg.grad_accum
    loader = step_batches(dataset, cfg.batch_size, cfg.seed, start * ga, end * ga, acc, cfg.num_workers)
    bar = tqdm(total=end, initial=start, desc=desc, disable=not acc.is_main_process)
    model.train()
    records, t0, seen, step = [], time.perf_counter(), 0, start
    for micro, (x, y) in enumerate(loader, start=start * ga):
        g = step_generator(cfg.seed, micro, acc.process_index, device=acc.device)
        x, y = x.to(acc.device, non_blocking=True) * 2 - 1, y.to(acc.device, non_blocking=True)
        with acc.accumulate(model):
            loss, stats = loss_fn(model, x, y, g)
            acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        records.append(torch.stack([loss.detach().float(), *(v.detach().float() for v in stats.values())]))
        seen += x.shape[0] * acc.num_processes
        if not acc.sync_gradients:
            continue
        lr_sched.step()
        step += 1
        on_step(step)
        bar.update(1)
        if step % cfg.log_every == 0 or step == end:
            means = acc.gather(torch.stack(records).mean(0, keepdim=True)).mean(0).tolist()
            rec = dict(zip(["loss", *stats], means))
            log(step=step, **rec, lr=lr_sched.get_last_lr()[0], images_per_s=seen / (time.perf_counter() - t0))
            bar.set_postfix(loss=f"{rec['loss']:.4g}")
            records = []
        if step % cfg.checkpoint_every == 0 or step == end:
            acc.wait_for_everyone()
            if acc.is_main_process:
                save_train_state(out, step, modules, opt, lr_sched, keep=cfg.keep_checkpoints, extra=state)
    bar.close()
    return {"seconds": time.perf_counter() - t0, "images": seen}


def make_optimizer(cfg, params):
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))


def adversarial_batch(x, y, classifier, cfg: AdversarialConfig, g: torch.Generator):
    """Replace the first `fraction` of a [-1, 1] batch by PGD examples against `classifier`; returns (x_in, mask)."""
    import torchattacks

    n = int(round(cfg.fraction * x.shape[0]))
    mask = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    if n == 0:
        return x, mask
    attack = torchattacks.PGD(classifier, eps=cfg.eps, alpha=2.5 * cfg.eps / cfg.steps, steps=cfg.steps)
    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # torchattacks uses the global RNG
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=g, device=g.device)))
        x_adv = attack((x[:n] + 1) / 2, y[:n]) * 2 - 1
    mask[:n] = True
    return torch.cat([x_adv.detach(), x[n:]]), mask
