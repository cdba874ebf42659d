"""Every rejected input: the error's type, and a message that names the op and the argument.

Each case runs on every backend available here, so the Triton path (which validates through the same
C++ checks) is held to the same messages.
"""
import pytest
import torch

import diffusion_ext as dx
from diffusion_ext import BackendUnavailable, ops


def _table(T=10):
    return torch.linspace(0.99, 0.1, T)


def _x(*shape):
    return torch.randn(*shape) if shape else torch.randn(2, 3, 4)


T2 = torch.tensor([1, 2])

# (case id, callable, error type, words the message must hold)
Q = "diffusion_ext.q_sample"
QN = "diffusion_ext.q_sample_with_noise"
P = "diffusion_ext.ddpm_step"
D = "diffusion_ext.ddim_step"
S = "diffusion_ext.dpmpp_2m_step"
G = "diffusion_ext.group_norm_act"
GB = "diffusion_ext.group_norm_act_backward"
_C6 = torch.ones(6)
A = "diffusion_ext.attention"
AB = "diffusion_ext.attention_backward"


def _qkv(B=2, H=3, L=5, D=32, **kw):
    return torch.randn(B, H, L, D, **kw)


def _attn_backward(**kw):
    q = _qkv()
    args = dict(grad_out=torch.randn_like(q), q=q, k=q, v=q, out=torch.randn_like(q), lse=torch.zeros(2, 3, 5),
                scale=0.5)
    args.update(kw)
    return torch.ops.diffusion_ext.attention_backward(*args.values())


def _dpmpp(**kw):
    """dpmpp_2m_step on good arguments (a second-order SDE step with guidance) but for those in kw."""
    x = _x()
    args = dict(model_output=_x(), t=T2, t_prev=T2 - 1, x_t=x, alphas_cumprod=_table(), x0_last=_x(),
                t_last=T2 + 3, sde=True, noise=None, seed=0, offset=0, clip_sample=False, clip_range=1.0,
                prediction_type="epsilon", guidance_scale=2.0, model_output_uncond=_x())
    args.update(kw)
    return ops.dpmpp_2m_step(**args)


def _gn_backward(**kw):
    x = torch.randn(2, 6, 3, 3)
    args = dict(grad_y=torch.randn_like(x), x=x, mean=torch.zeros(2, 3), rstd=torch.ones(2, 3), weight=None,
                bias=None, num_groups=3, activation="silu", output_mask=[True, True, True], scale=None, shift=None)
    args.update(kw)
    return torch.ops.diffusion_ext.group_norm_act_backward(*args.values())


CASES = [
    ("q_noise_shape", lambda: ops.q_sample(_x(), T2, _x(2, 3, 5), _table()), RuntimeError, [Q, "noise", "shape"]),
    ("q_noise_dtype", lambda: ops.q_sample(_x(), T2, _x().double(), _table()), TypeError, [Q, "noise", "dtype"]),
    ("q_int_x0", lambda: ops.q_sample(torch.ones(2, 3, dtype=torch.long), T2, torch.ones(2, 3, dtype=torch.long),
                                      _table()), TypeError, [Q, "x0", "float32"]),
    ("q_0dim", lambda: ops.q_sample(torch.tensor(1.0), T2, torch.tensor(1.0), _table()), RuntimeError, [Q, "x0"]),
    ("q_t_length", lambda: ops.q_sample(_x(), torch.tensor([1, 2, 3]), _x(), _table()), RuntimeError,
     [Q, "t", "[2]"]),
    ("q_t_dtype", lambda: ops.q_sample(_x(), T2.int(), _x(), _table()), TypeError, [Q, "t", "int64"]),
    ("q_t_float", lambda: ops.q_sample(_x(), T2.float(), _x(), _table()), TypeError, [Q, "t", "int64"]),
    ("q_t_2d", lambda: ops.q_sample(_x(), T2.view(2, 1), _x(), _table()), RuntimeError, [Q, "t"]),
    ("q_t_high", lambda: ops.q_sample(_x(), torch.tensor([1, 10]), _x(), _table()), ValueError,
     [Q, "t[1] = 10", "[0, 9]"]),
    ("q_t_negative", lambda: ops.q_sample(_x(), torch.tensor([-1, 0]), _x(), _table()), ValueError, [Q, "t[0]"]),
    ("q_table_2d", lambda: ops.q_sample(_x(), T2, _x(), _table().view(2, 5)), RuntimeError, [Q, "alphas_cumprod"]),
    ("q_table_int", lambda: ops.q_sample(_x(), T2, _x(), torch.ones(10, dtype=torch.long)), TypeError,
     [Q, "alphas_cumprod"]),
    ("qn_negative_offset", lambda: ops.q_sample_with_noise(_x(), T2, _table(), 1, -1), ValueError, [QN, "offset"]),
    ("ddpm_m_shape", lambda: ops.ddpm_step(_x(2, 3), T2, _x(), _table(), _x()), RuntimeError,
     [P, "model_output", "shape"]),
    ("ddpm_noise_dtype", lambda: ops.ddpm_step(_x(), T2, _x(), _table(), _x().half()), TypeError, [P, "noise"]),
    ("ddpm_variance", lambda: ops.ddpm_step(_x(), T2, _x(), _table(), variance="learned"), ValueError,
     [P, "variance", "learned"]),
    ("ddpm_prediction", lambda: ops.ddpm_step(_x(), T2, _x(), _table(), prediction_type="eps"), ValueError,
     [P, "prediction_type", "eps"]),
    ("ddpm_guidance_without_uncond", lambda: ops.ddpm_step(_x(), T2, _x(), _table(), guidance_scale=2.0), ValueError,
     [P, "guidance_scale", "model_output_uncond"]),
    ("ddpm_uncond_without_guidance", lambda: ops.ddpm_step(_x(), T2, _x(), _table(), model_output_uncond=_x()),
     ValueError, [P, "model_output_uncond"]),
    ("ddpm_uncond_shape", lambda: ops.ddpm_step(_x(), T2, _x(), _table(), guidance_scale=2.0,
                                                model_output_uncond=_x(2, 3)), RuntimeError,
     [P, "model_output_uncond"]),
    ("ddpm_guidance_nan", lambda: ops.ddpm_step(_x(), T2, _x(), _table(), guidance_scale=float("nan"),
                                                model_output_uncond=_x()), ValueError, [P, "guidance_scale"]),
    ("ddpm_clip_range", lambda: ops.ddpm_step(_x(), T2, _x(), _table(), clip_range=0.0), ValueError,
     [P, "clip_range"]),
    ("ddpm_t_range", lambda: ops.ddpm_step(_x(), torch.tensor([0, 99]), _x(), _table()), ValueError, [P, "t[1]"]),
    ("ddim_t_prev_not_before_t", lambda: ops.ddim_step(_x(), T2, torch.tensor([0, 2]), _x(), _table()), ValueError,
     [D, "t_prev"]),
    ("ddim_t_prev_below_minus_one", lambda: ops.ddim_step(_x(), T2, torch.tensor([-2, 0]), _x(), _table()),
     ValueError, [D, "t_prev[0]"]),
    ("ddim_eta_negative", lambda: ops.ddim_step(_x(), T2, T2 - 1, _x(), _table(), eta=-0.1), ValueError, [D, "eta"]),
    ("ddim_eta_inf", lambda: ops.ddim_step(_x(), T2, T2 - 1, _x(), _table(), eta=float("inf")), ValueError,
     [D, "eta"]),
    ("ddim_prediction", lambda: ops.ddim_step(_x(), T2, T2 - 1, _x(), _table(), prediction_type="x0"), ValueError,
     [D, "prediction_type"]),
    ("dpmpp_x_int", lambda: _dpmpp(x_t=torch.ones(2, 3, 4, dtype=torch.long)), TypeError, [S, "x_t", "dtype"]),
    ("dpmpp_m_shape", lambda: _dpmpp(model_output=_x(2, 3)), RuntimeError, [S, "model_output", "shape"]),
    ("dpmpp_table_2d", lambda: _dpmpp(alphas_cumprod=_table().view(2, 5)), RuntimeError, [S, "alphas_cumprod"]),
    ("dpmpp_prediction", lambda: _dpmpp(prediction_type="flow_prediction"), ValueError,
     [S, "prediction_type", "flow_prediction"]),
    ("dpmpp_t_range", lambda: _dpmpp(t=torch.tensor([1, 10])), ValueError, [S, "t[1] = 10"]),
    ("dpmpp_t_prev_not_before_t", lambda: _dpmpp(t_prev=T2), ValueError, [S, "t_prev must be smaller than t"]),
    ("dpmpp_t_prev_below_minus_one", lambda: _dpmpp(t_prev=torch.tensor([-2, 0])), ValueError, [S, "t_prev[0]"]),
    ("dpmpp_x0_last_without_t_last", lambda: _dpmpp(t_last=None), ValueError,
     [S, "x0_last was given without t_last"]),
    ("dpmpp_t_last_without_x0_last", lambda: _dpmpp(x0_last=None), ValueError,
     [S, "t_last was given without x0_last"]),
    ("dpmpp_x0_last_shape", lambda: _dpmpp(x0_last=_x(2, 3, 5)), RuntimeError, [S, "x0_last", "shape"]),
    ("dpmpp_x0_last_dtype", lambda: _dpmpp(x0_last=_x().double()), TypeError, [S, "x0_last", "dtype"]),
    ("dpmpp_t_last_dtype", lambda: _dpmpp(t_last=(T2 + 3).int()), TypeError, [S, "t_last", "int64"]),
    ("dpmpp_t_last_range", lambda: _dpmpp(t_last=torch.tensor([3, 10])), ValueError, [S, "t_last[1] = 10"]),
    ("dpmpp_t_last_not_after_t", lambda: _dpmpp(t_last=torch.tensor([3, 2])), ValueError,
     [S, "t must be smaller than t_last", "sample 1"]),
    ("dpmpp_noise_dtype", lambda: _dpmpp(noise=_x().half()), TypeError, [S, "noise", "dtype"]),
    ("dpmpp_noise_shape_ode", lambda: _dpmpp(sde=False, noise=_x(2, 3)), RuntimeError, [S, "noise", "shape"]),
    ("dpmpp_negative_offset", lambda: _dpmpp(offset=-1), ValueError, [S, "offset"]),
    ("dpmpp_guidance_without_uncond", lambda: _dpmpp(model_output_uncond=None), ValueError,
     [S, "guidance_scale", "model_output_uncond"]),
    ("dpmpp_uncond_without_guidance", lambda: _dpmpp(guidance_scale=None), ValueError, [S, "model_output_uncond"]),
    ("dpmpp_guidance_inf", lambda: _dpmpp(guidance_scale=float("inf")), ValueError, [S, "guidance_scale"]),
    ("dpmpp_clip_range", lambda: _dpmpp(clip_range=-1.0), ValueError, [S, "clip_range"]),
    ("gn_groups_divide", lambda: ops.group_norm_act(_x(2, 6, 4), 4), ValueError, [G, "6 channels", "num_groups = 4"]),
    ("gn_groups_zero", lambda: ops.group_norm_act(_x(2, 6, 4), 0), ValueError, [G, "num_groups"]),
    ("gn_1d", lambda: ops.group_norm_act(_x(6), 3), RuntimeError, [G, "x", "at least 2 dims"]),
    ("gn_weight_shape", lambda: ops.group_norm_act(_x(2, 6, 4), 3, torch.ones(5)), RuntimeError, [G, "weight", "[6]"]),
    ("gn_bias_dtype", lambda: ops.group_norm_act(_x(2, 6, 4), 3, _C6, _C6.double()), TypeError, [G, "bias", "dtype"]),
    ("gn_int_x", lambda: ops.group_norm_act(torch.ones(2, 6, 4, dtype=torch.long), 3), TypeError, [G, "x", "dtype"]),
    ("gn_activation", lambda: ops.group_norm_act(_x(2, 6, 4), 3, activation="gelu"), ValueError,
     [G, "activation", "gelu"]),
    ("gn_eps_zero", lambda: ops.group_norm_act(_x(2, 6, 4), 3, eps=0.0), ValueError, [G, "eps"]),
    ("gn_eps_nan", lambda: ops.group_norm_act(_x(2, 6, 4), 3, eps=float("nan")), ValueError, [G, "eps"]),
    ("gn_scale_1d", lambda: ops.group_norm_act(_x(2, 6, 4), 3, scale=_C6), RuntimeError, [G, "scale", "[2, 6]"]),
    ("gn_shift_batch", lambda: ops.group_norm_act(_x(2, 6, 4), 3, shift=torch.zeros(3, 6)), RuntimeError,
     [G, "shift", "[3, 6]", "expected [2, 6]"]),
    ("gn_scale_dtype", lambda: ops.group_norm_act(_x(2, 6, 4), 3, scale=torch.zeros(2, 6, dtype=torch.float64)),
     TypeError, [G, "scale", "dtype"]),
    ("gn_shift_dtype", lambda: ops.group_norm_act(_x(2, 6, 4), 3, shift=torch.zeros(2, 6, dtype=torch.float16)),
     TypeError, [G, "shift", "dtype"]),
    ("gnb_stats_shape", lambda: _gn_backward(mean=torch.zeros(2, 2)), RuntimeError, [GB, "mean"]),
    ("gnb_scale_shape", lambda: _gn_backward(scale=torch.zeros(2, 3)), RuntimeError, [GB, "scale", "[2, 6]"]),
    ("gnb_shift_dtype", lambda: _gn_backward(shift=torch.zeros(2, 6, dtype=torch.float64)), TypeError,
     [GB, "shift", "dtype"]),
    ("gnb_stats_dtype", lambda: _gn_backward(rstd=torch.ones(2, 3, dtype=torch.float64)), RuntimeError, [GB, "rstd"]),
    ("gnb_grad_shape", lambda: _gn_backward(grad_y=torch.randn(2, 6, 3, 4)), RuntimeError, [GB, "grad_y", "shape"]),
    ("attn_rank", lambda: ops.attention(_qkv()[0], _qkv()[0], _qkv()[0]), ValueError, [A, "q", "4 dims"]),
    ("attn_batch", lambda: ops.attention(_qkv(), _qkv(B=3), _qkv(B=3)), ValueError, [A, "batch"]),
    ("attn_heads", lambda: ops.attention(_qkv(), _qkv(H=2), _qkv()), ValueError, [A, "head counts"]),
    ("attn_head_dim_mismatch", lambda: ops.attention(_qkv(), _qkv(), _qkv(D=40)), ValueError, [A, "head dims"]),
    ("attn_value_length", lambda: ops.attention(_qkv(), _qkv(L=7), _qkv(L=6)), ValueError, [A, "v has length"]),
    ("attn_head_dim", lambda: ops.attention(_qkv(D=36), _qkv(D=36), _qkv(D=36)), ValueError,
     [A, "head dim 36", "multiple of 8"]),
    ("attn_head_dim_large", lambda: ops.attention(_qkv(D=264), _qkv(D=264), _qkv(D=264)), ValueError,
     [A, "head dim 264"]),
    ("attn_dtype", lambda: ops.attention(_qkv(), _qkv(dtype=torch.float64), _qkv()), TypeError, [A, "k", "dtype"]),
    ("attn_int", lambda: ops.attention(*(torch.ones(1, 1, 2, 8, dtype=torch.long),) * 3, scale=1.0), TypeError,
     [A, "q", "dtype"]),
    ("attn_scale_zero", lambda: ops.attention(_qkv(), _qkv(), _qkv(), scale=0.0), ValueError, [A, "scale"]),
    ("attn_scale_nan", lambda: ops.attention(_qkv(), _qkv(), _qkv(), scale=float("nan")), ValueError, [A, "scale"]),
    ("attnb_lse", lambda: _attn_backward(lse=torch.zeros(2, 3, 4)), RuntimeError, [AB, "lse"]),
    ("attnb_lse_dtype", lambda: _attn_backward(lse=torch.zeros(2, 3, 5, dtype=torch.float64)), RuntimeError,
     [AB, "lse"]),
    ("attnb_grad_shape", lambda: _attn_backward(grad_out=torch.randn(2, 3, 5, 16)), ValueError, [AB, "grad_out"]),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case,fn,error,words", CASES, ids=[c[0] for c in CASES])
def test_rejected(backend, case, fn, error, words):
    if backend not in dx.available_backends("cpu"):
        pytest.skip(f"{backend} not available")
    with dx.use_backend(backend):
        with pytest.raises(error) as info:
            fn()
    for w in words:
        assert w in str(info.value), f"{w!r} not in: {info.value}"


_DEVICE_T_OUT_OF_RANGE = """
import torch, diffusion_ext as dx
from diffusion_ext import ops
x = torch.randn(3, 3, 4, device="cuda")
table = torch.linspace(0.99, 0.1, 10, device="cuda", dtype=torch.float64)
t = lambda *v: torch.tensor(v, device="cuda")
with dx.use_backend({backend!r}):
    outs = [ops.q_sample(x, t(1, 10, -1), x, table),
            ops.ddpm_step(x, t(1, 10, -1), x, table, seed=0),                    # clipped: NaN survives the clip
            ops.ddim_step(x, t(5, 5, 5), t(2, 5, 7), x, table, eta=1.0, seed=0)]  # t_prev must be below t
    torch.cuda.synchronize()
print("nan" if all(o[1:].isnan().all() and o[0].isfinite().all() for o in outs) else "values")
"""


def test_triton_coefficients_of_unchecked_timesteps_are_nan():
    """The Triton half of the contract above, on the CPU (the interpreter): the coefficient pre-pass gives a
    sample with an out-of-range or misordered timestep NaN where x_prev (and DPM-Solver++'s x̂0) takes it,
    and the valid sample beside it finite coefficients (the CUDA half: csrc/tests/device_timesteps_test.cpp)."""
    if "triton" not in dx.available_backends("cpu"):
        pytest.skip("Triton's interpreter is not available here")
    from diffusion_ext.triton import schedule_coef as sc

    table = torch.linspace(0.99, 0.1, 10, dtype=torch.float64)
    t = lambda *v: torch.tensor(v)  # noqa: E731
    cases = [  # (kind, keyword arguments, the rows that must be NaN for the bad samples)
        (sc.Q_SAMPLE, dict(t=t(1, 10, -1)), (0, 1)),
        (sc.DDPM, dict(t=t(1, 10, -1), fixed_small=True), (2,)),
        (sc.DDIM, dict(t=t(5, 5, 5, 10), t_prev=t(2, 5, 7, 2), eta=1.0), (2,)),
        (sc.DPM_SOLVER, dict(t=t(5, 5, 5, 5), t_prev=t(2, 2, 5, -2), t_last=t(8, 5, 8, 8)), (0, 2)),
    ]
    for kind, kw, rows in cases:
        for acc in (torch.float32, torch.float64):
            coef = sc.per_sample_coefs(kind, table=table, acc=acc, **kw)
            assert coef[:, 0].isfinite().all(), (kind, coef)
            assert coef[list(rows), 1:].isnan().all(), (kind, coef)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_device_timesteps_out_of_range(backend):
    """A timestep out of range (or misordered) in a CUDA tensor cannot be raised without a host sync: the
    CUDA and Triton kernels give that sample NaN (a device assert would poison every later CUDA call of the
    process), read nothing outside the table, and the context stays usable. In a subprocess all the same, so
    that a regression to an assert cannot poison the tests after this one."""
    import subprocess
    import sys

    if not torch.cuda.is_available() or backend not in dx.available_backends("cuda"):
        pytest.skip(f"no CUDA device or no {backend} backend")
    res = subprocess.run([sys.executable, "-c", _DEVICE_T_OUT_OF_RANGE.format(backend=backend)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "nan", (res.stdout, res.stderr[-2000:])
    x = torch.randn(2, 3, 4, device="cuda")
    out = ops.q_sample(x, torch.tensor([1, 2], device="cuda"), x, _table().cuda())
    assert out.isfinite().all()


@pytest.mark.gpu
def test_device_mismatch_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    with pytest.raises(RuntimeError, match="diffusion_ext.q_sample.*noise"):
        ops.q_sample(_x().cuda(), T2.cuda(), _x(), _table().cuda())
    with pytest.raises(RuntimeError, match="diffusion_ext.q_sample.*t"):
        ops.q_sample(_x().cuda(), T2, _x().cuda(), _table().cuda())
    with pytest.raises(RuntimeError, match="alphas_cumprod"):
        ops.q_sample(_x().cuda(), T2.cuda(), _x().cuda(), _table())
    with pytest.raises(RuntimeError, match="diffusion_ext.attention: k is on"):
        ops.attention(_qkv().cuda(), _qkv(), _qkv().cuda())
    with pytest.raises(RuntimeError, match="diffusion_ext.group_norm_act: scale is on"):
        ops.group_norm_act(_x(2, 6, 4).cuda(), 3, scale=torch.zeros(2, 6))


# ---------------------------------------------------------------------------------------------------
# NoiseSchedule's own checks (Python side)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,words", [
    (dict(beta_schedule="quadratic"), ["beta_schedule", "quadratic"]),
    (dict(num_timesteps=0), ["num_timesteps"]),
    (dict(beta_start=0.0), ["beta_start"]),
    (dict(beta_start=0.5, beta_end=0.1), ["beta_start"]),
    (dict(beta_end=1.0), ["beta_end"]),
])
def test_schedule_rejects(kwargs, words):
    with pytest.raises(ValueError) as info:
        dx.NoiseSchedule(**kwargs)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("table,words", [
    (torch.tensor([0.9, float("nan"), 0.5]), ["non-finite"]),
    (torch.tensor([0.9, 0.95, 0.5]), ["strictly decreasing", "ᾱ[1]"]),
    (torch.tensor([0.9, 0.0]), ["(0, 1]"]),
    (torch.tensor([1.5, 0.5]), ["(0, 1]"]),
    (torch.ones(2, 2), ["1-D"]),
])
def test_custom_table_rejects(table, words):
    with pytest.raises(ValueError) as info:
        dx.NoiseSchedule.from_alphas_cumprod(table)
    for w in words:
        assert w in str(info.value)


def test_schedule_api_rejects():
    s = dx.NoiseSchedule(10)
    x = _x()
    with pytest.raises(ValueError, match="q_sample: t = 10 is outside"):
        s.q_sample(x, 10, x)
    with pytest.raises(TypeError, match="t must be an int"):
        s.q_sample(x, 1.5, x)
    with pytest.raises(ValueError, match="t_prev = -2"):
        s.ddim_step(x, 3, -2, x)
    with pytest.raises(ValueError, match="spacing"):
        s.timesteps(5, "uniform")
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.timesteps(11)
    with pytest.raises(ValueError, match="backend 'gpu' is unknown"):
        with dx.use_backend("gpu"):
            pass


def test_missing_backend_says_how_to_get_it():
    x = _x()
    if torch.cuda.is_available():
        pytest.skip("CUDA is here")
    with dx.use_backend("cuda"):
        with pytest.raises(BackendUnavailable, match="CUDA tensors only"):
            ops.q_sample(x, T2, x, _table())
