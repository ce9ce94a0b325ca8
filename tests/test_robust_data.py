"""Robust dataset distillation: the squeeze objectives (GUARD and its ablations), recover's BatchNorm matching,
relabel's stored soft labels, and the pipeline end to end."""

import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from robust_data.objectives import OBJECTIVES, curvature_direction, get_objective, guard_penalty, input_grad, split_normalization


def smooth_net(seed=0, dtype=torch.float64):
    """A tiny network with curvature everywhere (tanh), on 1x2x2 inputs, 3 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def finite_difference_grad(net, x, y, eps=1e-6):
    """Central differences of the batch-mean cross-entropy, one input coordinate at a time."""
    g = torch.zeros_like(x)
    flat = g.view(-1)
    for i in range(x.numel()):
        d = torch.zeros_like(x).view(-1)
        d[i] = eps
        d = d.view_as(x)
        flat[i] = (F.cross_entropy(net(x + d), y) - F.cross_entropy(net(x - d), y)) / (2 * eps)
    return g


def test_guard_penalty_equals_its_finite_difference_computation():
    net = smooth_net()
    x, y = torch.randn(3, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 2, 1])
    h = 0.5
    penalty = guard_penalty(net, x, y, h)
    z = curvature_direction(net, x, y, h)
    assert torch.allclose(z.flatten(1).norm(dim=1), torch.full((3,), h, dtype=torch.float64), atol=1e-6)
    with torch.no_grad():
        expected = (finite_difference_grad(net, x + z, y) - finite_difference_grad(net, x, y)).flatten(1).norm(dim=1)
    assert penalty.shape == (3,)
    assert torch.allclose(penalty, expected, rtol=1e-5, atol=1e-9)
    assert (penalty > 0).all()


@pytest.mark.parametrize("name", ["guard", "gradnorm", "guard-loss"])
def test_curvature_penalties_reach_the_weights(name):
    net = smooth_net(dtype=torch.float32)
    x, y = torch.randn(4, 1, 2, 2), torch.tensor([0, 1, 2, 0])
    if name == "guard":
        reg = guard_penalty(net, x, y, 0.5).mean()
    elif name == "gradnorm":
        reg = input_grad(net, x, y, create_graph=True)[0].flatten(1).norm(dim=1).mean()
    else:
        _, stats = get_objective("guard-loss")(net, x, y, reg_lambda=1.0, reg_h=0.5)
        z = curvature_direction(net, x, y, 0.5)
        reg = (F.cross_entropy(net(x + z), y) - F.cross_entropy(net(x), y)).abs()
    grads = torch.autograd.grad(reg, list(net.parameters()), allow_unused=True)
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    # the objective's total loss carries the penalty: its weight gradient differs from cross-entropy's
    total, _ = get_objective(name)(net, x, y, reg_lambda=10.0)
    ce = F.cross_entropy(net(x), y)
    g_total = torch.autograd.grad(total, list(net.parameters()))
    g_ce = torch.autograd.grad(ce, list(net.parameters()))
    assert any(not torch.allclose(a, b) for a, b in zip(g_total, g_ce))


def test_guard_works_in_the_classifiers_normalised_units():
    from core.models import ClassifierConfig, build_classifier

    model = build_classifier(ClassifierConfig(arch="convnet-bn", width=8, depth=2, mean=[0.3], std=[0.2]))
    x = torch.rand(2, 1, 16, 16)
    net, xn = split_normalization(model, x)
    assert net is model.net and torch.allclose(xn, (x - 0.3) / 0.2)
    loss, stats = get_objective("guard")(model, x, torch.tensor([1, 2]))
    assert model.training and stats["reg"] > 0  # BatchNorm back in training mode after the eval-mode probe


def test_adversarial_objective_trains_on_pgd_points_of_higher_loss():
    net = smooth_net(dtype=torch.float32)
    x, y = torch.rand(8, 1, 2, 2), torch.randint(0, 3, (8,))
    loss, stats = get_objective("adversarial")(net, x, y, adv_eps=0.1, adv_steps=5)
    assert loss > F.cross_entropy(net(x), y)  # PGD raised the loss
    assert set(stats) == {"ce", "adv_acc"}


def test_unknown_objective_and_bad_ipc_are_named(tmp_path):
    from robust_data.__main__ import main

    with pytest.raises(SystemExit, match=r"unknown squeeze objective 'guardd'; known: ce, guard"):
        main(["squeeze", "--out", str(tmp_path / "s"), "objective=guardd"])
    with pytest.raises(SystemExit, match="ipc must be a positive integer"):
        main(["pipeline", "--config", "configs/digits/guard.yaml", "--out", str(tmp_path / "p"), "recover.ipc=0"])
    with pytest.raises(SystemExit, match="unknown config key recover.ipcs"):
        main(["pipeline", "--config", "configs/digits/guard.yaml", "--out", str(tmp_path / "p"), "recover.ipcs=3"])
    with pytest.raises(SystemExit, match="squeezed: .* is not a classifier folder"):
        main(["pipeline", "--config", "configs/digits/guard.yaml", "--out", str(tmp_path / "p"),
              f"squeezed={tmp_path}"])
    assert not (tmp_path / "p").exists()
    assert sorted(OBJECTIVES) == ["adversarial", "ce", "gradnorm", "guard", "guard-loss"]


def test_bn_matching_is_zero_when_the_batch_has_the_running_statistics():
    from robust_data.recover import BNStatistics

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(8, 1, 6, 6)
    bn = BNStatistics(net, first_multiplier=10.0)
    net(x)
    assert bn.pop() > 0
    for layer in bn.layers:  # set each layer's running statistics to what the batch shows it, in order
        seen = {}
        h = layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0]))
        with torch.no_grad():
            net(x)
        h.remove()
        layer.running_mean.copy_(seen["x"].mean((0, 2, 3)))
        layer.running_var.copy_(seen["x"].permute(1, 0, 2, 3).flatten(1).var(1, unbiased=False))
    bn.pop()  # drop what the hooks saw while the statistics were being set
    net(x)
    assert bn.pop().item() < 1e-5
    bn.remove()
    assert not any(layer._forward_hooks for layer in bn.layers)


def test_recover_refuses_a_classifier_without_batchnorm(tmp_path):
    from core.checkpoint import save_classifier
    from core.models import ClassifierConfig, build_classifier
    from robust_data.recover import RecoverConfig, recover

    cfg = ClassifierConfig(arch="convnet", width=8, depth=2)
    save_classifier(build_classifier(cfg), tmp_path / "clf", cfg, {})
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        recover(RecoverConfig(classifier=str(tmp_path / "clf")), tmp_path / "r")


def test_soft_labels_regenerate_identically_from_the_stored_crops(tmp_path):
    from core.checkpoint import load_classifier, save_classifier
    from core.io import load_tensors
    from core.models import ClassifierConfig, build_classifier
    from robust_data.distilled import save_distilled
    from robust_data.relabel import RelabelConfig, apply_crops, relabel

    torch.manual_seed(0)
    cfg = ClassifierConfig(arch="convnet-bn", width=8, depth=2)
    save_classifier(build_classifier(cfg), tmp_path / "clf", cfg, {})
    images, labels = torch.rand(6, 1, 16, 16), torch.arange(6) % 3
    save_distilled(tmp_path / "d", images, labels, {"ipc": 2})
    relabel(RelabelConfig(distilled=str(tmp_path / "d"), classifier=str(tmp_path / "clf"), epochs=3,
                          min_crop=0.3), tmp_path / "r")
    stored = load_tensors(tmp_path / "r" / "soft_labels.safetensors")
    assert stored["crops"].shape == (3, 6, 5) and stored["logits"].shape == (3, 6, 10)
    assert stored["logits"].dtype == torch.float16
    teacher = load_classifier(tmp_path / "clf")
    for e in range(3):
        with torch.no_grad():
            again = teacher(apply_crops(images, stored["crops"][e])).half()
        assert torch.equal(again, stored["logits"][e])
    assert not torch.equal(stored["crops"][0], stored["crops"][1])  # a new crop per epoch
    assert (tmp_path / "d" / "grid.png").is_file()


def test_tiny_pipeline_leaves_a_loadable_classifier_and_reuses_its_stages(tmp_path, capsys):
    from core.checkpoint import load_classifier
    from robust_data.__main__ import main

    args = ["pipeline", "--config", "configs/digits/guard.yaml", "--out", str(tmp_path / "p"), "squeeze.epochs=0.5",
            "squeeze.width=8", "recover.ipc=2", "recover.iterations=5", "recover.batch_size=10",
            "relabel.epochs=2", "train.epochs=4", "train.width=8"]
    main(args)
    summary = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert summary["objective"] == "guard" and summary["ipc"] == 2
    clf = load_classifier(summary["classifier"])
    assert clf(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    distilled = json.loads((tmp_path / "p" / "recover" / "distilled" / "distilled.json").read_text())
    assert distilled["images"] == 20 and distilled["ipc"] == 2
    capsys.readouterr()
    main(args)  # unchanged: every stage reused
    out = capsys.readouterr().out
    assert len(re.findall("unchanged: reusing", out)) == 4


def test_one_pipeline_seed_reaches_every_stage(tmp_path):
    from core.config import load_config
    from robust_data.pipeline import PipelineConfig, stage_configs

    cfg = load_config(PipelineConfig, "configs/cifar10/guard-cpu.yaml", ["seed=3", "recover.seed=7"])
    s = stage_configs(cfg, tmp_path)
    assert (s["squeeze"].seed, s["recover"].seed, s["train"].seed) == (3, 3, 3)
    assert s["relabel"].seed == s["train"].crop_seed == 45  # soft labels and online crops from one draw
    assert stage_configs(load_config(PipelineConfig, "configs/cifar10/dc-cpu.yaml", ["seed=3"]), tmp_path)[
        "condense"].seed == 3
    unseeded = stage_configs(load_config(PipelineConfig, "configs/cifar10/guard-cpu.yaml", ["recover.seed=7"]),
                             tmp_path)
    assert (unseeded["recover"].seed, unseeded["relabel"].seed, unseeded["train"].crop_seed) == (7, 42, 42)


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path("configs").glob("*/guard*.yaml")))
def test_shipped_pipeline_configs_load(path):
    from core.config import load_config
    from robust_data.objectives import OBJECTIVES
    from robust_data.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, path)
    assert cfg.squeeze.objective in OBJECTIVES and cfg.recover.ipc >= 1


def test_stored_crops_cut_the_right_region_and_mirror_it():
    from robust_data.relabel import apply_crops

    img = torch.arange(64.0).view(1, 1, 8, 8)
    full = apply_crops(img, torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(full, img, atol=1e-5)  # the whole image, unflipped: itself
    assert torch.allclose(apply_crops(img, torch.tensor([[0.0, 0.0, 1.0, 1.0, 1.0]])), img.flip(-1), atol=1e-5)
    quarter = apply_crops(img, torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.0]]))  # bottom-right 4x4, upsampled 2x
    assert abs(quarter.mean() - img[..., 4:, 4:].mean()) < 1.5  # the other quarters average 13.5 to 45.5
    assert torch.allclose(quarter[..., 3:5, 3:5].mean(), img[..., 5:7, 5:7].mean(), atol=0.01)  # centre


@pytest.mark.slow
def test_recover_and_relabel_shard_across_two_processes(tmp_path):
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from robust_data.__main__ import main
    from robust_data.distilled import load_distilled

    main(["squeeze", "--out", str(tmp_path / "s"), "epochs=0.5", "width=8"])
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "robust_data"]
    subprocess.run(launch + ["recover", "--out", str(tmp_path / "r"), f"classifier={tmp_path / 's' / 'classifier'}",
                             "ipc=2", "iterations=3", "batch_size=4"], check=True, timeout=300)
    images, labels, meta = load_distilled(tmp_path / "r" / "distilled")
    assert meta["processes"] == 2 and labels.tolist() == [c for c in range(10) for _ in range(2)]
    # the same set as one process makes: the batches (and their BatchNorm statistics) do not depend on the count
    main(["recover", "--out", str(tmp_path / "r1"), f"classifier={tmp_path / 's' / 'classifier'}", "ipc=2",
          "iterations=3", "batch_size=4"])
    one, labels1, _ = load_distilled(tmp_path / "r1" / "distilled")
    assert torch.equal(labels1, labels) and torch.allclose(one, images, atol=1e-6)
    subprocess.run(launch + ["relabel", "--out", str(tmp_path / "l"), f"distilled={tmp_path / 'r' / 'distilled'}",
                             f"classifier={tmp_path / 's' / 'classifier'}", "epochs=3"], check=True, timeout=300)
    from core.io import load_tensors

    assert load_tensors(tmp_path / "l" / "soft_labels.safetensors")["logits"].shape == (3, 20, 10)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_every_squeeze_objective_keeps_the_contract(name):
    """(model, x, y) -> (scalar loss, stats of scalars): finite, differentiable in the weights, its settings
    bound from a SqueezeConfig, and the model left in the mode it was given in (the contract a new objective
    meets by registering itself)."""
    from robust_data.squeeze import SqueezeConfig

    fn, settings = OBJECTIVES[name]
    cfg = SqueezeConfig()
    assert all(hasattr(cfg, k) for k in settings), settings
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 16, 3)).train()
    x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    loss, stats = get_objective(name, cfg)(model, x, y)
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert all(torch.as_tensor(v).dim() == 0 for v in stats.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.training and model[1].training


def test_benchmark_training_keys_give_dcs_schedule_on_hard_labels_with_dsa(tmp_path):
    """The DD benchmarks' evaluation: SGD with momentum, the rate / 10 at the midpoint, batches that never span two
    epochs (one step per epoch below the batch size), DSA instead of crops."""
    from core.config import load_config
    from core.io import read_jsonl
    from robust_data.distilled import save_distilled
    from robust_data.train import TrainConfig, train_distilled

    torch.manual_seed(0)
    save_distilled(tmp_path / "d", torch.rand(20, 1, 16, 16), torch.arange(10).repeat_interleave(2), {"ipc": 2})
    cfg = load_config(TrainConfig, "configs/cifar10/dd-benchmark/train.yaml",
                      ["dataset=digits", f"distilled={tmp_path / 'd'}", "epochs=8", "width=8", "log_every=1"])
    train_distilled(cfg, tmp_path / "t")
    meta = json.loads((tmp_path / "t" / "train.json").read_text())
    assert meta["train_steps"] == 8 and meta["batch_size"] == 20  # 20 images: one batch of 20 per epoch
    assert (meta["optimizer"], meta["lr_schedule"], meta["augment"]) == ("sgd", "step", "dsa")
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "t" / "log.jsonl") if "lr" in r]  # logged after each step
    assert lrs == pytest.approx([0.01] * 3 + [0.001] * 5)
    cfg = load_config(TrainConfig, "configs/cifar10/dd-benchmark/train.yaml",
                      ["dataset=digits", f"distilled={tmp_path / 'd'}", "epochs=2", "width=8", "batch_size=8"])
    train_distilled(cfg, tmp_path / "t8")  # 20 images, batches of at most 8: three of 7 tile an epoch
    meta = json.loads((tmp_path / "t8" / "train.json").read_text())
    assert meta["train_steps"] == 6 and meta["batch_size"] == 7


def test_dsa_cuts_out_in_normalised_units_as_dc_evaluates():
    """A cutout hole is 0 in normalised units: the dataset's mean pixel, not black."""
    from robust_data.train import dsa_pixels

    mean, std = torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1), torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    x = torch.ones(2, 3, 8, 8)
    out = dsa_pixels(x, {"family": "cutout", "cutout": torch.tensor([[0.5, 0.5], [0.0, 0.0]])}, mean, std)
    assert torch.allclose(out[0, :, 4, 4], mean.flatten()) and torch.allclose(out[1, :, 0, 0], mean.flatten())
    assert torch.equal(out[:, :, 7, 7], torch.ones(2, 3))  # outside both holes: unchanged


def test_dsa_training_changes_what_the_network_sees_and_bad_choices_are_named(tmp_path):
    from robust_data.distilled import save_distilled
    from robust_data.train import TrainConfig, train_distilled

    save_distilled(tmp_path / "d", torch.rand(10, 1, 16, 16), torch.arange(10), {"ipc": 1})
    base = dict(distilled=str(tmp_path / "d"), soft_labels="hard", epochs=3, width=8, batch_size=10, lr=0.01)
    for key, bad in [("optimizer", "adam"), ("lr_schedule", "linear"), ("augment", "mixup")]:
        with pytest.raises(Exception, match=key):
            train_distilled(TrainConfig(**base, **{key: bad}), tmp_path / f"bad-{key}")
        assert not (tmp_path / f"bad-{key}").exists()
    with pytest.raises(Exception, match="stored soft labels"):
        train_distilled(TrainConfig(**{**base, "soft_labels": "runs/x"}, augment="dsa"), tmp_path / "bad")
    weights = {}
    for augment in ("crops", "dsa"):
        train_distilled(TrainConfig(**base, augment=augment, min_crop=1.0, flip=False), tmp_path / augment)
        from safetensors.torch import load_file
        weights[augment] = load_file(next((tmp_path / augment / "classifier").glob("*.safetensors")))
    k = next(k for k, v in weights["dsa"].items() if v.is_floating_point() and k.endswith("weight"))
    assert not torch.equal(weights["crops"][k], weights["dsa"][k])  # min_crop 1, no flip: crops are the identity
