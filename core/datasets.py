"""Datasets as [0, 1] float NCHW images with integer labels: embedded digits, CIFAR-10, image folders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset

from .errors import InputError

DIGITS_FILE = Path(__file__).parent / "data" / "digits.npz"
CACHE = Path(os.environ.get("DDP_DATA", Path.home() / ".cache" / "datasets"))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: shape, classes and normalisation."""

    name: str
    channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

# Image-folder presets: root under the cache, split folder names, resize then centre-crop size.
FOLDER_PRESETS = {
    "cifar10-jpeg": dict(root="cifar10", train="train", test="test", resize=32, size=32, classes=10,
                         mean=CIFAR_MEAN, std=CIFAR_STD,
                         hint="unzip ../shared/data/cifar10-test-jpeg.zip (and -train-) -d ~/.cache/datasets"),
    "imagenette": dict(root="imagenette2", train="train", test="val", resize=256, size=224, classes=10,
                       mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       hint="download imagenette2.tgz from fast.ai and extract it into ~/.cache/datasets"),
    "tiny-imagenet": dict(root="tiny-imagenet-200", train="train", test="val", resize=64, size=64, classes=200,
                          mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          hint="extract tiny-imagenet-200 into ~/.cache/datasets and sort val/ into class folders"),
    "imagenet": dict(root="imagenet", train="train", test="val", resize=256, size=224, classes=1000,
                     mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     hint="put ILSVRC-2012 train/ and val/ as class folders under ~/.cache/datasets/imagenet"),
}

DATASETS = ("digits", "cifar10", *FOLDER_PRESETS)


def dataset_info(name: str, image_size: int | None = None) -> DatasetInfo:
    if name == "digits":
        return DatasetInfo("digits", 1, image_size or 16, 10, (0.5,), (0.5,))
    if name == "cifar10":
        return DatasetInfo("cifar10", 3, image_size or 32, 10, CIFAR_MEAN, CIFAR_STD)
    if name in FOLDER_PRESETS:
        p = FOLDER_PRESETS[name]
        return DatasetInfo(name, 3, image_size or p["size"], p["classes"], p["mean"], p["std"])
    raise InputError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")


def load_digits(split: str = "train", image_size: int = 16) -> TensorDataset:
    """scikit-learn's 8x8 handwritten digits, upsampled (bilinear) to `image_size`, fixed 80/20 split."""
    d = np.load(DIGITS_FILE)
    keep = d["test_mask"] if split == "test" else ~d["test_mask"]
    x = torch.from_numpy(d["images"][keep]).float().div(16.0).unsqueeze(1)
    if image_size != 8:
        x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False, antialias=True)
    return TensorDataset(x.clamp(0, 1).contiguous(), torch.from_numpy(d["labels"][keep]).long())


def _check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 download: bool = False, image_size: int | None = None) -> tuple[Dataset, DatasetInfo]:
    """Return (dataset of (image in [0,1] CHW float, label), info). Downloads only if `download`."""
    _check_split(split)
    info = dataset_info(name, image_size)
    if name == "digits":
        return load_digits(split, info.image_size), info
    import torchvision
    from torchvision import transforms as T

    if name == "cifar10":
        root = Path(root or CACHE / "cifar10-torchvision")
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=split == "train", download=download,
                                              transform=T.ToTensor())
        except RuntimeError:
            raise FileNotFoundError(
                f"CIFAR-10 is not at {root}: pass download=True (needs a network) or root= a folder "
                "holding cifar-10-batches-py; offline, use the 'cifar10-jpeg' copy instead") from None
        return ds, info
    p = FOLDER_PRESETS[name]
    folder = Path(root or CACHE / p["root"]) / p[split]
    if not folder.is_dir():
        raise FileNotFoundError(f"{name} {split} images are not at {folder}: {p['hint']} (or pass root=)")
    size = info.image_size
    resize = size if size != p["size"] else p["resize"]
    tf = T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor()])
    return torchvision.datasets.ImageFolder(str(folder), transform=tf), info


def sample_indices(total: int, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """The sorted indices `to_tensors` draws: all of them, or the first n of a seeded permutation (so a smaller
    draw with the same seed is a subset of a larger one)."""
    if n is None or n >= total:
        return torch.arange(total)
    return torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:n].sort().values


def to_tensors(ds: Dataset, n: int | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack `n` examples (all when None; a seeded class-mixed subset otherwise) into (x, y) tensors."""
    if isinstance(ds, TensorDataset) and n is None:
        return ds.tensors[0], ds.tensors[1]
    idx = sample_indices(len(ds), n, seed)
    xs, ys = zip(*(ds[int(i)] for i in idx))
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)
