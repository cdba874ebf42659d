"""pytest-benchmark suite of a whole DDPM sampling loop (T = 1000 reverse steps) of the report's 64×64 UNet:
the eager model in a Python loop, the fused model in a Python loop, and the fused model's step captured
in a CUDA graph and replayed 1000 times (diffusion_ext.sampling.GraphedSampler), in one run.

    pytest benchmarks/bench_sampling_loop.py --benchmark-only
    python benchmarks/bench_sampling_loop.py [cpu|cuda] [--quick|--smoke] [--steps N]   # the table, ratios to eager

The issue's target is graph ≥ 2× eager on an H100. The graph removes the host's launch cost (a few hundred
kernels per step), so the gain is largest at small batches, where the GPU would otherwise wait for
Python; both batch 1 and batch 16 are measured. "graph (eager model)" separates the graph's gain from the
kernels'. On GPU the model runs under bf16 autocast; on CPU (fp32) there is no graph, and the default is
10 steps of a 1000-step schedule (the per-step cost is what matters there). No assertion here is about time.
"""
import sys

import pytest
import torch

import diffusion_ext as dx
from diffusion_ext import bench
from diffusion_ext.diffusion import Diffusion
from diffusion_ext.sampling import GraphedSampler
from diffusion_ext.models import UNet

from bench_unet import CONFIG, SMOKE_CONFIG

PROVIDERS = ["eager", "fused", "graph (eager model)", "graph (fused)"]


def batches_for(device):
    return (1, 16) if device.type == "cuda" else (1, 8)


def _providers(device):
    return PROVIDERS if device.type == "cuda" else PROVIDERS[:2]


def make_fn(provider, device, batch, steps, config=CONFIG):
    torch.manual_seed(0)
    model = UNet(**config, fused="fused" in provider).to(device).eval()
    diffusion = Diffusion(dx.NoiseSchedule(1000, "linear").to(device))
    shape = (batch, 3, config["image_size"], config["image_size"])
    # DDIM η = 1 with `steps` steps of the 1000-step schedule is DDPM's ancestral chain on those steps
    # (Song et al. 2021, eq. 16); steps = 1000 is the full DDPM loop of ddpm_step calls.
    kw = dict(sampler="ddpm", steps=steps)
    bf16 = device.type == "cuda"
    if provider.startswith("graph"):
        sampler = GraphedSampler(diffusion, model, shape, device=device, capture=True,
                                 autocast_dtype=torch.bfloat16 if bf16 else None, **kw)
        return lambda: sampler(seed=0)

    def fn():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return diffusion.sample(model, shape, seed=0, device=device, **kw)
    return fn


def default_steps(device):
    return 1000 if device.type == "cuda" else 10


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sampling_loop(benchmark, device, batch, provider):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if provider not in _providers(device):
        pytest.skip("CUDA graphs need a CUDA device")
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    steps = default_steps(device)
    fn = bench.synced(make_fn(provider, device, batch, steps), device)
    fn()
    benchmark.group = f"sampling loop, {steps} steps, batch {batch}"
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1)


def table(device, steps=None, batches=None, reps=3, config=CONFIG) -> str:
    device = torch.device(device)
    steps = steps or default_steps(device)
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    # one loop takes seconds: the median of a few, no L2 flush (it would be 1 write in ~10^5 kernels)
    options = bench.TimingOptions(warmup=1, min_reps=reps, max_reps=reps, min_time_s=0.0, flush_l2=False)
    lines = ["| batch | provider | loop (ms) | per step (ms) | vs eager |", "|---:|---|---:|---:|---:|"]
    for batch in batches or batches_for(device):
        base = None
        for provider in _providers(device):
            t, why = bench.attempt(lambda: make_fn(provider, device, batch, steps, config), device, options)
            base = t if provider == "eager" else base
            cells = f"failed: {why} | – | –" if t is None else \
                f"{t * 1e3:.0f} | {t * 1e3 / steps:.2f} | " + (f"{base / t:.2f}×" if base else "–")
            lines.append(f"| {batch} | {provider} | {cells} |")
            print(lines[-1], file=sys.stderr)
    dtype = "fp32" if device.type == "cpu" else "bf16 autocast"
    size = config["image_size"]
    return (f"DDPM sampling loop, {steps} steps of a 1000-step linear schedule, UNet {config}, {size}×{size}, {dtype}, "
            f"torch threads {torch.get_num_threads()}\n\n" + "\n".join(lines))


if __name__ == "__main__":
    args = bench.script_args(__doc__, extra=lambda p: p.add_argument("--steps", type=int, default=None))
    if args.smoke:  # two steps at batch 1, once
        print(table(args.device, args.steps or 2, batches=(1,), reps=1, config=SMOKE_CONFIG))
    elif args.quick:  # the batch 16; 250 of the 1000 steps (the per-step ratio is what is compared)
        print(table(args.device, args.steps or (250 if args.device.type == "cuda" else 10), batches=(16,), reps=2))
    else:
        print(table(args.device, args.steps))
