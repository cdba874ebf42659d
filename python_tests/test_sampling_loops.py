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


def _backends():
    out = [("cpu", "cpu")]
    if "triton" in dx.available_backends("cpu"):
        out.append(("triton", "cpu"))
    if torch.cuda.is_available():
        out += [(b, "cuda") for b in dx.available_backends("cuda") if b != "torch"]
    return out


@pytest.mark.slow
def test_ddpm_1000_steps_same_on_every_backend():
    sched = dx.NoiseSchedule(1000)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # The reference chain in fp64 is the exact answer; in fp32 it shows how far fp32 rounding alone drifts
    # over 1000 steps. Both use the same noise stream (reference.philox_normal).
    with dx.use_backend("torch"):
        ref64 = ddpm_loop(sched, x_T.double(), seed=42)
        ref32 = ddpm_loop(sched, x_T, seed=42)
    for backend, device in _backends():
        sched.to(device)
        with dx.use_backend(backend):
            out = ddpm_loop(sched, x_T.to(device), seed=42).cpu()
        assert_matches_oracle(out, ref32, ref64)
    sched.to("cpu")


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_steps_same_on_every_backend(eta):
    sched = dx.NoiseSchedule(1000)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with dx.use_backend("torch"):
        ref64 = ddim_loop(sched, x_T.double(), 50, eta, seed=5)
        ref32 = ddim_loop(sched, x_T, 50, eta, seed=5)
    assert math.isfinite(ref64.abs().max().item())
    for backend, device in _backends():
        sched.to(device)
        with dx.use_backend(backend):
            out = ddim_loop(sched, x_T.to(device), 50, eta, seed=5).cpu()
        assert_matches_oracle(out, ref32, ref64)
    sched.to("cpu")
