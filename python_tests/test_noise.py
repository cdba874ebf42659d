"""The counter-based noise: Philox known answers, distribution, independence, and the same stream on
every backend and for every split of the work between threads."""
import pytest
import torch

import diffusion_ext as dx
from diffusion_ext import reference


def test_philox_known_answers():
    # Known-answer vectors of Philox4x32-10 from Random123 (kat_vectors): (counter, key) -> output.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for (c0, c1, c2, c3), (k0, k1), expected in cases:
        group = torch.tensor([c0 | (c1 << 32)], dtype=torch.int64) if c1 < 2**31 else \
            torch.tensor([c0 | (c1 << 32)], dtype=torch.uint64).view(torch.int64)
        out = reference.philox4x32_10(group, c2 | (c3 << 32), k0 | (k1 << 32))
        assert tuple(int(v) for v in out) == expected


def _noise(backend, numel, seed, offset, dtype=torch.float32):
    with dx.use_backend(backend):
        sched = dx.NoiseSchedule(10)
        x0 = torch.zeros(1, numel, dtype=dtype)
        return sched.q_sample_with_noise(x0, 0, seed=seed, offset=offset)[1].flatten()


def test_moments_of_a_million_draws():
    z = _noise("cpu", 10**6, seed=2024, offset=0).double()
    # standard errors: mean 1e-3, std ~7e-4, skewness ~2.4e-3, kurtosis ~4.9e-3; allow > 4 sigma
    assert abs(z.mean().item()) < 5e-3
    assert abs(z.std().item() - 1) < 3e-3
    assert abs(((z - z.mean()) ** 3).mean().item()) < 1.2e-2
    assert abs(((z - z.mean()) ** 4).mean().item() - 3) < 3e-2
    # tails of a normal: P(|z| > 3) = 0.0027
    assert abs((z.abs() > 3).double().mean().item() - 0.0027) < 5e-4


def _corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return ((a * b).mean() / (a.std() * b.std())).item()


def test_no_correlation_between_neighbours_or_offsets():
    n = 2**18
    z = _noise("cpu", n, seed=7, offset=0)
    for lag in (1, 2, 3, 4, 5, 8):  # within a Philox block (lags 1-3) and across blocks
        assert abs(_corr(z[:-lag], z[lag:])) < 0.01, lag
    z_next = _noise("cpu", n, seed=7, offset=1)
    assert abs(_corr(z, z_next)) < 0.01
    assert abs(_corr(z[4:], z_next[:-4])) < 0.01  # not a shifted copy either
    assert abs(_corr(z, _noise("cpu", n, seed=8, offset=0))) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_same_noise_on_cpu_and_triton(dtype):
    pytest.importorskip("triton")
    if "triton" not in dx.available_backends("cpu"):
        pytest.skip("Triton interpreter not enabled")
    for seed, offset in [(0, 0), (123456789012, 5), (-1, 2**40)]:
        a = _noise("cpu", 4099, seed, offset, dtype)
        b = _noise("triton", 4099, seed, offset, dtype)
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6 if dtype == torch.float32 else 1e-14)


@pytest.mark.gpu
def test_same_noise_on_cpu_and_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    sched = dx.NoiseSchedule(10)
    x0 = torch.zeros(3, 5001)
    cpu = sched.q_sample_with_noise(x0, 0, seed=99, offset=3)[1]
    sched.to("cuda")
    for backend in dx.available_backends("cuda"):
        if backend == "torch":
            continue
        with dx.use_backend(backend):
            gpu = sched.q_sample_with_noise(x0.cuda(), 0, seed=99, offset=3)[1].cpu()
        torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-5)
    sched.to("cpu")


def test_noise_does_not_depend_on_thread_count():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _noise("cpu", 300_001, seed=3, offset=1)
        torch.set_num_threads(max(2, threads))
        many = _noise("cpu", 300_001, seed=3, offset=1)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(one, many, rtol=0, atol=0)
