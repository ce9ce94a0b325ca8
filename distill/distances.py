"""Per-example distances for consistency distillation: pseudo-Huber (default), L2, LPIPS."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from core.errors import InputError

DISTANCES = ("pseudo-huber", "l2", "lpips")
LPIPS_BACKBONES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float | None = None) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per example; c = 0.00054 sqrt(d) as in improved CT (Song & Dhariwal, 2023)."""
    d = a[0].numel()
    c = 0.00054 * math.sqrt(d) if c is None else c
    return ((a - b).float().flatten(1).square().sum(1) + c * c).sqrt() - c


def l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error per example."""
    return (a - b).float().flatten(1).square().mean(1)


class LPIPSDistance(torch.nn.Module):
    """LPIPS (Zhang et al., 2018) on images upsampled to 224 as in consistency models; needs cached backbone weights."""

    def __init__(self, net: str = "vgg"):
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise InputError(f"LPIPS backbone must be one of {', '.join(LPIPS_BACKBONES)}, got {net!r}")
        cached = Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONES[net]
        if not cached.is_file():
            raise FileNotFoundError(
                f"LPIPS needs the ImageNet {net} weights at {cached}, which are not there and cannot be "
                "downloaded here: copy that file from a machine with a network (torchvision puts it there), "
                "or use distance=pseudo-huber")
        self.lpips = _lpips_without_pickle(net, cached).eval().requires_grad_(False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        def prep(x):
            x = x.repeat(1, 3 // x.shape[1], 1, 1) if x.shape[1] == 1 else x
            return F.interpolate(x.float(), size=224, mode="bilinear", align_corners=False) if x.shape[-1] < 224 else x

        return self.lpips(prep(a), prep(b)).flatten()  # inputs already in [-1, 1]


def _lpips_without_pickle(net: str, backbone_file: Path):
    """LPIPS with its layers built empty and every weight file read with `weights_only=True`.

    `lpips.LPIPS(net=...)` would fetch the backbone through torchvision and read its own linear layers with a
    plain `torch.load`; here the same two files are read as tensors only (no arbitrary unpickling)."""
    import lpips

    model = lpips.LPIPS(pretrained=False, net=net, pnet_rand=True, verbose=False)  # reads no file
    sd = torch.load(backbone_file, map_location="cpu", weights_only=True)
    features = {k.split(".", 1)[1]: v for k, v in sd.items() if k.startswith("features.")}
    try:
        model.net.load_state_dict({f"{name}.{key}": features[key] for name, part in model.net.named_children()
                                   for key in part.state_dict()})
    except KeyError as e:
        raise InputError(f"{backbone_file} is not torchvision's {net} checkpoint (no features.{e.args[0]})") from None
    lin = Path(lpips.__file__).parent / "weights" / "v0.1" / f"{net}.pth"  # shipped inside the lpips package
    model.load_state_dict(torch.load(lin, map_location="cpu", weights_only=True), strict=False)
    return model


def get_distance(name: str, huber_c: float | None = None):
    if name == "pseudo-huber":
        return lambda a, b: pseudo_huber(a, b, huber_c)
    if name == "l2":
        return l2
    if name == "lpips":
        return LPIPSDistance()
    raise InputError(f"unknown distance {name!r}; known: {', '.join(DISTANCES)}")
