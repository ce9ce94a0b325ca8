"""A distilled dataset on disk: data.safetensors (images in [0, 1], labels) + distilled.json + grid.png."""

from __future__ import annotations

from pathlib import Path

import torch

from core.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json
from core.plots import image_grid


def save_distilled(folder: str | Path, images: torch.Tensor, labels: torch.Tensor, meta: dict) -> Path:
    """Write the images (float32 NCHW in [0, 1]), labels and metadata, and a PNG grid (one row per class)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors({"images": images.float().contiguous(), "labels": labels.long().contiguous()},
                        folder / "data.safetensors")
    atomic_write_json(folder / "distilled.json", {**meta, "images": len(labels), "shape": list(images.shape[1:])})
    classes = sorted(set(labels.tolist()))[:10]
    per = min(10, min(int((labels == c).sum()) for c in classes))
    image_grid({f"class {c}": images[labels == c][:per] for c in classes}, folder / "grid.png")
    return folder


def load_distilled(folder: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(images, labels, metadata) of a folder written by save_distilled."""
    folder = Path(folder)
    if not (folder / "data.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no distilled data (data.safetensors); run "
                                "`python -m robust_data recover` first")
    t = load_tensors(folder / "data.safetensors")
    return t["images"], t["labels"], read_json(folder / "distilled.json")
