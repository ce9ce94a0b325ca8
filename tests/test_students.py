"""Distilled students: the progressive target, the consistency boundary, and tiny training runs."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.io import load_tensors
from distill.progressive import progressive_target
from purify import ConsistencyDenoiser, UNetDenoiser, VPSchedule, load_purifier
from purify.samplers import ddim_step, heun_step

from .conftest import scheduler_config, tiny_unet
from .test_commands import TINY_UNET


def test_one_ddim_step_with_the_progressive_target_lands_on_the_teachers_two_steps():
    sched = VPSchedule.from_scheduler_config(scheduler_config())
    teacher = UNetDenoiser(tiny_unet(), sched)
    z_t = torch.randn(4, 1, 8, 8)
    for t, t_mid, t_next in [(0.1, 0.075, 0.05), (0.05, 0.025, 0.0), (0.003, 0.002, 0.001)]:
        ab = {v: sched.alpha_bar(torch.tensor(v, dtype=torch.float64)).float() for v in (t, t_mid, t_next)}
        with torch.no_grad():
            z_mid = ddim_step(z_t, teacher(z_t, t), ab[t], ab[t_mid])
            z_next = ddim_step(z_mid, teacher(z_mid, t_mid), ab[t_mid], ab[t_next])
        x_tilde = progressive_target(z_t.double(), z_next.double(), ab[t].double(), ab[t_next].double())
        landed = ddim_step(z_t.double(), x_tilde, ab[t].double(), ab[t_next].double())
        assert torch.allclose(landed, z_next.double(), atol=1e-9), (t, (landed - z_next).abs().max())


@pytest.mark.parametrize("t_min", [0.0, 0.02])
def test_consistency_function_is_exactly_the_identity_at_t_min(t_min):
    sched = VPSchedule.from_scheduler_config(scheduler_config())
    f = ConsistencyDenoiser(UNetDenoiser(tiny_unet(), sched), t_min=t_min)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(f(x, t_min), x)
        assert not torch.allclose(f(x, t_min + 0.01), x)
        c_skip, c_out = f.scalings(torch.tensor([0.1]))
        assert c_skip < 1e-4 and c_out > 0.999  # far from t_min the network has taken over


def test_heun_equals_ddim_when_the_noise_prediction_is_constant():
    sched = VPSchedule.from_scheduler_config(scheduler_config())
    eps = torch.randn(2, 1, 8, 8)

    class ConstantEps:
        schedule = sched

        def __call__(self, x, t):
            ab = sched.alpha_bar(torch.as_tensor(t)).float().view(-1, 1, 1, 1)
            return (x - (1 - ab).sqrt() * eps) / ab.sqrt()

    x = torch.randn(2, 1, 8, 8)
    ab_t, ab_s = (sched.alpha_bar(torch.full((2,), v, dtype=torch.float64)).float().view(-1, 1, 1, 1) for v in (0.1, 0.05))
    d = ConstantEps()
    t, s = torch.full((2,), 0.1), torch.full((2,), 0.05)
    assert torch.allclose(heun_step(d, x, t, s, ab_t, ab_s), ddim_step(x, d(x, t), ab_t, ab_s), atol=1e-5)


def test_lpips_without_cached_weights_says_where_to_put_them(tmp_path, monkeypatch):
    from distill.distances import get_distance

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth.*distance=pseudo-huber"):
        get_distance("lpips")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    from distill.__main__ import main

    out = tmp_path_factory.mktemp("teacher")
    main(["teacher", "--out", str(out / "run"), *TINY_UNET, "train_steps=2"])
    return out / "run" / "purifier"


def distill(method, teacher_dir, out, *extra):
    from distill.__main__ import main

    main([method, "--config", f"configs/digits/{method}.yaml", "--teacher", str(teacher_dir), "--out", str(out),
          "batch_size=8", "log_every=1", *extra])


def test_tiny_progressive_run_leaves_a_student_per_round(teacher_dir, tmp_path):
    distill("progressive", teacher_dir, tmp_path / "pd", "start_steps=4", "steps_per_round=2", "checkpoint_every=1")
    for k in (2, 1):
        s = load_purifier(tmp_path / "pd" / "students" / f"steps-{k}")
        assert s.kind == "progressive" and s.nfe == k and s.t_star == 0.1
        assert s.x0_net.prediction_type == "epsilon"  # the teacher's: round 1 starts at its teacher
        assert s(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)
    rounds = [json.loads(line)["step"] for line in (tmp_path / "pd" / "log.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]


def test_tiny_consistency_run_leaves_1_2_4_step_students(teacher_dir, tmp_path):
    distill("consistency", teacher_dir, tmp_path / "cd", "train_steps=3", "solver=heun")
    for k in (1, 2, 4):
        s = load_purifier(tmp_path / "cd" / "students" / f"steps-{k}")
        assert s.kind == "consistency" and s.nfe == k
        assert s(torch.rand(2, 1, 16, 16)).shape == (2, 1, 16, 16)


def test_killed_consistency_run_resumes_to_the_same_weights(teacher_dir, tmp_path, monkeypatch):
    distill("consistency", teacher_dir, tmp_path / "whole", "train_steps=4", "checkpoint_every=2")
    import distill.consistency as C

    real, calls = C.ema_update, []

    def dies(*a, **kw):
        calls.append(1)
        if len(calls) == 5:  # two EMA updates per step: dies during step 3
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(C, "ema_update", dies)
    with pytest.raises(KeyboardInterrupt):
        distill("consistency", teacher_dir, tmp_path / "killed", "train_steps=4", "checkpoint_every=2")
    monkeypatch.setattr(C, "ema_update", real)
    distill("consistency", teacher_dir, tmp_path / "killed", "train_steps=4", "checkpoint_every=2", "--resume")
    for name in ("student", "ema", "target"):
        a = load_tensors(tmp_path / "whole" / "checkpoints" / "step-00000004" / f"{name}.safetensors")
        b = load_tensors(tmp_path / "killed" / "checkpoints" / "step-00000004" / f"{name}.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name


def test_killed_progressive_run_resumes_across_a_round(teacher_dir, tmp_path, monkeypatch):
    args = ("start_steps=4", "steps_per_round=2", "checkpoint_every=1")
    distill("progressive", teacher_dir, tmp_path / "whole", *args)
    import distill.progressive as P

    real, calls = P.ema_update, []

    def dies(*a, **kw):
        calls.append(1)
        if len(calls) == 4:  # during round 2's second step
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(P, "ema_update", dies)
    with pytest.raises(KeyboardInterrupt):
        distill("progressive", teacher_dir, tmp_path / "killed", *args)
    monkeypatch.setattr(P, "ema_update", real)
    distill("progressive", teacher_dir, tmp_path / "killed", *args, "--resume")
    a = load_tensors(tmp_path / "whole" / "students" / "steps-1" / "diffusion_pytorch_model.safetensors")
    b = load_tensors(tmp_path / "killed" / "students" / "steps-1" / "diffusion_pytorch_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def _spy_batches(monkeypatch):
    """Record every StudentBatch the consistency loss receives."""
    import distill.consistency as dc

    seen, real = [], dc.consistency_loss
    monkeypatch.setattr(dc, "consistency_loss", lambda *a, **k: (seen.append(a[3]), real(*a, **k))[1])
    return seen


def _assert_adversarial_rows(batches, fraction, eps):
    """Every batch's first `fraction` rows are perturbed within eps of the clean image; the rest are clean."""
    assert batches
    for b in batches:
        n = int(round(fraction * len(b.x)))
        assert b.adv is not None and b.adv.tolist() == [True] * n + [False] * (len(b.x) - n)
        delta = (b.x - b.clean).flatten(1).abs().amax(1) / 2  # [-1, 1] units back to [0, 1] pixels
        assert (delta[:n] > 0).all() and (delta[:n] <= eps + 1e-5).all() and (delta[n:] == 0).all()


def test_adversarial_distillation_trains_on_adversarial_rows(teacher_dir, tmp_path, monkeypatch):
    from robust_data.__main__ import main as squeeze

    squeeze(["squeeze", "--out", str(tmp_path / "clf"), "epochs=0.2", "width=8"])
    seen = _spy_batches(monkeypatch)
    distill("consistency", teacher_dir, tmp_path / "adv", "train_steps=2", "student_steps=[1]",
            f"adversarial.classifier={tmp_path / 'clf' / 'classifier'}", "adversarial.steps=2",
            "adversarial.target=clean", "adversarial.eps=0.1")
    _assert_adversarial_rows(seen, 0.5, 0.1)
    assert all(b.clean_target for b in seen)  # target "clean": the adversarial rows are pulled to the clean image
    s = load_purifier(tmp_path / "adv" / "students" / "steps-1")
    assert s.source["adversarial"]["attack"] == "classifier" and s.source["adversarial"]["target"] == "clean"


@pytest.mark.parametrize("method, extra", [("progressive", ["start_steps=2", "steps_per_round=2"]),
                                           ("consistency", ["train_steps=2", "student_steps=[1, 2]"])])
def test_adaptive_distillation_with_a_classifier_term_runs_and_says_so(teacher_dir, tmp_path, method, extra,
                                                                     monkeypatch):
    from robust_data.__main__ import main as squeeze

    squeeze(["squeeze", "--out", str(tmp_path / "clf"), "epochs=0.2", "width=8"])
    seen = _spy_batches(monkeypatch) if method == "consistency" else None
    distill(method, teacher_dir, tmp_path / "adv", *extra, f"adversarial.classifier={tmp_path / 'clf' / 'classifier'}",
            "adversarial.attack=adaptive", "adversarial.steps=2", "adversarial.eot=2",
            "adversarial.target=teacher-clean", "adversarial.classifier_term=kl")
    s = load_purifier(tmp_path / "adv" / "students" / "steps-1")
    assert s.source["adversarial"]["attack"] == "adaptive" and s.source["adversarial"]["classifier_term"] == "kl"
    logged = json.loads((tmp_path / "adv" / "log.jsonl").read_text().splitlines()[-1])
    # the KL between the classifier on the purified adversarial rows and on the clean ones: zero only if the
    # adversarial rows were never used (or were the clean images)
    assert "clf" in logged and logged["clf"] > 1e-6
    if seen is not None:
        _assert_adversarial_rows(seen, 0.5, 0.1)  # the adaptive attack's rows reach the loss


@pytest.mark.parametrize("bad, word", [("adversarial.attack=student", "attack"),
                                       ("adversarial.target=both", "target"),
                                       ("adversarial.classifier_term=mse", "classifier_term")])
def test_bad_adversarial_settings_fail_before_training(teacher_dir, tmp_path, bad, word):
    with pytest.raises(SystemExit, match=word):
        distill("consistency", teacher_dir, tmp_path / "bad", "train_steps=2", "adversarial.classifier=x", bad)
    assert not (tmp_path / "bad" / "log.jsonl").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method, extra", [("progressive", ["start_steps=2", "steps_per_round=2"]),
                                           ("consistency", ["train_steps=2", "student_steps=[1, 2]"])])
def test_two_process_runs_leave_loadable_students(teacher_dir, tmp_path, method, extra):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent))
    subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "distill", method,
                    "--config", f"configs/digits/{method}.yaml", "--teacher", str(teacher_dir),
                    "--out", str(tmp_path / "ddp"), "batch_size=8", *extra], check=True, timeout=300)
    assert json.loads((tmp_path / "ddp" / "train.json").read_text())["processes"] == 2
    assert load_purifier(tmp_path / "ddp" / "students" / "steps-1").nfe == 1


def test_compare_reports_students_against_the_teacher(teacher_dir, tmp_path):
    from eval.__main__ import main as eval_main
    from purify import ConsistencyStudent
    from robust_data.__main__ import main as squeeze

    squeeze(["squeeze", "--out", str(tmp_path / "clf"), "epochs=0.2", "width=8"])
    teacher = load_purifier(teacher_dir)
    ConsistencyStudent(teacher.unet, teacher.schedule.config, 0.1, 1).save(tmp_path / "cm1")
    eval_main(["compare", "--teacher", str(teacher_dir), "--student", str(tmp_path / "cm1"), "--classifier",
               str(tmp_path / "clf" / "classifier"), "--n", "16", "--batch-size", "8", "--out", str(tmp_path),
               "--baseline-steps", "1"])
    rows = json.loads((tmp_path / "compare.json").read_text())["rows"]
    assert [r["nfe"] for r in rows] == [0, 5, 5, 1, 1]
    assert 0 < rows[4]["psnr_vs_teacher_sde"] < 100 and rows[4]["speedup_vs_teacher"] > 0
    # an untrained consistency student on the teacher's weights is the teacher's one-step x0 prediction,
    # which at t_min = 0 with timestep_scaling 10 is the undistilled DDIM-1 baseline to within c_skip
    assert abs(rows[3]["psnr_vs_teacher_ode"] - rows[4]["psnr_vs_teacher_ode"]) < 1.0
    assert "| none |" in (tmp_path / "compare.md").read_text()


def test_defended_vote_averages_probabilities():
    from eval.defended import Defended

    class Flip(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Flip.calls += 1
            return x if Flip.calls % 2 else 1 - x

    clf = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    x = torch.rand(3, 1, 2, 2)
    voted = Defended(Flip(), clf, votes=2)(x).exp()
    expected = (clf(x).softmax(1) + clf(1 - x).softmax(1)) / 2
    assert torch.allclose(voted, expected, atol=1e-6)


def test_consistency_target_network_is_the_ema_of_the_student_at_target_ema(teacher_dir, tmp_path):
    """theta^- <- mu theta^- + (1 - mu) theta after every step, from the teacher's weights (Song et al., 2023):
    recomputed from the checkpoints of steps 1 and 2; the student itself or the evaluation EMA would fail it."""
    distill("consistency", teacher_dir, tmp_path / "cd", "train_steps=2", "student_steps=[1]", "checkpoint_every=1",
            "target_ema=0.9", "lr=0.01")
    ck = {s: tmp_path / "cd" / "checkpoints" / f"step-{s:08d}" for s in (1, 2)}
    w = {(s, m): load_tensors(ck[s] / f"{m}.safetensors") for s in (1, 2) for m in ("student", "target", "ema")}
    unet = load_purifier(teacher_dir).unet
    teacher, params = unet.state_dict(), dict(unet.named_parameters())
    for k in params:
        assert torch.allclose(w[1, "target"][k], 0.9 * teacher[k] + 0.1 * w[1, "student"][k], atol=1e-6), k
        assert torch.allclose(w[2, "target"][k], 0.9 * w[1, "target"][k] + 0.1 * w[2, "student"][k], atol=1e-6), k
    moved = [k for k in params if not torch.allclose(w[2, "student"][k], teacher[k])]
    assert moved  # the student trained, so the student, the target and the evaluation EMA all differ
    assert any(not torch.allclose(w[2, "target"][k], w[2, "student"][k], atol=1e-6) for k in moved)
    assert any(not torch.allclose(w[2, "target"][k], w[2, "ema"][k], atol=1e-6) for k in moved)


def test_a_unet_runs_channels_last_on_the_cpu_and_denoises_as_the_contiguous_one():
    import copy

    schedule = VPSchedule.from_scheduler_config(scheduler_config())
    unet = tiny_unet(1, 16)
    plain = copy.deepcopy(unet)
    x_t, t = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0)), torch.full((4,), 0.05)
    denoiser = UNetDenoiser(unet, schedule)
    with torch.inference_mode():  # converted on its first call, here under inference mode (certify, latency)
        x0 = denoiser(x_t, t).clone()
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the layout oneDNN runs fastest
    x_ = x_t.clone().requires_grad_(True)  # and its weights still take part in a gradient afterwards
    assert torch.autograd.grad(denoiser(x_, t).sum(), x_)[0].abs().sum() > 0
    with torch.no_grad():
        eps = plain(x_t, schedule.timestep(t)).sample  # the same weights, contiguous, called directly
    ab = schedule.alpha_bar(t).view(-1, 1, 1, 1)
    assert torch.allclose(x0, (x_t - (1 - ab).sqrt() * eps) / ab.sqrt(), atol=1e-5)
