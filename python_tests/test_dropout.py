"""dropout: the kernel's mask against the reference's (csrc/common/dropout_mask.h) on every backend, dtype and
layout; its statistics; the backward as the same mask; opcheck, gradcheck, torch.compile; nn.Dropout on it."""
import math

import pytest
import torch
from conftest import DTYPES
from shapes import CASES, make
from tolerances import assert_matches_oracle

import diffusion_ext as dx
from diffusion_ext import ops, reference
from diffusion_ext.nn import Dropout
from diffusion_ext.nn.dropout import new_seed

SEEDS = [(0, 0), (-1, 2**40 + 3), (123456789, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CASES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5])
def test_dropout_matches_reference(backend_device, shape, layout, dtype, p):
    _, device = backend_device
    x = make(shape, layout, dtype, device, torch.Generator().manual_seed(3))
    for seed, offset in SEEDS:
        out = ops.dropout(x, p, seed, offset)
        assert_matches_oracle(out, reference.dropout(x, p, seed, offset),
                              reference.dropout(x.double(), p, seed, offset))
        keep = reference.dropout_keep(x, p, seed, offset)
        assert torch.equal(out != 0, keep & (x != 0)), "the kernel's mask is the reference's, element for element"
        if layout in ("contiguous", "channels_last", "channels_last_3d", "transposed"):
            assert out.stride() == x.stride(), "a dense layout is kept, not copied"


def test_dropout_propagates_nan_and_inf_like_torch(backend_device):
    """A multiply by the mask, as torch's dropout: NaN stays NaN, inf stays inf where kept and is NaN where
    dropped (inf·0) — a GPU must not hide a non-finite value from AMP's inf check by dropping it to 0."""
    _, device = backend_device
    x = torch.randn(4, 64, device=device)
    x[:, ::5] = float("nan")
    x[:, 1::5] = float("inf")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        xd = x.to(dtype)
        out, ref = ops.dropout(xd, 0.5, 3, 1), reference.dropout(xd, 0.5, 3, 1)
        assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
        keep = reference.dropout_keep(xd, 0.5, 3, 1)
        assert bool(out[:, ::5].isnan().all()) and bool(out[:, 1::5][~keep[:, 1::5]].isnan().all())
        finite = ref.isfinite()
        torch.testing.assert_close(out[finite], ref[finite])


@pytest.mark.gpu
def test_module_in_a_cuda_graph_draws_a_new_mask_per_replay():
    """Captured in a CUDA graph, the module runs torch's graph-safe dropout: a host seed would be frozen into
    the graph and every replay would drop the same elements."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    drop = Dropout(0.5).train()
    x = torch.ones(4096, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        drop(x)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = drop(x)
    graph.replay()
    a = y.clone()
    graph.replay()
    assert not torch.equal(a, y)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_keeps_one_minus_p_and_streams_are_independent(backend_device, p):
    backend, device = backend_device
    n = 1 << 13 if backend == "triton" and device == "cpu" else 1 << 18  # the interpreter: ~1 s per 2^13
    x = torch.ones(n, device=device)
    a = ops.dropout(x, p, 5, 0) != 0
    frac = a.double().mean().item()
    assert abs(frac - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n), frac  # 5 sigma of a Binomial(n, 1 − p)
    assert torch.equal(ops.dropout(x, p, 5, 0) != 0, a), "the same (seed, offset) gives the same mask"
    for other in (ops.dropout(x, p, 6, 0) != 0, ops.dropout(x, p, 5, 1) != 0):
        both = (a & other).double().mean().item()  # independent masks: P(both kept) = (1 − p)²
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / n), both
    # neighbours within a Philox block are independent too
    pair = (a[0::4] & a[1::4]).double().mean().item()
    assert abs(pair - (1 - p) ** 2) < 5 * math.sqrt((1 - p) ** 2 * (1 - (1 - p) ** 2) / (n // 4)), pair


@pytest.mark.parametrize("layout,grad_layout", [("contiguous", "contiguous"), ("contiguous", "channels_last"),
                                                ("channels_last", "contiguous"), ("strided", "contiguous")])
def test_dropout_backward_applies_the_forward_mask(backend_device, layout, grad_layout):
    """dL/dx = g·keep/(1 − p) with the forward's mask, whatever layout the gradient arrives in (the mask
    follows the output's memory order: the backward arranges g in it first)."""
    _, device = backend_device
    x = make((2, 5, 3, 4), layout, torch.float32, device, torch.Generator().manual_seed(4)).requires_grad_()
    g = make((2, 5, 3, 4), grad_layout, torch.float32, device, torch.Generator().manual_seed(5))
    y = ops.dropout(x, 0.3, 77, 2)
    y.backward(g)
    keep = reference.dropout_keep(y, 0.3, 77, 2)  # the output's layout: x's when dense, else contiguous
    torch.testing.assert_close(x.grad, g * keep / 0.7, rtol=1e-6, atol=0)
    assert torch.equal(y != 0, keep & (x != 0))


def test_dropout_backward_takes_a_gradient_that_differs_only_in_size_one_strides(backend_device):
    """A size-1 dim's stride never moves an element, so such a gradient is used as it is (no copy into the
    output's strides), and the mask still lands on the right elements."""
    _, device = backend_device
    x = torch.randn(2, 5, 1, 4, generator=torch.Generator().manual_seed(4)).to(device).requires_grad_()
    g0 = torch.randn(2, 5, 1, 4, generator=torch.Generator().manual_seed(5)).to(device)
    g = g0.as_strided(g0.shape, (20, 4, 7, 1))
    y = ops.dropout(x, 0.3, 77, 2)
    assert g.stride() != y.stride() and torch.equal(g, g0)
    y.backward(g)
    keep = reference.dropout_keep(y, 0.3, 77, 2)
    torch.testing.assert_close(x.grad, g0 * keep / 0.7, rtol=1e-6, atol=0)


def test_dropout_gradcheck_cpu():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    with dx.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a: ops.dropout(a, 0.4, 9, 1), (x,))
        assert torch.autograd.gradgradcheck(lambda a: ops.dropout(a, 0.4, 9, 1), (x,))


def test_dropout_edge_shapes(backend_device):
    _, device = backend_device
    for x in (torch.empty(0, 3, device=device), torch.tensor(2.0, device=device), torch.randn(7, device=device)):
        out = ops.dropout(x, 0.5, 1, 0)
        assert out.shape == x.shape
        torch.testing.assert_close(out, reference.dropout(x, 0.5, 1, 0))


def test_opcheck_cpu():
    x = torch.randn(3, 2, 5, 5)
    for args in ((x, 0.1, 5, 2), (x.contiguous(memory_format=torch.channels_last), 0.5, -3, 0), (x[..., ::2], 0.2, 1, 1)):
        torch.library.opcheck(torch.ops.diffusion_ext.dropout.default, args)


@pytest.mark.gpu
def test_opcheck_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x = torch.randn(3, 2, 5, 5, device="cuda")
    torch.library.opcheck(torch.ops.diffusion_ext.dropout.default, (x, 0.1, 5, 2))
    torch.library.opcheck(torch.ops.diffusion_ext.dropout.default, (x.contiguous(memory_format=torch.channels_last),
                                                                    0.5, 7, 0))


def test_opcheck_triton():
    pytest.importorskip("triton")
    from diffusion_ext import triton as dx_triton

    x = torch.randn(3, 2, 5, 5)
    torch.library.opcheck(dx_triton.dropout, (x, 0.1, 5, 2))
    torch.library.opcheck(dx_triton.dropout, (x.contiguous(memory_format=torch.channels_last), 0.5, 7, 0))


def test_compile_fullgraph(backend_device):
    _, device = backend_device
    x = torch.randn(4, 3, 6, 6, device=device)

    def f(x):
        return ops.dropout(x, 0.25, 11, 3) * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.parametrize("p,offset,dtype,what", [
    (-0.1, 0, torch.float32, "p = -0.1"), (1.0, 0, torch.float32, "p = 1"), (float("nan"), 0, torch.float32, "p = nan"),
    (0.1, -1, torch.float32, "offset = -1"), (0.1, 0, torch.int64, "dtype"),
])
def test_dropout_rejects_bad_arguments(backend_device, p, offset, dtype, what):
    _, device = backend_device
    x = torch.ones(2, 3, dtype=dtype, device=device)
    with pytest.raises((ValueError, TypeError), match="diffusion_ext.dropout"):
        ops.dropout(x, p, 0, offset)


# ------------------------------------------------------------------------------------------------------
# nn.Dropout on the op
# ------------------------------------------------------------------------------------------------------
def test_module_is_identity_in_eval_and_at_p_zero():
    x = torch.randn(4, 8)
    assert Dropout(0.5).eval()(x) is x
    assert Dropout(0.0).train()(x) is x
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))  # p = 1: torch's dropout, all dropped


def test_module_draws_its_seed_from_torchs_generator():
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.random.fork_rng():
        torch.manual_seed(21)
        out = Dropout(0.3).train()(x)
        torch.manual_seed(21)
        seed = new_seed()
        again = Dropout(0.3).train()(x)
    torch.testing.assert_close(out, reference.dropout(x, 0.3, seed, 0))
    assert not torch.equal(out, again), "each call draws a new mask"
    assert 0 <= seed < 2**63


def test_module_under_compile_uses_torchs_dropout():
    m = torch.nn.Sequential(torch.nn.Linear(16, 16), Dropout(0.5)).train()
    x = torch.randn(64, 16)
    torch._dynamo.reset()
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    dropped = (out == 0).double().mean().item()
    assert 0.3 < dropped < 0.7


@pytest.mark.parametrize("reentrant", [False, True])
def test_module_under_activation_checkpointing_recomputes_the_same_mask(reentrant):
    """Checkpointed, the gradients equal the plain run's. Reentrant, the forward runs again in the backward
    and draws its key again, from torch's generator, which checkpoint restores first (preserve_rng_state:
    without it the masks differ, which makes this test fail). Non-reentrant, this graph needs nothing of the
    op recomputed (its node keeps its key and saves no tensor); in a block whose next layer saves the
    dropout's output, that output is recomputed, and gets the same mask for the reentrant case's reason."""
    lin = torch.nn.Linear(12, 12).double()
    drop = Dropout(0.5).train()
    x = torch.randn(32, 12, dtype=torch.float64, requires_grad=True)

    def f(x):
        return drop(torch.tanh(lin(x))).sum(dim=1)

    grads = []
    for checkpointed in (False, True):
        lin.zero_grad()
        with torch.random.fork_rng():
            torch.manual_seed(4)
            out = torch.utils.checkpoint.checkpoint(f, x, use_reentrant=reentrant) if checkpointed else f(x)
            out.square().sum().backward()
        grads.append(lin.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
