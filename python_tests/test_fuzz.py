"""Hypothesis throws random shapes, strides, dtypes, devices and arguments at every op: each call must
give the reference's answer or raise a clean Python exception, one that names the op. A crash (segfault,
abort) fails the run, and so does any other exception: a Triton compile error, say, is a bug, not a
rejected input.

On a GPU, timesteps held in a CUDA tensor are only drawn in range: the kernels cannot raise for an
out-of-range value there without a host sync, so they trip a device-side assert, which poisons the CUDA
context of the whole process (every later CUDA call fails). Out-of-range timesteps are drawn in CPU
tensors (the host check raises), and test_bad_input.py's GPU test checks the device assert in a
subprocess of its own."""
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from tolerances import FLOOR

import diffusion_ext as dx
from diffusion_ext import ops, reference

# fuzz: the GPU lease's test selection (benchmarks/gpu_check.sh) takes these too, for their CUDA draws
pytestmark = pytest.mark.fuzz
CLEAN_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


def _rejected(e: BaseException) -> str:
    """The event name of a clean rejection; re-raises anything else (not one of CLEAN_ERRORS, an error that
    does not name the op, or one that comes from Triton, e.g. a kernel that failed to compile)."""
    chain, c = [], e
    while c is not None:
        chain.append(c)
        c = c.__cause__ or c.__context__
    if not isinstance(e, CLEAN_ERRORS) or "diffusion_ext" not in str(e) or \
            any(type(c).__module__.startswith("triton") for c in chain):
        raise e
    return f"rejected: {type(e).__name__}"
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPES = FLOATS * 3 + [torch.int64, torch.bool]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@st.composite
def tensors(draw, shape=None, dtype=None, device=None):
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(0, 5), min_size=draw(st.sampled_from([0, 1, 1, 1])), max_size=5)))
    dtype = dtype or draw(st.sampled_from(DTYPES))
    device = device or draw(st.sampled_from(DEVICES))
    layout = draw(st.sampled_from(["contiguous", "strided", "permuted", "channels_last"]))
    base = torch.randn(shape, dtype=torch.float64).to(dtype) if dtype.is_floating_point else \
        torch.randint(0, 3, shape).to(dtype)
    if layout == "strided" and len(shape) >= 1:
        big = torch.zeros(shape[:-1] + (shape[-1] * 2 + 1,), dtype=dtype)
        big[..., ::2][..., : shape[-1]] = base
        base = big[..., ::2][..., : shape[-1]]
    elif layout == "permuted" and len(shape) >= 2:
        perm = draw(st.permutations(range(len(shape))))
        inv = [perm.index(i) for i in range(len(shape))]
        base = base.permute(*perm).contiguous().permute(*inv)
    elif layout == "channels_last" and len(shape) == 4:
        base = base.contiguous(memory_format=torch.channels_last)
    return base.to(device)


@st.composite
def timesteps(draw, batch, T, device):
    kind = draw(st.sampled_from(["ok"] * 7 + ["range", "length", "dtype"]))
    on = draw(st.sampled_from([device] * 5 + ["cpu"]))
    lo, hi = (-3, T + 3) if kind == "range" and on == "cpu" else (0, T - 1)  # see the module's doc
    n = batch if kind != "length" else batch + draw(st.integers(1, 2))
    t = torch.tensor(draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)), dtype=torch.long)
    if kind == "dtype":
        t = t.to(draw(st.sampled_from([torch.int32, torch.float32])))
    return t.to(on)


def one_in(draw, n):
    """True with probability 1/n: each kind of bad argument is rare, so most calls reach the kernel."""
    return draw(st.integers(1, n)) == 1


def _close(out, ref):
    if not (out.shape == ref.shape and out.dtype == ref.dtype):
        return False
    if out.numel() == 0:
        return True
    scale = max(1.0, ref.double().abs().max().item())
    tol = 8 * FLOOR[out.dtype] * scale + (2e-2 * scale if out.dtype in (torch.float16, torch.bfloat16) else 0)
    return bool(((out.double() - ref.double()).abs() <= tol).all() | (out.isnan() & ref.isnan()).all())


def _backend_for(device, draw):
    choices = [b for b in dx.available_backends(device) if b != "torch"]
    return draw(st.sampled_from(choices))


SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@SETTINGS
@given(st.data())
def test_fuzz_q_sample(data):
    draw = data.draw
    T = draw(st.integers(1, 20))
    x0 = draw(tensors())
    noise = draw(tensors()) if one_in(draw, 6) else draw(tensors(shape=x0.shape, dtype=x0.dtype,
                                                                    device=x0.device.type))
    t = draw(timesteps(x0.shape[0] if x0.dim() else 1, T, x0.device.type))
    table = torch.linspace(0.999, 0.01, T, dtype=draw(st.sampled_from([torch.float32, torch.float64]))).to(x0.device)
    with dx.use_backend(_backend_for(x0.device.type, draw)):
        try:
            out = ops.q_sample(x0, t, noise, table)
        except Exception as e:
            event(_rejected(e))
            return
    event("computed")
    assert _close(out, reference.q_sample(x0, t, noise, table))


@SETTINGS
@given(st.data())
def test_fuzz_reverse_steps(data):
    draw = data.draw
    T = draw(st.integers(1, 20))
    x = draw(tensors())
    shaped = dict(shape=x.shape, dtype=x.dtype, device=x.device.type)
    m = draw(tensors()) if one_in(draw, 6) else draw(tensors(**shaped))
    noise = draw(st.one_of(st.none(), tensors(**shaped)))
    guided = draw(st.booleans())
    mu = draw(tensors(**shaped)) if guided else None
    w = draw(st.sampled_from([0.0, 1.0, 7.5])) if guided != one_in(draw, 8) else None
    batch = x.shape[0] if x.dim() else 1
    t = draw(timesteps(batch, T, x.device.type))
    table = torch.linspace(0.999, 0.01, T).to(x.device)
    prediction = draw(st.sampled_from(["epsilon", "sample", "v_prediction"] * 3 + ["x0"]))
    with dx.use_backend(_backend_for(x.device.type, draw)):
        try:
            cpu = t.device.type == "cpu"
            kind = draw(st.sampled_from(["ddpm", "ddim", "dpmpp"]))
            if kind == "ddpm":
                args = (m, t, x, table, noise, draw(st.integers(-2**63, 2**63 - 1)), draw(st.integers(0, 2**40)),
                        draw(st.booleans()), 1.0, draw(st.sampled_from(["fixed_small", "fixed_large"] * 4 + ["learned"])),
                        prediction, w, mu)
                out = ops.ddpm_step(*args)
                ref = reference.ddpm_step(*args)
            else:
                # t_prev ≥ t or < −1 (and t_last ≤ t) is rejected on the host for CPU timesteps; on a GPU it
                # would assert
                t_prev = t - draw(st.integers(0 if cpu else 1, 3))
                if not cpu:
                    t_prev = t_prev.clamp(min=-1)
                if kind == "ddim":
                    args = (m, t, t_prev, x, table, draw(st.sampled_from([0.0, 0.5, 1.0])), noise, 3, 0,
                            draw(st.booleans()), 1.0, prediction, w, mu)
                    out = ops.ddim_step(*args)
                    ref = reference.ddim_step(*args)
                else:
                    t_last = t + draw(st.integers(0 if cpu else 1, 3)) if draw(st.booleans()) else None
                    if t_last is not None and not cpu and bool((t_last >= T).any()):
                        t_last = None
                    last = draw(tensors(**shaped)) if t_last is not None or one_in(draw, 8) else None
                    args = (m, t, t_prev, x, table, last, t_last, draw(st.booleans()), noise, 3, 0,
                            draw(st.booleans()), 1.0, prediction, w, mu)
                    out = ops.dpmpp_2m_step(*args)
                    ref = reference.dpmpp_2m_step(*args)
        except Exception as e:
            event(_rejected(e))
            return
    event("computed")
    if kind == "dpmpp":
        assert _close(out[0], ref[0]) and _close(out[1], ref[1])
    else:
        assert _close(out, ref)


@SETTINGS
@given(st.data())
def test_fuzz_group_norm_act(data):
    draw = data.draw
    x = draw(tensors())
    C = x.shape[1] if x.dim() >= 2 else 1
    num_groups = draw(st.sampled_from([1, 2, 3, C if C else 1, 0]))
    params = dict(dtype=x.dtype, device=x.device.type)
    weight = draw(st.one_of(st.none(), tensors(shape=(C,), **params))) if not one_in(draw, 8) else draw(tensors())
    bias = draw(st.one_of(st.none(), tensors(shape=(C,), **params)))
    activation = draw(st.sampled_from(["silu", "relu", "none"] * 3 + ["gelu"]))
    eps = draw(st.sampled_from([1e-5, 1e-5, 1e-3, 0.0]))
    # FiLM: absent, (N, C) in any layout, or (rarely) anything else
    N = x.shape[0] if x.dim() >= 1 else 1
    scale, shift = (draw(st.one_of(st.none(), tensors(shape=(N, C), **params))) if not one_in(draw, 10)
                    else draw(tensors()) for _ in range(2))
    with dx.use_backend(_backend_for(x.device.type, draw)):
        try:
            out = ops.group_norm_act(x, num_groups, weight, bias, eps, activation, scale, shift)
        except Exception as e:
            event(_rejected(e))
            return
    event("computed")
    if x.numel() and x[0].numel() // max(C, 1) == 0:
        return  # empty groups: PyTorch gives NaN statistics, the kernels a defined 0 (see the op's docs)
    w64, b64, s64, t64 = (None if p is None else p.double() for p in (weight, bias, scale, shift))
    if x.numel() and x[0].numel() == num_groups:  # one value per group: F.group_norm refuses, so eq. 1 by hand
        ref = _group_norm_one_value_groups(x.double(), w64, b64, eps, activation, s64, t64)
    else:
        ref = reference.group_norm_act(x.double(), num_groups, w64, b64, eps, activation, s64, t64)
    assert _close(out, ref.to(out.dtype))


def _group_norm_one_value_groups(x, weight, bias, eps, activation, scale, shift):
    """Groups of one value (F.group_norm raises "Expected more than 1 value per channel"): μ = x, σ² = 0, so
    x̂ = 0·(0 + ε)^(-1/2) (NaN for ε = 0, as the kernels give) and y = act((x̂·γ + β)·(1 + s) + t)."""
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    per_sample = (x.shape[0], x.shape[1]) + (1,) * (x.dim() - 2)
    y = (x - x) / torch.sqrt(torch.zeros_like(x) + eps)
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    if scale is not None:
        y = y * (1 + scale.reshape(per_sample))
    if shift is not None:
        y = y + shift.reshape(per_sample)
    return reference._ACTIVATIONS[activation](y)


@SETTINGS
@given(st.data())
def test_fuzz_attention(data):
    draw = data.draw
    B, H = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    Lq, Lk = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    D = draw(st.sampled_from([8, 16, 40] * 4 + [12, 0, 264]))
    dtype = draw(st.sampled_from(FLOATS * 3 + [torch.int64]))
    device = draw(st.sampled_from(DEVICES))

    def qkv_like(L):
        if one_in(draw, 12):  # a wrong rank, batch, heads, length or head dim
            return draw(tensors(dtype=dtype, device=device))
        return draw(tensors(shape=(B, H, L, D), dtype=draw(st.sampled_from([dtype] * 11 + [torch.float64])),
                            device=device))

    q, k = qkv_like(Lq), qkv_like(Lk)
    v = qkv_like(Lk if not one_in(draw, 12) else Lk + 1)
    scale = draw(st.sampled_from([None] * 6 + [0.5, 0.0, -1.0, float("nan"), float("inf")]))
    with dx.use_backend(_backend_for(device, draw)):
        try:
            out = ops.attention(q, k, v, scale)
        except Exception as e:
            event(_rejected(e))
            return
    event("computed")
    ref = reference.attention(q.double(), k.double(), v.double(), scale)
    assert _close(out, ref.to(out.dtype))
