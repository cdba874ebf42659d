"""Shared fixtures: which (backend, device) pairs exist here, and the per-dtype tolerances.

Without a GPU, Triton kernels run on CPU tensors in Triton's interpreter: TRITON_INTERPRET must be set
before triton is first imported, so it is set here, before anything imports diffusion_ext.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import compile_check_jobs  # noqa: E402
import diffusion_ext  # noqa: E402
from diffusion_ext.backend import available_backends  # noqa: E402


def _split_cores_between_xdist_workers() -> None:
    """Under pytest-xdist, each worker gets its share of the cores for torch's intra-op threads. By default
    every worker would start as many threads as the machine has cores, and W workers × all cores oversubscribe
    it: an op of tens of microseconds then waits a scheduler slice at each fork/join (see one_intra_op_thread;
    measured there: 8 s for test_models.py alone, 100 s beside another process)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_split_cores_between_xdist_workers()


def pytest_collection_finish(session):
    # the compile-for-GPU check runs in the background, niced, beside the rest of the suite
    if not session.config.option.collectonly:
        compile_check_jobs.start_in_background(session.items)


def pytest_sessionfinish(session):
    compile_check_jobs.stop()


# (backend, device); GPU pairs carry the gpu marker and skip cleanly without a GPU.
BACKEND_DEVICES = [
    pytest.param(("cpu", "cpu"), id="cpu"),
    pytest.param(("triton", "cpu"), id="triton-interpret"),
    pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
    pytest.param(("triton", "cuda"), id="triton-gpu", marks=pytest.mark.gpu),
]


def skip_unless_available(backend: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} is not available for {device} tensors here")


@pytest.fixture(params=BACKEND_DEVICES)
def backend_device(request):
    backend, device = request.param
    skip_unless_available(backend, device)
    with diffusion_ext.use_backend(backend):
        yield backend, device


@pytest.fixture(autouse=True)
def _same_global_rng_for_every_test():
    """Every test starts from torch.manual_seed(0), whatever ran before it. Models built in a test take their
    initial parameters from the global generator, and the network tests perturb those (network_check.randomize),
    so without this a test's inputs depended on which tests ran earlier: a margin that passed in the full suite
    could fail in a subset, under pytest-xdist on the GPU lease, or after an unrelated test was added."""
    torch.manual_seed(0)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """For files of tiny models (mostly 16×16 with ≤ 72 channels): one op is tens of microseconds, so a second
    intra-op thread only adds a fork/join per op, and on a shared 2-core machine each join can wait a scheduler
    slice (measured: 8 s for test_models.py on one thread, 100 s on two beside another process). The ops'
    threaded paths are tested by the op tests at their sizes. Use: pytestmark = pytest.mark.usefixtures(...)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class SendsNoGradient(torch.autograd.Function):
    """The identity forward whose backward sends nothing (None) back: the op before it gets no gradient for its
    output, as when a loss depends on a tensor only through a detached path."""

    @staticmethod
    def forward(ctx, t):
        return t.clone()

    @staticmethod
    def backward(ctx, grad):
        return None
