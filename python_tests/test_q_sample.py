"""q_sample and q_sample_with_noise: parity with the reference on every backend, dtype and layout;
gradients; opcheck; torch.compile."""
import pytest
import torch
from conftest import DTYPES
from shapes import CASES, make, same_layout
from tolerances import assert_matches_oracle

import diffusion_ext as dx
from diffusion_ext import ops, reference


@pytest.fixture(scope="module")
def sched():
    return dx.NoiseSchedule(1000, "linear", 1e-4, 0.02)


def _timesteps(batch, device, T=1000):
    g = torch.Generator().manual_seed(batch)
    t = torch.randint(0, T, (batch,), generator=g)
    t[0] = 0
    if batch > 1:
        t[-1] = T - 1
    return t.to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
def test_q_sample_matches_reference(backend_device, sched, shape, layout, dtype):
    _, device = backend_device
    sched.to(device)
    g = torch.Generator().manual_seed(0)
    x0 = make(shape, layout, dtype, device, g)
    noise = same_layout(x0, dtype, device, g)
    t = _timesteps(shape[0], device)
    out = sched.q_sample(x0, t, noise)
    ref = reference.q_sample(x0, t, noise, sched.alphas_cumprod)
    ref64 = reference.q_sample(x0.double(), t, noise.double(), sched.alphas_cumprod)
    assert_matches_oracle(out, ref, ref64)
    if layout in ("contiguous", "channels_last", "channels_last_3d"):
        assert out.stride() == x0.stride(), "a dense batch-outermost layout is kept, not copied"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
def test_q_sample_with_noise_matches_reference(backend_device, sched, shape, layout, dtype):
    _, device = backend_device
    sched.to(device)
    x0 = make(shape, layout, dtype, device, torch.Generator().manual_seed(1))
    t = _timesteps(shape[0], device)
    out, noise = sched.q_sample_with_noise(x0, t, seed=1234, offset=7)
    ref_noise64 = reference.noise_like(x0.double(), 1234, 7)
    ref_noise = reference.noise_like(x0, 1234, 7)
    assert_matches_oracle(noise, ref_noise, ref_noise64)
    # x_t must be made from exactly the noise returned: that is the training target
    assert_matches_oracle(out, reference.q_sample(x0, t, noise, sched.alphas_cumprod),
                          reference.q_sample(x0.double(), t, noise.double(), sched.alphas_cumprod))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,layout", [((4, 3, 8, 8), "contiguous"), ((4, 3, 8, 8), "channels_last"),
                                          ((5, 3, 3, 3), "contiguous"), ((3, 2, 5, 5), "channels_last"),
                                          ((7, 1, 1, 1), "contiguous"), ((2, 3, 2), "contiguous")])
@pytest.mark.parametrize("offset", [5, 2**32 - 2])  # the second: sample 2's stream carries into the high word
def test_per_sample_streams_give_each_sample_its_own_noise(backend_device, sched, shape, layout, dtype, offset):
    """per_sample_streams: one launch gives sample b the noise it gets alone from stream (seed, offset + b),
    also when a Philox block of four elements straddles two samples (27, 50 and 1 elements per sample)."""
    _, device = backend_device
    sched.to(device)
    x0 = make(shape, layout, dtype, device, torch.Generator().manual_seed(2))
    t = _timesteps(shape[0], device)
    out, noise = sched.q_sample_with_noise(x0, t, seed=99, offset=offset, per_sample_streams=True)
    for b in range(shape[0]):
        alone = sched.q_sample_with_noise(x0[b:b + 1], t[b:b + 1], seed=99, offset=offset + b)[1]
        assert_matches_oracle(noise[b:b + 1], alone, reference.noise_like(x0[b:b + 1].double(), 99, offset + b))
    ref64 = reference.q_sample_with_noise(x0.double(), t, sched.alphas_cumprod, 99, offset, True)
    assert_matches_oracle(out, reference.q_sample(x0, t, noise, sched.alphas_cumprod),
                          reference.q_sample(x0.double(), t, ref64[1], sched.alphas_cumprod))
    assert not torch.equal(noise[0], noise[1])  # distinct streams


def test_int_timestep_means_whole_batch(backend_device, sched):
    _, device = backend_device
    sched.to(device)
    x0 = torch.randn(3, 2, 4, 4, device=device)
    noise = torch.randn_like(x0)
    torch.testing.assert_close(sched.q_sample(x0, 17, noise),
                               sched.q_sample(x0, torch.full((3,), 17, device=device), noise))


def test_empty_batch_returns_empty(backend_device, sched):
    _, device = backend_device
    sched.to(device)
    x0 = torch.empty(0, 3, 4, 4, device=device)
    t = torch.empty(0, dtype=torch.long, device=device)
    assert sched.q_sample(x0, t, x0).shape == x0.shape
    out, noise = sched.q_sample_with_noise(x0, t, seed=0)
    assert out.shape == noise.shape == x0.shape
    x0 = torch.empty(2, 0, 4, device=device)
    assert sched.q_sample(x0, torch.tensor([1, 2], device=device), x0).shape == x0.shape


def test_gradients_cpu_gradcheck(sched):
    table = sched.alphas_cumprod  # fp64
    x0 = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0, 500, 999])
    with dx.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: ops.q_sample(a, t, b, table), (x0, noise))
        assert torch.autograd.gradcheck(lambda a: ops.q_sample_with_noise(a, t, table, 3, 0)[0], (x0,))


def _opcheck_cases(device):
    table32 = torch.linspace(0.99, 0.01, 50, device=device)
    x = torch.randn(3, 2, 5, 5, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    t = torch.tensor([0, 10, 49], device=device)
    return [
        (torch.ops.diffusion_ext.q_sample.default, (x, t, torch.randn_like(x), table32)),
        (torch.ops.diffusion_ext.q_sample.default, (cl, t, torch.randn_like(cl), table32)),
        (torch.ops.diffusion_ext.q_sample_with_noise.default, (x, t, table32, 5, 2)),
        (torch.ops.diffusion_ext.q_sample_with_noise.default, (cl, t, table32, 5, 2, True)),
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

    x = torch.randn(3, 2, 5, 5)
    t = torch.tensor([0, 10, 49])
    table = torch.linspace(0.99, 0.01, 50)
    torch.library.opcheck(dx_triton.q_sample, (x, t, torch.randn_like(x), table))
    torch.library.opcheck(dx_triton.q_sample_with_noise, (x, t, table, 5, 2))
    torch.library.opcheck(dx_triton.q_sample_with_noise, (x, t, table, 5, 2, True))


def test_compile_fullgraph(backend_device, sched):
    _, device = backend_device
    sched.to(device)
    x0 = torch.randn(4, 3, 6, 6, device=device)
    t = torch.tensor([0, 1, 500, 999], device=device)

    def loss_inputs(x0, t):
        x_t, eps = sched.q_sample_with_noise(x0, t, seed=11)
        return sched.q_sample(x0, t, eps) - x_t, eps * 2

    torch._dynamo.reset()
    compiled = torch.compile(loss_inputs, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    diff, eps2 = compiled(x0, t)
    _, eps2_eager = loss_inputs(x0, t)
    torch.testing.assert_close(diff, torch.zeros_like(diff), atol=1e-6, rtol=0)
    torch.testing.assert_close(eps2, eps2_eager)
