"""pytest-benchmark suite of the trainer's noising step: x_t and ε for a local batch whose sample b must get
the noise of Philox stream (seed, first + b) whatever batch or rank it lands in (train.py's rule).
"per-sample calls" is what the trainer did before per_sample_streams (B launches on one-sample slices,
then two torch.cat); "one call" is q_sample_with_noise(..., per_sample_streams=True). Both give the same
bits (checked before timing).

    pytest benchmarks/bench_training_noise.py --benchmark-only
    python benchmarks/bench_training_noise.py [cpu|cuda]      # the markdown table with the ratio

No assertion here is about time.
"""
import sys

import pytest
import torch

import diffusion_ext as dx
from diffusion_ext import bench

SHAPES = [(8, 3, 64, 64), (64, 3, 64, 64)]
PROVIDERS = ["per-sample calls", "one call"]


def make_fn(provider, shape, device):
    sched = dx.NoiseSchedule(1000).to(device)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g).to(device)
    t = torch.randint(0, 1000, (shape[0],), generator=g).to(device)
    if provider == "one call":
        return lambda: sched.q_sample_with_noise(x0, t, seed=7, offset=100, per_sample_streams=True)

    def per_sample():
        parts = [sched.q_sample_with_noise(x0[i:i + 1], t[i:i + 1], seed=7, offset=100 + i) for i in range(shape[0])]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return per_sample


def _check_same(shape, device):
    a, b = (make_fn(p, shape, device)() for p in PROVIDERS)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "the two ways must give the same bits"


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=bench.shape_name)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_training_noise(benchmark, device, shape, provider):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cpu":
        bench.steady_cpu_allocator()
    _check_same(shape, device)
    benchmark.group = f"training noise {bench.shape_name(shape)}"
    benchmark(bench.synced(make_fn(provider, shape, device), device))


def table(device) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    lines = ["| shape | per-sample calls (µs) | one call (µs) | ratio |", "|---|---:|---:|---:|"]
    for shape in SHAPES:
        _check_same(shape, device)
        t = [bench.measure(make_fn(p, shape, device), device)[0] for p in PROVIDERS]
        lines.append(f"| {bench.shape_name(shape)} | {t[0] * 1e6:.0f} | {t[1] * 1e6:.0f} | {t[0] / t[1]:.2f}× |")
    return f"q_sample_with_noise for a training batch, fp32, torch threads {torch.get_num_threads()}\n\n" + "\n".join(lines)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(table(args[0] if args else ("cuda" if torch.cuda.is_available() else "cpu")))
