"""DC (dataset condensation by gradient matching): its distance, augmentation, a tiny run, resume, the pipeline."""

import pytest
import torch

from robust_data.condense import DSA_FAMILIES, CondenseConfig, condense, dsa_augment, dsa_params, layer_distance, match_distance
from robust_data.distilled import load_distilled

TINY = dict(dataset="digits", ipc=1, iterations=2, width=8, depth=2, batch_real=8, batch_train=8)


def test_layer_distance_is_the_sum_over_output_units_of_one_minus_cosine():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 2, 3, 3, generator=g), torch.randn(3, 2, 3, 3, generator=g)  # a conv weight's gradient
    by_hand = 0.0
    for o in range(3):
        u, v = a[o].flatten().tolist(), b[o].flatten().tolist()
        dot = sum(x * y for x, y in zip(u, v))
        nu, nv = sum(x * x for x in u) ** 0.5, sum(y * y for y in v) ** 0.5
        by_hand += 1 - dot / (nu * nv + 1e-6)
    assert layer_distance(a, b).item() == pytest.approx(by_hand, rel=1e-5)
    assert layer_distance(torch.randn(3), torch.randn(3)).item() == 0.0  # biases and norm parameters: ignored
    w = torch.randn(4, 5)
    assert match_distance([w, torch.randn(4)], [2 * w, torch.randn(4)]).item() == pytest.approx(0, abs=1e-5)
    assert match_distance([w], [-w]).item() == pytest.approx(8, abs=1e-4)  # opposite: 2 per output unit


def test_dsa_draws_one_family_per_call_shared_across_the_siamese_pair_and_per_example_in_training():
    g = torch.Generator().manual_seed(1)
    draws = [dsa_params(6, g, shared=False) for _ in range(200)]
    assert {p["family"] for p in draws} == set(DSA_FAMILIES)  # DSA's 'S' mode: one family chosen per call
    assert all(len([k for k in p if k != "family"]) == (3 if p["family"] == "color" else 1) for p in draws)
    scale = next(p for p in draws if p["family"] == "scale")["scale"]
    assert scale.shape == (6, 2) and scale.std(0).min() > 0  # per-example parameters in the inner loop
    assert 1 / 1.2 <= scale.min() and scale.max() <= 1.2  # DSA's ratio_scale range
    p = dsa_params(1, g, shared=True)
    real, syn = torch.rand(5, 3, 16, 16), torch.rand(2, 3, 16, 16, requires_grad=True)
    both = dsa_augment(torch.cat([real, syn]), p)
    assert torch.allclose(both[5:], dsa_augment(syn, p), atol=1e-6)  # the same transform on either batch
    assert torch.allclose(both[:2], dsa_augment(real[:2], p), atol=1e-6)
    for family in DSA_FAMILIES:  # every family is differentiable in the images
        q = next(q for q in draws if q["family"] == family)
        syn.grad = None
        dsa_augment(syn.repeat(3, 1, 1, 1), q).sum().backward()
        assert syn.grad is not None and syn.grad.abs().sum() > 0, family


def test_tiny_condense_run_leaves_a_loadable_data_folder_and_the_objective_shapes_it(tmp_path):
    loops = dict(outer_loop=2, inner_loop=1)  # the matched network trains once, with the objective, between matches
    folder = condense(CondenseConfig(**TINY, **loops, dsa=True, objective="guard"), tmp_path / "dc")
    images, labels, meta = load_distilled(folder)
    assert images.shape == (10, 1, 16, 16) and labels.tolist() == list(range(10))
    assert 0 <= images.min() and images.max() <= 1 and meta["method"] == "dc+dsa" and meta["objective"] == "guard"
    ce, _, _ = load_distilled(condense(CondenseConfig(**TINY, **loops, dsa=True), tmp_path / "ce"))
    assert not torch.allclose(images, ce, atol=1e-6)  # GUARD-trained networks give other gradients to match


def test_an_objective_that_cannot_act_is_refused(tmp_path):
    from core.errors import InputError

    with pytest.raises(InputError, match="outer_loop 1"):  # ipc 1: DC's loops never train the matched network
        condense(CondenseConfig(**TINY, objective="gradnorm"), tmp_path / "dc")
    assert not (tmp_path / "dc").exists()


def test_matching_moves_the_images_and_a_killed_run_resumes_to_the_same_ones(tmp_path, monkeypatch):
    import robust_data.condense as C

    cfg = CondenseConfig(**{**TINY, "ipc": 2, "iterations": 4, "outer_loop": 2, "inner_loop": 1,
                            "checkpoint_every": 2})
    whole, _, _ = load_distilled(condense(cfg, tmp_path / "whole"))
    start = CondenseConfig(**{**TINY, "ipc": 2, "iterations": 1, "outer_loop": 2, "inner_loop": 1})
    real_init, _, _ = load_distilled(condense(start, tmp_path / "one"))
    assert not torch.allclose(whole, real_init)  # the matching steps changed the real-image initialisation
    calls, real = [], C._train_net

    def dies(*a, **kw):
        calls.append(1)
        if len(calls) == 3:  # during the third iteration, after the checkpoint at 2
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(C, "_train_net", dies)
    with pytest.raises(KeyboardInterrupt):
        condense(cfg, tmp_path / "killed")
    monkeypatch.setattr(C, "_train_net", real)
    resumed, _, _ = load_distilled(condense(cfg, tmp_path / "killed"))
    assert torch.allclose(whole, resumed, atol=1e-6)


def test_dc_pipeline_condenses_and_trains_on_hard_labels(tmp_path):
    from core.checkpoint import load_classifier
    from robust_data.__main__ import main

    main(["pipeline", "--out", str(tmp_path / "p"), "method=dc", "condense.ipc=1", "condense.iterations=1",
          "condense.width=8", "condense.depth=2", "condense.batch_real=8", "train.epochs=2", "train.width=8"])
    clf = load_classifier(tmp_path / "p" / "train" / "classifier")
    assert clf(torch.rand(2, 1, 16, 16)).shape == (2, 10)
    import json

    summary = json.loads((tmp_path / "p" / "pipeline.json").read_text())
    assert summary["method"] == "dc" and summary["squeezed_classifier"] is None


def test_bad_condense_settings_fail_before_work(tmp_path):
    with pytest.raises(SystemExit, match="init"):
        from robust_data.__main__ import main

        main(["condense", "--out", str(tmp_path / "c"), "init=zeros"])
    assert not (tmp_path / "c" / "log.jsonl").exists()
