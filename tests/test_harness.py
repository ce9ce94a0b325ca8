"""The attack harness: every attack by name, the gradient-masking alarms, R evaluations, EOT, resume, sharding,
the robustness command and the latency benchmark."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.datasets import load_dataset, to_tensors
from core.errors import InputError
from eval import Defended, evaluate
from eval.attacks import ATTACKS
from eval.harness import Budget
from purify import DiffPure, Purifier

from .conftest import digits_cnn, scheduler_config, tiny_unet

FEW = {"pgd": 10, "pgd-eot": 10, "bpda-eot": 10, "transfer": 10, "surrogate-eot": 10, "cw": 10, "autoattack": 5, "autoattack-rand": 5}


@pytest.fixture(scope="module")
def clf():
    return digits_cnn()


@pytest.fixture(scope="module")
def data():
    return to_tensors(load_dataset("digits", "test")[0], 32)


def near_identity_purifier(seed=0):
    """DiffPure with an untrained UNet at a tiny t_star: random, differentiable, close to the identity."""
    return DiffPure(tiny_unet(1, 16, seed), scheduler_config(), t_star=0.002, steps=2, seed=seed)


class Noise(Purifier):
    """x + 0.05 N(0, I); `frozen` ignores the seed, `global_rng` draws from torch's global generator."""

    def __init__(self, frozen=False, global_rng=False):
        super().__init__(1, (16, 16))
        self.frozen, self.global_rng = frozen, global_rng

    @property
    def nfe(self):
        return 1

    def purify(self, x, generator):
        if self.frozen:
            generator = torch.Generator().manual_seed(0)
        noise = torch.randn(x.shape) if self.global_rng else torch.randn(x.shape, generator=generator)
        return (x + 0.1 * noise).clamp(-1, 1)


def test_every_attack_by_name_leaves_robust_at_most_clean(clf, data):
    x, y = data
    bare = [a for a in ATTACKS if a not in ("bpda-eot", "transfer", "surrogate-eot")]
    r = evaluate(Defended(None, clf), x, y, bare, budget=Budget(attack_eps={"pgd-l2": 1.0}), eps=0.1, steps=FEW,
                 dataset="digits", queries=100,
                 sweep_eps=[0.05, 0.5], check_steps=False, progress=None)
    assert r["clean"]["average"] > 0.8
    assert set(r["attacks"]) == set(bare)
    for name, s in r["attacks"].items():
        assert s["average"] <= r["clean"]["average"], name
    assert r["attacks"]["pgd"]["average"] < 0.3  # PGD at the preset breaks the undefended classifier
    assert r["sweep"][-1]["accuracy"] == 0.0  # and at eps 0.5 nothing survives
    assert set(r["attacks"]["autoattack"]["broken_by"]) <= {"clean", "apgd-ce", "apgd-t", "fab-t", "square"}

    model = Defended(near_identity_purifier(), clf)
    r = evaluate(model, x, y, ["pgd-eot", "bpda-eot", "transfer", "surrogate-eot"], evals=1, eps=0.1, eot=2, steps=FEW,
                 transfer_source=Defended(near_identity_purifier(1), clf), check_steps=False, progress=None)
    for name, s in r["attacks"].items():
        assert s["average"] <= r["clean"]["average"], name
        assert s["average"] < 0.5, name  # a near-identity purifier adds no robustness


def test_gradient_masking_model_raises_the_square_flag(clf, data):
    x, y = data

    class Quantized(nn.Module):
        """round() inside: zero gradient almost everywhere, the textbook masked model."""

        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(torch.round(x * 3) / 3)

    honest = evaluate(Defended(None, clf), x, y, ["pgd", "square"], eps=0.2, steps={"pgd": 10}, queries=300,
                      check_steps=False, progress=None)
    masked = evaluate(Defended(None, Quantized(clf)), x, y, ["pgd", "square"], eps=0.2, steps={"pgd": 10},
                      queries=300, check_steps=False, progress=None)
    assert "square-beats-white-box" not in honest["raised"]
    assert "square-beats-white-box" in masked["raised"]
    flag = next(f for f in masked["flags"] if f["name"] == "square-beats-white-box")
    assert "masked" in flag["meaning"] and "square" in flag["detail"]


def test_frozen_or_global_noise_raises_the_randomness_flags(clf, data):
    x, y = data
    kw = dict(attacks=["pgd-eot"], eps=0.1, steps={"pgd-eot": 2}, eot=1, check_steps=False, progress=None)
    healthy = evaluate(Defended(Noise(), clf), x, y, **kw)
    frozen = evaluate(Defended(Noise(frozen=True), clf), x, y, **kw)
    glob = evaluate(Defended(Noise(global_rng=True), clf), x, y, **kw)
    assert not {"purifier-ignores-seed", "purifier-not-reproducible"} & set(healthy["raised"])
    assert "purifier-ignores-seed" in frozen["raised"]
    assert "purifier-not-reproducible" in glob["raised"]


def test_worst_case_counts_survival_of_every_evaluation_and_falls_below_the_average(clf, data):
    x, y = data
    r = evaluate(Defended(Noise(), clf), x, y, ["pgd-eot"], evals=3, eps=0.1, steps={"pgd-eot": 3}, eot=1,
                 check_steps=False, progress=None)
    assert r["evals"] == 3 and len(r["attacks"]["pgd-eot"]["per_eval"]) == 3
    per = torch.tensor(r["per_example"]["pgd-eot"])  # examples x R
    assert per.shape == (32, 3)
    s = r["attacks"]["pgd-eot"]
    assert s["worst"] == pytest.approx(per.all(1).float().mean().item())  # robust only if it survives all R
    assert s["average"] == pytest.approx(per.float().mean().item())
    assert s["per_eval"] == pytest.approx(per.float().mean(0).tolist())
    # the three evaluations really differ (fresh randomness each), so some example survives one and not another:
    # the worst case must then lie strictly below the average (a harness reporting one evaluation twice fails)
    assert len(set(map(tuple, per.T.tolist()))) > 1
    assert s["worst"] < s["average"]
    # (the worst-case and "all attacks" formulas are checked on a hand-made matrix in test_right_numbers)


def _strip_timing(report):
    report = json.loads(json.dumps(report))
    report.pop("seconds", None)
    return report


def test_interrupted_evaluation_resumes_to_the_identical_report(clf, data, tmp_path):
    x, y = data
    kw = dict(attacks=["pgd", "pgd-eot"], evals=2, eps=0.1, steps={"pgd": 3, "pgd-eot": 3}, eot=2,
              batch_size=8, sweep_eps=[0.05, 0.2], sweep_n=16, check_n=8, progress=None)
    full = evaluate(Defended(Noise(), clf), x, y, out=tmp_path / "a", **kw)
    lines = (tmp_path / "a" / "examples.jsonl").read_text().splitlines()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "examples.jsonl").write_text("\n".join(lines[:len(lines) // 2]) + '\n{"key": "pg')  # torn
    calls = []
    purifier = Noise()
    purifier.register_forward_hook(lambda *a: calls.append(1))
    resumed = evaluate(Defended(purifier, clf), x, y, out=tmp_path / "b", **kw)
    assert _strip_timing(resumed) == _strip_timing(full)
    fresh_calls = []
    purifier = Noise()
    purifier.register_forward_hook(lambda *a: fresh_calls.append(1))
    evaluate(Defended(purifier, clf), x, y, **kw)
    assert len(calls) < len(fresh_calls)  # only the missing half was recomputed


def test_bad_requests_fail_before_any_work(clf, data):
    x, y = data
    model = Defended(None, clf)
    with pytest.raises(ValueError, match="unknown attack 'pgd100'.*known: pgd"):
        evaluate(model, x, y, ["pgd100"], eps=0.1)
    with pytest.raises(ValueError, match="mim is an Linf attack"):
        evaluate(model, x, y, ["mim"], norm="L2", eps=1.0)
    with pytest.raises(ValueError, match="transfer_source"):
        evaluate(model, x, y, ["transfer"], eps=0.1)
    with pytest.raises(ValueError, match="no epsilon preset"):
        evaluate(model, x, y, ["pgd"], dataset="mnist")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        evaluate(model, x * 255, y, ["pgd"], eps=0.1)
    with pytest.raises(ValueError, match="cw takes no loss 'dlr'.*choice of loss: pgd-eot"):
        evaluate(model, x, y, ["cw"], eps=0.1, losses={"cw": "dlr"})
    with pytest.raises(ValueError, match="pgd-eot takes no loss 'hinge'; it takes ce, margin, dlr"):
        evaluate(model, x, y, ["pgd-eot"], eps=0.1, losses={"pgd-eot": "hinge"})
    with pytest.raises(ValueError, match="eot_batch must be at least 1"):
        evaluate(model, x, y, ["pgd-eot"], eps=0.1, eot_batch=0)


def test_l2_attacks_stay_inside_the_ball(clf, data):
    from eval.attacks import build_attack

    x, y = data
    for name in ("pgd", "pgd-eot", "cw", "square"):
        attack = build_attack(name, clf, "L2", 1.0, n_classes=10, steps=5, queries=50)
        adv = attack(x, y)
        assert (adv - x).flatten(1).norm(dim=1).max() <= 1.0 + 1e-4, name
        assert adv.min() >= 0 and adv.max() <= 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A trained classifier folder and two purifier folders, as the commands expect."""
    from core.config import replace
    from purify import ConsistencyStudent
    from robust_data.squeeze import SqueezeConfig, train_squeeze

    root = tmp_path_factory.mktemp("folders")
    clf_dir = train_squeeze(replace(SqueezeConfig(), {"epochs": 1.0, "width": 8}), root / "squeeze")
    near_identity_purifier().save(root / "teacher")
    ConsistencyStudent(tiny_unet(1, 16), scheduler_config(), 0.002, 1).save(root / "student")
    return root, clf_dir


def _config(root, clf_dir, **extra):
    budget = {"attacks": ["pgd", "pgd-eot", "bpda-eot"], "n": 16, "evals": 2, "eot": 1, "batch_size": 8,
              "steps": {"pgd": 2, "pgd-eot": 2, "bpda-eot": 2}, "sweep_eps": [0.1, 0.5], "sweep_n": 8, "check_n": 8}
    budget.update(extra.pop("budget", {}))
    cfg = {"classifier": str(clf_dir), "defenses": ["none", str(root / "teacher"),
                                                    {"purifier": str(root / "student"), "label": "cm", "n": 8}],
           "budget": budget, **extra}
    path = root / f"eval-{len(extra)}.yaml"
    path.write_text(json.dumps(cfg))
    return path


def test_robustness_command_writes_report_plots_and_per_example_records(folders, tmp_path, capsys):
    from eval.__main__ import main

    root, clf_dir = folders
    main(["robustness", "--config", str(_config(root, clf_dir)), "--out", str(tmp_path / "rob")])
    report = json.loads((tmp_path / "rob" / "report.json").read_text())
    assert list(report["defenses"]) == ["undefended", "diffpure-2", "cm"]
    und, cm = report["defenses"]["undefended"], report["defenses"]["cm"]
    assert und["evals"] == 1 and "bpda-eot" in und["skipped"] and cm["evals"] == 2 and cm["examples"] == 8
    assert cm["nfe"] == 1 and len(cm["per_example"]["bpda-eot"]) == 8
    md = (tmp_path / "rob" / "report.md").read_text()
    assert "| cm | 1 | 2 | 8 |" in md and "Gradient-masking checks" in md and "skipped" in md
    for f in ["robust_vs_eps.png", "undefended/grid.png", "cm/grid.png", "cm/examples.jsonl", "config.yaml"]:
        assert (tmp_path / "rob" / f).is_file(), f
    # rerunning the same config finds every item done and writes the same numbers
    main(["robustness", "--config", str(_config(root, clf_dir)), "--out", str(tmp_path / "rob")])
    again = json.loads((tmp_path / "rob" / "report.json").read_text())
    assert again["defenses"]["cm"]["attacks"] == cm["attacks"]


@pytest.mark.parametrize("extra, message", [
    ({"budget": {"attacks": ["pgd", "elasticnet"]}}, "unknown attack 'elasticnet'"),
    ({"defenses": [{"purifier": "none", "nn": 3}]}, "unknown key.*nn"),
    ({"defenses": ["no/such/folder"]}, "purifier folder no/such/folder does not exist"),
    ({"budget": {"attacks": ["transfer"]}}, "transfer_from"),
    ({"grad_checkpoint": "yes"}, "grad_checkpoint"),
])
def test_robustness_command_names_the_problem(folders, tmp_path, capsys, extra, message):
    from eval.__main__ import main

    root, clf_dir = folders
    with pytest.raises(SystemExit) as e:
        main(["robustness", "--config", str(_config(root, clf_dir, **extra)), "--out", str(tmp_path / "x")])
    assert re.search(message, str(e.value))
    assert not (tmp_path / "x").exists()


def test_latency_benchmark_measures_each_variant_beside_the_plain_one(folders, tmp_path, capsys):
    from eval.__main__ import main

    root, clf_dir = folders
    main(["latency", "--purifier", str(root / "teacher"), "--purifier", str(root / "student"), "--classifier",
          str(clf_dir), "--batch-size", "1", "--batch-size", "4", "--warmup", "1", "--repeats", "3",
          "--channels-last", "--out", str(tmp_path / "lat")])
    lat = json.loads((tmp_path / "lat" / "latency.json").read_text())
    rows = lat["rows"]
    assert len(rows) == 2 * 2 * 2 * 2  # variants x purifiers x batch sizes x (alone, with classifier)
    assert {r["variant"] for r in rows} == {"plain", "channels-last"}
    assert {(r["purifier"], r["nfe"]) for r in rows} == {("diffpure-2", 2), ("consistency-1", 1)}
    for r in rows:
        assert r["median_s"] > 0 and r["p90_s"] >= r["median_s"]
        assert r["images_per_s"] == pytest.approx(r["batch_size"] / r["median_s"])
        if r["purifier"] == "diffpure-2":
            assert r["speedup"] == 1.0
    assert all(r["vs_plain"] == 1.0 for r in rows if r["variant"] == "plain")
    assert "| plain | consistency-1 | yes | 4 | 1 |" in (tmp_path / "lat" / "latency.md").read_text()


def test_latency_times_the_attack_gradient_beside_the_forward_pass(folders, tmp_path):
    from eval.__main__ import main

    root, clf_dir = folders
    with pytest.raises(SystemExit, match="needs --classifier"):
        main(["latency", "--purifier", str(root / "student"), "--gradient-eot", "2", "--repeats", "1"])
    main(["latency", "--purifier", str(root / "student"), "--classifier", str(clf_dir), "--batch-size", "4",
          "--warmup", "0", "--repeats", "2", "--gradient-eot", "2", "--out", str(tmp_path / "g")])
    rows = json.loads((tmp_path / "g" / "latency.json").read_text())["rows"]
    grad = [r for r in rows if r["variant"] == "gradient-eot2"]
    forward = next(r for r in rows if r["variant"] == "plain" and r["with_classifier"])
    assert len(grad) == 1 and grad[0]["median_s"] > 0 and forward["median_s"] > 0
    assert grad[0]["forward_eot_s"] > 0 and grad[0]["checkpoint_share"] == 0.0  # a 1-step student: nothing recomputed
    md = (tmp_path / "g" / "latency.md").read_text()
    assert "gradient / forward of the copies" in md and "| consistency-1 | 4 | 2 | 0% |" in md


@pytest.mark.slow
def test_robustness_sharded_over_two_processes_gives_the_single_process_report(folders, tmp_path):
    root, clf_dir = folders
    cfg = _config(root, clf_dir)
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "eval", "robustness", "--config",
                    str(cfg), "--out", str(tmp_path / "ddp")], check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "eval", "robustness", "--config", str(cfg), "--out",
                    str(tmp_path / "one")], check=True, timeout=600)
    ddp = json.loads((tmp_path / "ddp" / "report.json").read_text())["defenses"]
    one = json.loads((tmp_path / "one" / "report.json").read_text())["defenses"]
    for label in one:
        assert _strip_timing(ddp[label]) == _strip_timing(one[label]), label


def test_attacks_leave_a_batchnorm_classifier_and_the_purifier_untouched(data):
    torch.manual_seed(0)
    bn_clf = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                           nn.Linear(4 * 256, 10))
    purifier = near_identity_purifier()
    before = {k: v.clone() for k, v in Defended(purifier, bn_clf).state_dict().items()}
    x, y = data
    model = Defended(purifier, bn_clf)
    evaluate(model, x, y, ["pgd", "bpda-eot", "pgd-eot", "square"], evals=2, eps=0.1, eot=1, queries=20,
             steps={"pgd": 2, "bpda-eot": 2, "pgd-eot": 2}, check_steps=False, progress=None)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics included
    assert not any(m.training for m in model.modules())


def test_records_of_another_evaluation_are_never_mixed_in(clf, data, tmp_path):
    x, y = data
    kw = dict(attacks=["pgd"], steps={"pgd": 2}, check_steps=False, progress=None, out=tmp_path / "r")
    evaluate(Defended(None, clf), x, y, eps=0.1, **kw)
    with pytest.raises(FileExistsError, match="attack records made with another eps"):
        evaluate(Defended(None, clf), x, y, eps=0.2, **kw)


def test_full_gradient_attacks_checkpoint_long_purifiers_only_when_memory_asks_and_only_while_they_run(
        clf, data, monkeypatch):
    import eval.harness.memory as memory

    x, y = data[0][:8], data[1][:8]
    purifier = DiffPure(tiny_unet(1, 16), scheduler_config(), t_star=0.002, steps=10)
    seen = []
    purifier.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(),
                                                                 m.x0_net.grad_checkpoint)))
    kw = dict(eps=0.1, eot=1, steps={"pgd-eot": 1, "bpda-eot": 1}, check_steps=False, progress=None)
    plenty = evaluate(Defended(purifier, clf), x, y, ["pgd-eot", "bpda-eot"], **kw)
    assert not any(ckpt for _, ckpt in seen)  # a small graph: kept whole, no second forward pass
    seen.clear()
    monkeypatch.setattr(memory, "available_bytes", lambda x: 1000)  # a machine that cannot hold it
    scarce = evaluate(Defended(purifier, clf), x, y, ["pgd-eot", "bpda-eot"], **kw)
    assert (True, True) in seen  # pgd-eot: gradients through the 10 steps, checkpointed
    assert purifier.x0_net.grad_checkpoint is False  # and only while the attack runs
    # the same numbers either way: checkpointing changes no gradient, and sizing the graph draws no noise
    assert plenty["per_example"] == scarce["per_example"]


def test_checkpointed_gradient_through_the_purifier_equals_the_plain_one(clf, data, monkeypatch):
    import purify.denoisers as denoisers

    recomputed = []
    plain_checkpoint = denoisers.checkpoint
    monkeypatch.setattr(denoisers, "checkpoint", lambda *a, **k: recomputed.append(1) or plain_checkpoint(*a, **k))
    x, y = data[0][:4], data[1][:4]
    purifier = DiffPure(tiny_unet(1, 16), scheduler_config(), t_star=0.05, steps=4)
    grads, calls = [], []
    for on in (False, True, 0.5):
        recomputed.clear()
        purifier.set_grad_checkpoint(on).manual_seed(3)
        x_ = x.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(clf(purifier(x_)), y), x_)[0])
        calls.append(len(recomputed))
    assert calls == [0, 4, 2]  # none, every UNet call, every other one
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)
    assert torch.allclose(grads[0], grads[2], atol=1e-6)
    with pytest.raises(InputError, match="grad_checkpoint"):
        purifier.set_grad_checkpoint(1.5)


def test_graph_bytes_counts_each_saved_activation_once_and_no_weights():
    from eval.harness.memory import graph_bytes

    class Toy(nn.Module):  # conv saves its input and its weight; h * h saves h twice
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            h = self.conv(x)
            return h * h

    x1 = torch.rand(1, 1, 16, 16)
    # the input and h once each: a weight does not grow with the batch, a tensor saved twice is held once
    assert graph_bytes(Toy(), x1) == (1 + 4) * 16 * 16 * 4


def test_available_memory_is_the_tightest_limit_shared_by_the_local_processes(monkeypatch):
    import eval.harness.memory as memory

    monkeypatch.setattr(memory, "_meminfo_available", lambda: 10 * 2**30)
    monkeypatch.setattr(memory, "_cgroup_available", lambda: None)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert memory.available_bytes(torch.zeros(1)) == 10 * 2**30
    monkeypatch.setattr(memory, "_cgroup_available", lambda: 2 * 2**30)  # a container's limit below the host's RAM
    assert memory.available_bytes(torch.zeros(1)) == 2 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine plan for half each
    assert memory.available_bytes(torch.zeros(1)) == 2**30


def test_auto_checkpoints_the_share_of_steps_that_memory_asks_for(clf, data, monkeypatch):
    import eval.harness.memory as memory
    from eval.harness.memory import graph_bytes

    x, y = data[0][:8], data[1][:8]
    purifier = DiffPure(tiny_unet(1, 16), scheduler_config(), t_star=0.002, steps=10)
    need = graph_bytes(purifier, x[:1]) * 8 * 2  # 8 images, two EOT copies
    shares = []
    purifier.register_forward_hook(lambda m, i, o: shares.append(float(m.x0_net.grad_checkpoint))
                                   if torch.is_grad_enabled() and len(i[0]) == 16 else None)
    monkeypatch.setattr(memory, "available_bytes", lambda x: need)  # half of it fits: half the calls recomputed
    evaluate(Defended(purifier, clf), x, y, ["pgd-eot"], eps=0.1, eot=2, steps={"pgd-eot": 1}, check_steps=False,
             progress=None)
    assert shares and set(shares) == {0.5}


