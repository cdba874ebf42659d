"""pytest-benchmark suite of group_norm_act: forward, backward and forward+backward, provider × shape ×
layout × dtype, against eager (F.group_norm then F.silu) and torch.compile of the same (on a CPU with
--compile: inductor's CPU compiles take minutes over the grid); for the
first shape also with FiLM (scale, shift from one (N, 2C) tensor, as a U-Net's time MLP gives them) against
eager F.silu(F.group_norm(x)·(1 + scale) + shift). The markdown table holds the plain rows.

    pytest benchmarks/bench_group_norm_act.py --benchmark-only
    python benchmarks/bench_group_norm_act.py [cpu|cuda] [--quick|--smoke] [--dtypes bf16,fp16]   # the markdown table of ratios
    python benchmarks/bench_group_norm_act.py cpu --small-maps --compile --dtypes fp32,bf16   # the latent model's maps

Rows are grouped by (mode, shape, layout, dtype) so the providers of one case stand side by side. On a
GPU each call is followed by torch.cuda.synchronize. No assertion here is about time.
"""
import sys

import pytest
import torch
import torch.nn.functional as F

import diffusion_ext as dx
from diffusion_ext import bench

GROUPS = 32
CPU_SHAPES = [(64, 128, 32, 32), (8, 320, 32, 32), (1, 512, 32, 32)]
# The 8×8×4 latent model's and a 64×64 U-Net's deepest levels (--small-maps): per-group and per-call costs weigh most.
SMALL_MAPS = [(8, 512, 4, 4), (64, 256, 4, 4), (64, 256, 8, 8)]
GPU_SHAPES = [(64, 128, 64, 64), (64, 256, 32, 32), (64, 512, 16, 16), (8, 320, 64, 64), (1, 512, 64, 64)]
HEADLINE = {"cuda": ([(64, 256, 32, 32)], [torch.bfloat16]), "cpu": ([(64, 128, 32, 32)], [torch.float32])}
SMOKE = ([(2, 64, 8, 8)], [torch.float32])
MODES = ["forward", "backward", "forward+backward"]
LAYOUTS = ["contiguous", "channels_last"]


def eager(x, w, b, scale=None, shift=None):
    h = F.group_norm(x, GROUPS, w, b, 1e-5)
    if scale is not None:  # FiLM, as diffusers' ResnetBlock2D writes it
        h = h * (1 + scale[:, :, None, None]) + shift[:, :, None, None]
    return F.silu(h)


def providers(device, compile_on_cpu=False):
    out = ["eager"]
    if device.type == "cuda" or compile_on_cpu:
        out.append("compile")
    out += [p for p in dx.available_backends(device) if p != "torch" and not (p == "triton" and device.type == "cpu")]
    return out


def make_fn(mode, provider, shape, layout, dtype, device, film=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = torch.randn(shape[1], generator=g).to(device, dtype)
    b = torch.randn(shape[1], generator=g).to(device, dtype)
    emb = torch.randn(shape[0], 2 * shape[1], generator=g).to(device, dtype) if film else None
    gy = torch.randn_like(x)
    if provider == "eager":
        f = eager
    elif provider == "compile":
        f = bench.compiled(eager, dynamic=False)
    else:
        def f(x, w, b, scale=None, shift=None, _backend=provider):
            with dx.use_backend(_backend):
                return dx.ops.group_norm_act(x, GROUPS, w, b, 1e-5, "silu", scale, shift)
    leaves = [t.requires_grad_(mode != "forward") for t in (x, w, b) + ((emb,) if film else ())]

    def call():
        return f(*leaves[:3], *leaves[3].chunk(2, dim=1)) if film else f(*leaves)

    if mode == "forward":
        return call
    if mode == "backward":
        y = call()
        return lambda: torch.autograd.grad(y, leaves, gy, retain_graph=True)
    return lambda: torch.autograd.grad(call(), leaves, gy)


def _cases():
    for device, shapes, dtypes in (("cpu", CPU_SHAPES, [torch.float32]),
                                   ("cuda", GPU_SHAPES, [torch.bfloat16, torch.float16, torch.float32])):
        for shape in shapes:
            for film in (False, True) if shape == shapes[0] else (False,):
                for layout in LAYOUTS:
                    for dtype in dtypes:
                        for mode in MODES:
                            marks = [pytest.mark.gpu] if device == "cuda" else []
                            name = f"{device}-{bench.shape_name(shape)}-{layout}-{bench.dtype_name(dtype)}-{mode}"
                            yield pytest.param(device, shape, layout, dtype, mode, film, marks=marks,
                                               id=name + ("-film" if film else ""))


@pytest.mark.parametrize("provider", ["eager", "compile", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("device,shape,layout,dtype,mode,film", list(_cases()))
def test_group_norm_act(benchmark, provider, device, shape, layout, dtype, mode, film):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if provider not in providers(device):
        pytest.skip(f"provider {provider!r} is not measured for {device.type} tensors")
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    fn = make_fn(mode, provider, shape, layout, dtype, device, film)
    fn = bench.synced(fn, device)

    fn()
    benchmark.group = (f"group_norm_act{' FiLM' if film else ''} {mode} {bench.shape_name(shape)} {layout} "
                       f"{bench.dtype_name(dtype)}")
    assert benchmark(fn) is not None


def table(device, cases=None, options=None, compile_on_cpu=False) -> str:
    """Markdown: median time per provider and the ratio to eager, measured in one run. cases: (shapes,
    dtypes), default every shape and dtype of the device; a case that fails is a row that says why."""
    device = torch.device(device)
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    shapes, dtypes = cases or ((CPU_SHAPES, [torch.float32]) if device.type == "cpu" else
                               (GPU_SHAPES, [torch.bfloat16, torch.float16, torch.float32]))
    lines = ["| mode | shape | layout | dtype | provider | time (µs) | vs eager |", "|---|---|---|---|---|---:|---:|"]
    for shape in shapes:
        for layout in LAYOUTS:
            for dtype in dtypes:
                for mode in MODES:
                    base = None
                    for provider in providers(device, compile_on_cpu):
                        t, why = bench.attempt(lambda: make_fn(mode, provider, shape, layout, dtype, device), device,
                                               options)
                        base = t if provider == "eager" else base
                        lines.append(f"| {mode} | {bench.shape_name(shape)} | {layout} | {bench.dtype_name(dtype)} | "
                                     f"{provider} | {bench.time_cells(t, base, why)} |")
                        print(lines[-1], file=sys.stderr)
    return "\n".join(lines)


def _options(p):
    bench.add_dtypes_option(p)
    p.add_argument("--small-maps", action="store_true",
                   help="the small maps (SMALL_MAPS) in fp32, or in the --dtypes given, instead of the headline shapes")
    p.add_argument("--compile", action="store_true", help="torch.compile of eager as a provider on a CPU too")


if __name__ == "__main__":
    args = bench.script_args(__doc__, extra=_options)
    cases = SMOKE if args.smoke else HEADLINE[args.device.type] if args.quick else None
    if args.dtypes and not args.smoke:  # the headline shapes in the dtypes asked for
        cases = (HEADLINE[args.device.type][0], args.dtypes)
    if args.small_maps and not args.smoke:
        cases = (SMALL_MAPS, args.dtypes or [torch.float32])
    print(table(args.device, cases, args.options, compile_on_cpu=args.compile))
