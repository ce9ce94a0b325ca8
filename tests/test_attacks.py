"""The strongest attacker: PGD-EOT's batched draws and best iterate, the flags that tell a masked gradient, and
DiffHammer's selective attack against averaged gradients (EOT) on a defense whose
purification draws pull in different directions."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from core.datasets import load_dataset, to_tensors
from core.errors import InputError
from eval import Defended, evaluate
from eval.attacks import EOTPGD, DiffHammer, build_attack

from .conftest import digits_cnn
from .test_harness import Noise


@pytest.fixture(scope="module")
def cnn():
    return digits_cnn()


@pytest.fixture(scope="module")
def batch():
    return to_tensors(load_dataset("digits", "test")[0], 32)


class Modes(nn.Module):
    """Each draw moves the image to one of K far-apart places (per example): u = x - 1/2 + c_k. Behind it a
    classifier that is a different linear function near each place, so the draws' gradients at their purified
    images are nearly orthogonal and their average is short: DiffHammer's gradient dilemma in miniature."""

    def __init__(self, k: int = 8, d: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.centers = 0.5 + 3 * torch.randn(k, d, generator=g)
        self.manual_seed(0)

    def manual_seed(self, seed: int) -> "Modes":
        self.gen = torch.Generator().manual_seed(seed)
        return self

    def forward(self, x):
        k = torch.randint(len(self.centers), (len(x),), generator=self.gen)
        return (x.flatten(1) - 0.5 + self.centers[k]).view_as(x)

    def every_mode(self, x):
        return [(x.flatten(1) - 0.5 + c).view_as(x) for c in self.centers]


class Gated(nn.Module):
    """Two classes, z(u) = margin + sum_k exp(-|u - c_k|^2 / 10) w_k.(u - c_k), logits (z, -z): near place k, the
    linear function w_k."""

    def __init__(self, centers, margin: float = 2.0, seed: int = 1):
        super().__init__()
        self.centers, self.margin = centers, margin
        self.w = torch.randn(*centers.shape, generator=torch.Generator().manual_seed(seed))

    def forward(self, u):
        delta = u.flatten(1)[:, None, :] - self.centers[None]  # n x K x d
        z = self.margin + (torch.exp(-delta.pow(2).sum(2) / 10) * (delta * self.w[None]).sum(2)).sum(1)
        return torch.stack([z, -z], 1)


@pytest.fixture(scope="module")
def toy():
    purifier = Modes()
    clf = Gated(purifier.centers)
    x = (0.5 + 0.005 * torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    eps = 1.4 * clf.margin / clf.w.abs().sum(1).mean().item()  # one place's own sign step: 1.4 margins
    return purifier, clf, x, torch.zeros(16, dtype=torch.long), eps


def _fooled_on_some_draw(purifier, clf, adv, y):
    return torch.stack([clf(u).argmax(1) != y for u in purifier.every_mode(adv)]).any(0)


def test_diffhammer_breaks_on_some_draw_what_averaged_gradients_cannot(toy):
    """The selective attack follows one place's gradient and fools that place for most examples; PGD-EOT's averaged
    gradient of 8 nearly orthogonal ones moves every place by about a third as much and fools none."""
    purifier, clf, x, y, eps = toy
    model = Defended(purifier, clf)
    assert not _fooled_on_some_draw(purifier, clf, x, y).any()
    purifier.manual_seed(3)
    hammer = DiffHammer(model, "Linf", eps, steps=30, eot=8, seed=0)(x, y)
    purifier.manual_seed(3)
    eot = EOTPGD(model, "Linf", eps, steps=30, eot=8, loss="margin", seed=0)(x, y)
    for adv in (hammer, eot):
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    assert _fooled_on_some_draw(purifier, clf, hammer, y).float().mean() >= 0.6
    assert not _fooled_on_some_draw(purifier, clf, eot, y).any()


def test_diffhammer_through_the_harness_and_by_name(toy):
    purifier, clf, x, y, eps = toy
    attack = build_attack("diffhammer", Defended(purifier, clf), "Linf", eps, n_classes=2, steps=5, eot=4,
                          stochastic=True)
    assert isinstance(attack, DiffHammer) and attack.loss == "margin" and attack.eot == 4
    r = evaluate(Defended(purifier, clf), x, y, ["pgd-eot", "diffhammer"], eps=eps, evals=8, eot=8,
                 steps={"pgd-eot": 30, "diffhammer": 30}, losses={"pgd-eot": "margin"}, check_steps=False,
                 progress=None)
    # R = 8 resubmissions, each scored on a fresh draw that lands on the fooled place 1 time in 8
    assert r["attacks"]["diffhammer"]["worst"] <= 0.8 and r["attacks"]["pgd-eot"]["worst"] == 1.0
    assert "DiffHammer" in r["budgets"]["diffhammer"] and "margin loss" in r["budgets"]["pgd-eot"]


def test_eot_gradient_is_the_mean_of_that_many_sampled_gradients(cnn, batch):
    x, y = batch[0][:4], batch[1][:4]
    purifier = Noise()
    model = Defended(purifier, cnn)
    # one pass at a time: the mean of `eot` gradients drawn one after another
    attack = EOTPGD(model, eps=0.1, steps=1, eot=4, eot_batch=1)
    purifier.manual_seed(7)
    g, loss, _ = attack.gradient(x, y)
    purifier.manual_seed(7)
    singles, losses = [], []
    for _ in range(4):
        x_ = x.clone().requires_grad_(True)
        ce = F.cross_entropy(model(x_), y, reduction="none")
        singles.append(torch.autograd.grad(ce.sum(), x_)[0])
        losses.append(ce.detach())
    assert torch.allclose(g, torch.stack(singles).mean(0), atol=1e-6)
    assert torch.allclose(loss, torch.stack(losses).mean(0), atol=1e-6)
    assert not torch.allclose(singles[0], singles[1])  # the samples differ, so the mean is a real average
    # batched (the default): the four draws are four stacked copies in one pass, each its own noise
    purifier.manual_seed(7)
    g4, _, _ = EOTPGD(model, eps=0.1, steps=1, eot=4).gradient(x, y)
    purifier.manual_seed(7)
    x4 = x.repeat(4, 1, 1, 1).requires_grad_(True)
    per_copy = torch.autograd.grad(F.cross_entropy(model(x4), y.repeat(4), reduction="sum"), x4)[0].view(4, *x.shape)
    assert torch.allclose(g4, per_copy.mean(0), atol=1e-6) and not torch.allclose(per_copy[0], per_copy[1])

    rows = []
    model.purifier.register_forward_hook(lambda m, inp, out: rows.append(len(inp[0])))
    EOTPGD(model, eps=0.1, steps=3, eot=4)(x, y)
    assert rows == [16] * 4  # steps x eot purifications in 3 batched passes, and one scoring the last iterate
    rows.clear()
    EOTPGD(model, eps=0.1, steps=3, eot=4, eot_batch=3, best=False)(x, y)
    assert rows == [12, 4] * 3  # chunks of at most eot_batch copies


class Periodic(nn.Module):
    """A loss that oscillates along any path: PGD's last iterate is rarely its best."""

    def forward(self, x):
        s = torch.sin(40 * x.flatten(1).mean(1))
        return torch.stack([s, -s], 1)


def test_pgd_keeps_each_examples_best_iterate_and_the_dlr_loss_is_croce_and_heins():
    from eval.attacks.pgd import dlr_loss

    x = torch.rand(32, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(32, dtype=torch.long)
    model = Periodic()
    seen = []
    model.register_forward_hook(lambda m, inp, out: seen.append(inp[0].detach().clone()))
    kw = dict(norm="Linf", eps=0.2, steps=6, alpha=0.15, seed=1)
    best = EOTPGD(model, **kw)(x, y)
    visited = torch.stack(seen[:-1])  # the iterates the run evaluated (the last entry: the final iterate's score)
    ce = lambda z: F.cross_entropy(model(z), y, reduction="none")  # noqa: E731
    last = EOTPGD(model, **kw, best=False)(x, y)
    every = torch.stack([ce(v) for v in visited] + [ce(last)])
    assert torch.allclose(ce(best), every.amax(0), atol=1e-6)  # the highest loss of the whole run, per example
    assert (ce(best) > ce(last) + 1e-4).any()  # and not the last iterate where they differ
    assert ((best - x).abs().amax() <= 0.2 + 1e-6) and best.min() >= 0 and best.max() <= 1
    logits = torch.tensor([[3.0, 1.0, 0.5, 0.0], [0.0, 2.0, 1.0, -1.0]])
    assert torch.allclose(dlr_loss(logits, torch.tensor([0, 0])), torch.tensor([-(3 - 1) / (3 - 0.5), (2 - 0) / (2 - 0)]))


class Quantize(Noise):
    """Rounds to 33 grey levels (zero gradient almost everywhere) plus a little noise: an obfuscated gradient."""

    def purify(self, x, generator):
        return (torch.round(x * 16) / 16 + 0.01 * torch.randn(x.shape, generator=generator)).clamp(-1, 1)


def test_bpda_beating_the_full_gradient_is_flagged_paired_and_an_honest_gradient_is_not(cnn, batch):
    x, y = batch
    kw = dict(eps=0.1, steps={"pgd-eot": 10, "bpda-eot": 10}, evals=1, eot=1, check_steps=False, progress=None)
    r = evaluate(Defended(Quantize(), cnn), x, y, ["pgd-eot", "bpda-eot"], **kw)
    f = {f["name"]: f for f in r["flags"]}["approximation-beats-full-gradient"]
    assert f["raised"] and "approximation-beats-full-gradient" in r["raised"], f["detail"]
    r = evaluate(Defended(Noise(), cnn), x, y, ["pgd-eot", "bpda-eot"], **kw)
    f = {f["name"]: f for f in r["flags"]}["approximation-beats-full-gradient"]
    assert f["checked"] and not f["raised"], f["detail"]


class RandomSign(Noise):
    """Flips each pixel's sign at random: every draw's input gradient is the classifier's times a random sign
    mask, so the gradients of two draws are nearly orthogonal."""

    def purify(self, x, generator):
        return x * torch.randn(x.shape, generator=generator).sign()


def test_gradient_probe_flags_near_orthogonal_draws_and_not_an_additive_noise():
    from eval.harness.checks import gradient_probe

    clf_, (x, y) = digits_cnn(), to_tensors(load_dataset("digits", "test")[0], 8)
    f = gradient_probe(Defended(RandomSign(), clf_), x, y, seed=0)
    assert f["raised"] and abs(f["cosine"]) < 0.1 and "mean cosine" in f["detail"]
    f = gradient_probe(Defended(Noise(), clf_), x, y, seed=0)
    assert not f["raised"] and f["cosine"] > 0.5 and 0.3 < f["norm_ratio"] < 3


class Bowl(nn.Module):
    """Cross-entropy of class 1 rises as x nears an interior point c: PGD's constant sign steps circle c."""

    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        z0 = -((x - self.c) ** 2).flatten(1).sum(1) * 50
        return torch.stack([z0, torch.zeros_like(z0)], 1)


def test_apgd_schedule_halves_its_step_and_settles_where_constant_pgd_keeps_circling():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((8, 1, 4, 4), 0.5)
    c = x + 0.05 * (torch.rand(x.shape, generator=gen) * 2 - 1)  # inside the Linf ball of 0.1
    y = torch.ones(8, dtype=torch.long)
    model = Bowl(c)
    kw = dict(norm="Linf", eps=0.1, steps=150, seed=0, alpha=0.02)
    apgd = EOTPGD(model, schedule="apgd", **kw)(x, y)
    const = EOTPGD(model, **kw)(x, y)
    gap = lambda z: (z - c).abs().amax().item()  # noqa: E731
    assert gap(apgd) < 0.003 and gap(const) > 0.01  # 7 halvings: 2 eps / 128 against a constant 0.02
    assert (apgd - x).abs().amax() <= 0.1 + 1e-6
    with pytest.raises(InputError, match="step-size schedule"):
        EOTPGD(model, schedule="cosine")


def test_autoattack_rand_draws_its_eot_copies_in_one_pass(cnn, batch):
    x, y = batch[0][:4], batch[1][:4]
    purifier = Noise()
    rows = []
    purifier.register_forward_hook(lambda m, inp, out: rows.append(len(inp[0])))
    x_adv, source = build_attack("autoattack-rand", Defended(purifier, cnn), "Linf", 0.1, n_classes=10, eot=4,
                                 steps=3, stochastic=True)(x, y)
    assert 16 in rows and set(rows) <= {16, 4}  # 4 examples x EOT 4 stacked; the candidates scored one draw a pass
    assert set(source) <= {"apgd-ce", "apgd-dlr"} and (x_adv - x).abs().amax() <= 0.1 + 1e-6


def test_the_best_iterate_is_the_one_that_fools_most_draws_then_the_highest_loss():
    from eval.attacks.pgd import _Best

    x = torch.zeros(1, 1, 2, 2)
    keep = _Best(x)
    # with cross-entropy a correct point (p_y 0.4 of 3 classes: CE 0.92) can outscore a fooled one (p_y 0.45: 0.80)
    for value, fooled, loss in [(1, 0.0, 0.92), (2, 1.0, 0.80), (3, 1.0, 0.90), (4, 0.0, 5.0), (5, 0.5, 9.0)]:
        keep.offer(x + value, torch.tensor([fooled]), torch.tensor([loss]))
    assert keep.x.flatten()[0].item() == 3  # fooled, and the higher loss of the two fooled points


class Flips(nn.Module):
    """A purifier whose dilemma is in its Jacobian: each draw multiplies the image (about grey) by one of four
    orthogonal +-1 patterns (rows of a Hadamard matrix), so the classifier wants the same of every purified image
    while each draw maps that back to the input along another direction."""

    def __init__(self, d: int = 64):
        super().__init__()
        h = torch.ones(1, 1)
        while len(h) < 8:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
        self.register_buffer("patterns", h[1:5].repeat_interleave(d // 8, 1))
        self.manual_seed(0)

    def manual_seed(self, seed):
        self.gen = torch.Generator().manual_seed(seed)
        return self

    def forward(self, x):
        k = torch.randint(0, 4, (len(x),), generator=self.gen)
        return 0.5 + (x - 0.5) * self.patterns[k].view(x.shape)


class Sum(nn.Module):
    """Class 0 while the purified image's sum over grey stays above -bias: only a step along one draw's pattern
    (eps d = 3.2 > 2.4) fools that draw; a mix of patterns moves each by half as much."""

    def forward(self, u):
        f = (u - 0.5).flatten(1).sum(1) + 2.4
        return 50 * torch.stack([f, -f], 1)


def test_diffhammer_sees_a_dilemma_inside_the_purifier_that_the_purified_variant_misses():
    """Agreement measured on each draw's input gradient finds the draw to follow; at the purified image every draw
    looks alike and the weighted gradient cancels, as EOT's does."""
    x = (0.5 + 0.02 * torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    y = torch.zeros(64, dtype=torch.long)
    steps = {a: 20 for a in ("pgd-eot", "diffhammer", "diffhammer-purified")}
    r = evaluate(Defended(Flips(), Sum()), x, y, attacks=list(steps), eps=0.05, evals=4, eot=4, steps=steps,
                 losses={"pgd-eot": "margin"}, check_steps=False, progress=None)
    broken = {a: 1 - s["worst"] for a, s in r["attacks"].items()}
    assert r["clean"]["worst"] == 1.0
    assert broken["diffhammer"] >= 0.35, broken
    assert broken["diffhammer-purified"] <= 0.15 and broken["pgd-eot"] <= 0.15, broken


def test_diffhammer_attacks_a_vote_one_soft_vote_a_draw_and_the_purified_variant_refuses_it():
    x = (0.5 + 0.02 * torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    y = torch.zeros(8, dtype=torch.long)
    voted = Defended(Flips(), Sum(), votes=3)
    hammer = DiffHammer(voted, "Linf", 0.05, steps=2, eot=2, loss="margin")
    L, fooled, g = hammer.draws(x, y)
    assert L.shape == (2, 8) and g.shape == x.shape and torch.isfinite(g).all()
    with pytest.raises(InputError, match="voting defense"):
        DiffHammer(voted, "Linf", 0.05, steps=2, eot=2, agreement="purified")


class Scale(nn.Module):
    """A deterministic 'purifier' x -> 0.5 + k (x - 0.5), its own generator unused: value and gradient known."""

    def __init__(self, k: float):
        super().__init__()
        self.k = k

    def manual_seed(self, seed):
        return self

    def forward(self, x):
        return 0.5 + self.k * (x - 0.5)


def test_the_surrogate_attack_follows_the_surrogates_gradient_and_is_scored_on_the_defense():
    from eval.attacks.pgd import surrogate_target

    torch.manual_seed(0)
    clf = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    defense, surrogate = Defended(Scale(-1.0), clf), Defended(Scale(2.0), clf)
    target = surrogate_target(defense, surrogate)
    x = torch.rand(4, 1, 4, 4, requires_grad=True)
    out = target(x)
    assert torch.allclose(out, defense(x))  # the value: the defense's
    g = torch.autograd.grad(out.logsumexp(1).sum(), x)[0]
    x2 = x.detach().clone().requires_grad_(True)  # the gradient: the surrogate's chain at the defense's value
    u = Scale(2.0)(x2)
    g_want = torch.autograd.grad(clf(u + (Scale(-1.0)(x2) - u).detach()).logsumexp(1).sum(), x2)[0]
    assert torch.allclose(g, g_want) and not torch.allclose(g, torch.autograd.grad(
        defense(x2).logsumexp(1).sum(), x2)[0])
    # in the harness: crafted on the surrogate's gradient, scored on the defense (a surrogate that points the
    # wrong way, k = -1 against +1, leaves what the defense's own gradient breaks)
    y = clf(Scale(1.0)(x)).argmax(1).detach()
    r = evaluate(Defended(Scale(1.0), clf), x.detach(), y, attacks=["pgd-eot", "surrogate-eot"], eps=0.3, evals=1,
                 eot=1, steps={"pgd-eot": 10, "surrogate-eot": 10}, transfer_source=Defended(Scale(-1.0), clf),
                 check_steps=False, progress=None)
    assert r["attacks"]["surrogate-eot"]["worst"] > r["attacks"]["pgd-eot"]["worst"]
    with pytest.raises(InputError, match="transfer_source"):
        evaluate(Defended(Scale(1.0), clf), x.detach(), y, attacks=["surrogate-eot"], eps=0.3, progress=None)
