"""pytest-benchmark suite of attention: forward and forward+backward, provider × (B, H, L, D) × dtype, against
eager (softmax(q·kᵀ·scale)·v with the scores materialised), every F.scaled_dot_product_attention backend the
device has, and, on GPU, torch.compile of the eager code.

    pytest benchmarks/bench_attention.py --benchmark-only
    python benchmarks/bench_attention.py [cpu|cuda] [--quick|--smoke] [--dtypes bf16,fp16]   # the table: time, vs eager, vs SDPA, TFLOP/s

FLOPs counted as FlashAttention does: forward 4·B·H·Lq·Lk·D (two matmuls), backward 2.5× the forward.
No assertion here is about time.
"""
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import diffusion_ext as dx
from diffusion_ext import bench, reference

SHAPES = [(64, 4, 64, 64), (64, 4, 256, 64), (16, 8, 1024, 64), (4, 8, 4096, 40), (64, 4, 256, 32)]
CPU_SHAPES = [(64, 4, 256, 32), (64, 4, 64, 64), (16, 8, 1024, 64)]
HEADLINE = {"cuda": ([(16, 8, 1024, 64), (64, 4, 256, 32)], [torch.bfloat16]), "cpu": ([(64, 4, 256, 32)], [torch.float32])}
SMOKE = ([(2, 2, 32, 32)], [torch.float32])
MODES = ["forward", "forward+backward"]
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
# Dense peak TFLOP/s by GPU name fragment and dtype (vendor datasheets; SXM parts), for the "% of peak" column.
GPU_PEAK = {"H100": {torch.float16: 989.0, torch.bfloat16: 989.0, torch.float32: 67.0},
            "H200": {torch.float16: 989.0, torch.bfloat16: 989.0, torch.float32: 67.0}}


def providers(device):
    out = ["eager"]
    if device.type == "cuda":
        out += ["compile", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"]
    else:
        out += ["sdpa-flash", "sdpa-math"]  # CPU: SDPA's flash kernel (its default) and its math fallback
    out += [p for p in dx.available_backends(device) if p != "torch" and not (p == "triton" and device.type == "cpu")]
    return out


def flops(shape, mode):
    B, H, L, D = shape
    fwd = 4 * B * H * L * L * D
    return fwd if mode == "forward" else 3.5 * fwd


def make_fn(mode, provider, shape, dtype, device):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    g_out = torch.randn_like(q)
    if provider == "eager":
        f = reference.attention
    elif provider == "compile":
        f = bench.compiled(reference.attention, dynamic=False)
    elif provider.startswith("sdpa"):
        def f(q, k, v, _b=SDPA_BACKENDS[provider]):
            with sdpa_kernel(_b):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)
    else:
        def f(q, k, v, _backend=provider):
            with dx.use_backend(_backend):
                return dx.ops.attention(q, k, v)
    leaves = [t.requires_grad_(mode != "forward") for t in (q, k, v)]
    try:
        f(*leaves)  # an SDPA backend that cannot take this case raises here: the provider is skipped
    except RuntimeError:
        if provider.startswith("sdpa"):
            return None
        raise  # anything else is a failure that its row reports
    if mode == "forward":
        return lambda: f(*leaves)
    return lambda: torch.autograd.grad(f(*leaves), leaves, g_out)


def _cases():
    for device, shapes, dtypes in (("cpu", CPU_SHAPES, [torch.float32]),
                                   ("cuda", SHAPES, [torch.float16, torch.bfloat16])):
        for shape in shapes:
            for dtype in dtypes:
                for mode in MODES:
                    marks = [pytest.mark.gpu] if device == "cuda" else []
                    yield pytest.param(device, shape, dtype, mode, marks=marks,
                                       id=f"{device}-{bench.shape_name(shape)}-{bench.dtype_name(dtype)}-{mode}")


@pytest.mark.parametrize("provider", ["eager", "compile", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math",
                                      "cpu", "cuda", "triton"])
@pytest.mark.parametrize("device,shape,dtype,mode", list(_cases()))
def test_attention(benchmark, provider, device, shape, dtype, mode):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if provider not in providers(device):
        pytest.skip(f"provider {provider!r} is not measured for {device.type} tensors")
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    fn = make_fn(mode, provider, shape, dtype, device)
    if fn is None:
        pytest.skip(f"{provider} does not support this case")
    fn = bench.synced(fn, device)

    benchmark.group = f"attention {mode} {bench.shape_name(shape)} {bench.dtype_name(dtype)}"
    assert benchmark(fn) is not None


def _peak(device, dtype):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[dtype] for k, p in GPU_PEAK.items() if k in name and dtype in p), None)


def table(device, cases=None, options=None) -> str:
    """Markdown: median time per provider, the ratios to eager and to SDPA's fastest fused backend, TFLOP/s,
    one run. cases: (shapes, dtypes), default every shape and dtype of the device; a provider that cannot
    take a case, or fails, is a row that says why."""
    device = torch.device(device)
    if device.type == "cpu":
        bench.steady_cpu_allocator()
    shapes, dtypes = cases or ((CPU_SHAPES, [torch.float32]) if device.type == "cpu" else
                               (SHAPES, [torch.float16, torch.bfloat16]))
    lines = ["| mode | (B, H, L, D) | dtype | provider | time (µs) | vs eager | vs SDPA | TFLOP/s | % of peak |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for shape in shapes:
        for dtype in dtypes:
            peak = _peak(device, dtype)
            for mode in MODES:
                times, whys = {}, {}
                for provider in providers(device):
                    times[provider], whys[provider] = bench.attempt(
                        lambda: make_fn(mode, provider, shape, dtype, device), device, options)
                sdpa = min((t for p, t in times.items() if t and p.startswith("sdpa") and p != "sdpa-math"),
                           default=None)
                for provider, t in times.items():
                    head = f"| {mode} | {tuple(shape)} | {bench.dtype_name(dtype)} | {provider} |"
                    if t is None:
                        lines.append(f"{head} {whys[provider]} | – | – | – | – |")
                        continue
                    tflops = flops(shape, mode) / t / 1e12
                    vs_eager = f"{times['eager'] / t:.2f}×" if times.get("eager") else "–"
                    vs_sdpa = f"{sdpa / t:.2f}×" if sdpa else "–"
                    pct = f"{100 * tflops / peak:.0f}%" if peak else "–"
                    lines.append(f"{head} {t * 1e6:.0f} | {vs_eager} | {vs_sdpa} | {tflops:.3f} | {pct} |")
                    print(lines[-1], file=sys.stderr)
    return "\n".join(lines) + "\n\n\"vs SDPA\": against the fastest of SDPA's fused backends (math excluded) in the same run."


if __name__ == "__main__":
    args = bench.script_args(__doc__, extra=bench.add_dtypes_option)
    cases = SMOKE if args.smoke else HEADLINE[args.device.type] if args.quick else None
    if args.dtypes and not args.smoke:  # the headline shapes in the dtypes asked for
        cases = (HEADLINE[args.device.type][0], args.dtypes)
    print(table(args.device, cases, args.options))
