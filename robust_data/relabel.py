"""SRe2L's relabel stage, FKD style (Shen & Xing, ECCV 2022): for every epoch, one random-resized crop (+ flip)
per distilled image, stored as parameters, and the squeezed model's logits on it, stored in fp16."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from core.checkpoint import load_classifier
from core.errors import InputError
from core.io import atomic_save_tensors, atomic_write_json, load_tensors
from core.runs import open_shared_folder, same_config_or_fail
from core.seeding import step_seed

from .distilled import load_distilled
from .recover import random_resized_crop_params


@dataclass
class RelabelConfig:
    distilled: str = ""  # the recover stage's distilled folder
    classifier: str = ""  # the squeezed classifier whose logits become the soft labels
    epochs: int = 300  # crop sets stored (the train stage cycles through them)
    min_crop: float = 0.08
    flip: bool = True
    batch_size: int = 256
    seed: int = 42  # FKD's seed


def crop_params(n: int, size: tuple[int, int], epoch: int, seed: int, min_crop: float, flip: bool) -> torch.Tensor:
    """[n, 5] float32: (top / H, left / W, height / H, width / W, flip) for each image of one epoch."""
    g = torch.Generator().manual_seed(step_seed(seed, epoch))
    h, w = size
    rows = []
    for _ in range(n):
        top, left, ch, cw = random_resized_crop_params(size, (min_crop, 1.0), g)
        f = float(flip and torch.rand(1, generator=g).item() < 0.5)
        rows.append([top / h, left / w, ch / h, cw / w, f])
    return torch.tensor(rows, dtype=torch.float32)


def apply_crops(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Crop each image by its stored parameters and resize it back to full size (bilinear), mirrored where
    marked: one batched affine resampling (affine_grid + grid_sample) for the whole batch."""
    top, left, ch, cw, flip = params.to(images.device, images.dtype).unbind(1)
    theta = torch.zeros(len(images), 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = cw * (1 - 2 * (flip > 0.5).to(images.dtype))
    theta[:, 0, 2] = 2 * left + cw - 1
    theta[:, 1, 1] = ch
    theta[:, 1, 2] = 2 * top + ch - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


@torch.no_grad()
def soft_labels(teacher, images: torch.Tensor, params: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The teacher's logits on the stored crops, in fp16."""
    return torch.cat([teacher(apply_crops(images[i:i + batch_size], params[i:i + batch_size])).half()
                      for i in range(0, len(images), batch_size)])


def relabel(cfg: RelabelConfig, out: str | Path) -> Path:
    """Write OUT/soft_labels.safetensors: crops [epochs, N, 5] float32 and logits [epochs, N, C] float16.
    Epochs shard across accelerate processes; finished epochs (OUT/epochs) are kept across reruns."""
    if cfg.epochs < 1:
        raise InputError(f"epochs must be positive, got {cfg.epochs}")
    if not cfg.distilled or not cfg.classifier:
        raise InputError("relabel needs distilled (the recover stage's folder) and classifier (the squeezed one)")
    images, labels, meta = load_distilled(cfg.distilled)
    same_config_or_fail(out, cfg)
    teacher = load_classifier(cfg.classifier)
    acc, out = open_shared_folder(out, cfg, "epochs")
    teacher, images = teacher.to(acc.device).eval(), images.to(acc.device)
    mine = range(acc.process_index, cfg.epochs, acc.num_processes)
    for e in tqdm(mine, desc="relabel", disable=not acc.is_main_process):
        f = out / "epochs" / f"e{e:05d}.safetensors"
        if f.is_file():
            continue
        params = crop_params(len(images), tuple(images.shape[-2:]), e, cfg.seed, cfg.min_crop, cfg.flip)
        logits = soft_labels(teacher, images, params.to(acc.device), cfg.batch_size)
        atomic_save_tensors({"crops": params, "logits": logits.cpu().contiguous()}, f)
    acc.wait_for_everyone()
    path = out / "soft_labels.safetensors"
    if acc.is_main_process:
        parts = [load_tensors(out / "epochs" / f"e{e:05d}.safetensors") for e in range(cfg.epochs)]
        atomic_save_tensors({"crops": torch.stack([p["crops"] for p in parts]),
                             "logits": torch.stack([p["logits"] for p in parts])}, path)
        atomic_write_json(out / "soft_labels.json", {"epochs": cfg.epochs, "images": len(labels),
                                                     "classifier": cfg.classifier, "distilled": cfg.distilled,
                                                     "seed": cfg.seed, "min_crop": cfg.min_crop, "flip": cfg.flip,
                                                     "teacher_agreement": _agreement(parts, labels)})
    acc.wait_for_everyone()
    return path


def _agreement(parts, labels) -> float:
    """How often the teacher's top class on a crop is the image's class (a sanity number for the report)."""
    top = torch.stack([p["logits"].float().argmax(1) for p in parts])
    return (top == labels[None]).float().mean().item()
