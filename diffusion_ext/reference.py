"""Eager PyTorch for every op: the parity oracle of the tests and the baseline of the benchmarks.

Written the way diffusers writes its schedulers (gather the per-sample coefficients, broadcast, separate
element-wise ops in the input's dtype), with no fusion. Tests run it in float64 as the exact answer.
philox_normal is the counter-based noise of csrc/common/philox.h in plain int64 tensor arithmetic, so the
noise made inside the kernels can be checked here too.
"""
from __future__ import annotations

import math

import torch

from ._meta import dense_non_overlapping, share_flat_batch_layout

_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = b * a  # < 2^64: int64 wraps, but the low 64 bits are right, and we mask both halves
    return (p >> 32) & _MASK32, p & _MASK32


def philox4x32_10(group: torch.Tensor, offset: int, seed: int) -> list[torch.Tensor]:
    """Philox4x32-10 (Salmon et al. 2011) of the counters (group, offset) under key seed; int64 lanes."""
    c0, c1 = group & _MASK32, (group >> 32) & _MASK32
    c2 = torch.full_like(group, offset & _MASK32)
    c3 = torch.full_like(group, (offset >> 32) & _MASK32)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return [c0, c1, c2, c3]


def philox_normal(numel: int, seed: int, offset: int = 0, dtype: torch.dtype = torch.float32,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """The first `numel` normals of stream (seed, offset): element e is lane e % 4 of block e // 4."""
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=device)
    r = philox4x32_10(groups, offset, seed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = [((x >> 9).to(acc) + 0.5) * 2.0**-23 for x in r]
    z = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        radius = torch.sqrt(-2.0 * torch.log(a))
        z += [radius * torch.cos(2 * math.pi * b), radius * torch.sin(2 * math.pi * b)]
    return torch.stack(z, dim=1).reshape(-1)[:numel].to(dtype)


def noise_like(x: torch.Tensor, seed: int, offset: int = 0, *others: torch.Tensor | None) -> torch.Tensor:
    """The in-kernel noise for a tensor x: laid out in x's memory order when the kernels walk x flat."""
    z = philox_normal(x.numel(), seed, offset, x.dtype, x.device)
    if share_flat_batch_layout(x, *others):
        return torch.as_strided(z, x.shape, x.stride()) if x.numel() else torch.empty_like(x)
    return z.reshape(x.shape)


def dropout_keep(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The keep mask of dropout (csrc/common/dropout_mask.h) for a tensor x, in x's layout: element e of x's
    memory (of its contiguous copy when x is not dense) keeps iff the top 23 bits of Philox word e % 4 of
    block e // 4 are at least round(p·2^23)."""
    numel = x.numel()
    groups = torch.arange((numel + 3) // 4, dtype=torch.int64, device=x.device)
    words = torch.stack(philox4x32_10(groups, offset, seed), dim=1).reshape(-1)[:numel]
    keep = (words >> 9) >= math.floor(math.ldexp(p, 23) + 0.5)
    if numel and dense_non_overlapping(x):
        return torch.as_strided(keep, x.shape, x.stride())
    return keep.reshape(x.shape)


def dropout(x, p, seed, offset=0):
    """Inverted dropout (Srivastava et al. 2014) with the kernels' mask: x·keep/(1 − p)."""
    return x * dropout_keep(x, p, seed, offset) / (1 - p)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _coef(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # diffusers: alphas_cumprod[timesteps], flattened, then unsqueezed to broadcast over the sample. The
    # per-sample coefficients are computed in fp32 (fp64 for fp64 samples), as diffusers keeps its tables in
    # fp32, and cast to the samples' dtype (_el) only where they meet the samples.
    return table.to(device=x.device, dtype=_acc_dtype(x))[t].view((-1,) + (1,) * (x.dim() - 1))


def _el(coef: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return coef.to(x.dtype)


def q_sample(x0, t, noise, alphas_cumprod):
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4), as diffusers' add_noise."""
    a = _coef(alphas_cumprod, t, x0)
    return _el(a.sqrt(), x0) * x0 + _el((1 - a).sqrt(), x0) * noise


def q_sample_with_noise(x0, t, alphas_cumprod, seed, offset=0, per_sample_streams=False):
    if per_sample_streams:  # sample b alone, from stream (seed, offset + b)
        noise = torch.cat([noise_like(x0[b:b + 1], seed, offset + b) for b in range(x0.shape[0])]) \
            if x0.shape[0] else torch.empty_like(x0)
    else:
        noise = noise_like(x0, seed, offset)
    return q_sample(x0, t, noise, alphas_cumprod), noise


def _guided(model_output, guidance_scale, model_output_uncond):
    if guidance_scale is None:
        return model_output
    return model_output_uncond + guidance_scale * (model_output - model_output_uncond)


def _predict_x0_eps(m, x_t, a_t, prediction_type):
    sa, sb = _el(a_t.sqrt(), x_t), _el((1 - a_t).sqrt(), x_t)
    if prediction_type == "epsilon":
        return (x_t - sb * m) / sa, m
    if prediction_type == "sample":
        return m, (x_t - sa * m) / sb
    if prediction_type == "v_prediction":
        return sa * x_t - sb * m, sa * m + sb * x_t
    raise ValueError(f"reference: unknown prediction_type {prediction_type!r}")


def _alpha_bar_prev(alphas_cumprod, t_prev, like):
    table = alphas_cumprod.to(device=like.device, dtype=like.dtype)
    return torch.where(t_prev >= 0, table[t_prev.clamp(min=0)], 1.0).view_as(like)


def ddpm_step(model_output, t, x_t, alphas_cumprod, noise=None, seed=0, offset=0, clip_sample=True, clip_range=1.0,
              variance="fixed_small", prediction_type="epsilon", guidance_scale=None, model_output_uncond=None):
    """diffusers DDPMScheduler.step with prev_t = t − 1 (Ho et al. 2020, Alg. 2; eqs. 6-7)."""
    m = _guided(model_output, guidance_scale, model_output_uncond)
    # 1. ᾱ_t, ᾱ_{t-1} (= 1 at t = 0), α_t, β_t
    a_t = _coef(alphas_cumprod, t, x_t)
    a_prev = _alpha_bar_prev(alphas_cumprod, t - 1, a_t)
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    # 2. x̂0 from the model output, clipped when asked
    x0, _ = _predict_x0_eps(m, x_t, a_t, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    # 3. posterior mean μ̃(x_t, x̂0), eq. 7
    c_x0 = a_prev.sqrt() * beta_t / (1 - a_t)
    c_xt = alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)
    mean = _el(c_x0, x_t) * x0 + _el(c_xt, x_t) * x_t
    # 4. σ_t² and the noise, none at t = 0
    if variance == "fixed_small":
        var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
    elif variance == "fixed_large":
        var = beta_t
    else:
        raise ValueError(f"reference: unknown variance {variance!r}")
    if noise is None:
        noise = noise_like(x_t, seed, offset, model_output, model_output_uncond)
    std = torch.where(t.view_as(var) > 0, var.sqrt(), 0.0)
    return mean + _el(std, x_t) * torch.where(std > 0, noise, 0.0)


def ddim_step(model_output, t, t_prev, x_t, alphas_cumprod, eta=0.0, noise=None, seed=0, offset=0, clip_sample=False,
              clip_range=1.0, prediction_type="epsilon", guidance_scale=None, model_output_uncond=None):
    """diffusers DDIMScheduler.step (Song et al. 2021, eq. 12; σ from eq. 16); t_prev = −1 means ᾱ_prev = 1."""
    m = _guided(model_output, guidance_scale, model_output_uncond)
    a_t = _coef(alphas_cumprod, t, x_t)
    a_prev = _alpha_bar_prev(alphas_cumprod, t_prev, a_t)
    x0, eps = _predict_x0_eps(m, x_t, a_t, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * var.clamp(min=0).sqrt()
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt()
    x_prev = _el(a_prev.sqrt(), x_t) * x0 + _el(direction, x_t) * eps
    if eta > 0:
        if noise is None:
            noise = noise_like(x_t, seed, offset, model_output, model_output_uncond)
        x_prev = x_prev + _el(std, x_t) * noise
    return x_prev


def _half_log_snr(alpha_bar):
    # λ = log(α) − log(σ) (Lu et al. 2022a, §3.1), as diffusers' DPMSolverMultistepScheduler writes it
    return torch.log(alpha_bar.sqrt()) - torch.log((1 - alpha_bar).sqrt())


def dpmpp_2m_step(model_output, t, t_prev, x_t, alphas_cumprod, x0_last=None, t_last=None, sde=False, noise=None,
                  seed=0, offset=0, clip_sample=False, clip_range=1.0, prediction_type="epsilon", guidance_scale=None,
                  model_output_uncond=None):
    """One DPM-Solver++ step t -> t_prev in data-prediction form (Lu et al. 2022b), as diffusers'
    DPMSolverMultistepScheduler (solver_type "midpoint") writes it: first order (§4.1) without x0_last,
    second order (Algorithm 2, 2M) with the last step's x̂0 and timestep, first order again where t_prev = −1
    (σ = 0); sde: the SDE variant ("sde-dpmsolver++"). Returns (x_prev, x̂0)."""
    m = _guided(model_output, guidance_scale, model_output_uncond)
    # 1. α_s, σ_s at the current timestep s = t; α_t, σ_t at the target t_prev (ᾱ = 1 at −1); h = λ_t − λ_s
    a_s = _coef(alphas_cumprod, t, x_t)
    a_t = _alpha_bar_prev(alphas_cumprod, t_prev, a_s)
    sigma_s, alpha_t, sigma_t = (1 - a_s).sqrt(), a_t.sqrt(), (1 - a_t).sqrt()
    h = _half_log_snr(a_t) - _half_log_snr(a_s)
    # 2. the data prediction x̂0 (clipped when asked: the x̂0 the update uses and the next step gets)
    x0, _ = _predict_x0_eps(m, x_t, a_s, prediction_type)
    if clip_sample:
        x0 = x0.clamp(-clip_range, clip_range)
    # 3. D = x̂0 + (x̂0 − x̂0_last)/(2r), r = h_last/h (Algorithm 2), first order where t_prev = −1 (h = ∞)
    d = x0
    if x0_last is not None:
        h_last = _half_log_snr(a_s) - _half_log_snr(_coef(alphas_cumprod, t_last, x_t))
        r = h_last / h
        second = (t_prev >= 0).view_as(r)
        d = torch.where(second, x0 + _el(1 / (2 * r), x_t) * (x0 - x0_last), x0)
    # 4. the exponential-integrator update, ODE or SDE
    if not sde:
        return _el(sigma_t / sigma_s, x_t) * x_t - _el(alpha_t * (torch.exp(-h) - 1), x_t) * d, x0
    if noise is None:
        noise = noise_like(x_t, seed, offset, model_output, model_output_uncond, x0_last)
    std = sigma_t * (1 - torch.exp(-2 * h)).sqrt()  # 0 at the clean end: no noise read there
    return (_el(sigma_t / sigma_s * torch.exp(-h), x_t) * x_t + _el(alpha_t * (1 - torch.exp(-2 * h)), x_t) * d
            + _el(std, x_t) * torch.where(std > 0, noise, 0.0)), x0


_ACTIVATIONS = {"silu": torch.nn.functional.silu, "relu": torch.nn.functional.relu, "none": lambda z: z}


def group_norm_act(x, num_groups, weight=None, bias=None, eps=1e-5, activation="silu", scale=None, shift=None):
    """act(GroupNorm(x)) (Wu & He 2018) as eager PyTorch writes it: F.group_norm, then the activation. With
    FiLM, scale and shift (N, C) act in between as diffusers' ResnetBlock2D applies its time embedding under
    time_embedding_norm="scale_shift": h·(1 + scale) + shift (Nichol & Dhariwal 2021)."""
    if activation not in _ACTIVATIONS:
        raise ValueError(f"reference: unknown activation {activation!r}")
    if (weight is not None and weight.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
            and not torch.is_autocast_enabled(x.device.type)):
        # mixed precision (fp32 γ, β on half activations) outside autocast: in fp32, then the result in x's dtype
        # (F.group_norm itself takes mixed dtypes on a CPU only). Under autocast F.group_norm as it is, what an
        # eager model's nn.GroupNorm runs there (on a CPU its mixed-dtype kernel, on CUDA an upcast to fp32).
        return group_norm_act(x.float(), num_groups, weight, bias, eps, activation,
                              *(None if t is None else t.float() for t in (scale, shift))).to(x.dtype)
    h = torch.nn.functional.group_norm(x, num_groups, weight, bias, eps)
    per_channel = (slice(None), slice(None)) + (None,) * (x.dim() - 2)  # (N, C) -> (N, C, 1, ..., 1)
    if scale is not None:
        h = h * (1 + scale[per_channel])
    if shift is not None:
        h = h + shift[per_channel]
    return _ACTIVATIONS[activation](h)


def attention(q, k, v, scale=None):
    """softmax(scale·q·kᵀ)·v (Vaswani et al. 2017, eq. 1) with the Lq×Lk score matrix materialised, as eager
    code writes it; q (B, H, Lq, D), k and v (B, H, Lk, D), scale = 1/√D by default. Lk = 0 gives zeros, as
    F.scaled_dot_product_attention does."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(scores.softmax(dim=-1), v)


def attention_lse(q, k, scale=None):
    """The row logsumexp of scale·q·kᵀ, (B, H, Lq), that the fused forward saves for its backward."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return torch.logsumexp(torch.matmul(q, k.transpose(-2, -1)) * scale, dim=-1)
