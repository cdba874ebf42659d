"""Typed wrappers over torch.ops.diffusion_ext.*: backend choice, fake implementations, autograd.

These are the low-level ops: every per-sample value is a tensor (timesteps, the ᾱ table) and noise is
either given or addressed by (seed, offset) of the counter-based generator (csrc/common/philox.h).
diffusion_ext.NoiseSchedule is the friendlier API on top of them.
"""
from __future__ import annotations

import torch

from . import _loader  # noqa: F401  (registers the C++ ops)
from . import reference
import math

from ._meta import (attention_lse_empty, attention_output_empty, dense_empty_like, flat_batch_empty_like,
                    group_norm_act_backward_empty, group_norm_empty_like, group_norm_stats_empty)
from .backend import resolve

_ops = torch.ops.diffusion_ext


def _triton():
    from . import triton as dx_triton

    return dx_triton


# ----------------------------------------------------------------------------------------------------
# fake (meta) implementations: shapes, dtypes and layouts of the outputs, for torch.compile and opcheck
# ----------------------------------------------------------------------------------------------------
@torch.library.register_fake("diffusion_ext::q_sample")
def _q_sample_fake(x0, t, noise, alphas_cumprod):
    return flat_batch_empty_like(x0, noise)


@torch.library.register_fake("diffusion_ext::q_sample_with_noise")
def _q_sample_with_noise_fake(x0, t, alphas_cumprod, seed, offset, per_sample_streams=False):
    return flat_batch_empty_like(x0), flat_batch_empty_like(x0)


@torch.library.register_fake("diffusion_ext::ddpm_step")
def _ddpm_step_fake(model_output, t, x_t, alphas_cumprod, noise, seed, offset, clip_sample, clip_range, variance,
                    prediction_type, guidance_scale, model_output_uncond):
    return flat_batch_empty_like(x_t, model_output, model_output_uncond, noise)


@torch.library.register_fake("diffusion_ext::ddim_step")
def _ddim_step_fake(model_output, t, t_prev, x_t, alphas_cumprod, eta, noise, seed, offset, clip_sample,
                    clip_range, prediction_type, guidance_scale, model_output_uncond):
    return flat_batch_empty_like(x_t, model_output, model_output_uncond, noise if eta > 0 else None)


@torch.library.register_fake("diffusion_ext::dpmpp_2m_step")
def _dpmpp_2m_step_fake(model_output, t, t_prev, x_t, alphas_cumprod, x0_last, t_last, sde, noise, seed, offset,
                        clip_sample, clip_range, prediction_type, guidance_scale, model_output_uncond):
    read = (x_t, model_output, model_output_uncond, noise if sde else None, x0_last)
    return flat_batch_empty_like(*read), flat_batch_empty_like(*read)


# ----------------------------------------------------------------------------------------------------
# autograd: q_sample is linear in x0 and noise, so dL/dx0 = √ᾱ_t·g and dL/dε = √(1−ᾱ_t)·g.
# (The reverse steps are sampling-only and have no backward.)
# ----------------------------------------------------------------------------------------------------
def _per_sample(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return table[t].to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))


def _q_sample_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[-1] if len(inputs) == 4 else inputs[2])


def _q_sample_backward(ctx, grad):
    t, table = ctx.saved_tensors
    g_x0 = grad * _per_sample(table, t, grad).sqrt() if ctx.needs_input_grad[0] else None
    g_noise = None
    if ctx.needs_input_grad[2]:
        g_noise = grad * (1 - _per_sample(table, t, grad)).sqrt()
    return g_x0, None, g_noise, None


def _q_sample_with_noise_backward(ctx, grad, grad_noise_out):
    t, table = ctx.saved_tensors
    g_x0 = grad * _per_sample(table, t, grad).sqrt() if ctx.needs_input_grad[0] else None
    return g_x0, None, None, None, None, None


torch.library.register_autograd("diffusion_ext::q_sample", _q_sample_backward, setup_context=_q_sample_setup)
torch.library.register_autograd("diffusion_ext::q_sample_with_noise", _q_sample_with_noise_backward,
                                setup_context=_q_sample_setup)


@torch.library.register_fake("diffusion_ext::group_norm_act")
def _group_norm_act_fake(x, num_groups, weight, bias, eps, activation, scale=None, shift=None):
    return group_norm_empty_like(x), group_norm_stats_empty(x, num_groups), group_norm_stats_empty(x, num_groups)


@torch.library.register_fake("diffusion_ext::group_norm_act_backward")
def _group_norm_act_backward_fake(grad_y, x, mean, rstd, weight, bias, num_groups, activation, output_mask,
                                  scale=None, shift=None, scale_shift_mask=(True, True)):
    return group_norm_act_backward_empty(x, weight, bias, scale, shift, output_mask, scale_shift_mask)


@torch.library.register_fake("diffusion_ext::attention")
def _attention_fake(q, k, v, scale):
    return attention_output_empty(q, q.shape[2]), attention_lse_empty(q)


@torch.library.register_fake("diffusion_ext::attention_backward")
def _attention_backward_fake(grad_out, q, k, v, out, lse, scale):
    return attention_output_empty(q, q.shape[2]), attention_output_empty(k, k.shape[2]), attention_output_empty(v, v.shape[2])


@torch.library.register_fake("diffusion_ext::dropout")
def _dropout_fake(x, p, seed, offset):
    return dense_empty_like(x)


# ----------------------------------------------------------------------------------------------------
# public wrappers
# ----------------------------------------------------------------------------------------------------
def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise with t a LongTensor [B] (Ho et al. 2020, eq. 4)."""
    backend = resolve("q_sample", x0.device)
    if backend == "torch":
        return reference.q_sample(x0, t, noise, alphas_cumprod)
    if backend == "triton":
        return _triton().q_sample(x0, t, noise, alphas_cumprod)
    return _ops.q_sample(x0, t, noise, alphas_cumprod)


def q_sample_with_noise(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int,
                        offset: int = 0, per_sample_streams: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q_sample with ε ~ N(0, I) made inside the kernel from (seed, offset); returns (x_t, ε).
    per_sample_streams: sample b's ε is stream (seed, offset + b), as if each sample were alone."""
    args = (x0, t, alphas_cumprod, seed, offset, bool(per_sample_streams))
    backend = resolve("q_sample_with_noise", x0.device)
    if backend == "torch":
        return reference.q_sample_with_noise(*args)
    if backend == "triton":
        return _triton().q_sample_with_noise(*args)
    return _ops.q_sample_with_noise(*args)


def ddpm_step(model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, alphas_cumprod: torch.Tensor,
              noise: torch.Tensor | None = None, seed: int = 0, offset: int = 0, clip_sample: bool = True,
              clip_range: float = 1.0, variance: str = "fixed_small", prediction_type: str = "epsilon",
              guidance_scale: float | None = None, model_output_uncond: torch.Tensor | None = None) -> torch.Tensor:
    """One DDPM reverse step x_t -> x_{t-1} (Ho et al. 2020, Alg. 2), noise given or made from (seed, offset)."""
    args = (model_output, t, x_t, alphas_cumprod, noise, seed, offset, clip_sample, float(clip_range), variance,
            prediction_type, None if guidance_scale is None else float(guidance_scale), model_output_uncond)
    backend = resolve("ddpm_step", x_t.device)
    if backend == "torch":
        return reference.ddpm_step(*args)
    if backend == "triton":
        return _triton().ddpm_step(*args)
    return _ops.ddpm_step(*args)


def ddim_step(model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x_t: torch.Tensor,
              alphas_cumprod: torch.Tensor, eta: float = 0.0, noise: torch.Tensor | None = None, seed: int = 0,
              offset: int = 0, clip_sample: bool = False, clip_range: float = 1.0, prediction_type: str = "epsilon",
              guidance_scale: float | None = None, model_output_uncond: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12); t_prev = -1 means ᾱ_prev = 1."""
    args = (model_output, t, t_prev, x_t, alphas_cumprod, float(eta), noise, seed, offset, clip_sample,
            float(clip_range), prediction_type, None if guidance_scale is None else float(guidance_scale),
            model_output_uncond)
    backend = resolve("ddim_step", x_t.device)
    if backend == "torch":
        return reference.ddim_step(*args)
    if backend == "triton":
        return _triton().ddim_step(*args)
    return _ops.ddim_step(*args)


def dpmpp_2m_step(model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x_t: torch.Tensor,
                  alphas_cumprod: torch.Tensor, x0_last: torch.Tensor | None = None, t_last: torch.Tensor | None = None,
                  sde: bool = False, noise: torch.Tensor | None = None, seed: int = 0, offset: int = 0,
                  clip_sample: bool = False, clip_range: float = 1.0, prediction_type: str = "epsilon",
                  guidance_scale: float | None = None,
                  model_output_uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DPM-Solver++ step x_t -> x_{t_prev} in data-prediction form (Lu et al. 2022); t_prev = -1 is the
    clean end. Second order (2M) with the last step's x̂0 and timestep (x0_last, t_last), first order without;
    sde: the SDE variant, noise given or made from (seed, offset). Returns (x_prev, x̂0 of this step)."""
    args = (model_output, t, t_prev, x_t, alphas_cumprod, x0_last, t_last, bool(sde), noise, seed, offset, clip_sample,
            float(clip_range), prediction_type, None if guidance_scale is None else float(guidance_scale),
            model_output_uncond)
    backend = resolve("dpmpp_2m_step", x_t.device)
    if backend == "torch":
        return reference.dpmpp_2m_step(*args)
    if backend == "triton":
        return _triton().dpmpp_2m_step(*args)
    return _ops.dpmpp_2m_step(*args)


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, eps: float = 1e-5, activation: str = "silu",
                   scale: torch.Tensor | None = None, shift: torch.Tensor | None = None) -> torch.Tensor:
    """act(GroupNorm(x)) in one fused pass, differentiable in x, weight and bias. x is (N, C, *);
    activation is "silu" (the U-Net's), "relu" (the VAE's) or "none" (plain GroupNorm).
    weight, bias: (C,) in x's dtype, or float32 with a float16/bfloat16 x (mixed precision: an autocast
    model's parameters read as they are, their gradients returned in float32).
    scale, shift: optional (N, C) FiLM in x's dtype, act(GroupNorm(x)·(1 + scale) + shift) — the
    "scale_shift" time-embedding norm of Nichol & Dhariwal 2021 and diffusers' ResnetBlock2D; either may be
    given alone, and both are differentiable."""
    args = (x, num_groups, weight, bias, float(eps), activation, scale, shift)
    backend = resolve("group_norm_act", x.device)
    if backend == "torch":
        return reference.group_norm_act(*args)
    if backend == "triton":
        return _triton().group_norm_act(*args)[0]
    return _ops.group_norm_act(*args)[0]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(scale·q·kᵀ)·v, flash-style: the Lq×Lk scores are never stored (Dao 2023, FlashAttention-2).
    q is (B, H, Lq, D), k and v are (B, H, Lk, D) as for F.scaled_dot_product_attention; scale defaults to
    1/√D. Differentiable in q, k and v. The output is a (B, H, Lq, D) view of (B, Lq, H, D) memory, so
    out.transpose(1, 2).reshape(B, Lq, H·D) is free."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() == 4 and q.shape[-1] > 0 else 1.0
    backend = resolve("attention", q.device)
    if backend == "torch":
        return reference.attention(q, k, v, scale)
    if backend == "triton":
        return _triton().attention(q, k, v, float(scale))[0]
    return _ops.attention(q, k, v, float(scale))[0]


def dropout(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """Inverted dropout x·keep/(1 − p) (Srivastava et al. 2014) with the mask made inside the kernel from
    (seed, offset) of the counter-based generator and regenerated by the backward, never stored. Element e
    of x's memory is kept when the top 23 bits of its Philox word reach round(p·2^23) (csrc/common/
    dropout_mask.h), so the mask depends on x's layout and is the same on every backend. Differentiable.
    seed: any int64 (the key's bits; −1 and 2^64 − 1 are one key); offset: 0 <= offset < 2^63."""
    backend = resolve("dropout", x.device)
    if backend == "torch":
        return reference.dropout(x, float(p), seed, offset)
    if backend == "triton":
        return _triton().dropout(x, float(p), seed, offset)
    return _ops.dropout(x, float(p), seed, offset)
