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


def ddim_loop(sched, x, steps, eta, seed):
    ts = sched.timesteps(steps, "leading").tolist()
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        tt = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        x = sched.ddim_step(toy_model(x, tt), t, t_prev, x, eta=eta, seed=seed, offset=i)
    return x


@pytest.fixture(scope="module")
def ddpm_refs():
    # The reference chain in fp64 is the exact answer; in fp32 it shows how far fp32 rounding alone drifts
    # over 1000 steps. Both use the same noise stream (reference.philox_normal).
    sched = dx.NoiseSchedule(1000)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with dx.use_backend("torch"):
        return x_T, ddpm_loop(sched, x_T.double(), seed=42), ddpm_loop(sched, x_T, seed=42)


@pytest.fixture(scope="module", params=[0.0, 1.0], ids=lambda eta: f"eta={eta}")
def ddim_refs(request):
    eta = request.param
    sched = dx.NoiseSchedule(1000)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with dx.use_backend("torch"):
        ref64 = ddim_loop(sched, x_T.double(), 50, eta, seed=5)
        ref32 = ddim_loop(sched, x_T, 50, eta, seed=5)
    assert math.isfinite(ref64.abs().max().item())
    return eta, x_T, ref64, ref32


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
