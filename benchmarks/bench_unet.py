"""pytest-benchmark suite of the whole UNet: one training step (forward + backward + Adam) and one sampling
step (one model call + one fused DDIM update) at the report's 64×64 configuration, fused vs eager vs
torch.compile(eager), measured in one run.

    pytest benchmarks/bench_unet.py --benchmark-only
    python benchmarks/bench_unet.py [cpu|cuda] [--quick|--smoke] [--compile] [--channels-last]
                                    [--precision fp32|bf16|fp16]                            # one table
    python benchmarks/bench_unet.py cpu --grid      # fp32 and bf16 autocast × NCHW and channels_last
    python benchmarks/bench_unet.py cpu --torch-dropout   # + the fused model with torch's nn.Dropout
    python benchmarks/bench_unet.py cpu --compile --compile-fused   # + torch.compile of the fused model
    python benchmarks/bench_unet.py cpu --both-layouts [--mode sample]   # each provider in both layouts, one run

"fused" is UNet(fused=True) (GroupNormAct + flash attention kernels), "eager" is UNet(fused=False) with
the same weights (nn.GroupNorm-equivalent F.group_norm + SiLU, softmax(q·kᵀ)·v with the scores stored,
torch's nn.Dropout), "compile" is torch.compile of the eager model, "compile, fused" (--compile-fused)
torch.compile of the fused model (what a user who compiles whatever model they have gets; the custom ops are
opaque to inductor, and nn.Dropout runs torch's dropout while traced), and "fused, torch dropout"
(--torch-dropout) the fused model with torch's nn.Dropout in place of ops.dropout: what the in-kernel
dropout mask alone buys. On CPU the batch is 8, in fp32 unless --precision says
otherwise; on GPU 64 under bf16 autocast. The table's providers are timed interleaved (timing.interleaved:
A B, B A, ...), and it quotes the median and the minimum of each. No assertion here is about time.
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
TORCH_DROPOUT = "fused, torch dropout"
COMPILE_FUSED = "compile, fused"


def batch_for(device):
    return 8 if device.type == "cpu" else 64


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device) -> str:
    return "fp32" if torch.device(device).type == "cpu" else "bf16"


def make_fn(mode, provider, device, batch, channels_last=False, config=CONFIG, precision=None):
    """One training or sampling step of the provider's model; `precision` ("fp32", "bf16", "fp16"; default
    fp32 on CPU, bf16 on GPU) other than fp32 runs the model under autocast to that dtype."""
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = UNet(**config, fused=provider in ("fused", TORCH_DROPOUT, COMPILE_FUSED)).to(device).to(memory_format=fmt)
    if provider == TORCH_DROPOUT:
        for m in model.modules():
            if isinstance(getattr(m, "dropout", None), dx.nn.Dropout):
                m.dropout = torch.nn.Dropout(m.dropout.p)
    net = bench.compiled(model) if provider in ("compile", COMPILE_FUSED) else model
    diffusion = Diffusion(dx.NoiseSchedule(1000, "linear").to(device))
    g = torch.Generator().manual_seed(1)
    size = config["image_size"]
    x0 = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(device).contiguous(memory_format=fmt)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    low = PRECISIONS[precision or default_precision(device)]
    autocast = torch.autocast(device.type, dtype=low or torch.bfloat16, enabled=low is not None)
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


def _providers(device, compile_cpu=False, torch_dropout=False, mode="train step", compile_fused=False):
    # dropout acts only in training: the sampling step has no "fused, torch dropout" row
    return [p for p in PROVIDERS if p != "compile" or device.type == "cuda" or compile_cpu] + \
        ([COMPILE_FUSED] if compile_fused else []) + ([TORCH_DROPOUT] if torch_dropout and mode == "train step" else [])


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


def table(device, compile_cpu=False, channels_last=False, batch=None, reps=5, config=CONFIG, precision=None,
          header=True, torch_dropout=False, compile_fused=False, both_layouts=False, modes=MODES) -> str:
    """Markdown rows (mode, provider, median and min ms, median vs eager) of the UNet's steps, the providers
    of each mode timed interleaved, `reps` repetitions each after two warm-ups (the first compiles).
    both_layouts: every provider in contiguous and in channels_last, all interleaved in one run, each row's
    ratio against the contiguous eager model (a user who picks a layout and a provider against the default)."""
    from diffusion_ext import timing

    device = torch.device(device)
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    batch = batch or batch_for(device)
    precision = precision or default_precision(device)
    layouts = (False, True) if both_layouts else (channels_last,)
    label = "fp32" if precision == "fp32" else f"{precision} autocast"
    lines = ["| precision | layout | mode | provider | median (ms) | min (ms) | vs eager (median) |",
             "|---|---|---|---|---:|---:|---:|"] if header else []

    def layout_name(cl):
        return "channels_last" if cl else "contiguous"

    def key(p, cl):  # the timing name: the provider, and its layout when the run has two
        return f"{p}, {layout_name(cl)}" if both_layouts else p

    baseline = key("eager", layouts[0])
    for mode in modes:
        fns, failed = {}, {}
        cases = [(p, cl) for cl in layouts for p in _providers(device, compile_cpu, torch_dropout, mode, compile_fused)]
        for p, cl in cases:
            k = key(p, cl)
            try:  # a provider that cannot build or run its first step gets a row saying why, not the table's end
                fns[k] = bench.synced(make_fn(mode, p, device, batch, cl, config, precision), device)
                fns[k]()
            except Exception as e:
                fns.pop(k, None)
                failed[k] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else type(e).__name__
        t = timing.interleaved(fns, reps, warmup=2)
        med = {k: sorted(v)[len(v) // 2] for k, v in t.times.items()}
        for p, cl in cases:
            k, layout = key(p, cl), layout_name(cl)
            if k in failed:
                lines.append(f"| {label} | {layout} | {mode} | {p} | failed: {failed[k]} | – | – |")
            else:
                ratio = f"{med[baseline] / med[k]:.2f}×" if baseline in med else "–"
                lines.append(f"| {label} | {layout} | {mode} | {p} | {med[k] * 1e3:.1f} | {t.min(k) * 1e3:.1f} | {ratio} |")
            print(lines[-1], file=sys.stderr)
        if fns:
            lines.append(f"<!-- {mode}, {label}, {'both layouts' if both_layouts else layout_name(channels_last)}: "
                         f"{t.describe()} -->")
    if not header:
        return "\n".join(lines)
    size = config["image_size"]
    against = " (every ratio against eager, contiguous)" if both_layouts else ""
    return (f"UNet {config}, batch {batch}, {size}×{size}, torch {torch.__version__}, torch threads "
            f"{torch.get_num_threads()}, {bench.describe_device(device)}{against}\n\n" + "\n".join(lines))


def _options(p):
    p.add_argument("--compile", action="store_true", help="on CPU, also torch.compile of the eager model (slow)")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    p.add_argument("--mode", choices=("train", "sample", "both"), default="both",
                   help="time the training step, the sampling step, or both (default)")
    p.add_argument("--both-layouts", action="store_true",
                   help="every provider contiguous and channels_last in one interleaved run, ratios against "
                        "contiguous eager")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default=None,
                   help="fp32, or autocast to bf16 / fp16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--grid", action="store_true", help="fp32 and bf16 autocast, each contiguous and channels_last")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of each provider (default 5)")
    p.add_argument("--compile-fused", action="store_true", help="also torch.compile of the fused model (slow on CPU)")
    p.add_argument("--torch-dropout", action="store_true",
                   help="also the fused model with torch's nn.Dropout (what ops.dropout alone buys)")


if __name__ == "__main__":
    args = bench.script_args(__doc__, extra=_options)
    # --quick keeps the device's batch (64 on a GPU) with fewer repetitions; --smoke runs batch 2 once
    reps = 3 if args.quick else 1 if args.smoke else args.reps
    kw = dict(batch=2 if args.smoke else None, reps=reps, config=SMOKE_CONFIG if args.smoke else CONFIG,
              torch_dropout=args.torch_dropout, compile_fused=args.compile_fused, both_layouts=args.both_layouts,
              modes={"train": MODES[:1], "sample": MODES[1:], "both": MODES}[args.mode])
    if args.grid:
        cells = [(prec, cl) for prec in ("fp32", "bf16") for cl in (False, True)]
        parts = [table(args.device, args.compile, cl, precision=prec, header=i == 0, **dict(kw, both_layouts=False))
                 for i, (prec, cl) in enumerate(cells)]
        print("\n".join(parts))
    else:
        print(table(args.device, args.compile, args.channels_last, precision=args.precision, **kw))
