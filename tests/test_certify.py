"""Randomized-smoothing certificates (Cohen et al., 2019) of classifier(purifier(.)): the statistics, the radius on
a classifier whose true radius is known, sigma from t_star, abstention, resume, bad input."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from core.errors import InputError
from eval.certify import (
    ABSTAIN,
    CertifyConfig,
    GaussianSmoothing,
    Smoothing,
    binom_test_p,
    certify,
    clopper_pearson_lower,
    purifier_sigma,
    run_certify,
    t_star_for_sigma,
)
from purify import ConsistencyStudent, DiffPure, VPSchedule

from .conftest import scheduler_config, tiny_unet


def test_clopper_pearson_and_the_binomial_test_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for k, n, alpha in [(990, 1000, 0.001), (60, 100, 0.05), (100_000, 100_000, 0.001), (1, 10, 0.01),
                        (51_234, 100_000, 0.001), (0, 50, 0.001)]:
        want = stats.beta.ppf(alpha, k, n - k + 1) if k > 0 else 0.0
        assert clopper_pearson_lower(k, n, alpha) == pytest.approx(want, abs=1e-9), (k, n)
    for a, b in [(60, 40), (500, 480), (7, 0), (3, 3)]:
        assert binom_test_p(a, b) == pytest.approx(stats.binomtest(max(a, b), a + b, 0.5).pvalue, rel=1e-9)


class Linear(nn.Module):
    """Two classes split by the hyperplane w.x + b = 0: the smoothed classifier's true L2 radius at x is exactly
    |w.x + b| / ||w|| (Cohen et al., Example 1)."""

    def __init__(self):
        super().__init__()
        self.w = torch.linspace(-1, 1, 16).view(1, 1, 4, 4)
        self.b = -0.1

    def forward(self, x):
        s = (x.double() * self.w).flatten(1).sum(1) + self.b
        return torch.stack([s, -s], 1)


def test_certified_radius_of_a_linear_classifier_stays_below_its_true_radius_and_approaches_it():
    clf = Linear()
    x = torch.rand(1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    true = abs((x * clf.w[0]).sum().item() + clf.b) / clf.w.norm().item()
    sigma = true / 1.5  # p_A = Phi(1.5): certifiable, not saturated
    radii = []
    for n in (1_000, 100_000):
        smooth = nn.Sequential(GaussianSmoothing(sigma, seed=1), clf)
        r = certify(smooth, x, sigma, Smoothing(n0=100, n=n, alpha=0.001, batch=50_000), 2)
        assert r["prediction"] != ABSTAIN
        radii.append(r["radius"])
    assert all(0 < r <= true for r in radii)
    assert true - radii[1] < (true - radii[0]) / 2 and radii[1] > 0.9 * true


def test_a_base_classifier_that_guesses_abstains():
    class Guess(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = torch.Generator().manual_seed(0)

        def forward(self, x):
            return torch.rand(len(x), 10, generator=self.g)

    r = certify(Guess(), torch.rand(1, 4, 4), 0.25, Smoothing(n0=100, n=2000, alpha=0.001), 10)
    assert r["prediction"] == ABSTAIN and r["radius"] == 0.0 and r["p_a_lower"] < 0.5


def _hand_alpha_bar(betas: np.ndarray, t_star: float) -> float:
    return float(np.prod(1 - betas[:round(t_star * len(betas))]))


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_sigma_from_t_star_against_a_hand_computation(schedule):
    T = 1000
    if schedule == "linear":
        betas = np.linspace(1e-4, 0.02, T)
    else:  # Nichol & Dhariwal's cosine schedule, betas capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
    p = DiffPure(tiny_unet(), scheduler_config(beta_schedule=schedule), t_star=0.1, steps=1)
    ab = _hand_alpha_bar(betas, 0.1)
    assert purifier_sigma(p) == pytest.approx(math.sqrt((1 - ab) / ab) / 2, rel=1e-5)
    sched = VPSchedule.from_scheduler_config(scheduler_config(beta_schedule=schedule))
    assert t_star_for_sigma(sched, purifier_sigma(p)) == pytest.approx(0.1, abs=1e-6)
    if schedule == "linear":
        assert purifier_sigma(p) == pytest.approx(0.1694, abs=5e-4)  # the figure the docs quote


@pytest.fixture
def folders(tmp_path):
    from core.checkpoint import save_classifier
    from core.models import ClassifierConfig, build_classifier

    cfg = ClassifierConfig(arch="convnet", in_channels=1, num_classes=10, image_size=16, width=4, depth=1,
                           mean=[0.5], std=[0.5])
    torch.manual_seed(0)
    save_classifier(build_classifier(cfg), tmp_path / "clf", cfg)
    ConsistencyStudent(tiny_unet(1, 16), scheduler_config(), 0.1, 1).save(tmp_path / "cd1")
    return tmp_path


def _cfg(folders, **kw):
    return CertifyConfig(**{"classifier": str(folders / "clf"), "examples": 4, "n0": 10, "n": 60, "batch": 32,
                            "defenses": [{"purifier": "none", "sigma": 0.17}, str(folders / "cd1")], **kw})


def test_a_killed_certification_resumes_to_the_same_records(folders):
    ref = run_certify(_cfg(folders), folders / "ref")
    log = folders / "ref" / "cd1" / "records.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + '\n{"index": 2, "lab')  # killed mid-write after two examples
    again = run_certify(_cfg(folders), folders / "ref")
    fresh = run_certify(_cfg(folders), folders / "fresh")
    keep = lambda r: {k: v for k, v in r.items() if k not in ("seconds_per_image", "draws_per_second")}  # noqa: E731
    for label in ("gaussian-0.17", "cd1"):
        assert keep(again["defenses"][label]) == keep(fresh["defenses"][label]) == keep(ref["defenses"][label])
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["index"] for r in recs) == [0, 1, 2, 3]
    assert (folders / "ref" / "report.md").is_file() and (folders / "ref" / "certified_vs_radius.png").is_file()
    assert abs(fresh["defenses"]["cd1"]["sigma"] - 0.1694) < 5e-4


def test_a_student_refuses_a_sigma_beyond_its_t_star_and_bad_settings_fail_before_work(folders):
    cfg = _cfg(folders)
    cfg.defenses = [{"purifier": str(folders / "cd1"), "sigma": 0.5}]
    with pytest.raises(InputError, match="beyond"):
        run_certify(cfg, folders / "o1")
    with pytest.raises(InputError, match="n0"):
        run_certify(_cfg(folders, n0=100), folders / "o2")
    with pytest.raises(InputError, match="alpha"):
        run_certify(_cfg(folders, alpha=1.5), folders / "o3")
    cfg = _cfg(folders)
    cfg.defenses = [{"purifier": str(folders / "cd1"), "t_max": 1}]
    with pytest.raises(InputError, match="unknown key"):
        run_certify(cfg, folders / "o4")
    cfg.defenses = [{"purifier": "none"}]
    with pytest.raises(InputError, match="sigma"):
        run_certify(cfg, folders / "o5")
    assert not any((folders / f"o{i}").exists() for i in range(1, 6))


def test_certify_command_reads_its_config_and_names_unknown_keys(folders, monkeypatch):
    from eval.__main__ import main

    with pytest.raises(SystemExit, match="n_draws"):
        main(["certify", "--config", "configs/digits/certify.yaml", "--out", str(folders / "c"), "n_draws=5"])
    main(["certify", "--config", "configs/digits/certify.yaml", "--out", str(folders / "c"),
          f"classifier={folders / 'clf'}", f"defenses=[{folders / 'cd1'}]", "examples=2", "n=20", "n0=5"])
    report = json.loads((folders / "c" / "report.json").read_text())
    assert report["defenses"]["cd1"]["examples"] == 2
