"""dpmpp_2m_step (DPM-Solver++ in data-prediction form, Lu et al. 2022): parity with the reference written
from the paper's equations on every backend, dtype, layout, prediction type, order, guidance, noise
source and the SDE variant; parity with diffusers' DPMSolverMultistepScheduler; torch.compile. Its opcheck
cases are test_reverse_steps.py's; its precision near t = 0, test_step_precision.py's."""
import itertools

import pytest
import torch
from conftest import DTYPES
from shapes import CASES, make, same_layout
from tolerances import assert_matches_oracle

import diffusion_ext as dx
from diffusion_ext import reference

PREDICTIONS = ["epsilon", "sample", "v_prediction"]


@pytest.fixture(scope="module", params=["linear", "cosine"])
def sched(request):
    return dx.NoiseSchedule(1000, request.param)


def _inputs(shape, layout, dtype, device, guided, seed=0):
    """x_t, the model output(s), the last x̂0, noise, and per-sample (t, t_prev, t_last) covering the first
    step (t = 999), a step to the clean end (t_prev = −1) and small and large steps in between."""
    g = torch.Generator().manual_seed(seed)
    x = make(shape, layout, dtype, device, g)
    m, last, noise = (same_layout(x, dtype, device, g) for _ in range(3))
    mu = same_layout(x, dtype, device, g) if guided else None
    B = shape[0]
    t = torch.randint(1, 999, (B,), generator=g)
    t_prev = (t - torch.randint(1, 200, (B,), generator=g)).clamp(min=-1)
    t_last = (t + torch.randint(1, 200, (B,), generator=g)).clamp(max=999)
    t[0], t_prev[0], t_last[0] = 20, -1, 140  # the last step of a chain: first order whatever is given
    if B > 1:
        t[1], t_prev[1], t_last[1] = 998, 900, 999
    return x, m, mu, last, noise, (t.to(device), t_prev.to(device), t_last.to(device))


def _check(outs, fn, *args):
    """fn(*args) is the reference; run it in the outputs' dtype and in fp64 and apply the tolerance rule to
    x_prev and x̂0 alike."""
    def cast(v, dtype):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    ref = fn(*[cast(a, outs[0].dtype) for a in args])
    ref64 = fn(*[cast(a, torch.float64) for a in args])
    for out, r, r64 in zip(outs, ref, ref64):
        assert_matches_oracle(out, r, r64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("order", [1, 2])
def test_layouts_dtypes(backend_device, sched, shape, layout, dtype, order):
    _, device = backend_device
    sched.to(device)
    x, m, _, last, _, (t, t_prev, t_last) = _inputs(shape, layout, dtype, device, guided=False)
    last, t_last = (last, t_last) if order == 2 else (None, None)
    outs = sched.dpmpp_2m_step(m, t, t_prev, x, last, t_last, sde=True, seed=7, offset=2)
    noise = reference.noise_like(x, 7, 2, m, last)
    assert outs[1].stride() == outs[0].stride()
    _check(outs, lambda m, x, last, n: reference.dpmpp_2m_step(m, t, t_prev, x, sched.alphas_cumprod, last, t_last,
                                                               True, n), m, x, last, noise)


@pytest.mark.parametrize("prediction,sde,clip,guided,order",
                         list(itertools.product(PREDICTIONS, [False, True], [False, True], [False, True], [1, 2])))
def test_options(backend_device, sched, prediction, sde, clip, guided, order):
    _, device = backend_device
    sched.to(device)
    x, m, mu, last, noise, (t, t_prev, t_last) = _inputs((5, 2, 3, 7), "contiguous", torch.float32, device, guided,
                                                         seed=3)
    last, t_last = (last, t_last) if order == 2 else (None, None)
    w = 4.0 if guided else None
    outs = sched.dpmpp_2m_step(m, t, t_prev, x, last, t_last, sde=sde, noise=noise, clip_sample=clip, clip_range=0.9,
                               prediction_type=prediction, guidance_scale=w, model_output_uncond=mu)

    def ref(m, x, last, n, mu):
        return reference.dpmpp_2m_step(m, t, t_prev, x, sched.alphas_cumprod, last, t_last, sde, n, clip_sample=clip,
                                       clip_range=0.9, prediction_type=prediction, guidance_scale=w,
                                       model_output_uncond=mu)

    _check(outs, ref, m, x, last, noise, mu)


def test_second_order_term_is_used_and_the_clean_end_is_first_order(backend_device, sched):
    """Where t_prev ≥ 0 the given x̂0_last changes x_prev (Algorithm 2's D); at t_prev = −1 it must not, and
    x_prev is x̂0 itself (σ = 0: the first-order step's exact answer, ODE and SDE alike)."""
    _, device = backend_device
    sched.to(device)
    x, m, _, last, noise, (t, t_prev, t_last) = _inputs((3, 2, 4, 4), "contiguous", torch.float32, device, False)
    for sde in (False, True):
        first, x0 = sched.dpmpp_2m_step(m, t, t_prev, x, sde=sde, noise=noise)
        second, x0_2 = sched.dpmpp_2m_step(m, t, t_prev, x, last, t_last, sde=sde, noise=noise)
        torch.testing.assert_close(x0, x0_2, rtol=0, atol=0)
        torch.testing.assert_close(second[0], first[0], rtol=0, atol=0)
        torch.testing.assert_close(second[0], x0[0], rtol=1e-6, atol=1e-6)
        assert not torch.allclose(second[1:], first[1:])


def test_first_order_ode_is_ddim(backend_device, sched):
    # DPM-Solver++'s first-order step is DDIM with η = 0 (Lu et al. 2022, §4.1)
    _, device = backend_device
    sched.to(device)
    x, m, _, _, _, (t, t_prev, _) = _inputs((4, 3, 5, 5), "contiguous", torch.float64, device, False)
    for prediction in PREDICTIONS:
        out, _ = sched.dpmpp_2m_step(m, t, t_prev, x, prediction_type=prediction)
        ddim = sched.ddim_step(m, t, t_prev, x, 0.0, prediction_type=prediction)
        torch.testing.assert_close(out, ddim, rtol=1e-9, atol=1e-9)


def test_ode_ignores_noise_and_sde_follows_the_seed(backend_device, sched):
    _, device = backend_device
    sched.to(device)
    x, m, _, last, noise, (t, t_prev, t_last) = _inputs((3, 2, 4, 4), "contiguous", torch.float32, device, False)
    a = sched.dpmpp_2m_step(m, t, t_prev, x, last, t_last)[0]
    b = sched.dpmpp_2m_step(m, t, t_prev, x, last, t_last, noise=noise * float("nan"))[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = sched.dpmpp_2m_step(m, t, t_prev, x, last, t_last, sde=True, seed=5)[0]
    torch.testing.assert_close(c, sched.dpmpp_2m_step(m, t, t_prev, x, last, t_last, sde=True, seed=5)[0], rtol=0,
                               atol=0)
    assert not torch.allclose(c[1:], sched.dpmpp_2m_step(m, t, t_prev, x, last, t_last, sde=True, seed=5,
                                                         offset=1)[0][1:])
    # the step to the clean end adds no noise: not even a NaN in it may leak into x_0
    assert torch.isfinite(sched.dpmpp_2m_step(m, t, t_prev, x, sde=True, noise=noise * float("nan"))[0][0]).all()


# ----------------------------------------------------------------------------------------------------
# diffusers' DPMSolverMultistepScheduler: the same chain, step by step
# ----------------------------------------------------------------------------------------------------
def toy_model(x, t):
    s = t.float().view(-1, *([1] * (x.dim() - 1))) / 1000
    return 0.5 * torch.tanh(x) * (1 - s) + 0.1 * torch.sin(3 * x + s)


@pytest.mark.parametrize("prediction,guided,algorithm",
                         list(itertools.product(PREDICTIONS, [False, True], ["dpmsolver++", "sde-dpmsolver++"])))
def test_matches_diffusers_dpm_solver_multistep(backend_device, prediction, guided, algorithm):
    """Each step of diffusers' scheduler (solver_order=2, midpoint, lower_order_final, final σ = 0), given the
    same x_t, model outputs, last x̂0 and noise: our op gives its x_prev and x̂0 up to fp32 rounding (diffusers
    forms its σs in fp32, we form the coefficients in fp64), on the timesteps NoiseSchedule gives it."""
    diffusers = pytest.importorskip("diffusers")
    _, device = backend_device
    steps, w = 8, 3.0
    sched_d = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                                    prediction_type=prediction, algorithm_type=algorithm)
    sched_d.set_timesteps(steps)
    ours = dx.NoiseSchedule.from_alphas_cumprod(sched_d.alphas_cumprod.double()).to(device)
    assert ours.timesteps(steps, "linspace", clean_end=True).tolist() == sched_d.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 6, generator=g)
    t_last = None
    for i, t in enumerate(sched_d.timesteps.tolist()):
        tt = torch.full((2,), t)
        m = toy_model(x, tt)
        mu = toy_model(x * 0.7, tt) if guided else None
        guided_m = mu + w * (m - mu) if guided else m
        noise = torch.randn(x.shape, generator=g)
        last = sched_d.model_outputs[-1]  # x̂0 of the step before (None at the first)
        x_d = sched_d.step(guided_m, t, x, variance_noise=noise).prev_sample
        t_prev = sched_d.timesteps[i + 1].item() if i + 1 < steps else -1
        second = last is not None and t_prev >= 0
        dev = [v.to(device) if isinstance(v, torch.Tensor) else v for v in (m, x, last, noise, mu)]
        out, x0 = ours.dpmpp_2m_step(dev[0], t, t_prev, dev[1], dev[2] if second else None, t_last if second else None,
                                     sde=algorithm.startswith("sde"), noise=dev[3], prediction_type=prediction,
                                     guidance_scale=w if guided else None, model_output_uncond=dev[4])
        scale = x_d.abs().max().item() + sched_d.model_outputs[-1].abs().max().item()
        torch.testing.assert_close(x0.cpu(), sched_d.model_outputs[-1], rtol=1e-5, atol=1e-5 * scale)
        torch.testing.assert_close(out.cpu(), x_d, rtol=1e-5, atol=1e-5 * scale)
        x, t_last = x_d, t


# ----------------------------------------------------------------------------------------------------
# torch.compile (opcheck: test_reverse_steps.py, with the other reverse steps)
# ----------------------------------------------------------------------------------------------------
def test_compile_fullgraph_two_steps(backend_device, sched):
    _, device = backend_device
    sched.to(device)
    x, m, mu, _, _, _ = _inputs((2, 3, 6, 6), "contiguous", torch.float32, device, True)
    t, tp, tl = (torch.tensor(v, device=device) for v in ([400, 500], [300, 400], [500, 600]))

    def two_steps(x, m, mu):
        y, x0 = sched.dpmpp_2m_step(m, tl, t, x, seed=3, guidance_scale=2.0, model_output_uncond=mu)
        return sched.dpmpp_2m_step(m, t, tp, y, x0, tl, sde=True, seed=4)

    torch._dynamo.reset()
    compiled = torch.compile(two_steps, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    for a, b in zip(compiled(x, m, mu), two_steps(x, m, mu)):
        torch.testing.assert_close(a, b)
