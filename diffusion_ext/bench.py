"""The measuring core of the schedule-op benchmarks, shared by `python -m diffusion_ext bench` and
benchmarks/bench_schedule_ops.py.

For each schedule op and each provider it builds a callable over pre-built inputs, times it, and reports
the time, the effective bandwidth and the ratio to the eager baseline measured in the same run.

Providers:
- "eager": the baseline as diffusers writes it: gather ᾱ[t], broadcast with view(-1, 1, 1, 1), separate
  element-wise ops (diffusion_ext.reference), and a separate torch.randn_like where the fused op makes its
  noise inside the kernel (diffusers draws its noise with randn; it does not compute Philox in torch).
- "compile": torch.compile of the eager callable (on CUDA when Triton is installed; on CPU only when
  asked for, since inductor's CPU compile is slow on a small machine).
- one provider per diffusion_ext backend that can run on the device ("cpu" on CPU; "cuda" and "triton"
  on a GPU), calling the public wrappers of diffusion_ext.ops with that backend pinned.

Effective bandwidth counts the bytes the fused op must move: every sample-sized tensor it reads or writes
once (the [B] timesteps and the ᾱ table are left out). It is the same byte count for every provider, so
GB/s compares providers on one footing; an eager chain moves several times more bytes than this.

Timing: the median of repeated calls after warm-up. On CPU each call is timed with time.perf_counter.
On a GPU each call is timed with CUDA events after a write of a buffer larger than L2 (as
triton.testing.do_bench does), so the inputs come from device memory rather than a warm L2; the times
are device times, and host launch overhead shows only where the host falls behind the device. On CPU,
glibc's malloc thresholds are fixed first (steady_cpu_allocator) so that the eager baseline does not
page-fault on every call in one run order and not in another. CPU timings on a busy machine are not to be
trusted (torch's threads wait for a busy core): the environment lines record the load average.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from . import ops, reference
from .backend import available_backends, use_backend
from .schedule import NoiseSchedule
from .timing import load_average  # noqa: F401  (part of this module's interface: cli's bench uses it)

# ----------------------------------------------------------------------------------------------------
# what is measured
# ----------------------------------------------------------------------------------------------------
# op name -> (description, number of sample-sized tensors the fused op reads + writes)
OPS: dict[str, tuple[str, int]] = {
    "q_sample": ("x_t = √ᾱ·x0 + √(1−ᾱ)·ε, ε given (reads x0, ε; writes x_t)", 3),
    "q_sample_with_noise": ("q_sample with ε made in the kernel (reads x0; writes x_t, ε)", 3),
    "ddpm_step": ("DDPM step, noise made in the kernel (reads ε_θ, x_t; writes x_{t-1})", 3),
    "ddpm_step_cfg": ("DDPM step with classifier-free guidance, w = 7.5, noise made in the kernel "
                      "(reads ε_cond, ε_uncond, x_t; writes x_{t-1})", 4),
    "ddim_step": ("DDIM step, η = 0 (reads ε_θ, x_t; writes x_{t_prev})", 3),
    "dpmpp_2m_step": ("DPM-Solver++(2M) second-order step (reads ε_θ, x_t, the last x̂0; writes x_{t_prev}, x̂0)", 5),
    "dropout": ("dropout, p = 0.1, mask made in the kernel (reads x; writes y); eager: F.dropout", 2),
}
DROPOUT_P = 0.1

CPU_SHAPES: tuple[tuple[int, ...], ...] = ((64, 3, 64, 64), (64, 4, 8, 8), (256, 3, 64, 64))
GPU_SHAPES: tuple[tuple[int, ...], ...] = CPU_SHAPES + ((256, 4, 128, 128),)  # the last: 16.8M elements
CPU_DTYPES: tuple[torch.dtype, ...] = (torch.float32,)
GPU_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

NUM_TIMESTEPS = 1000
GUIDANCE_SCALE = 7.5
DDIM_STRIDE = NUM_TIMESTEPS // 50  # t_prev = t − 20: a 50-step DDIM sampler
SEED = 1234


def default_shapes(device) -> tuple[tuple[int, ...], ...]:
    return GPU_SHAPES if torch.device(device).type == "cuda" else CPU_SHAPES


def default_dtypes(device) -> tuple[torch.dtype, ...]:
    return GPU_DTYPES if torch.device(device).type == "cuda" else CPU_DTYPES


def providers_for(device, compile_cpu: bool = False) -> list[str]:
    """The providers that can run on `device`: eager, compile (see the module doc) and the backends."""
    device = torch.device(device)
    backends = available_backends(device)
    out = ["eager"]
    # inductor generates Triton code on a GPU: where Triton imports, "triton" is an available backend
    if (device.type == "cuda" and "triton" in backends) or (device.type == "cpu" and compile_cpu):
        out.append("compile")
    for b in backends:
        if b == "torch" or (device.type == "cpu" and b == "triton"):  # the Triton interpreter is no benchmark
            continue
        out.append(b)
    return out


def bytes_moved(op: str, shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes the fused op must read and write: sample-sized tensors × elements × element size."""
    return OPS[op][1] * math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


DTYPE_NAMES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_dtypes_option(p: argparse.ArgumentParser) -> None:
    """--dtypes fp32,bf16,...: a script's headline shapes in these dtypes (a script_args extra)."""
    def parse(text: str) -> list[torch.dtype]:
        try:
            return [DTYPE_NAMES[n.strip()] for n in text.split(",") if n.strip()]
        except KeyError as e:
            raise argparse.ArgumentTypeError(f"unknown dtype {e}; expected some of {', '.join(DTYPE_NAMES)}") from None
    p.add_argument("--dtypes", type=parse, default=None,
                   help="comma-separated (fp32, fp64, bf16, fp16): the headline shapes in these dtypes")


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


# ----------------------------------------------------------------------------------------------------
# inputs and callables
# ----------------------------------------------------------------------------------------------------
def make_inputs(op: str, shape: Sequence[int], dtype: torch.dtype, device, seed: int = SEED) -> dict:
    """Random inputs of one case, on the device, shared by every provider of that case."""
    if op not in OPS:
        raise ValueError(f"diffusion_ext.bench: op {op!r} is unknown; expected one of {', '.join(OPS)}")
    device = torch.device(device)
    g = torch.Generator(device=device).manual_seed(seed)
    shape = tuple(shape)

    def randn():
        return torch.randn(shape, generator=g, dtype=dtype, device=device)

    # ᾱ on the device: float64 for the fused ops, as NoiseSchedule hands it to them (they form the per-sample
    # coefficients in float64), float32 for the eager baseline, as diffusers keeps its tables
    table = NoiseSchedule(NUM_TIMESTEPS, "linear").alphas_cumprod.to(device=device)
    t = torch.randint(0, NUM_TIMESTEPS, (shape[0],), generator=g, device=device)
    inp = {"table": table, "table32": table.float(), "t": t}
    if op == "q_sample":
        inp.update(x0=randn(), noise=randn())
    elif op == "q_sample_with_noise":
        inp.update(x0=randn())
    elif op == "ddpm_step":
        inp.update(model_output=randn(), x_t=randn())
    elif op == "ddpm_step_cfg":
        inp.update(model_output=randn(), model_output_uncond=randn(), x_t=randn())
    elif op == "ddim_step":
        inp.update(model_output=randn(), x_t=randn(), t_prev=(t - DDIM_STRIDE).clamp(min=-1))
    elif op == "dpmpp_2m_step":  # second order: the last step DDIM_STRIDE above t, the target as far below
        t = t.clamp(max=NUM_TIMESTEPS - 1 - DDIM_STRIDE)
        inp.update(t=t, model_output=randn(), x_t=randn(), x0_last=randn(), t_prev=(t - DDIM_STRIDE).clamp(min=-1),
                   t_last=t + DDIM_STRIDE)
    elif op == "dropout":
        inp.update(x=randn())
    return inp


def eager_fn(op: str, inp: dict) -> Callable[[], object]:
    """The diffusers-style baseline of one op over `inp` (separate randn_like where the op makes noise)."""
    table, t = inp["table32"], inp["t"]
    if op == "q_sample":
        x0, noise = inp["x0"], inp["noise"]

        def fn():
            return reference.q_sample(x0, t, noise, table)
    elif op == "q_sample_with_noise":
        x0 = inp["x0"]

        def fn():
            noise = torch.randn_like(x0)
            return reference.q_sample(x0, t, noise, table), noise
    elif op == "ddpm_step":
        m, x = inp["model_output"], inp["x_t"]

        def fn():
            return reference.ddpm_step(m, t, x, table, noise=torch.randn_like(x))
    elif op == "ddpm_step_cfg":
        m, mu, x = inp["model_output"], inp["model_output_uncond"], inp["x_t"]

        def fn():
            return reference.ddpm_step(m, t, x, table, noise=torch.randn_like(x), guidance_scale=GUIDANCE_SCALE,
                                       model_output_uncond=mu)
    elif op == "ddim_step":
        m, x, t_prev = inp["model_output"], inp["x_t"], inp["t_prev"]

        def fn():
            return reference.ddim_step(m, t, t_prev, x, table, eta=0.0)
    elif op == "dpmpp_2m_step":
        m, x, x0, t_prev, t_last = inp["model_output"], inp["x_t"], inp["x0_last"], inp["t_prev"], inp["t_last"]

        def fn():
            return reference.dpmpp_2m_step(m, t, t_prev, x, table, x0, t_last)
    elif op == "dropout":  # what a training model runs: torch's Bernoulli mask from its generator
        x = inp["x"]

        def fn():
            return torch.nn.functional.dropout(x, DROPOUT_P, training=True)
    else:
        raise ValueError(f"diffusion_ext.bench: op {op!r} is unknown; expected one of {', '.join(OPS)}")
    return fn


def fused_fn(op: str, backend: str, inp: dict) -> Callable[[], object]:
    """The public diffusion_ext.ops wrapper of one op with `backend` pinned (noise made in the kernel)."""
    table, t = inp["table"], inp["t"]
    if op == "q_sample":
        x0, noise = inp["x0"], inp["noise"]

        def call():
            return ops.q_sample(x0, t, noise, table)
    elif op == "q_sample_with_noise":
        x0 = inp["x0"]

        def call():
            return ops.q_sample_with_noise(x0, t, table, SEED, 0)
    elif op == "ddpm_step":
        m, x = inp["model_output"], inp["x_t"]

        def call():
            return ops.ddpm_step(m, t, x, table, None, SEED, 0)
    elif op == "ddpm_step_cfg":
        m, mu, x = inp["model_output"], inp["model_output_uncond"], inp["x_t"]

        def call():
            return ops.ddpm_step(m, t, x, table, None, SEED, 0, guidance_scale=GUIDANCE_SCALE, model_output_uncond=mu)
    elif op == "ddim_step":
        m, x, t_prev = inp["model_output"], inp["x_t"], inp["t_prev"]

        def call():
            return ops.ddim_step(m, t, t_prev, x, table, 0.0)
    elif op == "dpmpp_2m_step":
        m, x, x0, t_prev, t_last = inp["model_output"], inp["x_t"], inp["x0_last"], inp["t_prev"], inp["t_last"]

        def call():
            return ops.dpmpp_2m_step(m, t, t_prev, x, table, x0, t_last)
    elif op == "dropout":
        x = inp["x"]

        def call():
            return ops.dropout(x, DROPOUT_P, SEED)
    else:
        raise ValueError(f"diffusion_ext.bench: op {op!r} is unknown; expected one of {', '.join(OPS)}")

    def fn():
        with use_backend(backend):
            return call()

    return fn


def compiled(fn, **kwargs):
    """torch.compile(fn, **kwargs) after a reset of dynamo's caches: every benchmark's "compile" provider
    goes through here, since after 8 shapes dynamo's recompile limit silently runs the function eagerly,
    and a "compile" row would then time eager code."""
    torch._dynamo.reset()
    return torch.compile(fn, **kwargs)


def compiled_fn(op: str, inp: dict) -> Callable[[], object]:
    """torch.compile of the eager callable, for its static shape and dtype."""
    return compiled(eager_fn(op, inp), dynamic=False)


def make_fn(op: str, provider: str, inp: dict) -> Callable[[], object]:
    if provider == "eager":
        return eager_fn(op, inp)
    if provider == "compile":
        return compiled_fn(op, inp)
    return fused_fn(op, provider, inp)


@dataclass
class Case:
    """One benchmark case: a callable over pre-built inputs and what it moves."""
    op: str
    provider: str
    device: torch.device
    shape: tuple[int, ...]
    dtype: torch.dtype
    fn: Callable[[], object]
    bytes: int
    inputs: dict = field(repr=False, default_factory=dict)


def make_case(op: str, provider: str, shape: Sequence[int], dtype: torch.dtype, device, inputs: dict | None = None
              ) -> Case:
    """A case with its inputs built (or the given ones, to share inputs across providers)."""
    device = torch.device(device)
    inp = make_inputs(op, shape, dtype, device) if inputs is None else inputs
    return Case(op, provider, device, tuple(shape), dtype, make_fn(op, provider, inp), bytes_moved(op, shape, dtype),
                inp)


# ----------------------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TimingOptions:
    warmup: int = 3            # calls after the first (which may compile), also used to size the run
    min_reps: int = 10
    max_reps: int = 2000
    min_time_s: float = 0.4    # timed calls go on until at least this much time, within [min_reps, max_reps]
    flush_l2: bool = True      # GPU: write a buffer larger than L2 before every timed call


FULL = TimingOptions()                                  # GPU: device times are steady
FULL_CPU = TimingOptions(min_reps=20, min_time_s=1.0)   # CPU: noisier, and the whole run still takes < 1 min
LEASE = TimingOptions(warmup=2, min_reps=10, max_reps=200, min_time_s=0.1)  # a GPU lease's minutes: still a measurement
QUICK = TimingOptions(warmup=1, min_reps=3, max_reps=50, min_time_s=0.02)    # a smoke test, not a measurement
SMOKE = TimingOptions(warmup=1, min_reps=1, max_reps=1, min_time_s=0.0)      # does it run at all (3 calls)


def script_args(doc: str, argv=None, extra=None) -> argparse.Namespace:
    """The command line every benchmarks/bench_*.py script shares: the device, and --quick (its headline
    cases with LEASE repetitions: what one GPU lease can afford, benchmarks/gpu_check.sh) or --smoke (one
    tiny case, SMOKE repetitions: checks that the script runs, gpu_check.sh --dry-run). extra(parser) adds
    a script's own options."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    p.add_argument("device", nargs="?", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="headline cases only, fewer repetitions (a GPU lease)")
    mode.add_argument("--smoke", action="store_true", help="one tiny case, few repetitions: not a measurement")
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("cuda asked for, but torch sees no CUDA device")
    args.options = SMOKE if args.smoke else LEASE if args.quick else default_options(args.device)
    return args


def default_options(device, quick: bool = False) -> TimingOptions:
    if quick:
        return QUICK
    return FULL if torch.device(device).type == "cuda" else FULL_CPU


# glibc's malloc serves a large block by mmap and returns freed memory at the top of the heap to the
# system; its thresholds for both move with what the process freed before. Eager code allocates several
# sample-sized temporaries per call, so, left alone, its time depends on the order in which cases ran
# (page faults on every call in one order, none in another: eager q_sample took 4.2 ms in one run and
# 0.17 ms in another on the 2-core CI machine). Fixed thresholds make the heap keep its memory, as in a
# long-running process, and the eager baseline repeatable; the fused ops, which allocate only their
# outputs, hardly change.
_MALLOC_TUNING: str | None = None


def steady_cpu_allocator() -> str | None:
    """Fixes glibc's mmap and trim thresholds (once per process); returns what was set, None if not glibc."""
    global _MALLOC_TUNING
    if _MALLOC_TUNING is None:
        try:
            import ctypes
            import ctypes.util

            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
            if platform.libc_ver()[0] == "glibc" and libc.mallopt(m_mmap_threshold, 32 << 20) == 1 and \
                    libc.mallopt(m_trim_threshold, 1 << 30) == 1:
                _MALLOC_TUNING = ("glibc malloc with M_MMAP_THRESHOLD = 32 MiB, M_TRIM_THRESHOLD = 1 GiB "
                                  "(set by the benchmark)")
        except (OSError, AttributeError):
            pass
    return _MALLOC_TUNING


_flush_buffers: dict[int, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    buf = _flush_buffers.get(index)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or 0
        nbytes = max(256 << 20, 4 * l2)
        buf = _flush_buffers[index] = torch.empty(nbytes // 4, dtype=torch.int32, device=torch.device("cuda", index))
    return buf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn: Callable[[], object], device) -> Callable[[], object]:
    """fn followed by a device synchronisation on CUDA (kernels are asynchronous: a timer around a bare
    launch measures the launch), fn itself elsewhere. For timers that are not measure(), e.g.
    pytest-benchmark's."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def call():
        out = fn()
        _sync(device)
        return out

    return call


def measure(fn: Callable[[], object], device, options: TimingOptions | None = None) -> tuple[float, int]:
    """(median seconds per call, number of timed calls) of fn on device (options: default_options(device))."""
    device = torch.device(device)
    options = options if options is not None else default_options(device)
    fn()  # the first call compiles, allocates, loads kernels: not timed, not used to size the run
    _sync(device)
    warmup = max(1, options.warmup)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    estimate = max((time.perf_counter() - start) / warmup, 1e-9)
    reps = int(min(options.max_reps, max(options.min_reps, math.ceil(options.min_time_s / estimate))))

    if device.type == "cuda":
        flush = _l2_flush_buffer(device) if options.flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for begin, end in events:
            if flush is not None:
                flush.zero_()
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [begin.elapsed_time(end) * 1e-3 for begin, end in events]
    else:
        times = []
        clock = time.perf_counter
        for _ in range(reps):
            t0 = clock()
            fn()
            times.append(clock() - t0)
    return statistics.median(times), reps


def why(e: BaseException) -> str:
    """One line that says why a case failed, for the row that replaces its time."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:160].replace("|", "/")


def attempt(make: Callable[[], Callable[[], object] | None], device, options: TimingOptions | None = None
            ) -> tuple[float | None, str]:
    """(median seconds, "") of the callable that make() builds, or (None, why) when make() returns None
    (the provider cannot take this case) or building or running it raises: a table goes on past a
    failing case with a row that says why, rather than losing every row after it."""
    device = torch.device(device)
    try:
        fn = make()
        if fn is None:
            return None, "not supported for this case"
        return measure(fn, device, options)[0], ""
    except Exception as e:  # any failure of one case is that case's row
        if device.type == "cuda":
            torch.cuda.empty_cache()  # an out-of-memory case should not starve the next ones
        return None, why(e)


def time_cells(t: float | None, base: float | None, why: str = "", unit: float = 1e6, digits: int = 1) -> str:
    """The "time | vs eager" cells of a markdown row: t·unit and base / t, or "failed: why | –"."""
    if t is None:
        return f"failed: {why} | –"
    return f"{t * unit:.{digits}f} | " + (f"{base / t:.2f}×" if base else "–")


def copy_bandwidth(device, nbytes: int = 1 << 30, options: TimingOptions | None = None) -> float:
    """The device's achievable memory bandwidth in GB/s: a device-to-device copy of nbytes, counting the
    bytes read and the bytes written (the ceiling a memory-bound op is judged against, measured in the
    same run rather than taken from a datasheet)."""
    device = torch.device(device)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    seconds, _ = measure(lambda: dst.copy_(src), device, options)
    return 2 * nbytes / seconds / 1e9


# ----------------------------------------------------------------------------------------------------
# the table
# ----------------------------------------------------------------------------------------------------
def run_table(device=None, dtypes: Iterable[torch.dtype] | None = None,
              shapes: Iterable[Sequence[int]] | None = None, ops: Iterable[str] | None = None,
              providers: Iterable[str] | None = None, options: TimingOptions | None = None,
              compile_cpu: bool = False, tune_malloc: bool = True,
              on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Measures every op × shape × dtype × provider on `device` and returns one dict per row.

    Row keys: op, provider, device, shape, dtype, numel, bytes, time_us, gbps, reps, and ratio =
    eager time / provider time for the same op, shape and dtype in this run (> 1: faster than eager).
    The eager baseline is always measured, since every ratio needs it. options: default_options(device).
    A case that fails is a row with time_us, gbps and ratio None and error saying why; the others go on.
    On CUDA each row also has of_copy = gbps / the device-to-device copy bandwidth measured first.
    tune_malloc: on CPU, fix glibc's malloc thresholds first (steady_cpu_allocator).
    """
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("diffusion_ext.bench: --device cuda asked for, but torch sees no CUDA device")
    options = options if options is not None else default_options(device)
    if device.type == "cpu" and tune_malloc:
        steady_cpu_allocator()
    dtypes = tuple(dtypes) if dtypes is not None else default_dtypes(device)
    shapes = tuple(tuple(s) for s in shapes) if shapes is not None else default_shapes(device)
    op_names = tuple(ops) if ops is not None else tuple(OPS)
    for op in op_names:
        if op not in OPS:
            raise ValueError(f"diffusion_ext.bench: op {op!r} is unknown; expected one of {', '.join(OPS)}")
    possible = providers_for(device, compile_cpu=compile_cpu)
    if providers is None:
        chosen = possible
    else:
        wanted = set(providers) | {"eager"}
        missing = wanted - set(possible)
        if missing:
            raise ValueError(f"diffusion_ext.bench: provider(s) {', '.join(sorted(missing))} cannot run on {device} "
                             f"here; available: {', '.join(possible)}")
        chosen = [p for p in possible if p in wanted]

    rows: list[dict] = []
    copy_gbps = copy_bandwidth(device, options=options) if device.type == "cuda" else None
    for op in op_names:
        for dtype in dtypes:
            for shape in shapes:
                inputs = make_inputs(op, shape, dtype, device)
                group = []
                for provider in chosen:
                    row = {"op": op, "provider": provider, "device": str(device), "shape": tuple(shape),
                           "dtype": dtype_name(dtype), "numel": math.prod(shape),
                           "bytes": bytes_moved(op, shape, dtype), "time_us": None, "gbps": None, "reps": 0,
                           "error": ""}
                    try:
                        case = make_case(op, provider, shape, dtype, device, inputs)
                        seconds, reps = measure(case.fn, device, options)
                        row.update(time_us=seconds * 1e6, gbps=case.bytes / seconds / 1e9, reps=reps)
                        del case
                    except Exception as e:  # this row says why; the table goes on
                        row["error"] = why(e)
                    group.append(row)
                eager_us = next(r["time_us"] for r in group if r["provider"] == "eager")
                for r in group:
                    r["ratio"] = eager_us / r["time_us"] if eager_us and r["time_us"] else None
                    if copy_gbps:
                        r["copy_gbps"] = copy_gbps
                        r["of_copy"] = r["gbps"] / copy_gbps if r["gbps"] else None
                    rows.append(r)
                    if on_row is not None:
                        on_row(r)
                del inputs
    if device.type == "cuda":
        _flush_buffers.clear()
    return rows


def format_markdown(rows: Sequence[dict]) -> str:
    """A Markdown table of the rows (columns padded, so it reads as plain text too)."""
    header = ["op", "provider", "shape", "dtype", "time (µs)", "GB/s", "vs eager"]
    def cells(r):
        if r.get("time_us") is None:
            return [f"failed: {r.get('error', '')}", "", ""]
        return [f"{r['time_us']:.1f}", f"{r['gbps']:.1f}", "–" if r["ratio"] is None else f"{r['ratio']:.2f}×"]

    body = [[r["op"], r["provider"], shape_name(r["shape"]), r["dtype"], *cells(r)] for r in rows]
    right = {4, 5, 6}
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else ("-" * (w + 2)) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(b) for b in body)]) + "\n"


def describe_device(device) -> str:
    """The device in words: GPU name and memory, or the CPU model and the threads torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    model = ln.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs, torch uses {torch.get_num_threads()} threads"


def environment_markdown(device, options: TimingOptions, load_before: float | None = None) -> str:
    """The lines that say where and how a table was measured (load_before: load_average() before the run)."""
    from ._loader import build_info

    device = torch.device(device)
    timing = ("CUDA events per call, L2 flushed before each" if device.type == "cuda" and options.flush_l2
              else "CUDA events per call" if device.type == "cuda" else "time.perf_counter per call")
    lines = [
        f"- device: {describe_device(device)}",
        f"- torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}",
        f"- diffusion_ext build: {build_info()}",
        f"- timing: median of {options.min_reps}..{options.max_reps} calls (at least {options.min_time_s} s) "
        f"after {options.warmup} warm-up calls; {timing}",
        "- GB/s: bytes the fused op must read and write (sample-sized tensors only) / median time; "
        "'vs eager': eager time / provider time, same run (> 1 is faster than eager)",
        "- eager = diffusion_ext.reference (diffusers-style) with torch.randn_like for the noise; "
        "compile = torch.compile of it",
    ]
    if device.type == "cpu":
        lines.append(f"- CPU allocator: {_MALLOC_TUNING or 'as the process found it (not tuned)'}")
    if load_before is not None:
        busy = load_before > 0.5 * (os.cpu_count() or 1)
        lines.append(f"- 1-minute load average before the run: {load_before:.2f}"
                     + (" (the machine was busy: CPU timings are unreliable)" if busy else ""))
    return "\n".join(lines) + "\n"
