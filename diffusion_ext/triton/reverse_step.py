"""ddpm_step and ddim_step in Triton: one kernel, the per-sample coefficients of
csrc/common/schedule_math.h (read its comment) computed per element from t and the ᾱ table:
  x_prev = c0·clip(ax·x + am·m) + bx·x + bm·m + s·z,   m = m_u + w·(m_c − m_u) when guided.
"""
import torch
import triton
import triton.language as tl

from .._loader import _C
from .._meta import flat_batch_empty_like
from .philox import normals_for_block, split64
from .q_sample import BLOCK, _acc, _flat

_PREDICTION = {"epsilon": 0, "sample": 1, "v_prediction": 2}


@triton.jit
def _reverse_step_kernel(
    x_ptr,  # [numel] x_t, flat batch-outermost layout shared by every tensor below
    m_ptr,  # [numel] model output (conditional one when GUIDED)
    mu_ptr,  # [numel] unconditional model output; read only when GUIDED
    noise_ptr,  # [numel] noise; read only when NOISE_GIVEN
    out_ptr,  # [numel] x_prev
    t_ptr,  # [B] int64
    t_prev_ptr,  # [B] int64, DDIM only (−1: ᾱ_prev = 1)
    table_ptr,  # [T] ᾱ in ACC
    numel, per_sample, num_timesteps,
    w, clip_range, eta,  # guidance scale, clip range (inf: no clip), DDIM η
    seed_lo, seed_hi, off_lo, off_hi,
    IS_DDIM: tl.constexpr, PREDICTION: tl.constexpr, FIXED_SMALL: tl.constexpr, GUIDED: tl.constexpr,
    NOISE_GIVEN: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK)
    mask = e < numel
    b = e // per_sample
    # 1. ᾱ_t and ᾱ_prev of each element's sample; out-of-range timesteps poison the sample with NaN
    t = tl.load(t_ptr + b, mask=mask, other=0)
    ok = (t >= 0) & (t < num_timesteps)
    if IS_DDIM:
        tp = tl.load(t_prev_ptr + b, mask=mask, other=-1)
        ok = ok & (tp >= -1) & (tp < t)
    else:
        tp = t - 1
    ab = tl.load(table_ptr + t, mask=mask & ok, other=float("nan")).to(ACC)
    ab_prev = tl.load(table_ptr + tp, mask=mask & ok & (tp >= 0), other=1.0).to(ACC)
    ab_prev = tl.where(ok, ab_prev, float("nan"))
    sa = tl.sqrt(ab)
    sb = tl.sqrt(1.0 - ab)
    # 2. x̂0 = ax·x + am·m and ε̂ = ex·x + em·m for the prediction type
    if PREDICTION == 0:
        ax = 1.0 / sa
        am = -sb / sa
        ex = tl.zeros_like(sa)
        em = ex + 1.0
    elif PREDICTION == 1:
        ax = tl.zeros_like(sa)
        am = ax + 1.0
        ex = 1.0 / sb
        em = -sa / sb
    else:
        ax = sa
        am = -sb
        ex = sb
        em = sa
    # 3. the step's coefficients (Ho et al. 2020 eqs. 6-7; Song et al. 2021 eqs. 12, 16)
    if IS_DDIM:
        var = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
        s = eta * tl.sqrt(tl.maximum(var, 0.0))
        direction = tl.sqrt(tl.maximum(1.0 - ab_prev - s * s, 0.0))
        c0 = tl.sqrt(ab_prev)
        bx = direction * ex
        bm = direction * em
    else:
        alpha_t = ab / ab_prev
        beta_t = 1.0 - alpha_t
        c0 = tl.sqrt(ab_prev) * beta_t / (1.0 - ab)
        bx = tl.sqrt(alpha_t) * (1.0 - ab_prev) / (1.0 - ab)
        bm = tl.zeros_like(bx)
        if FIXED_SMALL:
            var = tl.maximum((1.0 - ab_prev) / (1.0 - ab) * beta_t, 1e-20)
        else:
            var = beta_t
        s = tl.where(t > 0, tl.sqrt(var), 0.0)
    # 4. guidance, the update, the noise (read or made only where s ≠ 0)
    x = tl.load(x_ptr + e, mask=mask, other=0).to(ACC)
    m = tl.load(m_ptr + e, mask=mask, other=0).to(ACC)
    if GUIDED:
        mu = tl.load(mu_ptr + e, mask=mask, other=0).to(ACC)
        m = mu + w * (m - mu)
    y = ax * x + am * m
    x0 = tl.where(y < -clip_range, -clip_range, tl.where(y > clip_range, clip_range, y))  # NaN passes
    if NOISE_GIVEN:
        z = tl.load(noise_ptr + e, mask=mask & (s != 0.0), other=0).to(ACC)
    else:
        z = normals_for_block(start, seed_lo, seed_hi, off_lo, off_hi, BLOCK, ACC)
    out = c0 * x0 + bx * x + bm * m + s * z
    tl.store(out_ptr + e, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, m, mu, noise, t, t_prev, table, w, clip_range, eta, seed, offset, is_ddim, prediction, fixed_small):
    table = table.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
    x, m, mu, noise = _flat(x, m, mu, noise)
    out = torch.empty_like(x)
    numel = x.numel()
    if numel:
        s_lo, s_hi = split64(seed)
        o_lo, o_hi = split64(offset)
        _reverse_step_kernel[(triton.cdiv(numel, BLOCK),)](
            x, m, m if mu is None else mu, x if noise is None else noise, out, t.contiguous(),
            t if t_prev is None else t_prev.contiguous(), table, numel, numel // x.shape[0], table.numel(),
            float(w), float(clip_range), float(eta), s_lo, s_hi, o_lo, o_hi,
            IS_DDIM=is_ddim, PREDICTION=_PREDICTION[prediction], FIXED_SMALL=fixed_small, GUIDED=mu is not None,
            NOISE_GIVEN=noise is not None, ACC=_acc(x), BLOCK=BLOCK)
    return out


@torch.library.custom_op("diffusion_ext_triton::ddpm_step", mutates_args=())
def ddpm_step(model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, alphas_cumprod: torch.Tensor,
              noise: torch.Tensor | None, seed: int, offset: int, clip_sample: bool, clip_range: float, variance: str,
              prediction_type: str, guidance_scale: float | None,
              model_output_uncond: torch.Tensor | None) -> torch.Tensor:
    _C.check_ddpm_step(model_output, t, x_t, alphas_cumprod, noise, seed, offset, clip_sample, clip_range, variance,
                       prediction_type, guidance_scale, model_output_uncond)
    return _launch(x_t, model_output, model_output_uncond, noise, t, None, alphas_cumprod,
                   1.0 if guidance_scale is None else guidance_scale, clip_range if clip_sample else float("inf"),
                   0.0, seed, offset, False, prediction_type, variance == "fixed_small")


@torch.library.custom_op("diffusion_ext_triton::ddim_step", mutates_args=())
def ddim_step(model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x_t: torch.Tensor,
              alphas_cumprod: torch.Tensor, eta: float, noise: torch.Tensor | None, seed: int, offset: int,
              clip_sample: bool, clip_range: float, prediction_type: str, guidance_scale: float | None,
              model_output_uncond: torch.Tensor | None) -> torch.Tensor:
    _C.check_ddim_step(model_output, t, t_prev, x_t, alphas_cumprod, eta, noise, seed, offset, clip_sample,
                       clip_range, prediction_type, guidance_scale, model_output_uncond)
    return _launch(x_t, model_output, model_output_uncond, noise if eta > 0 else None, t, t_prev, alphas_cumprod,
                   1.0 if guidance_scale is None else guidance_scale, clip_range if clip_sample else float("inf"),
                   eta, seed, offset, True, prediction_type, False)


@ddpm_step.register_fake
def _(model_output, t, x_t, alphas_cumprod, noise, seed, offset, clip_sample, clip_range, variance, prediction_type,
      guidance_scale, model_output_uncond):
    return flat_batch_empty_like(x_t, model_output, model_output_uncond, noise)


@ddim_step.register_fake
def _(model_output, t, t_prev, x_t, alphas_cumprod, eta, noise, seed, offset, clip_sample, clip_range,
      prediction_type, guidance_scale, model_output_uncond):
    return flat_batch_empty_like(x_t, model_output, model_output_uncond, noise if eta > 0 else None)
