"""Whole sampling loops with a fixed toy model: every backend ends at the same image."""
import math

import pytest
import torch
from tolerances import assert_matches_oracle

import diffusion_ext as dx


def toy_model(x, t):
    """A fixed, smooth ε-predictor (no training needed): depends on x and t like a real one."""
    s = t.float().view(-1, *([1] * (x.dim() - 1))) / 1000
    return 0.5 * torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x + s)


def ddpm_loop(sched, x, seed):
    for i, t in enumerate(range(sched.num_timesteps - 1, -1, -1)):
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = sched.ddpm_step(toy_model(x, tt), tt, x, seed=seed, offset=i)
    return x


def steps_of(ts, x):
    """(i, t, t_prev, t as a (B,) tensor) over the descending timesteps ts, the last step to the clean end."""
    return [(i, t, ts[i + 1] if i + 1 < len(ts) else -1, torch.full((x.shape[0],), t, dtype=torch.long,
                                                                     device=x.device)) for i, t in enumerate(ts)]


def ddim_loop(sched, x, steps, eta, seed):
    for i, t, t_prev, tt in steps_of(sched.timesteps(steps, "leading").tolist(), x):
        x = sched.ddim_step(toy_model(x, tt), t, t_prev, x, eta=eta, seed=seed, offset=i)
    return x


def dpm_solver_loop(sched, x, steps, sde, seed):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): first order at the first and the last step."""
    x0 = t_last = None
    for i, t, t_prev, tt in steps_of(sched.timesteps(steps, "linspace", clean_end=True).tolist(), x):
        second = x0 is not None and t_prev >= 0
        x, x0 = sched.dpmpp_2m_step(toy_model(x, tt), t, t_prev, x, x0 if second else None,
                                    t_last if second else None, sde=sde, seed=seed, offset=i)
        t_last = t
    return x


def reference_chains(loop, seed):
    """(x_T, ref64, ref32): loop(sched, x) on the reference backend from one x_T. The chain in fp64 is the
    exact answer; in fp32 it shows how far fp32 rounding alone drifts. Both use the same noise stream
    (reference.philox_normal)."""
    sched = dx.NoiseSchedule(1000)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with dx.use_backend("torch"):
        ref64, ref32 = loop(sched, x_T.double()), loop(sched, x_T)
    assert math.isfinite(ref64.abs().max().item())
    return x_T, ref64, ref32


@pytest.fixture(scope="module")
def ddpm_refs():
    return reference_chains(lambda sched, x: ddpm_loop(sched, x, seed=42), seed=0)


@pytest.fixture(scope="module", params=[0.0, 1.0], ids=lambda eta: f"eta={eta}")
def ddim_refs(request):
    eta = request.param
    return (eta, *reference_chains(lambda sched, x: ddim_loop(sched, x, 50, eta, seed=5), seed=1))


# backend_device (conftest.py) runs each test on every backend, the CUDA and GPU-Triton ones gpu-marked.
@pytest.mark.slow
def test_ddpm_1000_steps_same_on_every_backend(backend_device, ddpm_refs):
    _, device = backend_device
    x_T, ref64, ref32 = ddpm_refs
    sched = dx.NoiseSchedule(1000).to(device)
    out = ddpm_loop(sched, x_T.to(device), seed=42).cpu()
    assert_matches_oracle(out, ref32, ref64)


def test_ddim_50_steps_same_on_every_backend(backend_device, ddim_refs):
    _, device = backend_device
    eta, x_T, ref64, ref32 = ddim_refs
    sched = dx.NoiseSchedule(1000).to(device)
    out = ddim_loop(sched, x_T.to(device), 50, eta, seed=5).cpu()
    assert_matches_oracle(out, ref32, ref64)


@pytest.fixture(scope="module", params=[False, True], ids=lambda sde: f"sde={sde}")
def dpm_refs(request):
    sde = request.param
    return (sde, *reference_chains(lambda sched, x: dpm_solver_loop(sched, x, 20, sde, seed=8), seed=2))


def test_dpm_solver_20_steps_same_on_every_backend(backend_device, dpm_refs):
    _, device = backend_device
    sde, x_T, ref64, ref32 = dpm_refs
    sched = dx.NoiseSchedule(1000).to(device)
    out = dpm_solver_loop(sched, x_T.to(device), 20, sde, seed=8).cpu()
    assert_matches_oracle(out, ref32, ref64)
