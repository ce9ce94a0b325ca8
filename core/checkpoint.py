"""Classifier folders: `config.json` (a ClassifierConfig) + `model.safetensors`, written atomically."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch.nn as nn

from .config import ConfigError, from_dict
from .errors import InputError
from .io import atomic_dir, atomic_save_tensors, atomic_write_json, load_tensors, read_json, refuse_pickle
from .models import ClassifierConfig, build_classifier
from .zoo import is_named, load_named

WEIGHTS = "model.safetensors"


def save_classifier(model: nn.Module, folder: str | Path, cfg: ClassifierConfig, meta: dict | None = None) -> Path:
    """Write a classifier folder in one atomic rename; `meta` (accuracy, provenance) goes to meta.json."""
    model = getattr(model, "module", model)
    with atomic_dir(folder) as tmp:
        atomic_write_json(tmp / "config.json", {"kind": "classifier", **dataclasses.asdict(cfg)})
        atomic_save_tensors(model.state_dict(), tmp / WEIGHTS)
        if meta:
            atomic_write_json(tmp / "meta.json", meta)
    return Path(folder)


def classifier_meta(folder: str | Path) -> dict:
    """What `save_classifier` recorded beside the weights (test accuracy, provenance), or {} if nothing."""
    path = Path(folder) / "meta.json"
    return read_json(path) if path.is_file() else {}


def load_classifier(folder: str | Path, device="cpu") -> nn.Module:
    """Rebuild a classifier written by `save_classifier`, in eval mode; or one by name from a library
    (`torchvision:resnet18`, `timm:NAME`, `robustbench:cifar10/Linf/Standard`: see core/zoo.py)."""
    if is_named(folder):
        return load_named(folder, device)
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"classifier folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        refuse_pickle(folder, "classifier")
        raise FileNotFoundError(f"{folder} is not a classifier folder: config.json is missing")
    raw = read_json(folder / "config.json")
    if raw.pop("kind", None) != "classifier":
        raise InputError(f"{folder}/config.json does not describe a classifier (no \"kind\": \"classifier\")")
    try:
        cfg = from_dict(ClassifierConfig, raw)
    except ConfigError as e:
        raise InputError(f"{folder}/config.json: {e}") from None
    if not (folder / WEIGHTS).is_file():
        refuse_pickle(folder, "classifier")
        raise FileNotFoundError(f"{folder} has no {WEIGHTS}")
    model = build_classifier(cfg)
    try:
        model.load_state_dict(load_tensors(folder / WEIGHTS))
    except RuntimeError as e:
        raise InputError(f"{folder}/{WEIGHTS} does not fit its config.json ({cfg.arch}): {e}") from None
    model.config = cfg
    return model.to(device).eval()
