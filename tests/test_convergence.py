"""The convergence ladder: paired changes, the verdict, the ladder against direct evaluations, the report."""

import json

import pytest
import torch
import torch.nn as nn

from core.errors import InputError
from eval import Budget, Defended, evaluate
from eval.robustness.ladder import check_ladder, every_rung, run_ladder, verdict
from eval.stats import paired_change

from .conftest import digits_cnn
from .test_attacks import batch, cnn  # noqa: F401 -- fixtures
from .test_harness import Noise, _config, folders  # noqa: F401 -- the fixture


def test_paired_change_is_the_mean_difference_with_its_paired_standard_error():
    before = [1, 1, 1, 1, 0, 0, 1, 1]
    after = [0, 1, 0, 1, 0, 1, 1, 1]
    c = paired_change(before, after)  # differences -1, 0, -1, 0, 0, 1, 0, 0: mean -1/8, sample sd 0.6409
    assert c["change"] == pytest.approx(-0.125) and c["se"] == pytest.approx(0.6409 / 8 ** 0.5, abs=1e-4)
    assert (c["broken"], c["recovered"]) == (2, 1) and c["p"] == pytest.approx(0.5)  # P(>= 2 of 3 fair flips)


def _rows(*figures):
    return [{"steps": 10 * (i + 1), "eot": 1, "correct": c} for i, c in enumerate(figures)]


def test_robust_under_every_rung_counts_an_example_only_where_no_rung_broke_it():
    # each rung breaks an example the others leave (flips both ways): every rung alone leaves 4 of 5, only 2 of
    # 5 survive all three
    e = every_rung(_rows([1, 1, 1, 0, 1], [1, 0, 1, 1, 1], [1, 1, 0, 1, 1]))
    assert e["every_rung"] == pytest.approx(0.4)
    assert e["every_rung_se"] == pytest.approx((0.4 * 0.6 / 4) ** 0.5)  # as the harness's worst_se: n - 1


def test_verdict_names_the_smallest_rung_the_largest_does_not_lower_beyond_one_standard_error():
    n = 40
    low = [1] * 20 + [0] * 20
    assert verdict(_rows([1] * n, low, low))["converged"] == "20x1"  # 10 steps: 50 points above; 20: equal
    assert verdict(_rows([1] * n, [1] * 30 + [0] * 10, low))["converged"] is None  # the largest still helps
    one = verdict(_rows([1] * n, low[:-1] + [1], low))  # one example apart: within a standard error
    assert one["converged"] == "20x1" and one["against_largest"]["broken"] == 1
    # a rung within noise of the largest does not count when a larger one below the largest is not
    assert verdict(_rows(low, [1] * 30 + [0] * 10, low))["converged"] is None


@pytest.mark.parametrize("rungs", [[[10, 2]], [[10, 2], [5, 2]], [[10, 2], [20, 1]], [[10, 0], [20, 2]], "10x2"])
def test_a_ladder_that_does_not_grow_is_refused(rungs):
    with pytest.raises(InputError, match="ladder"):
        check_ladder(rungs)


def test_each_rung_is_the_harness_at_that_budget_on_the_same_examples(cnn, batch):  # noqa: F811
    x, y = batch[0][:8], batch[1][:8]
    model = Defended(Noise(), cnn)
    b = Budget(attacks=["pgd-eot"], evals=2, check_steps=False, batch_size=8)
    lad = run_ladder(model, x, y, "pgd-eot", [[1, 1], [3, 2]], b, eps=0.1)
    direct = evaluate(model, x, y, budget=b, steps={"pgd-eot": 3}, eot=2, eps=0.1, progress=None)
    top = lad["rungs"][1]
    assert top["worst"] == direct["attacks"]["pgd-eot"]["worst"]
    assert top["correct"] == [all(v) for v in direct["per_example"]["pgd-eot"]]
    assert top["vs_previous"]["change"] == pytest.approx(top["worst"] - lad["rungs"][0]["worst"])
    assert lad["examples"] == 8 and lad["evals"] == 2
    assert lad["every_rung"] == every_rung(lad["rungs"])["every_rung"]


def test_robustness_report_carries_each_defenses_ladder(folders, tmp_path):  # noqa: F811
    from eval.__main__ import main

    root, clf_dir = folders
    cfg = _config(root, clf_dir, budget={"ladder": [[1, 1], [2, 1], [4, 1]], "sweep_eps": []})
    main(["robustness", "--config", str(cfg), "--out", str(tmp_path / "rob")])
    report = json.loads((tmp_path / "rob" / "report.json").read_text())
    cm = report["defenses"]["cm"]["ladder"]
    assert cm["attack"] == "pgd-eot" and [r["steps"] for r in cm["rungs"]] == [1, 2, 4]
    assert report["defenses"]["undefended"]["ladder"]["attack"] == "pgd"
    md = (tmp_path / "rob" / "report.md").read_text()
    assert "## Convergence of the attacks" in md and "| 4 x 1 |" in md
    assert (f"Levels off at **{cm['converged']}**" if cm["converged"] else "**Does not level off**") in md
    assert cm["second"]["attack"] == "apgd-eot" and "Second optimizer: apgd-eot at 4 x 1" in md
    assert not cm["shown_converged"] and "fewer than 100" in " ".join(cm["not_shown_because"])
    assert "**Not shown converged**" in md
    assert f"Robust under every rung: {100 * cm['every_rung']:.1f} ± " in md
    assert [r["eot"] for r in report["defenses"]["undefended"]["ladder"]["rungs"]] == [1, 1, 1]  # no EOT there


def _result(worst_all: list, seed=0):
    n = len(worst_all)
    return {"stochastic": True, "seed": seed, "examples": n, "attacks": {"pgd-eot": {}},
            "worst_over_attacks": sum(worst_all) / n,
            "per_example": {"label": [0] * n, "clean": [[True, True]] * n, "pgd-eot": [[v, v] for v in worst_all]}}


def test_rows_above_a_reference_on_the_examples_both_saw_are_the_ones_escalated():
    from eval.robustness.escalate import above_references

    results = {"teacher": _result([True] * 4 + [False] * 4), "student": _result([True] * 6 + [False] * 2),
               "weak": _result([True] * 2 + [False] * 6)}
    assert above_references(results, ["teacher"], 8) == {"student": ["teacher"]}
    assert above_references(results, ["teacher", "weak"], 8) == {"student": ["teacher", "weak"]}
    other_seed = {"student": results["student"], "strong": _result([True] * 7 + [False], seed=1)}
    assert above_references(other_seed, ["strong"], 8) == {}  # another seed: whole rows, 75 below 87.5


def test_escalation_attacks_again_by_transfer_and_square_and_keeps_the_worst_case(cnn, batch):  # noqa: F811
    from eval.robustness.escalate import escalate

    x, y = batch[0][:8], batch[1][:8]
    model = Defended(Noise(), cnn)
    b = Budget(attacks=["pgd-eot"], evals=2, eot=2, steps={"pgd-eot": 2, "transfer": 2}, queries=20,
               check_steps=False, batch_size=8)
    base = evaluate(model, x, y, budget=b, eps=0.1, progress=None)
    source = Defended(Noise(), digits_cnn())
    crafted = []
    source.classifier.register_forward_hook(lambda m, i, o: crafted.append(len(i[0])))
    e = escalate(model, x, y, b, {"plain": source}, base, None, 0.02, eps=0.1)
    assert set(e["attacks"]) == {"transfer from plain", "square"}
    assert sum(crafted) >= 2 * 8 * 2 * 2  # R x examples x EOT x steps through the source: crafted there
    before = [all(all(v) for v in (c, a)) for c, a in zip(base["per_example"]["clean"], base["per_example"]["pgd-eot"])]
    assert e["before"] == sum(before) / 8
    assert e["flag"]["name"] == "escalation-beats-full-gradient" and "transfer from plain" in e["flag"]["detail"]


def test_escalate_must_name_a_purified_defense(folders, tmp_path):  # noqa: F811
    from eval.__main__ import main

    root, clf_dir = folders
    with pytest.raises(SystemExit, match="escalate names undefended"):
        main(["robustness", "--config", str(_config(root, clf_dir, escalate=["undefended"])), "--out",
              str(tmp_path / "x")])


class Trap(nn.Module):
    """A deterministic model whose margin along the mean perturbation s (in units of eps = 0.1) has a local maximum
    at s = 0.3, a valley beyond it and the fooling region past s = 0.8 (`monotone`: no trap, never fooled)."""

    def __init__(self, monotone: bool = False):
        super().__init__()
        self.monotone = monotone

    def forward(self, x):
        s = (x - 0.5).flatten(1).mean(1) / 0.1
        margin = -1 + 0.1 * s if self.monotone else (
            -1 + 0.6 * torch.exp(-((s - 0.3) / 0.1) ** 2) + 2 * torch.sigmoid((s - 0.8) / 0.03))
        return torch.stack([torch.zeros_like(margin), margin], 1)


@pytest.mark.parametrize("monotone", [False, True])
def test_a_ladder_is_shown_converged_only_where_a_second_optimizer_agrees(monotone):
    """Fixed-step PGD climbs to the trap at every rung and stays (the ladder levels off); APGD's schedule, whose
    first step is 2 eps, jumps the valley and breaks every example: not shown converged. Without the trap both
    optimizers agree, and a ladder reaching 100 steps is shown converged."""
    x, y = torch.full((16, 1, 4, 4), 0.5), torch.zeros(16, dtype=torch.long)
    b = Budget(attacks=["pgd-eot"], losses={"pgd-eot": "margin"}, check_steps=False, batch_size=16)
    lad = run_ladder(Trap(monotone), x, y, "pgd-eot", [[25, 1], [50, 1], [100, 1]], b, eps=0.1)
    assert lad["converged"] == "25x1" and lad["every_rung"] == 1.0  # one optimizer: it looks converged
    assert lad["second"]["attack"] == "apgd-eot"
    if monotone:
        assert lad["second"]["agrees"] and lad["shown_converged"] and lad["not_shown_because"] == []
    else:
        assert lad["second"]["worst"] == 0.0 and not lad["second"]["agrees"]
        assert not lad["shown_converged"] and "apgd-eot at the largest budget lowers it by 100.0" in \
            lad["not_shown_because"][0]
