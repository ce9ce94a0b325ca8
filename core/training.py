"""The training loop every command shares (`fit`), with its optimizer, schedule and EMA helpers."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .runs import Run, save_train_state
from .seeding import step_batches, step_generator


@dataclass
class LoopConfig:
    """The data and optimisation keys every training command has (`fit` reads them)."""

    dataset: str = "digits"
    data_root: str | None = None
    image_size: int | None = None
    batch_size: int = 64
    lr: float = 0.0002
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    grad_accum: int = 1
    mixed_precision: str = "no"  # or fp16 / bf16 (autocast on GPU)
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 25
    num_workers: int = 0
    seed: int = 0


def make_ema(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model; buffers (BN statistics) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def make_optimizer(cfg: LoopConfig, params):
    """AdamW with a linear warm-up over `cfg.warmup_steps`, then a constant rate."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.warmup_steps)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))


def cosine_schedule(opt, total: int, warmup_steps: int = 0):
    """Linear warm-up over `warmup_steps`, then a cosine decay to zero at step `total`."""
    warm = max(1, warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s, total) / total))))


def fit(run: Run, cfg, model, opt, lr_sched, loss_fn, start: int, end: int, on_step, modules: dict, desc: str,
        state: dict | None = None, dataset=None) -> dict:
    """The training loop every command shares, under the run's accelerator.

    Runs optimizer steps [start, end) on `dataset` (default: the run's training split): step-seeded batches,
    gradient accumulation, clipping, `on_step(step)` (EMA updates), the run's log.jsonl, and train-state
    checkpoints in the run folder every `cfg.checkpoint_every` steps and at `end`.

    `loss_fn(model, x, y, g) -> (loss, stats)` gets pixels in [0, 1] and a generator seeded by
    (seed, micro-step, process); `modules` are the modules a checkpoint saves.
    """
    acc, out, log = run.acc, run.out, run.log
    dataset = run.dataset if dataset is None else dataset
    ga = cfg.grad_accum
    loader = step_batches(dataset, cfg.batch_size, cfg.seed, start * ga, end * ga, acc, cfg.num_workers)
    bar = tqdm(total=end, initial=start, desc=desc, disable=not acc.is_main_process)
    model.train()
    records, t0, seen, step = [], time.perf_counter(), 0, start
    for micro, (x, y) in enumerate(loader, start=start * ga):
        g = step_generator(cfg.seed, micro, acc.process_index, device=acc.device)
        x, y = x.to(acc.device, non_blocking=True), y.to(acc.device, non_blocking=True)
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
