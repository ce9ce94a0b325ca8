"""The contract every purifier kind honours (kinds are listed in conftest.PURIFIER_KINDS)."""

import torch

from purify import Purifier, load_purifier


def batch(p: Purifier, n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, p.channels, *p.image_size, generator=torch.Generator().manual_seed(seed))


def test_shape_range_and_dtype(purifier):
    x = batch(purifier)
    y = purifier(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert 0 <= y.min() and y.max() <= 1
    assert not torch.equal(y, x)


def test_input_gradient_flows(purifier):
    x = batch(purifier).requires_grad_(True)
    purifier(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_same_seed_same_output_other_seed_other_output(purifier):
    x = batch(purifier)
    a = purifier.manual_seed(7)(x)
    b = purifier.manual_seed(7)(x)
    c = purifier.manual_seed(8)(x)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    assert (purifier(x) - purifier(x)).abs().max() > 1e-3  # successive calls draw fresh noise


def test_noise_does_not_come_from_the_global_rng(purifier):
    x = batch(purifier)
    torch.manual_seed(0)
    a = purifier.manual_seed(3)(x)
    torch.manual_seed(123)  # torchattacks' APGD / Square reseed the global RNG like this
    b = purifier.manual_seed(3)(x)
    assert torch.equal(a, b)


def test_save_load_round_trip(purifier, tmp_path):
    x = batch(purifier)
    folder = purifier.save(tmp_path / "saved")
    loaded = load_purifier(folder)
    assert type(loaded) is type(purifier) and loaded.nfe == purifier.nfe
    assert loaded.t_star == purifier.t_star and loaded.steps == purifier.steps
    assert torch.allclose(loaded.manual_seed(5)(x), purifier.manual_seed(5)(x), atol=1e-6)


def test_nfe_counts_network_evaluations(purifier):
    calls = []
    handle = purifier.unet.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        purifier(batch(purifier, n=2))
    handle.remove()
    assert len(calls) == purifier.nfe
