"""Bad input fails before any work, with an error that names the problem."""

import json

import pytest
import torch

from core import load_classifier
from purify import load_purifier

from .conftest import tiny_diffpure, tiny_unet


@pytest.mark.parametrize("x, words", [
    (torch.rand(1, 8, 8), "4-D"),
    (torch.rand(2, 3, 8, 8), "channel"),
    (torch.rand(2, 1, 16, 16), "8x8"),
    (torch.full((2, 1, 8, 8), float("nan")), "NaN"),
    (torch.full((2, 1, 8, 8), float("inf")), "Inf"),
    (torch.rand(2, 1, 8, 8) * 2 - 1, "[0, 1]"),
    (torch.rand(2, 1, 8, 8) * 255, "[0, 1]"),
    ((torch.rand(2, 1, 8, 8) * 255).to(torch.uint8), "dtype"),
    (torch.rand(0, 1, 8, 8), "empty"),
    ([[0.5]], "torch.Tensor"),
])
def test_purifier_rejects_bad_batches(x, words):
    p = tiny_diffpure()
    calls = []
    p.unet.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match=pytest.importorskip("re").escape(words)):
        p(x)
    assert not calls  # rejected before any network evaluation


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_purifier(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_classifier(tmp_path / "nope")


def test_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a purifier folder"):
        load_purifier(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a classifier folder"):
        load_classifier(tmp_path)


def test_pickle_only_unet_is_refused(tmp_path):
    unet = tiny_unet()
    unet.save_pretrained(tmp_path, safe_serialization=False)  # diffusion_pytorch_model.bin
    (tmp_path / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 1000}))
    assert (tmp_path / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(ValueError, match="pickle"):
        load_purifier(tmp_path)


def test_pickle_only_classifier_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(ValueError, match="pickle"):
        load_classifier(tmp_path)


def test_bare_unet_without_its_schedule(tmp_path):
    tiny_unet().save_pretrained(tmp_path, safe_serialization=True)
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        load_purifier(tmp_path)


def test_unknown_override_and_bad_values(tmp_path):
    folder = tiny_diffpure().save(tmp_path / "p")
    with pytest.raises(ValueError, match="valid: t_star, steps, mode, seed"):
        load_purifier(folder, tstar=0.2)
    with pytest.raises(ValueError, match="t_star"):
        load_purifier(folder, t_star=1.5)
    with pytest.raises(ValueError, match="mode"):
        load_purifier(folder, mode="heun")
    assert load_purifier(folder, steps=3, mode="ode").nfe == 3


def test_weights_that_do_not_fit_their_config(tmp_path):
    folder = tiny_diffpure().save(tmp_path / "p")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_out_channels"] = [16, 32]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="could not load the UNet"):
        load_purifier(folder)


def test_hub_id_without_network_gives_one_clear_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="huggingface-cli download"):
        load_purifier("google/ddpm-cifar10-32-not-cached")
