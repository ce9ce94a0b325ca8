"""Classifiers on [0, 1] inputs: DD-literature ConvNet (instance / batch norm), ResNet-18, WideResNet-28-10."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

ARCHS = ("convnet", "convnet-bn", "resnet18", "resnet18-imagenet", "wrn-28-10")


@dataclass
class ClassifierConfig:
    """Everything needed to rebuild a classifier; stored as `config.json` beside its weights."""

    arch: str = "convnet-bn"
    in_channels: int = 1
    num_classes: int = 10
    image_size: int = 16
    mean: list[float] = field(default_factory=lambda: [0.5])
    std: list[float] = field(default_factory=lambda: [0.5])
    width: int = 128  # ConvNet channels (WideResNet depth and widen come from the arch name)
    depth: int = 3  # ConvNet blocks


class Normalized(nn.Module):
    """(x - mean) / std in front of a network, so that the classifier takes [0, 1] pixels."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 (torch.from_numpy), float16 or bfloat16 pixels are computed in the network's own dtype
        return self.net((x.to(self.mean.dtype) - self.mean) / self.std)


class ConvNet(nn.Module):
    """ConvNet of the dataset-distillation literature: depth x [conv3x3, norm, ReLU, avgpool2], linear."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 128,
                 depth: int = 3, norm: str = "instance"):
        super().__init__()
        layers, c, s = [], in_channels, image_size
        for _ in range(depth):
            layers += [nn.Conv2d(c, width, 3, padding=1),
                       nn.GroupNorm(width, width, affine=True) if norm == "instance" else nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.AvgPool2d(2)]
            c, s = width, s // 2
        if s < 1:
            raise InputError(f"ConvNet depth {depth} is too deep for {image_size}x{image_size} images")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * s * s, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


class _WideBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        y = self.conv2(F.relu(self.bn2(self.conv1(o))))
        return y + (x if self.shortcut is None else self.shortcut(o))


class WideResNet(nn.Module):
    """WideResNet (Zagoruyko & Komodakis, 2016); 28-10 is DiffPure's CIFAR-10 classifier."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 28, widen: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise InputError(f"WideResNet depth must be 6n+4, got {depth}")
        n, w = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        blocks = []
        for i, stride in enumerate((1, 2, 2)):
            blocks += [_WideBlock(w[i] if j == 0 else w[i + 1], w[i + 1], stride if j == 0 else 1) for j in range(n)]
        self.blocks = nn.Sequential(*blocks)
        self.bn, self.fc = nn.BatchNorm2d(w[3]), nn.Linear(w[3], num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.blocks(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def resnet18(in_channels: int, num_classes: int, cifar_stem: bool) -> nn.Module:
    """torchvision ResNet-18; the CIFAR stem swaps the 7x7/2 conv + max-pool for one 3x3/1 conv."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=num_classes)
    if cifar_stem:
        net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return net


def build_classifier(cfg: ClassifierConfig) -> Normalized:
    """The network named by `cfg.arch`, wrapped to normalise [0, 1] inputs itself."""
    if len(cfg.mean) != cfg.in_channels or len(cfg.std) != cfg.in_channels:
        raise InputError(f"mean/std need {cfg.in_channels} values each, got {cfg.mean} / {cfg.std}")
    if cfg.arch in ("convnet", "convnet-bn"):
        net = ConvNet(cfg.in_channels, cfg.num_classes, cfg.image_size, cfg.width, cfg.depth,
                      norm="batch" if cfg.arch == "convnet-bn" else "instance")
    elif cfg.arch in ("resnet18", "resnet18-imagenet"):
        net = resnet18(cfg.in_channels, cfg.num_classes, cifar_stem=cfg.arch == "resnet18")
    elif cfg.arch.startswith("wrn-"):
        depth, widen = (int(v) for v in cfg.arch[4:].split("-"))
        net = WideResNet(cfg.in_channels, cfg.num_classes, depth, widen)
    else:
        raise InputError(f"unknown classifier arch {cfg.arch!r}; known: {', '.join(ARCHS)}")
    return Normalized(net, cfg.mean, cfg.std)


def classifier_config_for(info, arch: str = "convnet-bn", **kw) -> ClassifierConfig:
    """A ClassifierConfig matching a core.datasets.DatasetInfo."""
    return ClassifierConfig(arch=arch, in_channels=info.channels, num_classes=info.num_classes,
                            image_size=info.image_size, mean=list(info.mean), std=list(info.std), **kw)
