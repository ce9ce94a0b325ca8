"""`load_purifier`: a saved purifier folder (any registered kind), a bare diffusers UNet folder, or a hub id."""

from __future__ import annotations

from pathlib import Path

from core.errors import InputError
from core.io import read_json, refuse_pickle

from . import students  # noqa: F401 -- registers the student kinds
from .purifier import FORMAT_VERSION, KINDS, UNET_WEIGHTS, DiffPure, register_purifier

OVERRIDABLE = ("t_star", "steps", "mode", "seed")
__all__ = ["load_purifier", "register_purifier"]


def _load_unet(folder: Path):
    from diffusers import UNet2DModel

    cfg = read_json(folder / "config.json")
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise InputError(f"{folder}/config.json describes a {cfg['_class_name']}, not a diffusers UNet2DModel")
    if not (folder / UNET_WEIGHTS).is_file():
        refuse_pickle(folder, "UNet")
        raise FileNotFoundError(f"{folder} has a UNet config.json but no {UNET_WEIGHTS}")
    try:
        return UNet2DModel.from_pretrained(folder, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise InputError(f"could not load the UNet in {folder}: {e}") from None


def _check_overrides(overrides: dict) -> None:
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise InputError(f"unknown purifier override(s) {', '.join(unknown)}; valid: {', '.join(OVERRIDABLE)}")


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
        raise InputError(f"{folder} is a file; load_purifier wants a purifier folder")

    if (folder / "purifier.json").is_file():
        meta = read_json(folder / "purifier.json")
        kind = meta.get("kind")
        if kind not in KINDS:
            raise InputError(f"{folder}/purifier.json has unknown kind {kind!r}; known kinds: {', '.join(KINDS)}"
                             " (written by a newer toolkit?)")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise InputError(f"{folder} was written by a newer toolkit (format {meta['format_version']})")
        if not (folder / "scheduler_config.json").is_file():
            raise FileNotFoundError(f"{folder} lacks scheduler_config.json")
        unet = _load_unet(folder)
        return KINDS[kind].from_config(unet, read_json(folder / "scheduler_config.json"), meta, **overrides).to(device)

    if (folder / "config.json").is_file() or (folder / "unet" / "config.json").is_file():
        unet_dir = folder if (folder / "config.json").is_file() else folder / "unet"
        sched = next((p for p in (unet_dir / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json")
                      if p.is_file()), None)
        if sched is None:
            raise FileNotFoundError(f"{unet_dir} holds a UNet but no scheduler_config.json beside it: a DiffPure "
                                    "teacher needs the noise schedule its UNet was trained with")
        unet = _load_unet(unet_dir)
        return DiffPure(unet, read_json(sched), source={"unet": str(source)}, **overrides).to(device)

    raise InputError(f"{folder} is not a purifier folder (no purifier.json) nor a diffusers UNet folder "
                     f"(no config.json); found: {', '.join(sorted(p.name for p in folder.iterdir())[:8]) or 'nothing'}")
