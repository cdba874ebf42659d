"""ddpm_step and ddim_step: parity with the reference (diffusers' step() formulas) on every backend,
dtype, layout, prediction type, variance, clipping, guidance and noise source; opcheck; torch.compile."""
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
    g = torch.Generator().manual_seed(seed)
    x = make(shape, layout, dtype, device, g)
    m = same_layout(x, dtype, device, g)
    mu = same_layout(x, dtype, device, g) if guided else None
    noise = same_layout(x, dtype, device, g)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    t[0] = 0  # no noise at t = 0
    if shape[0] > 1:
        t[1] = 999
    return x, m, mu, noise, t.to(device)


def _check(out, fn, *tensors_and_rest):
    """fn(*args) is the reference; run it in out's dtype and in fp64 and apply the tolerance rule."""
    def cast(v, dtype):
        return v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    args = tensors_and_rest
    ref = fn(*[cast(a, out.dtype) for a in args])
    ref64 = fn(*[cast(a, torch.float64) for a in args])
    assert_matches_oracle(out, ref, ref64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("noise_source", ["given", "seed"])
def test_ddpm_step_layouts_dtypes(backend_device, sched, shape, layout, dtype, noise_source):
    _, device = backend_device
    sched.to(device)
    x, m, _, noise, t = _inputs(shape, layout, dtype, device, guided=False)
    given = noise if noise_source == "given" else None
    out = sched.ddpm_step(m, t, x, given, seed=99, offset=3)
    if given is None:
        noise = reference.noise_like(x, 99, 3, m)
    _check(out, lambda m, x, n: reference.ddpm_step(m, t, x, sched.alphas_cumprod, n), m, x, noise)


@pytest.mark.parametrize("variance,prediction,clip,guided",
                         list(itertools.product(["fixed_small", "fixed_large"], PREDICTIONS, [True, False],
                                                [False, True])))
def test_ddpm_step_options(backend_device, sched, variance, prediction, clip, guided):
    _, device = backend_device
    sched.to(device)
    x, m, mu, noise, t = _inputs((4, 3, 5, 6), "contiguous", torch.float32, device, guided, seed=2)
    w = 3.5 if guided else None
    out = sched.ddpm_step(m, t, x, noise, clip_sample=clip, clip_range=0.8, variance=variance,
                          prediction_type=prediction, guidance_scale=w, model_output_uncond=mu)

    def ref(m, x, n, mu):
        return reference.ddpm_step(m, t, x, sched.alphas_cumprod, n, clip_sample=clip, clip_range=0.8,
                                   variance=variance, prediction_type=prediction, guidance_scale=w,
                                   model_output_uncond=mu)

    _check(out, ref, m, x, noise, mu)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
def test_ddim_step_layouts_dtypes(backend_device, sched, shape, layout, dtype):
    _, device = backend_device
    sched.to(device)
    x, m, _, noise, t = _inputs(shape, layout, dtype, device, guided=False)
    t_prev = t - 20
    t_prev[t_prev < 0] = -1
    out = sched.ddim_step(m, t, t_prev, x, eta=0.7, seed=5, offset=1)
    noise = reference.noise_like(x, 5, 1, m)
    _check(out, lambda m, x, n: reference.ddim_step(m, t, t_prev, x, sched.alphas_cumprod, 0.7, n), m, x, noise)


@pytest.mark.parametrize("eta,prediction,clip,guided",
                         list(itertools.product([0.0, 0.5, 1.0, 1.5], PREDICTIONS, [False, True], [False, True])))
def test_ddim_step_options(backend_device, sched, eta, prediction, clip, guided):
    _, device = backend_device
    sched.to(device)
    x, m, mu, noise, t = _inputs((4, 2, 3, 7), "contiguous", torch.float32, device, guided, seed=3)
    t_prev = torch.tensor([-1, 979, 0, -1], device=device)
    t = torch.tensor([0, 999, 10, 500], device=device)
    w = 0.0 if guided else None  # w = 0: the unconditional output alone
    out = sched.ddim_step(m, t, t_prev, x, eta, noise, clip_sample=clip, prediction_type=prediction,
                          guidance_scale=w, model_output_uncond=mu)

    def ref(m, x, n, mu):
        return reference.ddim_step(m, t, t_prev, x, sched.alphas_cumprod, eta, n, clip_sample=clip,
                                   prediction_type=prediction, guidance_scale=w, model_output_uncond=mu)

    _check(out, ref, m, x, noise, mu)


def test_ddim_eta_zero_is_deterministic_and_ignores_noise(backend_device, sched):
    _, device = backend_device
    sched.to(device)
    x, m, _, noise, t = _inputs((3, 2, 4, 4), "contiguous", torch.float32, device, False)
    a = sched.ddim_step(m, t, t - 1, x, eta=0.0)
    b = sched.ddim_step(m, t, t - 1, x, eta=0.0, noise=noise * float("nan"))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ddpm_no_noise_read_at_t0(backend_device, sched):
    # At t = 0 the step adds no noise, so not even a NaN in the noise may leak into x_0.
    _, device = backend_device
    sched.to(device)
    x = torch.randn(2, 3, 4, 4, device=device)
    m = torch.randn_like(x)
    out = sched.ddpm_step(m, 0, x, torch.full_like(x, float("nan")))
    assert torch.isfinite(out).all()


def test_same_seed_same_result_different_offset_different(backend_device, sched):
    _, device = backend_device
    sched.to(device)
    x, m, _, _, t = _inputs((2, 3, 8, 8), "contiguous", torch.float32, device, False)
    t = torch.tensor([500, 600], device=device)
    a = sched.ddpm_step(m, t, x, seed=1)
    torch.testing.assert_close(a, sched.ddpm_step(m, t, x, seed=1), rtol=0, atol=0)
    assert not torch.allclose(a, sched.ddpm_step(m, t, x, seed=1, offset=1))
    torch.manual_seed(0)
    c = sched.ddpm_step(m, t, x)  # seed drawn from torch's generator
    torch.manual_seed(0)
    torch.testing.assert_close(c, sched.ddpm_step(m, t, x), rtol=0, atol=0)


def _opcheck_cases(device):
    table = torch.linspace(0.999, 0.01, 50, device=device)
    x = torch.randn(3, 2, 5, 5, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 10, 49], device=device)
    tp = torch.tensor([-1, 5, 40], device=device)
    td, tl = torch.tensor([2, 10, 45], device=device), torch.tensor([3, 20, 49], device=device)  # dpmpp: t < t_last
    m = torch.randn_like(x)
    dpmpp = torch.ops.diffusion_ext.dpmpp_2m_step.default
    return [
        (torch.ops.diffusion_ext.ddpm_step.default,
         (m, t, x, table, None, 1, 2, True, 1.0, "fixed_small", "epsilon", None, None)),
        (torch.ops.diffusion_ext.ddpm_step.default,
         (cl, t, cl, table, torch.randn_like(cl), 1, 2, False, 1.0, "fixed_large", "v_prediction", 2.0, cl * 0.5)),
        (torch.ops.diffusion_ext.ddim_step.default,
         (m, t, tp, x, table, 0.5, None, 1, 2, False, 1.0, "sample", 3.0, m * 0.1)),
        (torch.ops.diffusion_ext.ddim_step.default,
         (m, t, tp, x, table, 0.0, None, 0, 0, True, 1.0, "epsilon", None, None)),
        # dpmpp_2m_step: first order ODE; second order SDE (noise made, guided, clipped); channels_last with the
        # noise given; an fp64 table
        (dpmpp, (m, td, tp, x, table, None, None, False, None, 0, 0, False, 1.0, "epsilon", None, None)),
        (dpmpp, (m, td, tp, x, table, m * 0.3, tl, True, None, 1, 2, True, 1.0, "v_prediction", 2.0, m * 0.5)),
        (dpmpp, (cl, td, tp, cl, table, cl * 0.2, tl, True, torch.randn_like(cl), 0, 0, False, 1.0, "sample", None,
                 None)),
        (dpmpp, (m, td, tp, x, table.double(), m * 0.3, tl, False, None, 0, 0, False, 1.0, "epsilon", 7.5, m)),
    ]


def test_opcheck_cpu():
    for op, args in _opcheck_cases("cpu"):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_opcheck_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for op, args in _opcheck_cases("cuda"):
        torch.library.opcheck(op, args)


def test_opcheck_triton():
    pytest.importorskip("triton")
    from diffusion_ext import triton as dx_triton

    for op, args in _opcheck_cases("cpu"):
        torch.library.opcheck(getattr(dx_triton, op.name().split("::")[1].split(".")[0]), args)


def test_compile_fullgraph_sampling_step(backend_device, sched):
    _, device = backend_device
    sched.to(device)
    x, m, mu, _, t = _inputs((2, 3, 6, 6), "contiguous", torch.float32, device, True)
    t = torch.tensor([10, 400], device=device)

    def step(x, m, mu):
        y = sched.ddpm_step(m, t, x, seed=3, guidance_scale=2.0, model_output_uncond=mu)
        return sched.ddim_step(m, t, t - 5, y, eta=0.3, seed=4)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x, m, mu), step(x, m, mu))
