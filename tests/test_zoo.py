"""Classifiers by name (torchvision, timm, RobustBench): random weights written in each library's own format and
cache layout, loaded with the network unreachable, wrapped to [0, 1] in and logits out."""

import socket

import pytest
import torch

from core.checkpoint import load_classifier
from core.zoo import is_named


@pytest.fixture
def offline(monkeypatch):
    def refuse(*a, **k):
        raise OSError("the network is unreachable in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_a_torchvision_classifier_by_name_from_the_hub_cache(tmp_path, monkeypatch, offline):
    import torchvision
    from torchvision.models import ResNet18_Weights

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=r"resnet18-.*\.pth: put the file at .*hub/checkpoints"):
        load_classifier("torchvision:resnet18")
    ref = torchvision.models.resnet18()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / ResNet18_Weights.DEFAULT.url.rsplit("/", 1)[1])
    model = load_classifier("torchvision:resnet18")
    x = torch.rand(2, 3, 64, 64)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.eval()((x - mean) / std), atol=1e-5)
    assert not model.training and model.source == "torchvision:resnet18"


def test_a_timm_classifier_by_name_from_the_hugging_face_cache(tmp_path, monkeypatch, offline):
    import timm
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(FileNotFoundError, match="timm/test_efficientnet.r160_in1k"):
        load_classifier("timm:test_efficientnet")
    ref = timm.create_model("test_efficientnet", pretrained=False)
    repo = tmp_path / "hf" / "models--timm--test_efficientnet.r160_in1k"
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, repo / "snapshots" / "abc123" / "model.safetensors")
    model = load_classifier("timm:test_efficientnet")
    x = torch.rand(2, 3, 64, 64)
    c = ref.pretrained_cfg
    mean, std = torch.tensor(c["mean"]).view(1, 3, 1, 1), torch.tensor(c["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), ref.eval()((x - mean) / std), atol=1e-5)


@pytest.mark.slow
def test_a_robustbench_classifier_at_full_size_runs_the_harness_on_cifar10_shapes(tmp_path, monkeypatch, offline):
    from core.zoo import _import_robustbench
    from eval import Defended, evaluate

    _import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    monkeypatch.setenv("ROBUSTBENCH_MODELS", str(tmp_path / "models"))
    with pytest.raises(FileNotFoundError, match="Standard.pt: put the file at .*models/cifar10/Linf"):
        load_classifier("robustbench:cifar10/Linf/Standard")
    ref = model_dicts[BenchmarkDataset("cifar10")][ThreatModel("Linf")]["Standard"]["model"]()  # WRN-28-10, 36M
    (tmp_path / "models" / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "models" / "cifar10" / "Linf" / "Standard.pt")
    model = load_classifier("robustbench:cifar10/Linf/Standard")
    assert sum(p.numel() for p in model.parameters()) > 30e6
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([3, 5])
    with torch.no_grad():
        assert torch.allclose(model(x), ref.eval()(x), atol=1e-5)  # [0, 1] in: RobustBench normalises inside
    r = evaluate(Defended(None, model), x, y, ["pgd"], eps=8 / 255, steps={"pgd": 1}, check_steps=False, progress=None)
    assert r["examples"] == 2 and "pgd" in r["attacks"]


def test_names_are_told_apart_from_folders_and_a_wrong_one_is_one_sentence():
    from core.errors import InputError

    assert is_named("timm:resnet18") and is_named("robustbench:cifar10/Linf/Standard")
    assert not is_named("runs/quickstart/classifier/classifier") and not is_named("C:/models/clf")
    with pytest.raises(InputError, match="torchvision has no model 'resnet9000'"):
        load_classifier("torchvision:resnet9000")
    with pytest.raises(InputError, match="robustbench:DATASET/THREAT/MODEL"):
        load_classifier("robustbench:Standard")
