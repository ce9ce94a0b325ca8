"""The robust-distillation benchmarks' attacks and scores: BEARD's RR / AE / CREI against a row of its leaderboard,
ROME's I-RR by hand, DeepFool's distance on a linear model, attacks beside the threat model kept out of its figure."""

import pytest
import torch
import torch.nn as nn

from core.errors import InputError
from eval import evaluate
from eval.robustness.scores import bench_scores


def test_scores_reproduce_a_published_beard_row():
    """BACON, CIFAR-10 IPC 10, untargeted (BEARD's evaluation log and leaderboard: RR 28.24, AE 25.94, CREI 27.09)."""
    attacked = dict(zip(["fgsm", "pgd", "pgd-l2", "deepfool", "cw", "aa"], [33.27, 26.45, 44.05, 16.11, 11.84, 23.85]))
    times = dict(zip(attacked, [2.84, 8.29, 8.46, 2102.68, 73.91, 1086.94]))
    s = bench_scores(61.73, attacked, 2.29, times)
    assert s["rr"] == pytest.approx(28.24, abs=0.01)
    assert s["ae"] == pytest.approx(25.94, abs=0.01)
    assert s["crei"] == pytest.approx(27.09, abs=0.01)
    # I-RR = 1 - (clean - mean)(clean - min) / clean^2, by hand
    mean = sum(attacked.values()) / 6
    assert s["i_rr"] == pytest.approx(100 * (1 - (61.73 - mean) * (61.73 - 11.84) / 61.73 ** 2))
    with pytest.raises(InputError, match="two or more"):
        bench_scores(60.0, {"pgd": 10.0}, 1.0, {"pgd": 2.0})


class Linear(nn.Module):
    """Three classes on 1x2x2 inputs, logits w_k . x + b_k: the minimal L2 distance to the boundary is exact."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_deepfool_finds_the_linear_boundary_and_stays_beside_the_threat_model():
    x = torch.tensor([[0.8, 0.5, 0.4, 0.0], [0.3, 0.9, 0.6, 0.0]]).view(2, 1, 2, 2)
    y = torch.tensor([0, 1])
    # distance to the nearest other class k: (x_y - x_k) / ||w_y - w_k|| = gap / sqrt(2)
    nearest = torch.tensor([0.3, 0.3]) / 2 ** 0.5
    r = evaluate(Linear(), x, y, ["pgd", "deepfool", "cw-l2"], norm="Linf", eps=0.01, check_steps=False,
                 progress=None)
    d = r["attacks"]["deepfool"]
    assert d["average"] == 0.0  # unbounded: it always gets there
    assert d["median_l2"] == pytest.approx(1.02 * nearest.median().item(), rel=0.05)  # overshoot 0.02
    assert r["attacks"]["pgd"]["average"] == 1.0  # eps 0.01 is far below 0.21
    assert r["worst_over_attacks"] == 1.0  # the unbounded attacks are reported beside, not inside, the threat model
    assert set(r["beside_threat"]) == {"deepfool", "cw-l2"}
    from eval.robustness.escalate import _worst_all
    from eval.robustness.matched import on_examples

    assert _worst_all(r) == [True, True] and on_examples(r, [0, 1])["all attacks"]["worst"] == 1.0
    r = evaluate(Linear(), x, y, ["cw-l2"], norm="Linf", eps=0.01, check_steps=False, progress=None,
                 steps={"cw-l2": 1})  # one Adam step of 0.01 cannot cross 0.21: CW hands back the clean image
    assert r["attacks"]["cw-l2"]["average"] == 1.0
    assert r["attacks"]["cw-l2"]["median_l2"] == float("inf")  # not 0: it never got there


def test_an_attack_with_its_own_norm_takes_its_own_epsilon():
    x = torch.tensor([[0.8, 0.5, 0.4, 0.0]]).view(1, 1, 2, 2)
    y = torch.tensor([0])
    with pytest.raises(InputError, match="pgd-l2.*eps"):
        evaluate(Linear(), x, y, ["pgd", "pgd-l2"], norm="Linf", eps=0.01, progress=None)
    from eval.harness import Budget

    with pytest.raises(InputError, match="attack_eps is for attacks under another norm"):
        evaluate(Linear(), x, y, budget=Budget(attacks=["pgd"], attack_eps={"pgd": 0.5}), eps=0.01, progress=None)
    from eval.harness import Budget

    r = evaluate(Linear(), x, y, budget=Budget(attacks=["pgd", "pgd-l2"], attack_eps={"pgd-l2": 0.5}, check_steps=False),
                 norm="Linf", eps=0.01, progress=None)
    assert r["attacks"]["pgd"]["average"] == 1.0 and r["attacks"]["pgd-l2"]["average"] == 0.0  # 0.5 > 0.21
    assert "L2 eps 0.5" in r["budgets"]["pgd-l2"] and r["worst_over_attacks"] == 1.0


def test_robustness_command_prints_the_benchmark_scores_of_the_attacks_it_is_given(tmp_path):
    from core.checkpoint import save_classifier
    from core.models import ClassifierConfig, build_classifier
    from eval.harness import Budget
    from eval.robustness import EvalConfig, run_robustness

    cfg_c = ClassifierConfig(arch="convnet", in_channels=1, num_classes=10, image_size=16, width=4, depth=1,
                             mean=[0.5], std=[0.5])
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg_c), tmp_path / "clf", cfg_c)
    budget = Budget(attacks=["fgsm", "pgd", "deepfool"], n=8, steps={"pgd": 2, "deepfool": 3}, check_steps=False)
    with pytest.raises(InputError, match="does not run cw-l2"):
        run_robustness(EvalConfig(classifier=str(tmp_path / "clf"), defenses=["none"], budget=budget,
                                  scores=["pgd", "cw-l2"]), tmp_path / "bad")
    report = run_robustness(EvalConfig(classifier=str(tmp_path / "clf"), defenses=["none"], budget=budget,
                                       scores=["all"]), tmp_path / "ev")
    r = report["defenses"]["undefended"]
    accs = [100 * r["attacks"][a]["average"] for a in ("fgsm", "pgd", "deepfool")]
    assert r["scores"]["attacks"] == ["fgsm", "pgd", "deepfool"]
    assert r["scores"]["i_rr"] == pytest.approx(bench_scores(100 * r["clean"]["average"], dict(zip("abc", accs)), 1,
                                                             {"a": 2, "b": 3, "c": 4})["i_rr"])
    md = (tmp_path / "ev" / "report.md").read_text()
    assert "Benchmark scores" in md and "deepfool †" in md and "median L2" in md
