"""Does the student keep the teacher's robustness: adaptive distillation inputs and the matched evaluation."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.consistency import ConsistencyConfig, consistency_loss
from distill.loop import AdversarialConfig, StudentBatch, adversarial_batch, classifier_term
from distill.progressive import progressive_loss
from purify import UNetDenoiser, VPSchedule

from .conftest import scheduler_config, tiny_unet


def _linear_classifier():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval().requires_grad_(False)


def test_adaptive_attack_follows_the_gradient_through_the_purifier():
    """purify flips the image: PGD on the bare classifier climbs the wrong way for the defense, the adaptive
    attack (through purify) raises the defense's loss."""
    clf = _linear_classifier()
    x = torch.rand(16, 1, 8, 8) * 2 - 1
    y = clf((x + 1) / 2).argmax(1)

    def purify(v, g):
        return -v

    def defended_loss(v):
        return F.cross_entropy(clf(((purify(v, None) + 1) / 2).clamp(0, 1)), y, reduction="none")

    losses = {}
    for attack in ("classifier", "adaptive"):
        cfg = AdversarialConfig(classifier="c", attack=attack, eps=0.1, steps=10, eot=2, fraction=1.0)
        x_adv, mask = adversarial_batch(x, y, clf, cfg, torch.Generator().manual_seed(0), purify)
        assert mask.all() and (x_adv - x).abs().max() <= 2 * 0.1 + 1e-5  # eps in [0, 1] pixels
        losses[attack] = defended_loss(x_adv).mean()
    assert losses["adaptive"] > defended_loss(x).mean() + 0.05
    assert losses["adaptive"] > losses["classifier"] + 0.05


def test_teacher_clean_target_is_the_clean_inputs_target_under_the_same_noise():
    """A student that ignores its input: its loss then depends on the target alone, so a batch whose target
    comes from the clean images scores exactly as the clean batch does."""
    sched = VPSchedule.from_scheduler_config(scheduler_config())
    teacher = UNetDenoiser(tiny_unet(), sched)
    const = nn.Parameter(torch.zeros(1, 1, 8, 8))

    def student(z, t):
        return const.expand_as(z)

    clean, adv = torch.rand(4, 1, 8, 8) * 2 - 1, torch.rand(4, 1, 8, 8) * 2 - 1
    y, mask = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    f = UNetDenoiser(tiny_unet(seed=1), sched)
    cfg = ConsistencyConfig()
    for loss in (lambda b, g: progressive_loss(student, teacher, b, 0.1, 2, g)[0],
                 lambda b, g: consistency_loss(student, f, teacher, b, cfg, 0.1, lambda p, q: (p - q).square(), g)[0]):
        with torch.no_grad():
            from_clean = loss(StudentBatch(adv, clean, clean, y, mask), torch.Generator().manual_seed(3))
            clean_batch = loss(StudentBatch(clean, clean, clean, y), torch.Generator().manual_seed(3))
            from_adv = loss(StudentBatch(adv, adv, clean, y, mask), torch.Generator().manual_seed(3))
        assert torch.allclose(from_clean, clean_batch) and not torch.allclose(from_adv, clean_batch)


def test_classifier_term_reaches_the_student_and_vanishes_where_it_should():
    clf = _linear_classifier()
    w = nn.Parameter(torch.ones(()))

    def purify(v, g):
        return w * v

    clean = torch.rand(6, 1, 8, 8) * 2 - 1
    y = clf((clean + 1) / 2).argmax(1)
    mask = torch.tensor([True, True, True, False, False, False])
    kl = AdversarialConfig(classifier="c", classifier_term="kl")
    same = StudentBatch(clean, clean, clean, y, mask)
    assert classifier_term(clf, purify, same, kl, None).abs() < 1e-6  # purify(x) = x on clean rows: no shift
    moved = StudentBatch(clean.flip(0), clean, clean, y, mask)
    term = classifier_term(clf, purify, moved, AdversarialConfig(classifier="c", classifier_term="ce"), None)
    term.backward()
    assert term > 0 and w.grad is not None and w.grad.abs() > 0
    none = AdversarialConfig(classifier="c")
    assert classifier_term(clf, purify, moved, none, None) is None


def test_teacher_training_logs_the_purified_accuracy_curve(tmp_path):
    import json

    from robust_data.__main__ import main as squeeze

    from .test_commands import teacher

    squeeze(["squeeze", "--out", str(tmp_path / "clf"), "epochs=0.2", "width=8"])
    teacher(tmp_path / "t", "train_steps=4", f"curve_classifier={tmp_path / 'clf' / 'classifier'}", "curve_every=2",
            "curve_n=16")
    curve = [json.loads(line) for line in (tmp_path / "t" / "curve.jsonl").read_text().splitlines()]
    assert [c["step"] for c in curve] == [2, 4]
    assert all(0 <= c["purified_accuracy"] <= 1 and c["examples"] == 16 for c in curve)


def test_curve_without_a_classifier_fails_before_training(tmp_path):
    import pytest

    from .test_commands import teacher

    with pytest.raises(SystemExit, match="curve_classifier"):
        teacher(tmp_path / "t", "train_steps=4", "curve_every=2")
    assert not (tmp_path / "t" / "log.jsonl").exists()


def test_the_smaller_seeded_draw_sits_inside_the_larger_one_where_subset_positions_says():
    from core.datasets import load_dataset, to_tensors
    from eval.robustness.matched import subset_positions

    ds = load_dataset("digits", "test")[0]
    for small, big, seed in ((16, 64, 0), (5, 359, 3), (32, 100, 7)):
        x_small, y_small = to_tensors(ds, small, seed)
        x_big, y_big = to_tensors(ds, big, seed)
        pos = subset_positions(len(ds), small, big, seed)
        assert torch.equal(x_big[pos], x_small) and torch.equal(y_big[pos], y_small)


def _result(attacks: dict, evals=2, examples=8, stochastic=True, per_example=None):
    return {"strength": {a: {"steps": s, "eot": e, "queries": 5000} for a, (s, e) in attacks.items()},
            "evals": evals, "examples": examples, "stochastic": stochastic, "seed": 0,
            "attacks": {a: {} for a in attacks}, "per_example": per_example}


def test_weaker_names_every_way_a_row_was_attacked_more_weakly():
    from eval.robustness.matched import weaker

    results = {"undefended": _result({"pgd": (10, 1)}, evals=1, stochastic=False),
               "student": _result({"pgd-eot": (20, 4), "bpda-eot": (20, 4)}),
               "same": _result({"pgd-eot": (20, 4), "bpda-eot": (20, 4)}),
               "teacher": _result({"bpda-eot": (5, 1)}, evals=1)}
    w = weaker(results)
    assert set(w) == {"teacher"}
    assert w["teacher"] == ["no pgd-eot", "bpda-eot 5 steps < 20", "bpda-eot EOT 1 < 4", "R 1 < 2"]


def test_rows_on_shared_examples_use_exactly_the_smaller_rows_images():
    from eval.robustness.matched import shared_examples

    # 6 test images, the big row saw all 6 (positions 0..5), the small one the first 3 of seed 0's permutation
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:3].sort().values.tolist()
    big = {k: [[i in perm] * 2 for i in range(6)] for k in ("label", "clean", "pgd-eot")}
    small = {k: [[True, True]] * 3 for k in ("label", "clean", "pgd-eot")}
    results = {"student": _result({"pgd-eot": (20, 4)}, examples=6, per_example=big),
               "teacher": _result({"pgd-eot": (20, 4)}, examples=3, per_example=small)}
    n, rows = shared_examples(results, total=6)
    assert n == 3
    assert rows["student"]["pgd-eot"]["average"] == 1.0 and rows["student"]["all attacks"]["worst"] == 1.0
    assert rows["teacher"]["clean"]["average_se"] == 0.0
