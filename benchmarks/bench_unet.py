"""pytest-benchmark suite of the whole UNet: one training step (forward + backward + Adam) and one sampling
step (one model call + one fused DDIM update) at the report's 64×64 configuration, fused vs eager vs
torch.compile(eager), measured in one run.

    pytest benchmarks/bench_unet.py --benchmark-only
    python benchmarks/bench_unet.py [cpu|cuda] [--quick|--smoke] [--compile] [--channels-last]   # the table

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
# --smoke: the same architecture, small enough that one step takes milliseconds on a CPU
SMOKE_CONFIG = dict(CONFIG, base_channels=32, channel_mults=(1, 2), image_size=32)
MODES = ["train step", "sampling step"]
PROVIDERS = ["eager", "fused", "compile"]


def batch_for(device):
    return 8 if device.type == "cpu" else 64


def make_fn(mode, provider, device, batch, channels_last=False, config=CONFIG):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(**config, fused=provider == "fused").to(device).to(memory_format=fmt)
    net = bench.compiled(model) if provider == "compile" else model
    diffusion = Diffusion(dx.NoiseSchedule(1000, "linear").to(device))
    g = torch.Generator().manual_seed(1)
    size = config["image_size"]
    x0 = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
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


def table(device, compile_cpu=False, channels_last=False, batch=None, options=None, config=CONFIG) -> str:
    device = torch.device(device)
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    batch = batch or batch_for(device)
    # whole-model steps take 0.1–2 s on CPU: a few repetitions (median) suffice
    options = options or bench.TimingOptions(warmup=2, min_reps=7, max_reps=50, min_time_s=2.0)
    lines = ["| mode | provider | time (ms) | vs eager |", "|---|---|---:|---:|"]
    for mode in MODES:
        base = None
        for provider in _providers(device, compile_cpu):
            t, why = bench.attempt(lambda: make_fn(mode, provider, device, batch, channels_last, config), device,
                                   options)
            base = t if provider == "eager" else base
            lines.append(f"| {mode} | {provider} | {bench.time_cells(t, base, why, unit=1e3)} |")
            print(lines[-1], file=sys.stderr)
    dtype = "fp32" if device.type == "cpu" else "bf16 autocast"
    layout = "channels_last" if channels_last else "contiguous"
    size = config["image_size"]
    return (f"UNet {config}, batch {batch}, {size}×{size}, {dtype}, {layout}, torch threads {torch.get_num_threads()}\n\n"
            + "\n".join(lines))


def _options(p):
    p.add_argument("--compile", action="store_true", help="on CPU, also torch.compile of the eager model (slow)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")


if __name__ == "__main__":
    args = bench.script_args(__doc__, extra=_options)
    # --quick keeps the device's batch (64 on a GPU) with fewer repetitions; --smoke runs batch 2 once
    options = bench.TimingOptions(warmup=1, min_reps=5, max_reps=20, min_time_s=0.5) if args.quick else \
        args.options if args.smoke else None
    print(table(args.device, args.compile, args.channels_last, batch=2 if args.smoke else None, options=options,
                config=SMOKE_CONFIG if args.smoke else CONFIG))
