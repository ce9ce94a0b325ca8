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
    certify,
    predict,
    purifier_sigma,
    run_certify,
    t_star_for_sigma,
)
from eval.stats import binom_test_p, clopper_pearson_lower
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
    log = folders / "ref" / "consistency-1" / "records.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:2]) + '\n{"index": 2, "lab')  # killed mid-write after two examples
    again = run_certify(_cfg(folders), folders / "ref")
    fresh = run_certify(_cfg(folders), folders / "fresh")
    timed = ("seconds_per_image", "draws_per_second", "batch_draws_per_second", "batch_rate_same_session")
    keep = lambda r: {k: v for k, v in r.items() if k not in timed}  # noqa: E731
    for label in ("gaussian-0.17", "consistency-1"):  # a purifier row is named by its kind and NFE
        assert keep(again["defenses"][label]) == keep(fresh["defenses"][label]) == keep(ref["defenses"][label])
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert sorted(r["index"] for r in recs) == [0, 1, 2, 3]
    assert (folders / "ref" / "report.md").is_file() and (folders / "ref" / "certified_vs_radius.png").is_file()
    assert abs(fresh["defenses"]["consistency-1"]["sigma"] - 0.1694) < 5e-4
    # the batch rate beside draws / s is the one timed when the records were certified, not re-timed on resume;
    # records of two sessions (a killed run resumed) are marked as not comparable
    done = run_certify(_cfg(folders), folders / "fresh")
    assert done["defenses"]["consistency-1"]["batch_draws_per_second"] == fresh["defenses"]["consistency-1"][
        "batch_draws_per_second"]
    assert done["defenses"]["consistency-1"]["batch_rate_same_session"]
    assert not again["defenses"]["consistency-1"]["batch_rate_same_session"]
    assert "% †" in (folders / "ref" / "report.md").read_text()
    assert "% †" not in (folders / "fresh" / "report.md").read_text()
    # a row added to the finished run: the others' certificates are reused as they are, the new one certified
    before = (folders / "fresh" / "consistency-1" / "records.jsonl").read_text()
    more = run_certify(_cfg(folders, defenses=[*_cfg(folders).defenses, {"purifier": "none", "sigma": 0.3}]),
                       folders / "fresh")
    assert (folders / "fresh" / "consistency-1" / "records.jsonl").read_text() == before
    assert list(more["defenses"]) == ["gaussian-0.17", "consistency-1", "gaussian-0.3"]
    assert keep(more["defenses"]["consistency-1"]) == keep(fresh["defenses"]["consistency-1"])


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
          f"classifier={folders / 'clf'}", f"defenses=[{folders / 'cd1'}]", "examples=2", "n=20", "n0=5", "attack_n=20"])
    report = json.loads((folders / "c" / "report.json").read_text())
    assert report["defenses"]["consistency-1"]["examples"] == 2
    assert report["defenses"]["consistency-1"]["batch_draws_per_second"] > 0


def test_noise_augmented_training_feeds_the_objective_x_plus_sigma_eps(tmp_path, monkeypatch):
    """Cohen's base classifier is trained on x + sigma eps: the objective must see exactly that noise (unclamped),
    and none when noise_sd is 0."""
    import robust_data.squeeze as sq

    x = torch.rand(256, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    cfg = sq.SqueezeConfig(crop_padding=0, noise_sd=0.25)
    noisy = sq.training_inputs(x, cfg, g)
    assert (noisy - x).std().item() == pytest.approx(0.25, rel=0.02) and abs((noisy - x).mean().item()) < 0.005
    assert noisy.min() < 0 and noisy.max() > 1  # not clamped: the certificate smooths x + sigma eps as it is
    assert torch.equal(sq.training_inputs(x, sq.SqueezeConfig(crop_padding=0), g), x)

    seen = []

    def spy(model, x, y, label_smoothing=0.0):
        seen.append(x.detach().clone())
        from robust_data.objectives import cross_entropy

        return cross_entropy(model, x, y)

    monkeypatch.setattr(sq, "get_objective", lambda name, cfg=None: spy)
    folder = sq.train_squeeze(sq.SqueezeConfig(epochs=0.1, batch_size=64, crop_padding=0, noise_sd=0.5, width=8),
                           tmp_path / "run")
    assert seen and all(s.min() < -0.5 and s.max() > 1.5 for s in seen)  # pixels in [0, 1] + N(0, 0.5^2)
    assert json.loads((folder / "meta.json").read_text())["noise_sd"] == 0.5
    with pytest.raises(InputError, match="noise_sd must be >= 0"):
        sq.train_squeeze(sq.SqueezeConfig(noise_sd=-0.1), tmp_path / "bad")


def test_the_attack_on_a_smoothed_linear_classifier_stops_at_its_true_radius_and_flags_a_false_certificate():
    """Gaussian smoothing keeps a linear classifier's boundary, so the smoothed classifier's true L2 radius is the
    distance d to it: L2 PGD on the soft vote at radius 0.3 must flip the points with d < 0.3 and not the others;
    certificates below d raise nothing, certificates beyond d are contradicted and flagged."""
    from eval.certify.attack import SmoothedAttack, attack_smoothed, compare
    from eval.defended import Defended

    clf = Linear()
    w = clf.w / clf.w.norm()
    offset = -clf.b / clf.w.norm().item()  # the boundary's signed offset along w from the grey image
    d = torch.tensor([0.1, -0.2, 0.45, -0.6], dtype=torch.float64)  # signed distances to the boundary
    x = (0.5 + (offset + d).view(-1, 1, 1, 1) * w).float()
    y = (d < 0).long()  # class 0 where w.x + b > 0
    model = Defended(GaussianSmoothing(0.1, seed=0), clf)
    a = SmoothedAttack(steps=30, votes=8, judge=Smoothing(1, 1000, 0.001))
    adv = attack_smoothed(model, x, y, 0.3, a, seed=0)
    assert ((adv - x).flatten(1).norm(dim=1) <= 0.3 + 1e-5).all()
    preds = [predict(model, xa, Smoothing(1, 1000, 0.001, 1000), 2) for xa in adv]
    assert preds[0] == 1 - int(y[0]) and preds[1] == 1 - int(y[1])  # d < 0.3: across the boundary
    assert preds[2] == int(y[2]) and preds[3] == int(y[3])  # d > 0.3: out of reach
    attacked = {"0.3": dict(enumerate(preds))}
    honest = [{"index": i, "label": int(y[i]), "prediction": int(y[i]), "radius": 0.9 * abs(float(d[i]))}
              for i in range(4)]
    c = compare(honest, attacked, 0.001, [0.3])["0.3"]
    assert c["attacked_accuracy"] == 0.5 and c["certified_accuracy"] == 0.5 and not c["flag"]
    inflated = [{**r, "radius": 1.0} for r in honest]
    c = compare(inflated, attacked, 0.001, [0.3])["0.3"]
    assert c["contradictions"] == [0, 1] and c["flag"]


def test_certify_with_the_attack_resumes_and_reports_it(folders):
    from core.checkpoint import save_classifier
    from core.datasets import load_dataset, to_tensors
    from core.models import ClassifierConfig, build_classifier

    # a classifier that is right on the most common label of the 10 examples, whatever its input: certified
    _, y = to_tensors(load_dataset("digits", "test")[0], 10, seed=0)
    ccfg = ClassifierConfig(arch="convnet", in_channels=1, num_classes=10, image_size=16, width=4, depth=1,
                            mean=[0.5], std=[0.5])
    clf = build_classifier(ccfg)
    last = [m for m in clf.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(1e-3), last.bias.zero_()
        last.bias[int(y.mode().values)] = 5.0
    save_classifier(clf, folders / "clf", ccfg)
    cfg = _cfg(folders, examples=10, radii=[0.0, 0.02, 0.05], attack_steps=2, attack_votes=2, attack_n=40)
    cfg.defenses = [{"purifier": "none", "sigma": 0.17}]
    first = run_certify(cfg, folders / "a")
    row = first["defenses"]["gaussian-0.17"]
    records = [json.loads(x) for x in (folders / "a" / "gaussian-0.17" / "records.jsonl").read_text().splitlines()]
    certified_at = {f"{r:g}" for r in (0.02, 0.05)
                    if any(rec["prediction"] == rec["label"] and rec["radius"] >= r for rec in records)}
    assert certified_at and set(row["attack"]) == certified_at  # attacked exactly where a certificate exists
    assert "The attack beside the certificate" in (folders / "a" / "report.md").read_text()
    (folders / "a" / "gaussian-0.17" / "attack" / f"r-{max(certified_at)}.json").unlink()  # killed before the last
    assert run_certify(cfg, folders / "a")["defenses"]["gaussian-0.17"]["attack"] == row["attack"]
    # killed mid-radius: a batch logged as finished (by any process) is kept, not attacked again; one logged in
    # part is attacked again; the logs go once the radius is done
    key, attack = max(certified_at), folders / "a" / "gaussian-0.17" / "attack"
    ok = [rec for rec in records if rec["prediction"] == rec["label"]]
    wrong = [{"index": rec["index"], "prediction": (rec["label"] + 1) % 10} for rec in ok]  # no attack gives these
    for logged, expect in ((wrong[:1], row["attack"][key]["attacked_accuracy"]), (wrong, 0.0)):
        (attack / f"r-{key}.json").unlink()
        (attack / f"r-{key}.part-3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
        resumed = run_certify(cfg, folders / "a")["defenses"]["gaussian-0.17"]["attack"][key]
        assert resumed["attacked_accuracy"] == expect and not list(attack.glob("*.part-*.jsonl"))
    assert resumed["flag"] and len(resumed["contradictions"]) == round(resumed["certified_accuracy"] * 10)
    with pytest.raises(FileExistsError, match="another config"):  # other attack settings: never mixed in
        run_certify(_cfg(folders, examples=10, radii=[0.0, 0.02, 0.05], attack_steps=3, attack_votes=2,
                         attack_n=40, defenses=[{"purifier": "none", "sigma": 0.17}]), folders / "a")


@pytest.mark.parametrize("path", ["configs/digits/certify.yaml", "configs/digits/certify-sigma.yaml",
                                  "configs/digits/certify-teacher.yaml", "configs/cifar10/certify-cpu.yaml",
                                  "configs/cifar10/certify-cpu-sigma.yaml", "configs/cifar10/certify-cpu-teacher.yaml",
                                  "configs/cifar10/certify-gpu.yaml"])
def test_shipped_certify_configs_load_and_keep_one_n_for_every_row(path):
    from core.config import load_config

    cfg = load_config(CertifyConfig, path)
    assert cfg.n0 <= cfg.n and (cfg.examples >= 100 and cfg.attack_steps > 0 or "teacher" in path)
    labels = [d["label"] if isinstance(d, dict) else d for d in cfg.defenses]
    assert len(set(labels)) == len(labels)
