"""Purifier folders: save, and `load_purifier` from a saved folder, a bare diffusers UNet, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

from core.io import atomic_dir, atomic_write_json, read_json, refuse_pickle

from .purifier import FORMAT_VERSION, DiffPure
from .students import ConsistencyStudent, ProgressiveStudent

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
OVERRIDABLE = ("t_star", "steps", "mode", "seed")
KINDS: dict = {}  # purifier.json "kind" -> loader(folder, meta, overrides) -> Purifier


def register_purifier(kind: str, loader) -> None:
    """Make `load_purifier` open folders whose purifier.json says `kind`, with `loader`."""
    KINDS[kind] = loader


def save_purifier_folder(purifier, folder: str | Path) -> Path:
    with atomic_dir(folder) as tmp:
        purifier.unet.save_pretrained(tmp, safe_serialization=True)
        atomic_write_json(tmp / "scheduler_config.json", {"_class_name": "DDPMScheduler", **purifier.schedule.config})
        atomic_write_json(tmp / "purifier.json", purifier.config())
    return Path(folder)


def _load_unet(folder: Path):
    from diffusers import UNet2DModel

    cfg = read_json(folder / "config.json")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ValueError(f"{folder}/config.json describes a {cfg['_class_name']}, not a diffusers UNet2DModel")
    if not (folder / UNET_WEIGHTS).is_file():
        refuse_pickle(folder, "UNet")
        raise FileNotFoundError(f"{folder} has a UNet config.json but no {UNET_WEIGHTS}")
    try:
        return UNet2DModel.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"could not load the UNet in {folder}: {e}") from None


def _check_overrides(overrides: dict) -> None:
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"unknown purifier override(s) {', '.join(unknown)}; valid: {', '.join(OVERRIDABLE)}")


def _from_hub(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # noqa: BLE001 -- any failure here means "not reachable"
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}); on a machine with a network run "
            f"`huggingface-cli download {repo_id} --local-dir DIR` and pass DIR instead") from None


def load_purifier(source: str | Path, device="cpu", **overrides):
    """Open a purifier: a folder written by `.save`, a diffusers UNet folder with its scheduler, or a hub id.

    For a bare UNet (a DiffPure teacher built on the spot) `t_star`, `steps`, `mode` and `seed`
    may be given; for a saved purifier they override what purifier.json says.
    """
    _check_overrides(overrides)
    folder = Path(source)
    if not folder.exists():
        looks_like_hub_id = isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/", "~"))
        if not looks_like_hub_id:
            raise FileNotFoundError(f"purifier folder {folder} does not exist")
        folder = _from_hub(source)
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file; load_purifier wants a purifier folder")

    if (folder / "purifier.json").is_file():
        meta = read_json(folder / "purifier.json")
        kind = meta.get("kind")
        if kind not in KINDS:
            raise ValueError(f"{folder}/purifier.json has unknown kind {kind!r}; known kinds: {', '.join(KINDS)}"
                             " (written by a newer toolkit?)")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{folder} was written by a newer toolkit (format {meta['format_version']})")
        return KINDS[kind](folder, meta, overrides).to(device)

    if (folder / "config.json").is_file() or (folder / "unet" / "config.json").is_file():
        unet_dir = folder if (folder / "config.json").is_file() else folder / "unet"
        sched = next((p for p in (unet_dir / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
                      if p.is_file()), None)
        if sched is None:
            raise FileNotFoundError(f"{unet_dir} holds a UNet but no scheduler_config.json beside it: a DiffPure "
                                    "teacher needs the noise schedule its UNet was trained with")
        unet = _load_unet(unet_dir)
        source_info = {"unet": str(source)}
        return DiffPure(unet, read_json(sched), source=source_info, **overrides).to(device)

    raise ValueError(f"{folder} is not a purifier folder (no purifier.json) nor a diffusers UNet folder "
                     f"(no config.json); found: {', '.join(sorted(p.name for p in folder.iterdir())[:8]) or 'nothing'}")


def load_unet_and_schedule(folder: Path) -> tuple:
    """The diffusers UNet and scheduler config stored in a purifier folder."""
    try:
        sched = json.loads((folder / "scheduler_config.json").read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} lacks scheduler_config.json") from None
    return _load_unet(folder), sched


def _family_loader(cls):
    """Loader for DiffPure and its students: purifier.json gives the constructor's arguments."""

    def load(folder: Path, meta: dict, overrides: dict):
        keys = dict(t_star=meta["t_star"], steps=meta["steps"], mode=meta["mode"], seed=meta.get("seed", 0),
                    prediction_type=meta.get("parameterization"), clip_x0=meta.get("clip_x0", False),
                    source=meta.get("source"))
        if "consistency" in meta:
            keys["consistency"] = meta["consistency"]
        keys.update(overrides)
        unet, sched = load_unet_and_schedule(folder)
        return cls(unet, sched, **keys)

    return load


for _cls in (DiffPure, ProgressiveStudent, ConsistencyStudent):
    register_purifier(_cls.kind, _family_loader(_cls))
