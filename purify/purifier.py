"""Purifiers: [0, 1] NCHW images in, purified images of the same shape out, differentiably."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from core.errors import InputError
from core.io import atomic_dir, atomic_write_json

from .denoisers import UNetDenoiser
from .samplers import SAMPLERS, randn_like
from .schedule import VPSchedule

FORMAT_VERSION = 1
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
KINDS: dict[str, type] = {}  # purifier.json "kind" -> class with from_config(unet, scheduler_config, meta, **overrides)


def register_purifier(cls):
    """Make `load_purifier` rebuild folders whose purifier.json names `cls.kind` with `cls.from_config`."""
    KINDS[cls.kind] = cls
    return cls


def label_of(meta: dict) -> str:
    """A purifier's short name from its metadata: 'consistency-1', 'diffpure-100'."""
    return f"{meta.get('kind', 'purifier')}-{meta.get('nfe', meta.get('steps', ''))}"


def check_images(x, channels: int, image_size: tuple[int, int], who: str = "purifier") -> None:
    """Raise ValueError naming the problem unless x is a float NCHW batch in [0, 1] of the right shape."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{who} expects a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise InputError(f"{who} expects a 4-D NCHW batch, got shape {tuple(x.shape)}")
    if x.shape[1] != channels:
        raise InputError(f"{who} expects {channels} channel(s), got shape {tuple(x.shape)} (NCHW)")
    if tuple(x.shape[2:]) != tuple(image_size):
        raise InputError(f"{who} expects {image_size[0]}x{image_size[1]} images, got {x.shape[2]}x{x.shape[3]}")
    if not x.is_floating_point():
        raise InputError(f"{who} expects float pixels in [0, 1], got dtype {x.dtype}")
    if x.numel() == 0:
        raise InputError(f"{who} got an empty batch")
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise InputError(f"{who} input holds {bad} NaN or Inf value(s)")
    lo, hi = x.min().item(), x.max().item()
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise InputError(f"{who} expects pixels in [0, 1], got values in [{lo:.4g}, {hi:.4g}] "
                         "(images in [-1, 1] or 0..255 must be rescaled first)")


class Purifier(nn.Module):
    """What every purifier shares: input checks, its own seeded noise, `nfe`, `save`."""

    kind = "purifier"

    def __init__(self, channels: int, image_size: tuple[int, int], seed: int = 0):
        super().__init__()
        self.channels, self.image_size = channels, tuple(image_size)
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> "Purifier":
        """Reseed the purifier's own generator: the same seed gives the same purifications again."""
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        return self

    def generator(self, device) -> torch.Generator:
        device = torch.device(device)
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    @property
    def nfe(self) -> int:
        raise NotImplementedError

    @property
    def label(self) -> str:
        """The short name reports use: kind and network evaluations, e.g. 'consistency-1'."""
        return label_of({"kind": self.kind, "nfe": self.nfe})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.channels, self.image_size, who=type(self).__name__)
        dtype = x.dtype  # float64 / float16 / bfloat16 pixels: computed in the network's dtype, returned in theirs
        x = x.contiguous().to(self.dtype).clamp(0, 1)  # a permuted or channels-last batch gives the same result
        out = self.purify(x * 2 - 1, self.generator(x.device))
        return ((out + 1) / 2).clamp(0, 1).to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the purifier computes in: its first floating parameter's (float32 without any)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def purify(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """x in [-1, 1] -> purified x in [-1, 1]."""
        raise NotImplementedError


@register_purifier
class DiffPure(Purifier):
    """DiffPure (Nie et al., ICML 2022): diffuse to t_star, then solve the reverse SDE (or ODE) to t = 0."""

    kind = "diffpure"

    def __init__(self, unet: nn.Module, scheduler_config: dict, t_star: float = 0.1, steps: int = 100,
                 mode: str = "sde", prediction_type: str | None = None, clip_x0: bool = False,
                 seed: int = 0, source: dict | None = None):
        cfg = unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, (tuple, list)) else (cfg.sample_size,) * 2
        super().__init__(cfg.in_channels, size, seed)
        if not 0 < float(t_star) <= 1:
            raise InputError(f"t_star must be in (0, 1], got {t_star}")
        if int(steps) != steps or steps < 1:
            raise InputError(f"steps must be a positive integer, got {steps}")
        if mode not in SAMPLERS:
            raise InputError(f"unknown mode {mode!r}; known: {', '.join(SAMPLERS)}")
        self.schedule = VPSchedule.from_scheduler_config(scheduler_config)
        prediction_type = prediction_type or scheduler_config.get("prediction_type", "epsilon")
        self.denoiser = UNetDenoiser(unet, self.schedule, prediction_type, clip_x0)
        self.t_star, self.steps, self.mode = float(t_star), int(steps), mode
        self.source = dict(source or {})
        self.eval().requires_grad_(False)

    @property
    def x0_net(self) -> UNetDenoiser:
        """The UNet's x0 predictor (students may wrap it in `denoiser`)."""
        return self.denoiser

    @property
    def unet(self) -> nn.Module:
        return self.x0_net.unet

    @property
    def nfe(self) -> int:
        return self.steps

    @property
    def times(self) -> torch.Tensor:
        return torch.linspace(self.t_star, 0.0, self.steps + 1, dtype=torch.float64)

    def set_grad_checkpoint(self, enabled: bool | float = True) -> "DiffPure":
        """Recompute each UNet call in backward so that full gradients through every step fit in memory (a float
        in [0, 1]: that share of the calls, evenly spread; the rest keep their activations)."""
        if not 0 <= float(enabled) <= 1:
            raise InputError(f"grad_checkpoint must be a bool or a share in [0, 1], got {enabled!r}")
        self.x0_net.grad_checkpoint, self.x0_net._calls = enabled, 0  # the pattern starts afresh
        return self

    def diffuse(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Sample x_{t_star} ~ q(x_t | x_0) = N(sqrt(alpha_bar) x_0, (1 - alpha_bar) I)."""
        ab = self.schedule.alpha_bar(torch.tensor(self.t_star, dtype=torch.float64)).item()
        return math.sqrt(ab) * x + math.sqrt(1 - ab) * randn_like(x, generator)

    def purify(self, x, generator):
        times = self.times.to(x.device)
        return SAMPLERS[self.mode](self.denoiser, self.diffuse(x, generator), times, generator)

    def config(self) -> dict:
        return {"kind": self.kind, "format_version": FORMAT_VERSION, "t_star": self.t_star, "steps": self.steps,
                "mode": self.mode, "sampler": {"sde": "ddpm-ancestral", "ode": "ddim"}.get(self.mode, self.mode),
                "parameterization": self.x0_net.prediction_type, "clip_x0": self.x0_net.clip_x0,
                "seed": self.seed, "nfe": self.nfe, "channels": self.channels, "image_size": list(self.image_size),
                "schedule": self.schedule.config, "source": self.source}

    @classmethod
    def from_config(cls, unet: nn.Module, scheduler_config: dict, meta: dict, **overrides) -> "DiffPure":
        """Rebuild from the UNet, the scheduler config and purifier.json (`config()`), with overrides on top."""
        return cls(unet, scheduler_config, **{**cls.arguments(meta), **overrides})

    @classmethod
    def arguments(cls, meta: dict) -> dict:
        """The constructor's arguments stored in purifier.json."""
        return dict(t_star=meta["t_star"], steps=meta["steps"], mode=meta["mode"], seed=meta.get("seed", 0),
                    prediction_type=meta.get("parameterization"), clip_x0=meta.get("clip_x0", False),
                    source=meta.get("source"))

    def save(self, folder: str | Path) -> Path:
        """Write purifier.json + the UNet in diffusers format + its own scheduler_config.json, atomically.

        The scheduler config names this UNet's prediction type (a v-predicting student's folder says
        v_prediction), so diffusers alone opens the folder as what it is."""
        with atomic_dir(folder) as tmp:
            self.unet.save_pretrained(tmp, safe_serialization=True)
            atomic_write_json(tmp / "scheduler_config.json", {"_class_name": "DDPMScheduler", **self.schedule.config,
                                                              "prediction_type": self.x0_net.prediction_type})
            atomic_write_json(tmp / "purifier.json", self.config())
        return Path(folder)

    def extra_repr(self) -> str:
        return f"t_star={self.t_star}, steps={self.steps}, mode={self.mode!r}, nfe={self.nfe}"
