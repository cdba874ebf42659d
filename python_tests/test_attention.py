"""attention: output, logsumexp and dq, dk, dv against softmax(scale·q·kᵀ)·v in fp64, over backend × dtype ×
lengths × head dims × Lq ≠ Lk × layouts; empty problems; gradcheck; opcheck; torch.compile; memory."""
import math

import pytest
import torch
from conftest import DTYPES, SendsNoGradient
from tolerances import assert_matches_oracle

import diffusion_ext as dx
from diffusion_ext import ops, reference

# (B, H, Lq, Lk, D): L = 1, 7, 77, 256, 1000, 4096; head dims 32, 40, 64, 80, 128, 256; Lq ≠ Lk both ways.
SHAPES = [
    (1, 1, 1, 1, 32),
    (2, 3, 7, 7, 40),
    (1, 2, 77, 77, 64),
    (2, 1, 7, 77, 80),
    (1, 2, 77, 7, 128),
    (1, 1, 256, 256, 32),
    (1, 1, 1000, 77, 40),
    (1, 1, 77, 1000, 64),
    (1, 1, 1000, 1000, 80),
    (1, 1, 4096, 256, 64),
    (2, 1, 70, 133, 256),  # single-head D = C, as diffusers' UNet2DModel and VAE mid-blocks; keys past whole tiles
]
# The interpreter runs a Triton program in Python: these are the shapes it can afford.
INTERPRETER_SHAPES = SHAPES[:6]
LAYOUTS = ["contiguous", "blhd", "qkv_split", "head_dim_strided"]


def _make_qkv(shape, layout, dtype, device, g):
    B, H, Lq, Lk, D = shape

    def rand(L):
        return torch.randn(B, H, L, D, generator=g, dtype=torch.float64)

    q, k, v = rand(Lq), rand(Lk), rand(Lk)
    if layout == "blhd":  # (B, L, H, D) memory seen as (B, H, L, D): what a projection then .view gives
        q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    elif layout == "qkv_split" and Lq == Lk:  # q, k, v as slices of one (B, L, 3, H, D) projection
        qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    elif layout == "head_dim_strided":  # head dim not innermost: the kernels see a copy
        q, k, v = (torch.cat([t, t], dim=-1)[..., ::2] for t in (q, k, v))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def _run(fn, q, k, v, g_out, scale):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, scale)
    grads = torch.autograd.grad(out, (q, k, v), g_out)
    return (out.detach(), *grads)


def _check_all(out, ref, oracle):
    for name, o, r, r64 in zip(("out", "dq", "dk", "dv"), out, ref, oracle):
        try:
            assert_matches_oracle(o, r, r64)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_softmax_attention(backend_device, shape, layout, dtype):
    backend, device = backend_device
    interpreted = backend == "triton" and device == "cpu"
    if interpreted and (shape not in INTERPRETER_SHAPES or dtype not in (torch.float32, torch.float16)
                        or layout in ("head_dim_strided", "qkv_split")):
        pytest.skip("the interpreter is slow: small shapes, fp32/fp16 and two layouts suffice there")
    if device == "cpu" and dtype in (torch.float16, torch.bfloat16) and max(shape[2:4]) > 256:
        pytest.skip("half-precision CPU reference matmuls are slow at long lengths")
    if layout != "contiguous" and max(shape[2:4]) > 256:
        pytest.skip("layouts are covered at the shorter lengths")
    B, H, Lq, Lk, D = shape
    g = torch.Generator().manual_seed(Lq * 31 + Lk + D)
    q, k, v = _make_qkv(shape, layout, dtype, device, g)
    g_out = torch.randn(B, H, Lq, D, generator=g, dtype=torch.float64).to(device, dtype)
    scale = 1.0 / math.sqrt(D)
    out = _run(ops.attention, q, k, v, g_out, scale)
    with dx.use_backend("torch"):
        ref = _run(ops.attention, q, k, v, g_out, scale)
    oracle = _run(reference.attention, *(t.double().cpu() for t in (q, k, v, g_out)), scale)
    _check_all([o.cpu() for o in out], [r.cpu() for r in ref], oracle)
    # heads merge back for free: the output is (B, Lq, H, D) memory
    assert out[0].transpose(1, 2).is_contiguous()


def test_logsumexp_and_default_scale(backend_device):
    backend, device = backend_device
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 40, generator=g).to(device) for n in (9, 21, 21))
    if backend == "triton":
        import diffusion_ext.triton  # registers diffusion_ext_triton::* (imported lazily by ops otherwise)
    op = torch.ops.diffusion_ext_triton.attention if backend == "triton" else torch.ops.diffusion_ext.attention
    out, lse = op(q, k, v, 1 / math.sqrt(40))
    lse64 = reference.attention_lse(q.double().cpu(), k.double().cpu())
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 9)
    torch.testing.assert_close(lse.double().cpu(), lse64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ops.attention(q, k, v).cpu(), out.cpu())  # scale defaults to 1/√D
    torch.testing.assert_close(ops.attention(q, k, v, scale=0.3).double().cpu(),
                               reference.attention(*(t.double().cpu() for t in (q, k, v)), 0.3), atol=1e-5, rtol=1e-5)


def test_large_scores_do_not_overflow(backend_device):
    # scores of ±1e4: exp without the running max would overflow; the online softmax subtracts it
    _, device = backend_device
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 1, 33, 32, generator=g, dtype=torch.float64) for _ in range(3))
    out = ops.attention(*(t.float().to(device) for t in (q, k, v)), scale=300.0)
    exact = reference.attention(q, k, v, 300.0)
    assert torch.isfinite(out).all()
    assert (out.double().cpu() - exact).abs().max() < 1e-3


@pytest.mark.parametrize("lengths", [(0, 5), (5, 0), (0, 0)])
def test_empty_lengths_match_sdpa(backend_device, lengths):
    _, device = backend_device
    Lq, Lk = lengths
    q = torch.randn(2, 2, Lq, 32, device=device, requires_grad=True)
    k = torch.randn(2, 2, Lk, 32, device=device, requires_grad=True)
    v = torch.randn(2, 2, Lk, 32, device=device, requires_grad=True)
    out = ops.attention(q, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    for gr, t in zip(grads, (q, k, v)):
        assert gr is not None and gr.shape == t.shape and not gr.abs().sum()


def test_no_gradient_into_the_output_gives_none_as_sdpa(backend_device):
    # lse is a non-differentiable output (no zeros made for it); with nothing coming back into out, q, k and v
    # get no gradient from the op, as from SDPA
    _, device = backend_device
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 2, 5, 32, generator=g).to(device) for _ in range(3))
    grads = []
    for fn in (ops.attention, torch.nn.functional.scaled_dot_product_attention):
        qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
        (SendsNoGradient.apply(fn(qr, kr, vr)).sum() + (3 * qr).sum()).backward()
        grads.append((qr.grad, kr.grad, vr.grad))
    (gq, gk, gv), (gq_sdpa, gk_sdpa, gv_sdpa) = grads
    assert gk is None and gv is None and gk_sdpa is None and gv_sdpa is None
    torch.testing.assert_close(gq, gq_sdpa)


def test_empty_batch(backend_device):
    _, device = backend_device
    q = torch.randn(0, 2, 5, 32, device=device)
    assert ops.attention(q, q, q).shape == q.shape


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_split_heads_match_at_any_thread_count(threads):
    """Few heads of long queries: the CPU forward splits each head into chunks of query rows and the backward
    splits its keys, both by the thread count (enough tasks for every thread), so each count runs another
    split and puts another mix of heads and chunks on a thread; every one must match the fp64 oracle."""
    shape = (1, 3, 256, 200, 64)
    g = torch.Generator().manual_seed(11)
    q, k, v = _make_qkv(shape, "blhd", torch.float32, "cpu", g)
    g_out = torch.randn(1, 3, 256, 64, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        with dx.use_backend("cpu"):
            out = _run(ops.attention, q, k, v, g_out, 0.125)
    finally:
        torch.set_num_threads(before)
    with dx.use_backend("torch"):
        ref = _run(ops.attention, q, k, v, g_out, 0.125)
    oracle = _run(reference.attention, *(t.double() for t in (q, k, v, g_out)), 0.125)
    _check_all(out, ref, oracle)


def test_gradcheck_cpu_fp64():
    g = torch.Generator().manual_seed(7)
    with dx.use_backend("cpu"):
        for Lq, Lk in ((5, 5), (3, 9), (17, 2)):
            q, k, v = (torch.randn(1, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
                       for n in (Lq, Lk, Lk))
            assert torch.autograd.gradcheck(lambda q, k, v: ops.attention(q, k, v, 0.7), (q, k, v))


def test_double_backward_is_a_clear_error():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64, requires_grad=True)
    with dx.use_backend("cpu"):
        out = ops.attention(q, q, q)
        with pytest.raises(RuntimeError, match="attention: double backward"):
            torch.autograd.grad(out.sum(), q, create_graph=True)


def _opcheck_args(device):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 40, generator=g).to(device) for n in (9, 17, 17))
    blhd = torch.randn(2, 9, 3, 40, generator=g).to(device).transpose(1, 2)
    out, lse = torch.ops.diffusion_ext.attention(q, k, v, 0.2)
    return [
        (torch.ops.diffusion_ext.attention.default, (q, k, v, 0.2)),
        (torch.ops.diffusion_ext.attention.default, (blhd, blhd, blhd, 0.5)),
        (torch.ops.diffusion_ext.attention_backward.default, (torch.randn_like(q), q, k, v, out, lse, 0.2)),
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
    q, k, v = (torch.randn(2, 2, 16, 32, device=device, requires_grad=True) for _ in range(3))

    def f(q, k, v):
        return ops.attention(q, k, v).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    g1 = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    g2 = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_forward_memory_is_linear_in_length():
    # L = 4096: the L×L fp32 scores would be 64 MiB; the fused forward may allocate its output, the lse and
    # per-thread tiles only. Measured with the profiler's allocation tracking of the CPU allocator.
    q, k, v = (torch.randn(1, 1, 4096, 64) for _ in range(3))
    with dx.use_backend("cpu"), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       profile_memory=True) as prof:
        ops.attention(q, k, v)
    allocated = sum(max(e.cpu_memory_usage, 0) for e in prof.events() if e.name == "diffusion_ext::attention")
    assert 0 < allocated < 8 * 2**20, f"the forward allocated {allocated / 2**20:.1f} MiB at L = 4096"


@pytest.mark.gpu
def test_forward_memory_is_linear_in_length_cuda():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    q, k, v = (torch.randn(1, 1, 4096, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    for backend in dx.available_backends("cuda"):
        if backend == "torch":
            continue
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with dx.use_backend(backend):
            out = ops.attention(q, k, v)
        torch.cuda.synchronize()
        extra = torch.cuda.max_memory_allocated() - before
        assert extra < 4 * 2**20, f"{backend}: the forward allocated {extra / 2**20:.1f} MiB at L = 4096"
        del out


# ----------------------------------------------------------------------------------------------------
# nn.SpatialSelfAttention
# ----------------------------------------------------------------------------------------------------
def _block_by_hand(m, x):
    """The block written out independently: GroupNorm, 1×1 convolutions as einsums, per-head softmax."""
    B, C, H, W = x.shape
    h = torch.nn.functional.group_norm(x, m.norm.num_groups, m.norm.weight, m.norm.bias, m.norm.eps)
    qkv = torch.einsum("oc,bchw->bohw", m.qkv.weight, h) + m.qkv.bias.view(1, -1, 1, 1)
    q, k, v = qkv.reshape(B, 3, m.num_heads, m.head_dim, H * W).unbind(1)  # (B, heads, d, L)
    w = torch.einsum("bndi,bndj->bnij", q, k) / m.head_dim ** 0.5
    out = torch.einsum("bnij,bndj->bndi", w.softmax(-1), v).reshape(B, C, H, W)
    return x + torch.einsum("oc,bchw->bohw", m.proj_out.weight, out) + m.proj_out.bias.view(1, -1, 1, 1)


@pytest.mark.parametrize("heads", [dict(), dict(num_heads=2), dict(head_dim=8)])
def test_spatial_self_attention_matches_hand_written_block(backend_device, heads):
    _, device = backend_device
    torch.manual_seed(0)
    fused = dx.nn.SpatialSelfAttention(32, num_groups=4, **heads).to(device)
    torch.nn.init.normal_(fused.proj_out.weight, std=0.2)  # zero-init would hide the attention path
    eager = dx.nn.SpatialSelfAttention(32, num_groups=4, fused=False, **heads).to(device)
    eager.load_state_dict(fused.state_dict())
    x = torch.randn(2, 32, 5, 6, device=device, requires_grad=True)
    outs = []
    for m in (fused, eager):
        y = m(x)
        outs.append((y, *torch.autograd.grad(y.square().sum(), (x, m.qkv.weight, m.norm.weight))))
    with torch.no_grad():
        expected = _block_by_hand(fused, x)
    torch.testing.assert_close(outs[0][0], expected, atol=1e-5, rtol=1e-5)
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_spatial_self_attention_starts_as_identity_and_rejects_bad_heads():
    m = dx.nn.SpatialSelfAttention(64, head_dim=32, num_groups=8)
    x = torch.randn(1, 64, 4, 4)
    torch.testing.assert_close(m(x), x)
    assert (m.num_heads, m.head_dim) == (2, 32)
    assert set(m.state_dict()) == {"norm.weight", "norm.bias", "qkv.weight", "qkv.bias", "proj_out.weight",
                                   "proj_out.bias"}
    with pytest.raises(ValueError, match="SpatialSelfAttention.*num_heads"):
        dx.nn.SpatialSelfAttention(64, num_heads=3)
    with pytest.raises(ValueError, match="SpatialSelfAttention.*head_dim"):
        dx.nn.SpatialSelfAttention(64, head_dim=24)
    with pytest.raises(ValueError, match="SpatialSelfAttention"):
        dx.nn.SpatialSelfAttention(64, num_heads=4, head_dim=32)
