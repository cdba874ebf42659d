"""pytest-benchmark suite of the schedule ops: op × provider × shape × dtype, with the inputs and
providers of diffusion_ext.bench (the same that `python -m diffusion_ext bench` measures).

    pytest benchmarks --benchmark-only                  # measure (CPU params here; GPU params on a GPU)
    pytest benchmarks -q --benchmark-disable            # smoke: every case runs once
    DIFFUSION_EXT_BENCH_COMPILE_CPU=1 pytest benchmarks --benchmark-only   # also torch.compile on CPU

Rows are grouped by (op, shape, dtype), so pytest-benchmark lists the providers of one case side by side
(its table's relative column is then the ratio to the fastest provider). extra_info holds the bytes the
fused op must move and the GB/s of the median. On a GPU each call is followed by torch.cuda.synchronize,
so these are wall times including one synchronisation; the CLI's table uses CUDA events instead.
No assertion here is about time.
"""
import os

import pytest
import torch

from diffusion_ext import bench

OPS = list(bench.OPS)


def _id(shape):
    return bench.shape_name(shape)


def _run(benchmark, op, provider, shape, dtype, device):
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    compile_cpu = os.environ.get("DIFFUSION_EXT_BENCH_COMPILE_CPU", "0") == "1"
    if device.type == "cpu" and provider == "compile" and not compile_cpu:
        pytest.skip("torch.compile on CPU is slow to compile; set DIFFUSION_EXT_BENCH_COMPILE_CPU=1 to include it")
    if provider not in bench.providers_for(device, compile_cpu=compile_cpu):
        pytest.skip(f"provider {provider!r} is not available for {device.type} tensors here")

    if device.type == "cpu":
        benchmark.extra_info["malloc"] = bench.steady_cpu_allocator() or "not tuned"  # see diffusion_ext.bench
    case = bench.make_case(op, provider, shape, dtype, device)
    fn = case.fn
    fn = bench.synced(fn, device)

    fn()  # first call outside the timer: torch.compile compiles, kernels load
    benchmark.group = f"{op} {bench.shape_name(shape)} {bench.dtype_name(dtype)} {device.type}"
    benchmark.extra_info.update(op=op, provider=provider, shape=list(shape), dtype=bench.dtype_name(dtype),
                                device=device.type, bytes=case.bytes)
    out = benchmark(fn)
    assert out is not None
    if benchmark.stats:  # None or empty under --benchmark-disable
        benchmark.extra_info["gbps"] = round(case.bytes / benchmark.stats.stats.median / 1e9, 2)


@pytest.mark.parametrize("shape", bench.CPU_SHAPES, ids=_id)
@pytest.mark.parametrize("provider", ["eager", "compile", "cpu"])
@pytest.mark.parametrize("op", OPS)
def test_schedule_op_cpu(benchmark, op, provider, shape):
    _run(benchmark, op, provider, shape, torch.float32, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", bench.GPU_DTYPES, ids=bench.dtype_name)
@pytest.mark.parametrize("shape", bench.GPU_SHAPES, ids=_id)
@pytest.mark.parametrize("provider", ["eager", "compile", "cuda", "triton"])
@pytest.mark.parametrize("op", OPS)
def test_schedule_op_gpu(benchmark, op, provider, shape, dtype):
    _run(benchmark, op, provider, shape, dtype, "cuda")
