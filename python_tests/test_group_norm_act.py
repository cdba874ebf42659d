"""group_norm_act: output and all three gradients against nn.GroupNorm + the activation, over
backend × dtype × layout × shape × activation; gradcheck; opcheck; torch.compile; the module."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES
from tolerances import assert_matches_oracle

import diffusion_ext as dx
from diffusion_ext import ops, reference

# (shape, num_groups): C = 320 with 32 groups (10 channels each), groups = 1 and = C, 1×1 and odd
# spatial sizes, N = 1, (N, C) and (N, C, L) and 5-D inputs, C not a multiple of any block size.
SHAPES = [
    ((2, 6, 5, 7), 3),
    ((1, 320, 4, 4), 32),
    ((3, 8, 1, 1), 8),
    ((2, 12, 3, 3), 1),
    ((2, 4), 2),
    ((2, 16, 9), 4),
    ((2, 6, 3, 2, 5), 3),
    ((1, 5, 13, 11), 5),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]
ACTIVATIONS = ["silu", "relu", "none"]


def _make(shape, layout, dtype, device, g, offset=0.0):
    x = torch.randn(shape, generator=g, dtype=torch.float64) + offset
    if layout == "channels_last" and len(shape) >= 3:
        x = x.movedim(1, -1).contiguous().movedim(-1, 1)  # C innermost: NHWC, NDHWC, NLC
    elif layout == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x.to(device=device, dtype=dtype)


def _run(fn, x, w, b, gy, *args):
    x, w, b = (t.detach().requires_grad_(True) for t in (x, w, b))
    y = fn(x, *args[:1], w, b, *args[1:])
    grads = torch.autograd.grad(y, (x, w, b), gy)
    return (y.detach(), *grads)


def _oracle(x, w, b, gy, num_groups, activation):
    # fp64 on contiguous copies: PyTorch's contiguous CPU path is the accurate one (two-pass moments)
    c = [t.detach().double().contiguous() for t in (x, w, b, gy)]
    return _run(reference.group_norm_act, c[0], c[1], c[2], c[3], num_groups, 1e-5, activation)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,num_groups", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_group_norm_then_activation(backend_device, shape, num_groups, layout, activation, dtype):
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and (dtype != torch.float32 or layout == "strided"):
        pytest.skip("the interpreter is slow: fp32 and the two fast layouts suffice there")
    g = torch.Generator().manual_seed(sum(shape))
    x = _make(shape, layout, dtype, device, g, offset=0.5)
    w = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.5 + 1).to(device, dtype)
    b = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
    gy = _make(shape, "contiguous", dtype, device, g)  # gradient in another layout than x
    out = _run(ops.group_norm_act, x, w, b, gy, num_groups, 1e-5, activation)
    with dx.use_backend("torch"):
        ref = _run(ops.group_norm_act, x, w, b, gy, num_groups, 1e-5, activation)
    oracle = _oracle(x, w, b, gy, num_groups, activation)
    for name, o, r, r64 in zip(("y", "grad_x", "grad_weight", "grad_bias"), out, ref, oracle):
        try:
            assert_matches_oracle(o, r, r64)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None
    if layout == "channels_last":
        assert out[0].stride() == x.stride(), "channels_last output keeps the layout, no copy"


def test_large_mean_is_stable(backend_device):
    # x = 1000 + N(0, 0.01²) in fp32: E[x²] − E[x]² would lose every digit, and so would x·scale + shift
    # (PyTorch's own fp32 kernels err by 8.6e-3 here, and by 7.1 in channels_last). Shifted sums and
    # y = (x − μ)·scale + β keep it below the 6e-5/0.01 that rounding μ to fp32 alone costs (the CPU
    # kernel, which carries μ to more than fp32, errs by ~2e-7).
    _, device = backend_device
    g = torch.Generator().manual_seed(0)
    for layout in ("contiguous", "channels_last"):
        x = (_make((2, 8, 6, 6), layout, torch.float64, "cpu", g) * 0.01 + 1000).to(device, torch.float32)
        y = ops.group_norm_act(x, 4, activation="none")
        exact = F.group_norm(x.double().cpu().contiguous(), 4)
        assert (y.double().cpu() - exact).abs().max() < 4e-3


def test_no_affine_and_partial_grads(backend_device):
    _, device = backend_device
    x = torch.randn(2, 6, 4, 4, device=device, requires_grad=True)
    y = ops.group_norm_act(x, 3, None, None, 1e-5, "silu")
    torch.testing.assert_close(y, F.silu(F.group_norm(x, 3)), atol=2e-6, rtol=1e-5)
    (gx,) = torch.autograd.grad(y.sum(), x)
    x2 = x.detach().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(F.silu(F.group_norm(x2, 3)).sum(), x2)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-4)
    w = torch.ones(6, device=device, requires_grad=True)
    b = torch.zeros(6, device=device)  # bias needs no grad: only grad_x and grad_weight are made
    gw = torch.autograd.grad(ops.group_norm_act(x.detach(), 3, w, b).sum(), w)[0]
    assert gw.shape == (6,)


def test_empty_batch(backend_device):
    _, device = backend_device
    x = torch.empty(0, 4, 3, 3, device=device)
    assert ops.group_norm_act(x, 2).shape == x.shape


def test_gradcheck_cpu_fp64():
    with dx.use_backend("cpu"):
        for act in ACTIVATIONS:
            for layout in ("contiguous", "channels_last"):
                g = torch.Generator().manual_seed(1)
                x = _make((2, 4, 3, 3), layout, torch.float64, "cpu", g).requires_grad_(True)
                w = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
                b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
                assert torch.autograd.gradcheck(lambda x, w, b: ops.group_norm_act(x, 2, w, b, 1e-5, act), (x, w, b))


def test_double_backward_is_a_clear_error():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with dx.use_backend("cpu"):
        y = ops.group_norm_act(x, 2)
        with pytest.raises(RuntimeError, match="group_norm_act: double backward"):
            torch.autograd.grad(y.sum(), x, create_graph=True)


def _opcheck_args(device):
    x = torch.randn(2, 6, 5, 3, device=device)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    y, mean, rstd = torch.ops.diffusion_ext.group_norm_act(x, 3, w, b, 1e-5, "silu")
    return [
        (torch.ops.diffusion_ext.group_norm_act.default, (x, 3, w, b, 1e-5, "silu")),
        (torch.ops.diffusion_ext.group_norm_act.default, (cl, 3, None, None, 1e-5, "relu")),
        (torch.ops.diffusion_ext.group_norm_act_backward.default,
         (torch.randn_like(x), x, mean, rstd, w, b, 3, "silu", [True, True, True])),
        (torch.ops.diffusion_ext.group_norm_act_backward.default,
         (torch.randn_like(x), x, mean, rstd, w, b, 3, "none", [True, False, True])),
    ]


def test_opcheck_cpu():
    for op, args in _opcheck_args("cpu"):
        torch.library.opcheck(op, args)


@pytest.mark.gpu
def test_opcheck_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for op, args in _opcheck_args("cuda"):
        torch.library.opcheck(op, args)


def test_compile_fullgraph_forward_backward(backend_device):
    _, device = backend_device
    m = dx.nn.GroupNormAct(4, 8).to(device)
    x = torch.randn(2, 8, 5, 5, device=device, requires_grad=True)

    def f(x):
        return m(x).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    (g1,) = torch.autograd.grad(compiled(x), x)
    (g2,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g1, g2)


def test_module_state_dict_round_trip_with_nn_group_norm():
    eager = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        eager.weight.normal_()
        eager.bias.normal_()
    fused = dx.nn.GroupNormAct(4, 8, activation="silu")
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(3, 8, 6, 6)
    torch.testing.assert_close(fused(x), F.silu(eager(x)), atol=2e-6, rtol=1e-5)
    back = torch.nn.GroupNorm(4, 8)
    back.load_state_dict(fused.state_dict())
    torch.testing.assert_close(back.weight, eager.weight)
    assert set(fused.state_dict()) == {"weight", "bias"}
    assert "activation='silu'" in repr(fused)


def test_module_rejects():
    with pytest.raises(ValueError, match="not divisible"):
        dx.nn.GroupNormAct(3, 8)
    with pytest.raises(ValueError, match="activation"):
        dx.nn.GroupNormAct(2, 8, activation="gelu")
