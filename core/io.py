"""Atomic, pickle-free checkpoint I/O: safetensors for tensors, JSON for everything else."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n")


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors.save_file through a temporary name and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(tensors, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(folder: str | Path):
    """Yield a temporary sibling folder; on success it replaces `folder` in one rename."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        yield tmp
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from None


def refuse_pickle(folder: str | Path, what: str) -> None:
    """Raise if `folder` only holds pickle-format weights: we never unpickle."""
    folder = Path(folder)
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled and not any(p.suffix == ".safetensors" for p in folder.iterdir()):
        raise InputError(
            f"{folder} holds {what} weights only in pickle format ({', '.join(pickled)}); "
            "this toolkit never unpickles files. Convert them once with "
            "`safetensors.torch.save_file(torch.load(path, weights_only=True), 'model.safetensors')` "
            "from a source you trust."
        )


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    return load_file(str(path))


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file; a line that does not parse (a torn last line from a kill mid-write) is
    dropped, so a killed run always resumes."""
    path, out = Path(path), []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def append_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append records to a JSON-lines file, first cutting a torn last line (a kill mid-write) so that the new
    records never fuse with it."""
    path = Path(path)
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = path.read_bytes()
                f.seek(0)
                f.truncate(data.rfind(b"\n") + 1)
    with path.open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of tensors' dtypes, shapes and bytes: which examples a record was made on."""
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def module_digest(module) -> str | None:
    """sha256 of a model's structure (its repr, which names every layer and a purifier's t_star / steps / mode),
    every submodule's `config()` where it has one, the plain attributes of a submodule that neither a config nor
    an `extra_repr` describes (a user's `Noise(sigma)` is told apart by its sigma), and every weight and buffer:
    which model a record was made with. None for no model."""
    import hashlib

    if module is None:
        return None
    h = hashlib.sha256(repr(module).encode())
    for name, m in module.named_modules():
        if callable(getattr(m, "config", None)) and not isinstance(getattr(m, "config"), dict):
            with contextlib.suppress(Exception):
                cfg = {k: v for k, v in m.config().items() if k != "seed"}
                h.update(f"{name}:{json.dumps(cfg, sort_keys=True, default=str)}".encode())
    for name, m in _undescribed(module):
        plain, _ = _attributes(m)
        if plain:
            h.update(f"{name}:attributes:{json.dumps(plain, sort_keys=True)}".encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor_digest(t).encode())
    return h.hexdigest()


def undigested(module) -> list[str]:
    """The attributes `module_digest` cannot read ("submodule.name"): objects without a repr of their own, on
    submodules that neither a config nor an `extra_repr` describes. Two models that differ only there have one
    digest, so records made with such a model must not be reused."""
    if module is None:
        return []
    return [f"{name}.{k}" if name else k for name, m in _undescribed(module) for k in _attributes(m)[1]]


def _undescribed(module):
    """(name, submodule) for every submodule with an empty `extra_repr` and no config, its own (a `config()`, a
    diffusers model's config dict, a classifier's config dataclass) or an enclosing module's."""
    covered = []
    for name, m in module.named_modules():
        if any(c == "" or name == c or name.startswith(c + ".") for c in covered):
            continue
        if getattr(m, "config", None) is not None:
            covered.append(name)
        elif not m.extra_repr():
            yield name, m


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _plain(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_plain(u) for u in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(u) for k, u in v.items())
    return isinstance(v, _PLAIN)


def _attributes(m) -> tuple[dict, list[str]]:
    """A module's own public attributes, as ({name: plain value or its digest}, [names of the others]). An object
    whose only description is its address (a lambda, a partial, a container of plain objects) is among the others."""
    import numpy as np

    plain, other = {}, []
    for k, v in vars(m).items():
        if k.startswith("_") or k in ("training", "seed") or _randomness(v):
            continue  # randomness is reseeded per record, never a setting
        if _plain(v):
            plain[k] = json.loads(json.dumps(v, default=str))
        elif isinstance(v, torch.Tensor) or isinstance(v, np.ndarray) and v.dtype.kind in "biuf":
            plain[k] = tensor_digest(torch.as_tensor(v))
        elif callable(v) and "<" not in getattr(v, "__qualname__", "<"):
            plain[k] = f"{getattr(v, '__module__', '')}.{v.__qualname__}"  # a named function or class
        elif type(v).__repr__ is not object.__repr__ and " at 0x" not in repr(v):
            plain[k] = repr(v)
        else:
            other.append(k)
    return plain, other


def _randomness(v) -> bool:
    """A generator, or a container holding only generators (a purifier's per-device generators)."""
    items = list(v.values()) if isinstance(v, dict) else list(v) if isinstance(v, (list, tuple)) else [v]
    return isinstance(v, torch.Generator) or bool(items) and all(isinstance(u, torch.Generator) for u in items)


def fingerprint(folder: str | Path) -> str:
    """sha256 over a folder's weights and metadata (names and bytes): which model a later stage was built from."""
    import hashlib

    folder, h = Path(folder), hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".json")):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()
