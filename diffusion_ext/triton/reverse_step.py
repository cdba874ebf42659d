"""ddpm_step, ddim_step and dpmpp_2m_step in Triton: one element-wise kernel with the per-sample
coefficients of csrc/common/schedule_math.h (read its comment), formed in fp64 by the pre-pass of
schedule_coef.py:
  x̂0 = clip(ax·x + am·m),  x_prev = c0·x̂0 + c1·(x̂0 − x̂0_last) + bx·x + bm·m + s·z,  m = m_u + w·(m_c − m_u)
when guided; DPM-Solver++ also writes x̂0, and its second order reads x̂0_last.
"""
import torch
import triton
import triton.language as tl

from .._loader import _C
from .._meta import flat_batch_empty_like
from .philox import SEED_OFFSET_WORDS, normals_for_block, split64
from .q_sample import BLOCK, _acc, _flat, _warps, acc_dtype
from .scalars import join_float, split_float
from .schedule_coef import DDIM, DDPM, DPM_SOLVER, per_sample_coefs
from .target import launch


@triton.jit(do_not_specialize=SEED_OFFSET_WORDS)
def _reverse_step_kernel(
    x_ptr,  # [numel] x_t, flat batch-outermost layout shared by every tensor below
    m_ptr,  # [numel] model output (conditional one when GUIDED)
    mu_ptr,  # [numel] unconditional model output; read only when GUIDED
    noise_ptr,  # [numel] noise; read only when NOISE == 1
    last_ptr,  # [numel] x̂0 of the step before (DPM-Solver++(2M)); read only when LAST
    out_ptr,  # [numel] x_prev
    x0_ptr,  # [numel] this step's x̂0 (DPM-Solver++); written only when WRITE_X0
    coef_ptr,  # [6 or 7, B] ACC per-sample (ax, am, c0, bx, bm, s[, c1]), schedule_coef.per_sample_coefs
    numel, per_sample, batch,
    w_hi, w_lo, clip_hi, clip_lo,  # guidance scale and clip range (inf: no clip) as two fp32 words each
    seed_lo, seed_hi, off_lo, off_hi,  # Philox key and offset words, as signed int32 (philox.py)
    GUIDED: tl.constexpr,
    NOISE: tl.constexpr,  # 0: none (DDIM with η = 0), 1: given (noise_ptr), 2: made here from (seed, offset)
    WRITE_X0: tl.constexpr, LAST: tl.constexpr,
    ACC: tl.constexpr, BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK)
    mask = e < numel
    b = e // per_sample
    # 1. the sample's coefficients (NaN for a sample with an out-of-range timestep)
    ax = tl.load(coef_ptr + b, mask=mask, other=0)
    am = tl.load(coef_ptr + batch + b, mask=mask, other=0)
    c0 = tl.load(coef_ptr + 2 * batch + b, mask=mask, other=0)
    bx = tl.load(coef_ptr + 3 * batch + b, mask=mask, other=0)
    bm = tl.load(coef_ptr + 4 * batch + b, mask=mask, other=0)
    s = tl.load(coef_ptr + 5 * batch + b, mask=mask, other=0)
    # 2. guidance (Ho & Salimans 2022), x̂0 clipped, the update and the noise (read only where s ≠ 0)
    x = tl.load(x_ptr + e, mask=mask, other=0).to(ACC)
    m = tl.load(m_ptr + e, mask=mask, other=0).to(ACC)
    if GUIDED:
        mu = tl.load(mu_ptr + e, mask=mask, other=0).to(ACC)
        m = mu + join_float(w_hi, w_lo, ACC) * (m - mu)
    clip_range = join_float(clip_hi, clip_lo, ACC)
    y = ax * x + am * m
    x0 = tl.where(y < -clip_range, -clip_range, tl.where(y > clip_range, clip_range, y))  # NaN passes
    out = c0 * x0 + bx * x + bm * m
    if LAST:  # DPM-Solver++(2M): the backward difference of x̂0, weighted after it is formed
        c1 = tl.load(coef_ptr + 6 * batch + b, mask=mask, other=0)
        out += c1 * (x0 - tl.load(last_ptr + e, mask=mask, other=0).to(ACC))
    if WRITE_X0:
        tl.store(x0_ptr + e, x0.to(x0_ptr.dtype.element_ty), mask=mask)
    if NOISE == 1:
        z = tl.load(noise_ptr + e, mask=mask & (s != 0.0), other=0).to(ACC)
        out += tl.where(s != 0.0, s * z, 0.0)
    elif NOISE == 2:
        z = normals_for_block(start, seed_lo, seed_hi, off_lo, off_hi, BLOCK, ACC)
        out += tl.where(s != 0.0, s * z, 0.0)
    tl.store(out_ptr + e, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch(x, m, mu, noise, coef, w, clip_range, seed, offset, make_noise, last=None, write_x0=False):
    """x_prev (and x̂0 when write_x0) of the element-wise step; the tensors in one flat layout (the C++ rule).
    A step that makes its noise and writes x̂0 (DPM-Solver++ SDE) runs 8 warps, 4 of the 1024 elements per
    thread: at 4 warps its bf16 kernel spilled 8–16 bytes on sm_80 with Triton 3.9."""
    x, m, mu, noise, last = _flat(x, m, mu, noise, last)
    out = torch.empty_like(x)
    x0 = torch.empty_like(x) if write_x0 else None
    numel = x.numel()
    if numel:
        s_lo, s_hi = split64(seed)
        o_lo, o_hi = split64(offset)
        launch(_reverse_step_kernel, (triton.cdiv(numel, BLOCK),), x, m, m if mu is None else mu,
               x if noise is None else noise, x if last is None else last, out, out if x0 is None else x0, coef,
               numel, numel // x.shape[0], x.shape[0], *split_float(w), *split_float(clip_range), s_lo, s_hi, o_lo,
               o_hi, GUIDED=mu is not None, NOISE=1 if noise is not None else (2 if make_noise else 0),
               WRITE_X0=write_x0, LAST=last is not None, ACC=_acc(x), BLOCK=BLOCK,
               num_warps=8 if make_noise and write_x0 else _warps(x))
    return out, x0


@torch.library.custom_op("diffusion_ext_triton::ddpm_step", mutates_args=())
def ddpm_step(model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, alphas_cumprod: torch.Tensor,
              noise: torch.Tensor | None, seed: int, offset: int, clip_sample: bool, clip_range: float, variance: str,
              prediction_type: str, guidance_scale: float | None,
              model_output_uncond: torch.Tensor | None) -> torch.Tensor:
    _C.check_ddpm_step(model_output, t, x_t, alphas_cumprod, noise, seed, offset, clip_sample, clip_range, variance,
                       prediction_type, guidance_scale, model_output_uncond)
    coef = per_sample_coefs(DDPM, t.contiguous(), alphas_cumprod.contiguous(), acc_dtype(x_t),
                            prediction=prediction_type, fixed_small=variance == "fixed_small")
    return _launch(x_t, model_output, model_output_uncond, noise, coef,
                   1.0 if guidance_scale is None else guidance_scale, clip_range if clip_sample else float("inf"),
                   seed, offset, make_noise=noise is None)[0]


@torch.library.custom_op("diffusion_ext_triton::ddim_step", mutates_args=())
def ddim_step(model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x_t: torch.Tensor,
              alphas_cumprod: torch.Tensor, eta: float, noise: torch.Tensor | None, seed: int, offset: int,
              clip_sample: bool, clip_range: float, prediction_type: str, guidance_scale: float | None,
              model_output_uncond: torch.Tensor | None) -> torch.Tensor:
    _C.check_ddim_step(model_output, t, t_prev, x_t, alphas_cumprod, eta, noise, seed, offset, clip_sample,
                       clip_range, prediction_type, guidance_scale, model_output_uncond)
    coef = per_sample_coefs(DDIM, t.contiguous(), alphas_cumprod.contiguous(), acc_dtype(x_t),
                            t_prev=t_prev.contiguous(), eta=eta, prediction=prediction_type)
    return _launch(x_t, model_output, model_output_uncond, noise if eta > 0 else None, coef,
                   1.0 if guidance_scale is None else guidance_scale, clip_range if clip_sample else float("inf"),
                   seed, offset, make_noise=eta > 0 and noise is None)[0]


@torch.library.custom_op("diffusion_ext_triton::dpmpp_2m_step", mutates_args=())
def dpmpp_2m_step(model_output: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, x_t: torch.Tensor,
                  alphas_cumprod: torch.Tensor, x0_last: torch.Tensor | None, t_last: torch.Tensor | None, sde: bool,
                  noise: torch.Tensor | None, seed: int, offset: int, clip_sample: bool, clip_range: float,
                  prediction_type: str, guidance_scale: float | None,
                  model_output_uncond: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    _C.check_dpmpp_2m_step(model_output, t, t_prev, x_t, alphas_cumprod, x0_last, t_last, sde, noise, seed, offset,
                           clip_sample, clip_range, prediction_type, guidance_scale, model_output_uncond)
    coef = per_sample_coefs(DPM_SOLVER, t.contiguous(), alphas_cumprod.contiguous(), acc_dtype(x_t),
                            t_prev=t_prev.contiguous(), prediction=prediction_type,
                            t_last=None if t_last is None else t_last.contiguous(), sde=sde)
    return _launch(x_t, model_output, model_output_uncond, noise if sde else None, coef,
                   1.0 if guidance_scale is None else guidance_scale, clip_range if clip_sample else float("inf"),
                   seed, offset, make_noise=sde and noise is None, last=x0_last, write_x0=True)


@ddpm_step.register_fake
def _(model_output, t, x_t, alphas_cumprod, noise, seed, offset, clip_sample, clip_range, variance, prediction_type,
      guidance_scale, model_output_uncond):
    return flat_batch_empty_like(x_t, model_output, model_output_uncond, noise)


@ddim_step.register_fake
def _(model_output, t, t_prev, x_t, alphas_cumprod, eta, noise, seed, offset, clip_sample, clip_range,
      prediction_type, guidance_scale, model_output_uncond):
    return flat_batch_empty_like(x_t, model_output, model_output_uncond, noise if eta > 0 else None)


@dpmpp_2m_step.register_fake
def _(model_output, t, t_prev, x_t, alphas_cumprod, x0_last, t_last, sde, noise, seed, offset, clip_sample, clip_range,
      prediction_type, guidance_scale, model_output_uncond):
    read = (x_t, model_output, model_output_uncond, noise if sde else None, x0_last)
    return flat_batch_empty_like(*read), flat_batch_empty_like(*read)
