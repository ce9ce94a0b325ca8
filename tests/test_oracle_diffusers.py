"""diffusers as the oracle: our reverse-SDE and DDIM steps equal DDPMScheduler / DDIMScheduler steps."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from purify import UNetDenoiser, VPSchedule, sample_ode, sample_sde

from .conftest import scheduler_config, tiny_unet


def grid_times(timesteps, T=1000):
    """Our continuous times for a chain of diffusers timesteps, ending at the clean image t = 0."""
    return torch.tensor([(int(k) + 1) / T for k in timesteps] + [0.0], dtype=torch.float64)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_reverse_sde_chain_equals_ddpm_scheduler(prediction_type):
    cfg = scheduler_config(prediction_type=prediction_type)
    unet, x = tiny_unet(), torch.randn(3, 1, 8, 8)
    ours = UNetDenoiser(unet, VPSchedule.from_scheduler_config(cfg), prediction_type)

    sched = DDPMScheduler.from_config(cfg)
    sched.set_timesteps(timesteps=list(range(99, -1, -1)))  # DiffPure's 100 steps below t* = 0.1
    g, ref = torch.Generator().manual_seed(0), x.clone()
    with torch.no_grad():
        for k in sched.timesteps:
            ref = sched.step(unet(ref, k).sample, k, ref, generator=g).prev_sample
        mine = sample_sde(ours, x.clone(), grid_times(sched.timesteps), torch.Generator().manual_seed(0))
    assert torch.allclose(mine, ref, atol=1e-4), (mine - ref).abs().max()


def test_single_ddpm_steps_with_strides_equal_the_scheduler():
    cfg = scheduler_config()
    unet, x = tiny_unet(), torch.randn(2, 1, 8, 8)
    ours = UNetDenoiser(unet, VPSchedule.from_scheduler_config(cfg))
    sched = DDPMScheduler.from_config(cfg)
    sched.set_timesteps(10)  # leading spacing: 900, 800, ..., 0
    with torch.no_grad():
        for k in sched.timesteps[[0, 4, -1]]:
            out = unet(x, k).sample
            ref = sched.step(out, k, x, generator=torch.Generator().manual_seed(1)).prev_sample
            prev = int(k) - 100
            times = torch.tensor([(int(k) + 1) / 1000, (prev + 1) / 1000 if prev >= 0 else 0.0], dtype=torch.float64)
            mine = sample_sde(ours, x, times, torch.Generator().manual_seed(1))
            assert torch.allclose(mine, ref, atol=1e-5), (int(k), (mine - ref).abs().max())


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_chain_equals_ddim_scheduler_eta_0(prediction_type):
    cfg = scheduler_config(prediction_type=prediction_type)
    unet, x = tiny_unet(), torch.randn(3, 1, 8, 8)
    ours = UNetDenoiser(unet, VPSchedule.from_scheduler_config(cfg), prediction_type)
    sched = DDIMScheduler.from_config({**cfg, "set_alpha_to_one": True, "steps_offset": 0})
    sched.set_timesteps(10)
    ref = x.clone()
    with torch.no_grad():
        for k in sched.timesteps:
            ref = sched.step(unet(ref, k).sample, k, ref, eta=0.0).prev_sample
        mine = sample_ode(ours, x.clone(), grid_times(sched.timesteps))
    assert torch.allclose(mine, ref, atol=1e-4), (mine - ref).abs().max()


def test_schedule_matches_alphas_cumprod_on_the_grid():
    s = VPSchedule.from_scheduler_config(scheduler_config())
    acp = DDPMScheduler.from_config(scheduler_config()).alphas_cumprod
    k = torch.tensor([0, 99, 500, 999])
    assert torch.allclose(s.alpha_bar((k + 1) / 1000.0), acp[k], rtol=1e-5)
    assert s.alpha_bar(torch.tensor(0.0)) == 1.0
    t = torch.linspace(0, 1, 257)
    assert (s.alpha_bar(t)[1:] < s.alpha_bar(t)[:-1]).all()
    assert torch.allclose(s.timestep(torch.tensor(0.1)), torch.tensor(99.0))
