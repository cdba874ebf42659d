"""Which kernel runs an op: the one place where backends are named, checked and chosen.

Backends: "cpu" (the C++ kernels), "cuda" (the CUDA kernels), "triton" (the Triton kernels; on CPU
tensors only under TRITON_INTERPRET=1, which is how CI tests them), "torch" (the eager reference of
diffusion_ext.reference), and "auto": for a CPU tensor "cpu"; for a CUDA tensor the faster of "cuda" and
"triton" for that op once a GPU has measured both (AUTO_CUDA below, from benchmarks/results/), and until
then the backend with the most verification behind it: Triton, whose kernels have run (in Triton's
interpreter) against the references on every test case and compile for sm_80/sm_90 with their resources
checked in CI, where the CUDA kernels have only been compiled. Without Triton, "cuda".

Override with the environment variable DIFFUSION_EXT_BACKEND or, for a block of code,
`with diffusion_ext.use_backend("triton"): ...`. A backend that is not built or not installed raises
BackendUnavailable saying how to get it; importing diffusion_ext never fails for that reason.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "cpu", "cuda", "triton", "torch")
# What the kernels take, on every backend: callers that must not fail (the nn modules' fallbacks, the
# diffusers patch) route any other dtype or device type to PyTorch's own code.
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
KERNEL_DEVICES = ("cpu", "cuda")

# "auto" on a CUDA tensor: the faster backend per op, from benchmarks/results/ (see README), only for
# kernels whose GPU tests passed. Empty until a GPU has measured them: ops not listed take UNMEASURED_CUDA.
AUTO_CUDA: dict[str, str] = {}

# use_backend's stack. A plain list, not a ContextVar: torch.compile traces resolve() and guards on it,
# and cannot trace a ContextVar.
_override: list[str] = []


class BackendUnavailable(RuntimeError):
    """The requested backend is not built or installed, or cannot run on the tensor's device."""


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"diffusion_ext: backend {name!r} is unknown; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Run the ops inside the block with the given backend ("auto", "cpu", "cuda", "triton", "torch")."""
    _override.append(_check_name(name))
    try:
        yield
    finally:
        _override.pop()


def requested() -> str:
    if _override:
        return _override[-1]
    name = os.environ.get("DIFFUSION_EXT_BACKEND", "auto") or "auto"
    return _check_name(name)


def _cuda_probe() -> bool:
    from ._loader import _C

    return "cuda" in _C.build_info()["backends"]


# Plain module values, so that torch.compile can read them while it traces resolve().
_CUDA_BUILT = _cuda_probe()
_TRITON_ERROR: str | None = "unchecked"
# Whether Triton is installed, without importing it (find_spec does not run the package).
_TRITON_FOUND = importlib.util.find_spec("triton") is not None
UNMEASURED_CUDA = "triton" if _TRITON_FOUND or not _CUDA_BUILT else "cuda"


def _cuda_built() -> bool:
    return _CUDA_BUILT


def _triton_error() -> str | None:
    """None when Triton imports, else why not. Imported on first need, not with diffusion_ext."""
    global _TRITON_ERROR
    if _TRITON_ERROR == "unchecked":
        try:
            import triton  # noqa: F401

            _TRITON_ERROR = None
        except ImportError as e:
            _TRITON_ERROR = f"Triton is not installed or does not import ({e}); install it with: pip install triton"
    return _TRITON_ERROR


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The concrete backends that can run an op on tensors of this device."""
    device = torch.device(device)
    out = ["torch"]
    if device.type == "cpu":
        out.append("cpu")
        if _triton_error() is None and triton_interpreted():
            out.append("triton")
    elif device.type == "cuda":
        if _cuda_built():
            out.append("cuda")
        if _triton_error() is None:
            out.append("triton")
    return out


def resolve(op: str, device: torch.device) -> str:
    """The concrete backend ("cpu", "cuda", "triton" or "torch") that runs `op` on `device`."""
    name = requested()
    if name == "auto":
        if device.type == "cuda":
            name = AUTO_CUDA.get(op, UNMEASURED_CUDA)
        elif device.type == "cpu":
            return "cpu"
        else:
            return "torch"
    if name == "torch":
        return name
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailable(f"diffusion_ext.{op}: backend 'cpu' runs CPU tensors only, got a {device} tensor")
    if name == "cuda":
        if device.type != "cuda":
            raise BackendUnavailable(f"diffusion_ext.{op}: backend 'cuda' runs CUDA tensors only, got a {device} tensor")
        if not _cuda_built():
            raise BackendUnavailable(
                f"diffusion_ext.{op}: this build has no CUDA kernels; install a CUDA build of torch and nvcc, "
                "then rebuild with: FORCE_CUDA=1 pip install --no-build-isolation ."
            )
    if name == "triton":
        err = _triton_error()
        if err is not None:
            raise BackendUnavailable(f"diffusion_ext.{op}: {err}")
        if device.type == "cpu" and not triton_interpreted():
            raise BackendUnavailable(
                f"diffusion_ext.{op}: Triton runs CPU tensors only in its interpreter; set TRITON_INTERPRET=1 "
                "before importing triton"
            )
    return name
