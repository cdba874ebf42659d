"""pytest-benchmark suite of the whole UNet: one training step (forward + backward + Adam) and one sampling
step (one model call + one fused DDIM update) at the report's 64×64 configuration, fused vs eager vs
torch.compile(eager), measured in one run.

    pytest benchmarks/bench_unet.py --benchmark-only
    python benchmarks/bench_unet.py [cpu|cuda] [--compile] [--channels-last]   # the markdown table, ratios to eager

"fused" is UNet(fused=True) (GroupNormAct + flash attention kernels), "eager" is UNet(fused=False) with
the same weights (nn.GroupNorm-equivalent F.group_norm + SiLU, softmax(q·kᵀ)·v with the scores stored),
"compile" is torch.compile of the eager model. On CPU the batch is 8 in fp32; on GPU 64 under bf16
autocast. No assertion here is about time.
"""
import sys

import pytest
import torch

import diffusion_ext as dx
from diffusion_ext import bench
from diffusion_ext.diffusion import Diffusion
from diffusion_ext.models import UNet

# The report's pixel U-Net on 64×64 faces (Ho et al. 2020's CelebA-HQ layout scaled to 64×64).
CONFIG = dict(in_channels=3, out_channels=3, base_channels=64, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
              attention_resolutions=(16,), image_size=64, dropout=0.1, head_dim=32, num_groups=32)
MODES = ["train step", "sampling step"]
PROVIDERS = ["eager", "fused", "compile"]


def batch_for(device):
    return 8 if device.type == "cpu" else 64


def make_fn(mode, provider, device, batch, channels_last=False):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(**CONFIG, fused=provider == "fused").to(device).to(memory_format=fmt)
    net = torch.compile(model) if provider == "compile" else model
    diffusion = Diffusion(dx.NoiseSchedule(1000, "linear").to(device))
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    if mode == "train step":
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        model.train()

        def fn():
            opt.zero_grad(set_to_none=True)
            x_t, eps = diffusion.schedule.q_sample_with_noise(x0, t, seed=1)
            with autocast:
                loss = torch.nn.functional.mse_loss(net(x_t, t).float(), eps)
            loss.backward()
            opt.step()
            return loss
        return fn

    model.eval()

    @torch.no_grad()
    def fn():
        with autocast:
            return diffusion.sample_step(net, x0, 500, 480, sampler="ddim")
    return fn


def _providers(device, compile_cpu=False):
    return [p for p in PROVIDERS if p != "compile" or device.type == "cuda" or compile_cpu]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_unet(benchmark, device, mode, provider):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if provider not in _providers(device):
        pytest.skip("torch.compile of the UNet on CPU: run `python benchmarks/bench_unet.py cpu --compile`")
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    fn = make_fn(mode, provider, device, batch_for(device))
    fn()  # warm-up (and compilation)
    fn = bench.synced(fn, device)

    benchmark.group = f"unet {mode} batch {batch_for(device)}"
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)


def table(device, compile_cpu=False, channels_last=False) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    batch = batch_for(device)
    # whole-model steps take 0.1–2 s on CPU: a few repetitions (median) suffice
    options = bench.TimingOptions(warmup=2, min_reps=7, max_reps=50, min_time_s=2.0)
    lines = ["| mode | provider | time (ms) | vs eager |", "|---|---|---:|---:|"]
    for mode in MODES:
        base = None
        for provider in _providers(device, compile_cpu):
            fn = make_fn(mode, provider, device, batch, channels_last)
            fn()
            t, _ = bench.measure(fn, device, options)
            base = t if provider == "eager" else base
            lines.append(f"| {mode} | {provider} | {t * 1e3:.1f} | {base / t:.2f}× |")
            print(lines[-1], file=sys.stderr)
    dtype = "fp32" if device.type == "cpu" else "bf16 autocast"
    layout = "channels_last" if channels_last else "contiguous"
    return (f"UNet {CONFIG}, batch {batch}, 64×64, {dtype}, {layout}, torch threads {torch.get_num_threads()}\n\n"
            + "\n".join(lines))


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(table(args[0] if args else ("cuda" if torch.cuda.is_available() else "cpu"), "--compile" in sys.argv,
                "--channels-last" in sys.argv))
