"""Tiny end-to-end runs of the commands: they leave loadable folders and resume exactly."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from core import load_classifier
from core.io import load_tensors
from purify import load_purifier

TINY_UNET = ["unet.block_out_channels=[8, 16]", "unet.attention=[false, true]", "unet.norm_num_groups=4",
             "batch_size=16", "purify_steps=5", "log_every=1"]


def teacher(out, *extra):
    from distill.__main__ import main

    main(["teacher", "--config", "configs/digits/teacher.yaml", "--out", str(out), *TINY_UNET, *extra])


def test_teacher_command_leaves_a_loadable_purifier(tmp_path):
    teacher(tmp_path / "run", "train_steps=4", "checkpoint_every=2")
    p = load_purifier(tmp_path / "run" / "purifier")
    assert (p.nfe, p.t_star, p.image_size, p.channels) == (5, 0.1, (16, 16), 1)
    y = p(torch.rand(2, 1, 16, 16))
    assert y.shape == (2, 1, 16, 16)
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in logged)
    assert (tmp_path / "run" / "config.yaml").is_file()
    with pytest.raises(SystemExit, match="already holds a run"):
        teacher(tmp_path / "run", "train_steps=4")


def test_killed_teacher_resumes_to_the_same_weights(tmp_path, monkeypatch):
    teacher(tmp_path / "whole", "train_steps=6", "checkpoint_every=2")

    import distill.teacher as T

    real, calls = T.ema_update, []

    def dies_at_step_5(*a, **kw):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # killed after checkpoint step-4, mid step 5
        return real(*a, **kw)

    monkeypatch.setattr(T, "ema_update", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        teacher(tmp_path / "killed", "train_steps=6", "checkpoint_every=2")
    monkeypatch.setattr(T, "ema_update", real)
    teacher(tmp_path / "killed", "train_steps=6", "checkpoint_every=2", "--resume")

    for name in ("unet", "ema"):
        a = load_tensors(tmp_path / "whole" / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        b = load_tensors(tmp_path / "killed" / "checkpoints" / "step-00000006" / f"{name}.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_teacher_config_errors_come_before_work(tmp_path):
    with pytest.raises(SystemExit, match="unknown config key unet.widht"):
        teacher(tmp_path / "r", "unet.widht=3")
    with pytest.raises(SystemExit, match="t_star 0.5 lies above t_max"):
        teacher(tmp_path / "r", "t_star=0.5")
    assert not (tmp_path / "r").exists()


def test_squeeze_command_leaves_a_loadable_classifier(tmp_path):
    from robust_data.__main__ import main

    main(["squeeze", "--config", "configs/digits/squeeze.yaml", "--out", str(tmp_path / "sq"),
          "epochs=0.5", "width=8", "checkpoint_every=2"])
    clf = load_classifier(tmp_path / "sq" / "classifier")
    assert clf(torch.rand(3, 1, 16, 16)).shape == (3, 10)
    meta = json.loads((tmp_path / "sq" / "classifier" / "meta.json").read_text())
    assert meta["test_examples"] == 359 and 0 <= meta["test_accuracy"] <= 1
    with pytest.raises(SystemExit, match="unknown squeeze objective 'guard2'"):
        main(["squeeze", "--out", str(tmp_path / "sq2"), "objective=guard2"])


@pytest.mark.slow
def test_teacher_under_accelerate_launch_with_two_processes(tmp_path):
    accelerate = shutil.which("accelerate", path=str(__import__("pathlib").Path(sys.executable).parent))
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "distill", "teacher", "--config", "configs/digits/teacher.yaml",
           "--out", str(tmp_path / "ddp"), *TINY_UNET, "train_steps=3"]
    subprocess.run(cmd, check=True, timeout=300)
    train = json.loads((tmp_path / "ddp" / "train.json").read_text())
    assert train["processes"] == 2
    assert load_purifier(tmp_path / "ddp" / "purifier").nfe == 5
