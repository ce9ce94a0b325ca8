"""core: the embedded dataset, classifiers, configs, checkpoint I/O and step-seeded batches."""

from dataclasses import dataclass, field

import pytest
import torch

from core import (
    ClassifierConfig,
    ConfigError,
    build_classifier,
    dataset_info,
    load_classifier,
    load_config,
    load_dataset,
    save_classifier,
    save_config,
)
from core.seeding import StepBatchSampler


def test_digits_is_embedded_fixed_and_in_range():
    train, info = load_dataset("digits", "train")
    test, _ = load_dataset("digits", "test")
    x, y = train.tensors
    assert (info.channels, info.image_size, info.num_classes) == (1, 16, 10)
    assert x.shape == (1438, 1, 16, 16) and len(test) == 359
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert set(y.tolist()) == set(range(10))
    assert torch.equal(load_dataset("digits", "test")[0].tensors[0], test.tensors[0])
    assert load_dataset("digits", "test", image_size=8)[0].tensors[0].shape[-1] == 8


def test_unknown_dataset_and_missing_folder_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="known datasets"):
        load_dataset("mnist")
    with pytest.raises(FileNotFoundError, match="cifar10-test-jpeg.zip"):
        load_dataset("cifar10-jpeg", "test", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="pass download"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_imagefolder_preset_reads_class_folders(tmp_path):
    from PIL import Image

    for c, name in enumerate(["airplane", "bird"]):
        (tmp_path / "cifar10" / "test" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (255 * c, 0, 0)).save(tmp_path / "cifar10" / "test" / name / "0000.jpg")
    ds, info = load_dataset("cifar10-jpeg", "test", root=tmp_path / "cifar10")
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and 0 <= x.min() and x.max() <= 1 and y == 1 and info.num_classes == 10


@pytest.mark.parametrize("arch, channels, size", [
    ("convnet", 1, 16), ("convnet-bn", 3, 32), ("resnet18", 3, 32), ("resnet18-imagenet", 3, 64),
    ("wrn-10-2", 3, 32),
])
def test_classifiers_take_unit_range_inputs(arch, channels, size):
    cfg = ClassifierConfig(arch=arch, in_channels=channels, num_classes=7, image_size=size,
                           mean=[0.5] * channels, std=[0.25] * channels, width=16)
    model = build_classifier(cfg).eval()
    assert model(torch.rand(2, channels, size, size)).shape == (2, 7)
    # normalisation is inside: a constant mean-valued image reaches the network as zeros
    seen = []
    model.net.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model(torch.full((1, channels, size, size), 0.5))
    assert seen[0].abs().max() == 0


def test_wrn_28_10_is_diffpures_classifier_size():
    cfg = ClassifierConfig(arch="wrn-28-10", in_channels=3, image_size=32, mean=[0.5] * 3, std=[0.5] * 3)
    assert 36.4e6 < sum(p.numel() for p in build_classifier(cfg).parameters()) < 36.6e6


def test_classifier_round_trip(tmp_path):
    cfg = ClassifierConfig(arch="convnet-bn", width=8)
    model = build_classifier(cfg).eval()
    model.net.features[1].running_mean.fill_(0.3)
    save_classifier(model, tmp_path / "clf", cfg, meta={"test_accuracy": 0.5})
    loaded = load_classifier(tmp_path / "clf")
    x = torch.rand(3, 1, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert sorted(p.name for p in (tmp_path / "clf").iterdir()) == ["config.json", "meta.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


@dataclass
class Inner:
    width: int = 4
    channels: list[int] = field(default_factory=lambda: [8, 16])


@dataclass
class Outer:
    lr: float = 0.1
    name: str = "a"
    inner: Inner = field(default_factory=Inner)


def test_config_yaml_overrides_and_strict_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\ninner:\n  width: 8\n")
    cfg = load_config(Outer, path, ["name=b", "inner.channels=[1, 2]"])
    assert cfg == Outer(lr=0.001, name="b", inner=Inner(width=8, channels=[1, 2]))
    with pytest.raises(ConfigError, match="unknown config key inner.wdith .*valid keys: inner.channels, inner.width"):
        load_config(Outer, path, ["inner.wdith=3"])
    with pytest.raises(ConfigError, match="unknown config key lrr.*valid keys: inner, lr, name"):
        load_config(Outer, None, ["lrr=3"])
    with pytest.raises(ConfigError, match="lr must be float"):
        load_config(Outer, None, ["lr=fast"])
    assert load_config(Outer, None, ["name=no"]).name == "no"  # YAML 1.2 booleans: "no" stays a string
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(Outer, tmp_path / "resolved.yaml") == cfg


def test_a_run_folder_of_an_older_config_is_continued_only_when_the_settings_it_had_are_the_same(tmp_path):
    from core.runs import holds_other_config, same_config_or_fail

    cfg = Outer()
    assert not holds_other_config(tmp_path, cfg)  # no config written yet
    (tmp_path / "config.yaml").write_text("lr: 0.1\ninner:\n  width: 4\n")  # written before `name`, `channels` existed
    assert not holds_other_config(tmp_path, cfg)  # the keys added since read as their defaults
    same_config_or_fail(tmp_path, cfg)
    assert holds_other_config(tmp_path, Outer(lr=0.2))
    (tmp_path / "config.yaml").write_text("lr: 0.1\nretired: 3\n")  # a key removed since: another config
    with pytest.raises(FileExistsError, match="another config"):
        same_config_or_fail(tmp_path, cfg)


def test_step_batches_resume_exactly_and_shard_by_rank():
    full = list(StepBatchSampler(50, 8, seed=3, start=0, total=20))
    resumed = list(StepBatchSampler(50, 8, seed=3, start=12, total=20))
    assert resumed == full[12:]
    first_epoch = [i for b in full for i in b][:50]
    assert sorted(first_epoch) == list(range(50))  # an epoch sees every example once
    r0 = [i for b in StepBatchSampler(50, 5, 3, 0, 5, rank=0, world=2) for i in b]
    r1 = [i for b in StepBatchSampler(50, 5, 3, 0, 5, rank=1, world=2) for i in b]
    assert not set(r0) & set(r1) and len(set(r0 + r1)) == 50


def test_dataset_info_presets():
    assert dataset_info("imagenet").image_size == 224 and dataset_info("tiny-imagenet").num_classes == 200


def test_a_stage_built_from_other_inputs_is_neither_reused_nor_continued(tmp_path):
    from core.config import save_config
    from core.runs import run_stage
    from core.training import LoopConfig

    upstream = tmp_path / "teacher"
    upstream.mkdir()
    (upstream / "model.safetensors").write_bytes(b"weights v1")
    calls = []

    def train(cfg, out, resume):
        calls.append(resume)
        (out / "product").mkdir(parents=True)
        save_config(cfg, out / "config.yaml")
        (out / "train.json").write_text("{}")
        return out / "product"

    cfg = LoopConfig()
    for _ in range(2):
        run_stage(tmp_path / "student", cfg, train, "product", inputs={"teacher": upstream})
    assert calls == [False]  # the second call reused the finished stage
    (upstream / "model.safetensors").write_bytes(b"weights v2")
    with pytest.raises(FileExistsError, match="a stage made with another teacher"):
        run_stage(tmp_path / "student", cfg, train, "product", inputs={"teacher": upstream})


def test_one_process_can_make_accelerators_of_different_precisions():
    """The quickstart runs an fp32 stage, then a bf16 one, in one process (accelerate keeps a singleton)."""
    from core.runs import make_accelerator

    assert make_accelerator("no").mixed_precision == "no"
    assert make_accelerator("bf16").mixed_precision == "bf16"
    assert make_accelerator("no").mixed_precision == "no"


def test_derive_seed_is_one_function_of_its_parts():
    from core.seeding import derive_seed
    from eval.harness import item_seed

    assert derive_seed(0, "certify", 3) == derive_seed(0, "certify", 3)
    seeds = {derive_seed(s, what, i) for s in (0, 1) for what in ("certify", "predict", "probe") for i in range(50)}
    assert len(seeds) == 300  # every (run seed, purpose, index) its own stream
    assert item_seed(0, "pgd-eot/1", 2) == derive_seed(0, "pgd-eot/1", 2)  # the harness's items are the same function
    assert 0 <= derive_seed(2**40, "x") < 2**31
