"""What every training loop shares: step-seeded batches, EMA, pickle-free resumable train state, log.jsonl.

Loops draw all their randomness from generators seeded by (seed, step, rank), never from the
global RNG, so a resumed run needs no RNG state and reaches the same weights as an
uninterrupted one. That is why we save our own train state instead of `accelerator.save_state`,
whose `load_state` unpickles RNG states and custom objects.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Sampler
from tqdm.auto import tqdm

from .io import atomic_dir, atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json

_STEP_DIR = re.compile(r"^step-(\d+)$")


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


def step_seed(seed: int, step: int, rank: int = 0, stream: int = 0) -> int:
    """A 63-bit seed for one (run seed, step, process, stream); distinct inputs give distinct seeds."""
    h = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB + stream * 0x2545F4914F6CDD1D)
    return h % (2**63 - 1)


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank, stream))


class StepBatchSampler(Sampler):
    """Batches for steps [start, total): epoch-wise permutations seeded by (seed, epoch), sharded by rank."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, total: int, rank: int = 0, world: int = 1):
        if n <= 0:
            raise ValueError("cannot draw batches from an empty dataset")
        self.n, self.bs, self.seed, self.start, self.total = n, batch_size, seed, start, total
        self.rank, self.world = rank, world

    def __len__(self):
        return max(0, self.total - self.start)

    def _perm(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=step_generator(self.seed, epoch, stream=1))

    def __iter__(self):
        cache: dict[int, torch.Tensor] = {}
        for step in range(self.start, self.total):
            first = (step * self.world + self.rank) * self.bs
            idx = []
            for pos in range(first, first + self.bs):
                epoch = pos // self.n
                if epoch not in cache:
                    cache.clear() if len(cache) > 2 else None
                    cache[epoch] = self._perm(epoch)
                idx.append(int(cache[epoch][pos % self.n]))
            yield idx


def step_batches(dataset, batch_size: int, seed: int, start: int, total: int, accelerator, num_workers: int = 0):
    """DataLoader over `dataset` yielding this process's batch for each step in [start, total)."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, total,
                               accelerator.process_index, accelerator.num_processes)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=accelerator.device.type == "cuda")


def make_ema(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).requires_grad_(False).eval()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model; buffers (BN statistics) are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().to(e.dtype), 1.0 - decay)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(b)


def checkpoint_dirs(run_dir: str | Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_train_state(run_dir: str | Path, step: int, modules: dict[str, nn.Module], optimizer,
                     lr_scheduler=None, keep: int = 2, extra: dict | None = None) -> Path:
    """Atomically write checkpoints/step-N (safetensors modules, optimizer, state.json); keep the last `keep`."""
    folder = Path(run_dir) / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(folder) as tmp:
        for name, m in modules.items():
            atomic_save_tensors(m.state_dict(), tmp / f"{name}.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        state = {"step": step, **(extra or {})}
        if lr_scheduler is not None:
            state["lr_scheduler"] = {k: v for k, v in lr_scheduler.state_dict().items() if _jsonable(v)}
        atomic_write_json(tmp / "state.json", state)
    for old in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def load_train_state(folder: str | Path, modules: dict[str, nn.Module], optimizer, lr_scheduler=None) -> dict:
    """Restore what `save_train_state` wrote; returns state.json (holding "step")."""
    folder = Path(folder)
    state = read_json(folder / "state.json")
    for name, m in modules.items():
        m.load_state_dict(load_tensors(folder / f"{name}.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    if lr_scheduler is not None and "lr_scheduler" in state:
        lr_scheduler.load_state_dict({**lr_scheduler.state_dict(), **state["lr_scheduler"]})
    return state


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


class JsonlLog:
    """Append-only `log.jsonl` of metric records, written by the main process only."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, **record) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def drop_after(self, step: int) -> None:
        """On resume, forget records logged after the checkpoint we went back to."""
        if self.enabled and self.path.is_file():
            keep = [l for l in self.path.read_text().splitlines() if json.loads(l).get("step", 0) <= step]
            atomic_write_text(self.path, "".join(l + "\n" for l in keep))


def start_run(out: str | Path, resume: bool) -> tuple[Path, Path | None]:
    """Check the run folder before any work: returns (folder, checkpoint to resume from or None)."""
    out = Path(out)
    ckpts = checkpoint_dirs(out)
    if resume:
        return out, (ckpts[-1] if ckpts else None)
    if ckpts:
        raise FileExistsError(f"{out} already holds a run (checkpoints/{ckpts[-1].name}); "
                              "pass --resume to continue it or choose another --out")
    return out, None


def same_config_or_fail(folder: str | Path, cfg) -> None:
    """A run folder that already holds another config is never continued with this one."""
    import yaml

    from .config import to_dict

    saved = Path(folder) / "config.yaml"
    if saved.is_file() and yaml.safe_load(saved.read_text()) != to_dict(cfg):
        raise FileExistsError(f"{folder} holds a run with another config; pass another --out "
                              "(or delete that folder) to start afresh")


def open_shared_folder(out: str | Path, cfg, subdir: str):
    """For stages whose processes each write their own part files: the Accelerator, OUT/subdir made and the
    config written on the main process, then everyone waits."""
    from .config import save_config

    acc = make_accelerator()
    out = Path(out)
    if acc.is_main_process:
        (out / subdir).mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    acc.wait_for_everyone()
    return acc, out


def same_inputs_or_fail(folder: str | Path, inputs: dict) -> None:
    """A stage folder built from other upstream models (`inputs`: name -> folder) is never reused or continued;
    the first call records their fingerprints in FOLDER/inputs.json."""
    from .io import fingerprint

    folder = Path(folder)
    now = {name: fingerprint(path) for name, path in inputs.items()}
    saved = folder / "inputs.json"
    if saved.is_file():
        changed = sorted(k for k, v in read_json(saved).items() if now.get(k, v) != v)
        if changed:
            raise FileExistsError(f"{folder} was built from another {', '.join(changed)} than "
                                  f"{', '.join(str(inputs[k]) for k in changed)} now holds; delete {folder} "
                                  "to rebuild it, or pass another --out")
    elif now:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(saved, now)


def run_stage(folder: str | Path, cfg, train_fn, product: str, done: str = "train.json",
              inputs: dict | None = None) -> Path:
    """Run a pipeline stage into `folder`: reuse it when its config and `inputs` (name -> upstream folder) are
    unchanged and it finished (`done` written), resume it when it has checkpoints, refuse a folder that holds
    another config or was built from other inputs."""
    folder, state = Path(folder), process_state()
    state.wait_for_everyone()  # under accelerate every process decides on the same files, after the last stage
    same_config_or_fail(folder, cfg)
    same_inputs_or_fail(folder, inputs or {})
    if (folder / "config.yaml").is_file() and (folder / product).exists() and (folder / done).is_file():
        print(f"[{folder.name}] unchanged: reusing {folder / product}")
        result = folder / product
    else:
        result = train_fn(cfg, folder, resume=bool(checkpoint_dirs(folder)))
    state.wait_for_everyone()
    return result


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


@dataclass
class Run:
    """An opened run folder: where it is, what to resume from, and what every loop needs."""

    out: Path
    ckpt: Path | None
    acc: object
    dataset: object
    info: object
    log: JsonlLog

    def resume(self, modules: dict[str, nn.Module], optimizer, lr_scheduler) -> int:
        """Load the checkpoint (if resuming) into these objects; returns the step to continue from."""
        if self.ckpt is None:
            return 0
        step = load_train_state(self.ckpt, modules, optimizer, lr_scheduler)["step"]
        self.log.drop_after(step)
        self.acc.print(f"resuming {self.out} from step {step}")
        return step


def open_run(cfg: LoopConfig, out: str | Path, resume: bool) -> Run:
    """Check the run folder before any work, then make the Accelerator, load the training split,
    write the resolved config.yaml and open log.jsonl."""
    from .config import save_config
    from .datasets import load_dataset

    out, ckpt = start_run(out, resume)
    acc = make_accelerator(cfg.mixed_precision, cfg.grad_accum)
    dataset, info = load_dataset(cfg.dataset, "train", root=cfg.data_root, image_size=cfg.image_size)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    return Run(out, ckpt, acc, dataset, info, JsonlLog(out / "log.jsonl", acc.is_main_process))


def _multi_cpu() -> bool:
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def make_accelerator(mixed_precision: str = "no", grad_accum: int = 1):
    """An Accelerator; under `accelerate launch --multi_gpu` on a machine without CUDA it runs DDP on CPUs (gloo)."""
    from accelerate import Accelerator

    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=_multi_cpu())


def process_state():
    """accelerate's PartialState (which process am I, barriers) set up like make_accelerator: the first one made
    fixes the distributed setup for the whole process, so never call PartialState() bare."""
    from accelerate import PartialState

    return PartialState(cpu=_multi_cpu())


def fit(acc, cfg, model, opt, lr_sched, loss_fn, dataset, start: int, end: int, out: Path, log,
        on_step, modules: dict, desc: str, state: dict | None = None) -> dict:
    """The training loop every command shares, under accelerate.

    Runs optimizer steps [start, end): step-seeded batches, gradient accumulation, clipping,
    `on_step(step)` (EMA updates), log.jsonl, and train-state checkpoints every
    `cfg.checkpoint_every` steps and at `end`.

    `loss_fn(model, x, y, g) -> (loss, stats)` gets pixels in [0, 1] and a generator seeded by
    (seed, micro-step, process); `modules` are the modules a checkpoint saves.
    """
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
