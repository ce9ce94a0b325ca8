"""Run folders: the Accelerator, resolved config, log.jsonl, pickle-free resumable train state, and reuse of a
finished stage whose config and inputs are unchanged.

We save our own train state instead of `accelerator.save_state`, whose `load_state` unpickles RNG states and
custom objects; with step-seeded randomness (core.seeding) nothing else needs saving."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .io import atomic_dir, atomic_save_tensors, atomic_write_json, atomic_write_text, load_tensors, read_json, read_jsonl

_STEP_DIR = re.compile(r"^step-(\d+)$")


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
            keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]  # a torn last line is dropped
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))


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


def holds_other_config(folder: str | Path, cfg, rows: str | None = None) -> bool:
    """Whether FOLDER/config.yaml exists and differs from `cfg`. A key added to the config since that file was
    written reads as its default (what the run did before the key existed); a key since removed differs. `rows`
    names a list key whose entries each keep their records under their own settings (reused only when those
    match): adding, removing or reordering its entries is the same run."""
    from .config import ConfigError, load_config, to_dict

    saved = Path(folder) / "config.yaml"
    if not saved.is_file():
        return False
    try:
        old, new = to_dict(load_config(type(cfg), saved)), to_dict(cfg)
    except ConfigError:
        return True
    for d in (old, new) if rows else ():
        d.pop(rows, None)
    return old != new


def same_config_or_fail(folder: str | Path, cfg, rows: str | None = None) -> None:
    """A run folder that already holds another config is never continued with this one (`rows`: as above)."""
    if holds_other_config(folder, cfg, rows):
        keep = f" other than its {rows}" if rows else ""
        raise FileExistsError(f"{folder} holds a run with another config{keep}; pass another --out "
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


def same_or_fail(path: str | Path, record: dict, what: str, write: bool = True) -> bool:
    """Reuse only what was made the same way: True when `path` already holds `record` (reuse the folder),
    False when it holds nothing yet (the record is written, when `write`); a different record is refused with
    the keys that changed. Every cache of the toolkit (stage inputs, harness records, latency, a pretrained
    teacher) goes through here."""
    path = Path(path)
    if path.is_file():
        old = read_json(path)
        if old == record:
            return True
        changed = sorted(k for k in {**old, **record} if old.get(k) != record.get(k))
        raise FileExistsError(f"{path.parent} holds {what} made with another {', '.join(changed)}; delete "
                              f"{path.parent} to rebuild it, or choose another folder (--out)")
    if write:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
    return False


def same_inputs_or_fail(folder: str | Path, inputs: dict) -> None:
    """A stage folder built from other upstream models (`inputs`: name -> folder) is never reused or continued;
    the first call records their fingerprints in FOLDER/inputs.json."""
    from .io import fingerprint

    if inputs:
        same_or_fail(Path(folder) / "inputs.json", {name: fingerprint(path) for name, path in inputs.items()},
                     "a stage")


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


def open_run(cfg, out: str | Path, resume: bool) -> Run:
    """For a `core.training.LoopConfig`: check the run folder before any work, then make the Accelerator, load the training split,
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
    from accelerate.state import AcceleratorState

    made = AcceleratorState._shared_state.get("_mixed_precision")
    if made is not None and made != mixed_precision:
        # accelerate keeps one state per process and refuses another precision; a process that runs several
        # stages (the quickstart: an fp32 classifier, then bf16 students) needs each stage's own. The process
        # group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum, cpu=_multi_cpu())


def process_state():
    """accelerate's PartialState (which process am I, barriers) set up like make_accelerator: the first one made
    fixes the distributed setup for the whole process, so never call PartialState() bare."""
    from accelerate import PartialState

    return PartialState(cpu=_multi_cpu())
