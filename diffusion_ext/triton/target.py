"""The device the Triton launchers size their kernels for, and how their kernels are started.

Every device-dependent decision a launcher takes on the host — how many SMs to fill, whether the tile
table of a GPU or the interpreter's big tiles apply, whether bf16 operands need the interpreter's
upcast — reads one `DeviceProfile` from `profile(device)`. A real CUDA device gets its own profile from
torch; CPU tensors (Triton's interpreter) get INTERPRETER; and `compile_only(H200)` makes every launcher
believe it runs on an H200 while `launch` compiles instead of launching. That is how CI proves, on a
machine without a GPU, that every kernel specialisation the launchers can choose compiles for sm_90 and
fits its resources (diffusion_ext/triton/compile_check.py), through the same host code that runs on a GPU.

Compiling without a GPU: Triton asks its active driver for the target; a driver that answers
GPUTarget("cuda", 90, 32) makes `JITFunction.run(..., warmup=True)` compile (Triton front end, LLVM,
ptxas) and return the CompiledKernel without loading it. The interpreter replaces @triton.jit functions
at import, so compile-only needs a process in which TRITON_INTERPRET was not set when triton was imported.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import tempfile
from typing import Iterator, Optional

import torch


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    name: str
    interpreter: bool  # Triton's CPU interpreter: its tile sizes and workarounds (see the launchers)
    sm_count: int  # streaming multiprocessors: the programs a launch needs to fill the device
    capability: tuple[int, int]  # compute capability: the compile target (sm_90 = (9, 0))
    max_shared_memory: int  # bytes of shared memory one program may use (the opt-in limit per block)

    @property
    def arch(self) -> int:
        return self.capability[0] * 10 + self.capability[1]


# The profiles a compile check can take. SM counts and per-block shared memory (opt-in) from NVIDIA's
# tuning guides: Hopper 132 SMs (SXM) and 227 KB, Ampere A100 108 SMs and 163 KB.
H100 = DeviceProfile("NVIDIA H100 80GB HBM3", False, 132, (9, 0), 232448)
H200 = DeviceProfile("NVIDIA H200", False, 132, (9, 0), 232448)
A100 = DeviceProfile("NVIDIA A100-SXM4-80GB", False, 108, (8, 0), 166912)
# The interpreter runs one program at a time: "4 programs per SM" becomes 4, enough to reach the split paths.
INTERPRETER = DeviceProfile("Triton interpreter (CPU tensors)", True, 1, (0, 0), 0)
PROFILES = {"h100": H100, "h200": H200, "a100": A100}

_forced: list[DeviceProfile] = []  # compile_only's stack; a plain list (torch.compile can read it)
_compiled: Optional[list] = None  # compile_only's record of what `launch` compiled


@functools.lru_cache(maxsize=None)
def _cuda_profile(index: int) -> DeviceProfile:
    p = torch.cuda.get_device_properties(index)
    smem = getattr(p, "shared_memory_per_block_optin", 0) or 49152
    return DeviceProfile(p.name, False, p.multi_processor_count, (p.major, p.minor), smem)


def profile(device: torch.device) -> DeviceProfile:
    """The profile the launchers size their kernels for on `device`."""
    if _forced:
        return _forced[-1]
    if device.type == "cuda":
        return _cuda_profile(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER


@dataclasses.dataclass
class Compiled:
    """One kernel specialisation compiled by `launch` under compile_only."""
    kernel: str  # the @triton.jit function's name
    constexprs: dict  # the constexpr and option keywords the launcher passed (BLOCK sizes, flags, num_warps)
    signature: str  # the argument types Triton specialised on (dtypes, ints equal to 1, alignment)
    compiled: object  # triton.compiler.CompiledKernel (its asm holds ptx and cubin)
    ptxas_log: str  # ptxas -v: registers, stack frame, spill stores and loads


# Compile options every kernel gets. FP fusion (a·b + c as one FMA) explicitly on: it is what every kernel
# here was written, tested and measured with, Triton's default up to 3.9, which warns that 3.10 turns it off.
_OPTIONS = {"enable_fp_fusion": True}


def launch(kernel, grid, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), the one way the launchers start a kernel; under compile_only, compile
    that specialisation for the profile's GPU instead and record it."""
    if _compiled is None:
        kwargs = {**_OPTIONS, **kwargs}
        # Triton launches on the current CUDA device and its stream, whatever device the pointers are on:
        # a tensor on cuda:1 while cuda:0 is current (DDP without set_device, a model split over GPUs) would
        # be read from the wrong GPU. The C++ kernels take a CUDAGuard; this is the Triton side of it.
        dev = next((a.device for a in args if isinstance(a, torch.Tensor) and a.is_cuda), None)
        if dev is not None and dev.index is not None and dev.index != torch.cuda.current_device():
            with torch.cuda.device(dev):
                kernel[grid](*args, **kwargs)
            return
        kernel[grid](*args, **kwargs)
        return
    from triton import knobs

    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report: the only spill count without a GPU
    try:
        with contextlib.redirect_stdout(log):
            compiled = kernel.run(*args, grid=grid, warmup=True, **_OPTIONS, **kwargs)
    finally:
        knobs.nvidia.dump_ptxas_log = False
    signature = ", ".join(f"{k}: {v}" for k, v in compiled.src.signature.items()) if hasattr(compiled, "src") else ""
    _compiled.append(Compiled(kernel.__name__, dict(kwargs), signature, compiled, log.getvalue()))


class _CompileOnlyDriver:
    """Just enough of a Triton driver for JITFunction.run(warmup=True): a target, a device key, a stream."""

    def __init__(self, arch: int, warp_size: int = 32):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, warp_size)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.target.arch  # the key of each kernel's per-device cache: one per arch

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@contextlib.contextmanager
def compile_only(device: DeviceProfile) -> Iterator[list[Compiled]]:
    """Inside the block, the launchers size their kernels for `device` and `launch` compiles each
    specialisation for its compute capability instead of running it; yields the list of Compiled."""
    global _compiled
    import triton
    from triton.runtime.driver import driver

    if device.interpreter:
        raise ValueError("diffusion_ext.triton.target.compile_only: needs a GPU profile (H100, H200, A100, ...)")
    if triton.knobs.runtime.interpret:
        raise RuntimeError("diffusion_ext.triton.target.compile_only: TRITON_INTERPRET was set when triton was "
                           "imported, so the kernels are interpreted and cannot be compiled; run without it")
    outer, outer_driver = _compiled, getattr(driver, "_active", None)  # None: Triton picks its default lazily
    outer_cache = triton.knobs.cache.dir
    driver.set_active(_CompileOnlyDriver(device.arch))
    _forced.append(device)
    _compiled = []
    # a private, empty cache: a kernel found in Triton's on-disk cache would skip ptxas, and its report
    with tempfile.TemporaryDirectory(prefix="diffusion_ext-compile-only-") as cache:
        triton.knobs.cache.dir = cache
        try:
            yield _compiled
        finally:
            _compiled = outer
            _forced.pop()
            driver.set_active(outer_driver)
            triton.knobs.cache.dir = outer_cache
