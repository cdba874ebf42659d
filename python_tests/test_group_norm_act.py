"""group_norm_act: output and all three gradients against nn.GroupNorm + the activation, over
backend × dtype × layout × shape × activation; the same with FiLM (scale, shift) and their gradients;
gradcheck; opcheck; torch.compile; the module."""
import pytest
import torch
import torch.nn.functional as F
from conftest import DTYPES, SendsNoGradient
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
    ((2, 40, 6, 6), 8),  # a whole bf16/fp16 vector step (32 lanes) and a tail, along H·W and along C
    ((2, 8, 5, 5), 4),  # H·W = 25: a bf16/fp16 run shorter than a step that fills one fp32 vector and part of a second
    # channels_last: whole vector steps along C over 81 rows, two 64-row lane runs (the fp32/bf16/fp16 forward's
    # statistics, every dtype's backward sums)
    ((1, 32, 9, 9), 4),
    # channels_last: more elements per sample (25600) than one CPU task takes (16384), so the forward's per-channel
    # sums come from two chunks of rows (a sample of one chunk takes another path)
    ((1, 64, 20, 20), 8),
    # contiguous: channels of 1296 elements, longer than a backward lane run (64 vector steps: 1024 fp32 with AVX-512)
    ((1, 4, 36, 36), 2),
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


def _run(fn, x, w, b, gy, num_groups, eps, activation, scale=None, shift=None):
    """(y, grad_x, grad_w, grad_b[, grad_scale][, grad_shift]) of fn (an ops.group_norm_act-like function)."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in (x, w, b, scale, shift)]
    y = fn(leaves[0], num_groups, leaves[1], leaves[2], eps, activation, leaves[3], leaves[4])
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], gy)
    return (y.detach(), *grads)


def _oracle(x, w, b, gy, num_groups, activation, scale=None, shift=None):
    # fp64 on contiguous copies: PyTorch's contiguous CPU path is the accurate one (two-pass moments)
    c = [None if t is None else t.detach().double().contiguous() for t in (x, w, b, gy, scale, shift)]
    return _run(reference.group_norm_act, c[0], c[1], c[2], c[3], num_groups, 1e-5, activation, c[4], c[5])


def _assert_all_match(names, out, ref, oracle):
    for name, o, r, r64 in zip(names, out, ref, oracle):
        try:
            assert_matches_oracle(o, r, r64)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


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
    _assert_all_match(("y", "grad_x", "grad_weight", "grad_bias"), out, ref, oracle)
    if layout == "channels_last":
        assert out[0].stride() == x.stride(), "channels_last output keeps the layout, no copy"


# FiLM: (which inputs, activation). "both" takes scale and shift as the two halves of one (N, 2C) tensor, as
# the U-Nets make them with torch.chunk: strided views that the kernels read in place.
FILM_CASES = [("scale", "silu"), ("shift", "relu"), ("both", "silu"), ("both", "none")]
FILM_SHAPES = [((2, 6, 5, 7), 3), ((1, 320, 4, 4), 32), ((3, 8, 1, 1), 8), ((2, 4), 2), ((2, 6, 3, 2, 5), 3)]


def _film_inputs(which, N, C, dtype, device, g):
    st = (torch.randn(N, 2 * C, generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
    scale, shift = st.chunk(2, dim=1)
    if which == "both":
        return scale, shift
    return (scale.contiguous(), None) if which == "scale" else (None, shift.contiguous())


@pytest.mark.parametrize("film,activation", FILM_CASES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape,num_groups", FILM_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_film_matches_group_norm_scale_shift_then_activation(backend_device, shape, num_groups, layout, film,
                                                             activation, dtype):
    """act(GN(x)·(1 + scale) + shift): output and the gradients of x, weight, bias, scale and shift."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and (dtype != torch.float32 or layout == "strided"):
        pytest.skip("the interpreter is slow: fp32 and the two fast layouts suffice there")
    g = torch.Generator().manual_seed(sum(shape) + len(film))
    x = _make(shape, layout, dtype, device, g, offset=0.5)
    w = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.5 + 1).to(device, dtype)
    b = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.5).to(device, dtype)
    scale, shift = _film_inputs(film, shape[0], shape[1], dtype, device, g)
    gy = _make(shape, "contiguous", dtype, device, g)
    args = (x, w, b, gy, num_groups, 1e-5, activation, scale, shift)
    out = _run(ops.group_norm_act, *args)
    with dx.use_backend("torch"):
        ref = _run(ops.group_norm_act, *args)
    oracle = _oracle(x, w, b, gy, num_groups, activation, scale, shift)
    names = ["y", "grad_x", "grad_weight", "grad_bias"] + ["grad_scale"] * (scale is not None) + \
        ["grad_shift"] * (shift is not None)
    assert len(out) == len(names) == len(oracle)
    _assert_all_match(names, out, ref, oracle)
    if layout == "channels_last":
        assert out[0].stride() == x.stride(), "channels_last output keeps the layout, no copy"


MIXED_SHAPES = [((2, 6, 5, 7), 3), ((2, 40, 6, 6), 8), ((1, 32, 9, 9), 4)]


@pytest.mark.parametrize("film", [None, "both"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape,num_groups", MIXED_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_mixed_precision_fp32_params_on_half_activations(backend_device, shape, num_groups, layout, film, dtype):
    """fp32 γ, β with a bf16/fp16 x (an autocast model's parameters, read without a cast): y and grad_x in x's
    dtype, grad_weight and grad_bias in fp32, against the reference's mixed precision (autocast's fp32
    F.group_norm, the result in x's dtype) and the fp64 oracle."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu" and shape != MIXED_SHAPES[0]:
        pytest.skip("the interpreter is slow: one shape suffices there")
    g = torch.Generator().manual_seed(sum(shape) + 7)
    x = _make(shape, layout, dtype, device, g, offset=0.5)
    w = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.5 + 1).to(device, torch.float32)
    b = (torch.randn(shape[1], generator=g, dtype=torch.float64) * 0.5).to(device, torch.float32)
    scale, shift = _film_inputs(film, shape[0], shape[1], dtype, device, g) if film else (None, None)
    gy = _make(shape, "contiguous", dtype, device, g)
    args = (x, w, b, gy, num_groups, 1e-5, "silu", scale, shift)
    out = _run(ops.group_norm_act, *args)
    with dx.use_backend("torch"):
        ref = _run(ops.group_norm_act, *args)
    oracle = _oracle(x, w, b, gy, num_groups, "silu", scale, shift)
    names = ["y", "grad_x", "grad_weight", "grad_bias"] + ["grad_scale", "grad_shift"] * (film is not None)
    assert [t.dtype for t in out] == [dtype, dtype, torch.float32, torch.float32] + [dtype, dtype] * (film is not None)
    _assert_all_match(names, out, ref, oracle)


def test_reference_under_autocast_is_what_an_eager_model_runs():
    """The eager reference is also the eager models' norm (GroupNormAct(fused=False)): under autocast it must stay
    exactly what nn.GroupNorm + SiLU give there (on a CPU F.group_norm's own mixed-dtype kernel; on CUDA
    autocast's upcast to fp32), not an fp32 computation cast back, which made the eager bf16 demo model's
    training step 10% slower and its sampling step 20% faster than a user's — the peer of every benchmark."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 5, 5, generator=g).bfloat16()
    w, b = torch.randn(8, generator=g), torch.randn(8, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = reference.group_norm_act(x, 4, w, b)
        want = F.silu(F.group_norm(x, 4, w, b))
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert reference.group_norm_act(x, 4, w, b).dtype == torch.bfloat16  # outside autocast: x's dtype


def test_mixed_precision_dtype_errors():
    """The parameters' dtype: x's, or float32 with a half x, weight and bias alike; anything else names the op,
    the argument and what was expected."""
    x = torch.randn(2, 4, 3, 3)
    w32 = torch.ones(4)
    cases = [
        (x, w32.half(), None, "weight has dtype Half but x has dtype Float; expected x's dtype$"),
        (x.bfloat16(), w32.double(), None, "weight has dtype Double .* expected x's dtype or float32"),
        (x.half(), w32.bfloat16(), None, "weight has dtype BFloat16 .* expected x's dtype or float32"),
        (x.bfloat16(), w32, w32.bfloat16(), "weight has dtype Float but bias has dtype BFloat16; expected the same"),
        (x.double(), None, w32, "bias has dtype Float but x has dtype Double"),
    ]
    for xx, w, b, msg in cases:
        with pytest.raises(TypeError, match="diffusion_ext.group_norm_act: " + msg):
            ops.group_norm_act(xx, 2, w, b)


def test_film_of_zero_is_the_plain_op(backend_device):
    """scale = shift = 0 gives γ' = γ·1 and β' = β·1 + 0 exactly: the output equals the plain op's bit for bit."""
    _, device = backend_device
    g = torch.Generator().manual_seed(5)
    for layout in ("contiguous", "channels_last"):
        x = _make((2, 8, 5, 5), layout, torch.float32, device, g)
        w, b = torch.randn(8, generator=g).to(device), torch.randn(8, generator=g).to(device)
        zero = torch.zeros(2, 8, device=device)
        assert torch.equal(ops.group_norm_act(x, 4, w, b, scale=zero, shift=zero), ops.group_norm_act(x, 4, w, b))


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


def test_no_gradient_into_the_output_gives_none_as_eager(backend_device):
    # mean and rstd are non-differentiable outputs: autograd makes no zeros for them, and when nothing comes
    # back into y either the op sends nothing on (no backward run on zeros), as F.group_norm + F.silu do
    _, device = backend_device
    x = torch.randn(2, 8, 4, 4, device=device)
    w = torch.randn(8, device=device)
    grads = []
    for fn in (lambda x, w: ops.group_norm_act(x, 4, w, None), lambda x, w: F.silu(F.group_norm(x, 4, w))):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        (SendsNoGradient.apply(fn(xr, wr)).sum() + (2 * xr).sum()).backward()
        grads.append((xr.grad, wr.grad))
    (gx, gw), (gx_eager, gw_eager) = grads
    assert gw is None and gw_eager is None
    torch.testing.assert_close(gx, gx_eager)


def test_empty_batch(backend_device):
    _, device = backend_device
    x = torch.empty(0, 4, 3, 3, device=device)
    assert ops.group_norm_act(x, 2).shape == x.shape


def test_gradcheck_cpu_fp64():
    """x, weight and bias; with FiLM, scale and shift too, then scale alone and shift alone without affine."""
    with dx.use_backend("cpu"):
        for act in ACTIVATIONS:
            for layout in ("contiguous", "channels_last"):
                g = torch.Generator().manual_seed(1)
                x = _make((2, 4, 3, 3), layout, torch.float64, "cpu", g).requires_grad_(True)
                w, b = (torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
                s, t = (torch.randn(2, 4, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2))
                assert torch.autograd.gradcheck(lambda x, w, b: ops.group_norm_act(x, 2, w, b, 1e-5, act), (x, w, b))
                assert torch.autograd.gradcheck(
                    lambda x, w, b, s, t: ops.group_norm_act(x, 2, w, b, 1e-5, act, s, t), (x, w, b, s, t))
                assert torch.autograd.gradcheck(lambda x, s: ops.group_norm_act(x, 2, None, None, 1e-5, act, s), (x, s))
                assert torch.autograd.gradcheck(
                    lambda x, t: ops.group_norm_act(x, 2, None, None, 1e-5, act, shift=t), (x, t))


def test_double_backward_is_a_clear_error():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    with dx.use_backend("cpu"):
        y = ops.group_norm_act(x, 2)
        with pytest.raises(RuntimeError, match="group_norm_act: double backward"):
            torch.autograd.grad(y.sum(), x, create_graph=True)


def _opcheck_args(device):
    x = torch.randn(2, 6, 5, 3, device=device)
    w, b = torch.randn(6, device=device), torch.randn(6, device=device)
    scale, shift = torch.randn(2, 12, device=device).chunk(2, dim=1)  # strided views, read in place
    cl = x.contiguous(memory_format=torch.channels_last)
    y, mean, rstd = torch.ops.diffusion_ext.group_norm_act(x, 3, w, b, 1e-5, "silu")
    xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
    _, mean_b, rstd_b = torch.ops.diffusion_ext.group_norm_act(xb, 3, w, b, 1e-5, "silu")
    fwd, bwd = torch.ops.diffusion_ext.group_norm_act.default, torch.ops.diffusion_ext.group_norm_act_backward.default
    return [
        (fwd, (x, 3, w, b, 1e-5, "silu")),
        (fwd, (cl, 3, None, None, 1e-5, "relu")),
        (fwd, (x, 3, w, b, 1e-5, "silu", scale, shift)),
        (fwd, (cl, 3, w, None, 1e-5, "none", None, shift.contiguous())),
        (bwd, (torch.randn_like(x), x, mean, rstd, w, b, 3, "silu", [True, True, True])),
        (bwd, (torch.randn_like(x), x, mean, rstd, w, b, 3, "none", [True, False, True])),
        (bwd, (torch.randn_like(x), x, mean, rstd, w, b, 3, "silu", [True, True, True], scale, shift)),
        (bwd, (torch.randn_like(cl), cl, mean, rstd, None, b, 3, "relu", [False, False, True], scale, None,
               [True, False])),
        # mixed precision: fp32 γ, β with bf16 x; their gradients in fp32
        (fwd, (xb, 3, w, b, 1e-5, "silu", scale.bfloat16(), None)),
        (bwd, (torch.randn_like(xb), xb, mean_b, rstd_b, w, b, 3, "silu", [True, True, True])),
    ]


def test_opcheck_cpu():
    for op, args in _opcheck_args("cpu"):
        torch.library.opcheck(op, args)


def test_opcheck_triton_on_cpu():
    """The Triton custom ops (schemas as csrc/torch_bindings.cpp's, fakes, autograd), under the interpreter."""
    if "triton" not in dx.available_backends("cpu"):
        pytest.skip("Triton is not available")
    fwd, bwd = ops._triton().group_norm_act, ops._triton().group_norm_act_backward  # autograd registered on import
    for op, args in _opcheck_args("cpu"):
        torch.library.opcheck(fwd if op is torch.ops.diffusion_ext.group_norm_act.default else bwd, args)


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
    emb = torch.randn(2, 16, device=device, requires_grad=True)

    def f(x):
        return m(x).square().sum()

    def f_film(x, emb):  # FiLM from halves of one tensor, as a U-Net's time MLP gives them
        scale, shift = emb.chunk(2, dim=1)
        return m(x, scale, shift).square().sum()

    torch._dynamo.reset()
    backend = "aot_eager" if device == "cpu" else "inductor"
    (g1,) = torch.autograd.grad(torch.compile(f, fullgraph=True, backend=backend)(x), x)
    (g2,) = torch.autograd.grad(f(x), x)
    torch.testing.assert_close(g1, g2)
    g1 = torch.autograd.grad(torch.compile(f_film, fullgraph=True, backend=backend)(x, emb), (x, emb))
    g2 = torch.autograd.grad(f_film(x, emb), (x, emb))
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


def test_triton_film_across_split_chunks():
    """The Triton kernels with programs shrunk (tile) and multiplied (target_programs) so that the statistics
    and the backward's sums come in several chunks per group and per (n, channel tile): FiLM's sums are then
    merged over the chunks and folded with (1 + s) before ∂γ, ∂β, a and b. Against the oracle rule."""
    if "triton" not in dx.available_backends("cpu"):
        pytest.skip("Triton is not available")
    from diffusion_ext.triton.group_norm_act import launch_group_norm_act, launch_group_norm_act_backward

    g = torch.Generator().manual_seed(9)
    for layout in ("contiguous", "channels_last"):
        x = _make((2, 8, 9, 7), layout, torch.float32, "cpu", g, offset=0.5)
        w, b = (torch.randn(8, generator=g) * 0.5 + 1 for _ in range(2))
        scale, shift = _film_inputs("both", 2, 8, torch.float32, "cpu", g)
        gy = _make((2, 8, 9, 7), "contiguous", torch.float32, "cpu", g)
        kw = dict(tile=16, target_programs=64)
        y, mean, rstd = launch_group_norm_act(x, 4, w, b, 1e-5, "silu", scale, shift, **kw)
        grads = launch_group_norm_act_backward(gy, x, mean, rstd, w, b, 4, "silu", [True] * 3, scale, shift,
                                               [True, True], **kw)
        with dx.use_backend("torch"):
            ref = _run(ops.group_norm_act, x, w, b, gy, 4, 1e-5, "silu", scale, shift)
        oracle = _oracle(x, w, b, gy, 4, "silu", scale, shift)
        _assert_all_match(("y", "grad_x", "grad_weight", "grad_bias", "grad_scale", "grad_shift"), (y, *grads),
                          ref, oracle)
