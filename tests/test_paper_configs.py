"""The paper-scale quickstart configs run end to end under --smoke: the models at full size (a randomly
initialised UNet shaped like google/ddpm-cifar10-32 standing in for the pretrained one), the configs' schedules
and switches, a few steps and images of stand-in data in the datasets' folder layout."""

import json

import pytest
import torch
from PIL import Image

# google/ddpm-cifar10-32's config.json (the pretrained DiffPure CIFAR-10 teacher), weights left random
DDPM_CIFAR10_32 = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256), "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D",
                                                                     "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), "downsample_padding": 0,
    "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6, "norm_num_groups": 32, "act_fn": "silu",
    "attention_head_dim": None}
DDPM_SCHEDULER = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
                  "beta_start": 0.0001, "beta_end": 0.02, "variance_type": "fixed_large", "clip_sample": True,
                  "prediction_type": "epsilon"}


def image_folders(root, classes: int, size: int, per_split: dict):
    """root/<split>/<class>/<i>.jpg: random JPEGs in torchvision's ImageFolder layout."""
    g = torch.Generator().manual_seed(0)
    for split, n in per_split.items():
        for c in range(classes):
            d = root / split / f"class{c:04d}"
            d.mkdir(parents=True)
            for i in range(n):
                px = (torch.rand(size, size, 3, generator=g) * 255).byte().numpy()
                Image.fromarray(px).save(d / f"{i}.jpg", quality=90)
    return root


def ddpm_cifar10_32_stand_in(folder):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**DDPM_CIFAR10_32)
    unet.save_pretrained(folder, safe_serialization=True)
    (folder / "scheduler_config.json").write_text(json.dumps(DDPM_SCHEDULER))
    return folder, sum(p.numel() for p in unet.parameters())


@pytest.mark.slow
def test_cifar10_paper_config_runs_end_to_end(tmp_path):
    from eval.quickstart import quickstart, quickstart_config
    from purify import load_purifier

    root = image_folders(tmp_path / "cifar10", 10, 32, {"train": 2, "test": 2})
    teacher, n_params = ddpm_cifar10_32_stand_in(tmp_path / "ddpm-cifar10-32")
    assert 35.5e6 < n_params < 36e6  # the 35.7M-parameter DDPM CIFAR-10 UNet
    # 10 teacher steps instead of 100 keep a CPU run to minutes (a full gradient through 100 steps of this UNet
    # takes several minutes on 2 cores); `python -m eval quickstart --config ... --smoke` runs the config as is
    cfg = quickstart_config(path="configs/cifar10/quickstart.yaml", smoke=True,
                            changes={"data_root": str(root), "teacher_from": str(teacher),
                                     "teacher": {"purify_steps": 10}})
    report = quickstart(tmp_path / "q", fast=True, cfg=cfg)
    t = load_purifier(tmp_path / "q" / "teacher" / "purifier")
    assert (t.t_star, t.steps, t.mode, t.schedule.variance_type) == (0.1, 10, "sde", "beta")
    assert sorted(p.name for p in (tmp_path / "q" / "progressive" / "students").iterdir()) == [
        f"steps-{k}" for k in (1, 16, 2, 32, 4, 8)]  # 64 -> 1: all six rounds
    rows = {(r["classifier"], r["defense"]): r for r in report["rows"]}
    teacher_row = rows["standard", "teacher"]
    assert set(teacher_row["attacks"]) == {"pgd-eot", "bpda-eot"} and not teacher_row["weaker"]
    assert report["threat"]["eps"] == pytest.approx(8 / 255, abs=1e-4)
    assert all(0 <= r["all_attacks"] <= 1 for r in report["rows"])
