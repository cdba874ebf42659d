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


def _backends():
    out = [("cpu", "cpu")]
    if "triton" in dx.available_backends("cpu"):
        out.append(("triton", "cpu"))
    if torch.cuda.is_available():
        out += [(b, "cuda") for b in dx.available_backends("cuda") if b != "torch"]
    return out


def assert_same_on_every_backend(loop, seed):
    """loop(sched, x_T) on every backend against the reference chain: in fp64 the exact answer, in fp32 how far
    fp32 rounding alone drifts over the chain. Both use the same noise stream (reference.philox_normal)."""
    sched = dx.NoiseSchedule(1000)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    with dx.use_backend("torch"):
        ref64, ref32 = loop(sched, x_T.double()), loop(sched, x_T)
    assert math.isfinite(ref64.abs().max().item())
    for backend, device in _backends():
        sched.to(device)
        with dx.use_backend(backend):
            out = loop(sched, x_T.to(device)).cpu()
        assert_matches_oracle(out, ref32, ref64)
    sched.to("cpu")


@pytest.mark.slow
def test_ddpm_1000_steps_same_on_every_backend():
    assert_same_on_every_backend(lambda sched, x: ddpm_loop(sched, x, seed=42), seed=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_steps_same_on_every_backend(eta):
    assert_same_on_every_backend(lambda sched, x: ddim_loop(sched, x, 50, eta, seed=5), seed=1)


@pytest.mark.parametrize("sde", [False, True])
def test_dpm_solver_20_steps_same_on_every_backend(sde):
    assert_same_on_every_backend(lambda sched, x: dpm_solver_loop(sched, x, 20, sde, seed=8), seed=2)
