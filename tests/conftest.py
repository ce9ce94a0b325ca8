"""Tiny models shared by the tests: seconds of CPU each."""

import pytest
import torch
from diffusers import UNet2DModel

from purify import ConsistencyStudent, DiffPure, ProgressiveStudent


def tiny_unet(channels: int = 1, size: int = 8, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 16), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4)


def digits_cnn(channels: int = 1, steps: int = 120):
    """A small CNN fitted to the digits (repeated to `channels` channels) in about a second (~95% on the test)."""
    import torch.nn as nn
    import torch.nn.functional as F

    from core.datasets import load_dataset, to_tensors

    torch.manual_seed(0)
    x, y = to_tensors(load_dataset("digits", "train")[0])
    x = x.repeat(1, channels, 1, 1)
    model = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def scheduler_config(**kw) -> dict:
    return {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
            "prediction_type": "epsilon", "clip_sample": False, **kw}


def tiny_diffpure(mode: str = "sde", steps: int = 10, channels: int = 1, size: int = 8) -> DiffPure:
    return DiffPure(tiny_unet(channels, size), scheduler_config(), t_star=0.1, steps=steps, mode=mode)


def _bare_unet_teacher(tmp_path):
    """A teacher built on the spot from a diffusers UNet folder (the google/ddpm-cifar10-32 layout)."""
    import json

    from purify import load_purifier

    tiny_unet().save_pretrained(tmp_path / "bare", safe_serialization=True)
    (tmp_path / "bare" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", **scheduler_config()}))
    return load_purifier(tmp_path / "bare", t_star=0.1, steps=5)


# Every purifier kind runs the contract test in test_purifier_contract.py; later kinds add a line here.
PURIFIER_KINDS = {
    "diffpure-sde": lambda tmp_path: tiny_diffpure("sde"),
    "diffpure-ode": lambda tmp_path: tiny_diffpure("ode"),
    "diffpure-100-steps": lambda tmp_path: tiny_diffpure("sde", steps=100),
    "diffpure-from-bare-unet": _bare_unet_teacher,
    "progressive-1": lambda tmp_path: ProgressiveStudent(tiny_unet(), scheduler_config(), 0.1, 1),
    "progressive-4-x": lambda tmp_path: ProgressiveStudent(tiny_unet(), scheduler_config(), 0.1, 4,
                                                           prediction_type="sample"),
    "consistency-1": lambda tmp_path: ConsistencyStudent(tiny_unet(), scheduler_config(), 0.1, 1),
    "consistency-4": lambda tmp_path: ConsistencyStudent(tiny_unet(), scheduler_config(), 0.1, 4),
}


@pytest.fixture(params=sorted(PURIFIER_KINDS))
def purifier(request, tmp_path):
    return PURIFIER_KINDS[request.param](tmp_path)
