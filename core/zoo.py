"""Classifiers by name from the libraries people use: `torchvision:<name>`, `timm:<name>` and
`robustbench:<dataset>/<threat>/<model>`, each loaded by its library's own loader and cache and wrapped to the
toolkit's contract: [0, 1] NCHW pixels in, logits out, eval mode (the normalisation from the model's own data
config). Nothing downloads unless `download=True`; offline, a missing weight file is one sentence naming it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from .errors import InputError
from .models import Normalized

LIBRARIES = ("torchvision", "timm", "robustbench")


def is_named(spec) -> bool:
    """True for 'torchvision:resnet18', 'timm:...', 'robustbench:...' (not a folder path)."""
    return isinstance(spec, str) and spec.split(":", 1)[0] in LIBRARIES and ":" in spec


def load_named(spec: str, device="cpu", download: bool = False) -> nn.Module:
    """The classifier `spec` names, wrapped, in eval mode, its name in `.source`."""
    lib, _, name = spec.partition(":")
    if lib not in LIBRARIES or not name:
        raise InputError(f"a classifier name is LIBRARY:NAME with LIBRARY one of {', '.join(LIBRARIES)}, got {spec!r}")
    model = {"torchvision": _torchvision, "timm": _timm, "robustbench": _robustbench}[lib](name, download)
    model.source = spec
    return model.to(device).eval().requires_grad_(False)


def _torchvision(name: str, download: bool) -> nn.Module:
    """torchvision.models.get_model with its DEFAULT weights (or NAME@WEIGHTS), from the torch hub cache."""
    import torchvision
    from torchvision.models import get_model, get_model_weights

    arch, _, tag = name.partition("@")
    if arch not in torchvision.models.list_models():
        raise InputError(f"torchvision has no model {arch!r} (torchvision.models.list_models() lists them)")
    enum = get_model_weights(arch)
    try:
        weights = enum[tag] if tag else enum.DEFAULT
    except KeyError:
        raise InputError(f"torchvision {arch} has no weights {tag!r}; it has {', '.join(w.name for w in enum)}") from None
    file = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not file.is_file() and not download:
        raise FileNotFoundError(f"torchvision:{name} needs its weights {file.name}: put the file at {file} (the torch "
                                "hub cache; TORCH_HOME moves it), or load it with download=True on a machine with a network")
    t = weights.transforms()
    if not hasattr(t, "mean"):
        raise InputError(f"torchvision:{arch} is not an image classifier (its weights carry no normalisation)")
    return Normalized(get_model(arch, weights=weights), t.mean, t.std)


def _hf_cache() -> str:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE


def _timm(name: str, download: bool) -> nn.Module:
    """timm.create_model(name, pretrained=True), its weights from the Hugging Face cache (`hf_hub_id`)."""
    import timm

    if not timm.is_model(name):
        raise InputError(f"timm has no model {name!r} (timm.list_models() lists them)")
    model = timm.create_model(name, pretrained=False)
    cfg = model.pretrained_cfg
    if download:
        model = timm.create_model(name, pretrained=True)
    else:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.get("hf_hub_id")
        if not repo:
            raise InputError(f"timm:{name} has no Hugging Face weights (hf_hub_id); load it with download=True")
        files = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        found = [p for f in files
                 for p in [try_to_load_from_cache(repo, f, cache_dir=_hf_cache())] if isinstance(p, str)]
        if not found:
            raise FileNotFoundError(f"timm:{name} needs its weights from the Hugging Face repo {repo}: put "
                                    f"model.safetensors in the Hugging Face cache ({_hf_cache()}, e.g. with "
                                    f"`huggingface-cli download {repo}`), or load it with download=True")
        timm.models.load_checkpoint(model, found[0])
    return Normalized(model, cfg["mean"], cfg["std"])


def _robustbench(name: str, download: bool) -> nn.Module:
    """robustbench.utils.load_model from RobustBench's model directory (ROBUSTBENCH_MODELS, default ./models);
    its models take [0, 1] pixels and normalise inside."""
    parts = name.split("/")
    if len(parts) != 3:
        raise InputError(f"a RobustBench classifier is robustbench:DATASET/THREAT/MODEL (e.g. "
                         f"robustbench:cifar10/Linf/Standard), got robustbench:{name}")
    dataset, threat, model_name = parts
    _import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    from robustbench.utils import load_model

    try:
        entry = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat)][model_name]
    except (KeyError, ValueError):
        raise InputError(f"RobustBench has no model {model_name!r} for {dataset} / {threat}") from None
    root = os.environ.get("ROBUSTBENCH_MODELS", "models")
    file = Path(root) / dataset / threat / f"{model_name}.pt"
    if not download and not file.is_file():
        where = ("" if isinstance(entry.get("gdrive_id"), str) else
                 " (this entry loads through timm or torchvision, which need a network the first time)")
        raise FileNotFoundError(f"robustbench:{name} needs {file.name}: put the file at {file} (RobustBench's model "
                                f"directory; ROBUSTBENCH_MODELS moves it), or load it with download=True{where}")
    return load_model(model_name=model_name, model_dir=root, dataset=dataset, threat_model=threat)


def _import_robustbench() -> None:
    """Import robustbench; its PyPI release (1.1.1) imports `autoattack`, which PyPI ships as `pyautoattack`."""
    try:
        import autoattack  # noqa: F401
    except ImportError:
        try:
            import importlib

            import pyautoattack
        except ImportError:
            raise InputError("robustbench classifiers need the robustbench package: pip install "
                             "'distilled-diffpure[zoo]'") from None
        sys.modules["autoattack"] = pyautoattack
        sys.modules["autoattack.state"] = importlib.import_module("pyautoattack.state")
    try:
        import robustbench  # noqa: F401
    except ImportError as e:
        raise InputError(f"robustbench classifiers need the robustbench package ({e}): pip install "
                         "'distilled-diffpure[zoo]'") from None
