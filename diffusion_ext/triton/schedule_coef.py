"""Per-sample coefficients of the schedule kernels (q_sample, ddpm_step, ddim_step, dpmpp_2m_step), the Triton twin of
csrc/common/schedule_math.h and csrc/cuda/per_sample_coef.cuh (read their comments).

A pre-pass with one lane per sample forms each sample's coefficients in fp64 from the ᾱ table (fp32 or
fp64, as given) and stores them rounded to the accumulation dtype as coef[k, b]; the element-wise kernel
that follows loads them. fp64 because near t = 0, 1 − ᾱ and β_t = 1 − ᾱ_t/ᾱ_prev cancel catastrophically
in fp32; once per sample because fp64 arithmetic per element would make the memory-bound step
compute-bound. Out-of-range timesteps give NaN coefficients and never read outside the table.

  q_sample (KIND 0):   k = 0 √ᾱ_t, 1 √(1−ᾱ_t)                         x_t = a·x0 + s·ε (Ho et al. 2020, eq. 4)
  reverse steps (1, 2): k = 0 ax, 1 am, 2 c0, 3 bx, 4 bm, 5 s          x_prev = c0·x̂0 + bx·x + bm·m + s·z,
                                                                      x̂0 = clip(ax·x + am·m)
  DPM-Solver++ (3):     the same, and 6 c1                             x_prev += c1·(x̂0 − x̂0_last)
"""
import torch
import triton
import triton.language as tl

from .scalars import join_float, split_float
from .target import launch

Q_SAMPLE, DDPM, DDIM, DPM_SOLVER = 0, 1, 2, 3
NUM_COEFS = {Q_SAMPLE: 2, DDPM: 6, DDIM: 6, DPM_SOLVER: 7}
PREDICTION = {"epsilon": 0, "sample": 1, "v_prediction": 2}
_BLOCK_B = 128  # samples per program


@triton.jit
def _x0_eps_weights(sa, sb, PREDICTION: tl.constexpr):
    # x̂0 = ax·x + am·m and ε̂ = ex·x + em·m per prediction type (schedule_math.h x0_eps_weights)
    zero = tl.zeros_like(sa)
    if PREDICTION == 0:  # epsilon
        return 1.0 / sa, -sb / sa, zero, zero + 1.0
    elif PREDICTION == 1:  # sample
        return zero, zero + 1.0, 1.0 / sb, -sa / sb
    else:  # v_prediction (Salimans & Ho 2022)
        return sa, -sb, sb, sa


@triton.jit
def _half_log_snr(ab):
    # λ = log(α/σ) = ½·log(ᾱ/(1−ᾱ)) (schedule_math.h half_log_snr)
    return 0.5 * (tl.log(ab) - tl.log(1.0 - ab))


@triton.jit
def _dpm_solver_coef(ab, ab_prev, ab_last, second, SDE: tl.constexpr, HAS_LAST: tl.constexpr):
    """(bx, c0, c1, s) of a DPM-Solver++ step (schedule_math.h dpm_solver_coef; Lu et al. 2022b, §4.1 and
    Algorithm 2): e^{−h} = σ_t·α_s/(α_t·σ_s) without logarithms, c1 = c0/(2r) where `second`, and first
    order at the clean end (σ_t = 0)."""
    alpha_s = tl.sqrt(ab)
    sigma_s = tl.sqrt(1.0 - ab)
    alpha_t = tl.sqrt(ab_prev)
    sigma_t = tl.sqrt(1.0 - ab_prev)
    e = sigma_t * alpha_s / (alpha_t * sigma_s)
    if SDE:
        one_minus_e2 = 1.0 - e * e
        bx = sigma_t / sigma_s * e
        c0 = alpha_t * one_minus_e2
        s = sigma_t * tl.sqrt(tl.maximum(one_minus_e2, 0.0))
    else:
        bx = sigma_t / sigma_s
        c0 = alpha_t * (1.0 - e)
        s = tl.zeros_like(c0)
    c1 = tl.zeros_like(c0)
    if HAS_LAST:
        second = second & (sigma_t > 0.0)
        lambda_s = _half_log_snr(ab)
        h = _half_log_snr(tl.where(second, ab_prev, 0.5)) - lambda_s  # λ_t = ∞ at the clean end: not formed
        h_last = lambda_s - _half_log_snr(ab_last)
        c1 = tl.where(second, c0 * h / (2.0 * h_last), c1)
    return bx, c0, c1, s


@triton.jit
def _schedule_coef_kernel(
    t_ptr,  # [B] int64 timesteps
    t_prev_ptr,  # [B] int64 previous timesteps (DDIM, DPM-Solver++; −1: ᾱ_prev = 1)
    t_last_ptr,  # [B] int64 timesteps of the step before (DPM-Solver++ with HAS_LAST only)
    table_ptr,  # [T] ᾱ, fp32 or fp64
    coef_ptr,  # [NUM_COEFS, B] out, ACC: coef k of sample b at k·B + b
    batch, num_timesteps,
    eta_hi, eta_lo,  # DDIM η as two fp32 words (a Python float reaches a kernel as fp32)
    KIND: tl.constexpr, PREDICTION: tl.constexpr, FIXED_SMALL: tl.constexpr, SDE: tl.constexpr,
    HAS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK_B: tl.constexpr,
):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = b < batch
    t = tl.load(t_ptr + b, mask=live, other=0)
    ok = (t >= 0) & (t < num_timesteps)
    if KIND >= 2:
        tp = tl.load(t_prev_ptr + b, mask=live, other=-1)
        ok = ok & (tp >= -1) & (tp < t)
    else:
        tp = t - 1
    if HAS_LAST:
        t_last = tl.load(t_last_ptr + b, mask=live, other=0)
        ok = ok & (t_last > t) & (t_last < num_timesteps)
    nan = float("nan")
    ab = tl.load(table_ptr + t, mask=live & ok, other=nan).to(tl.float64)
    ab = tl.where(ok, ab, nan)
    sa = tl.sqrt(ab)
    sb = tl.sqrt(1.0 - ab)
    if KIND == 0:
        tl.store(coef_ptr + b, sa.to(ACC), mask=live)
        tl.store(coef_ptr + batch + b, sb.to(ACC), mask=live)
    else:
        ab_prev = tl.load(table_ptr + tp, mask=live & ok & (tp >= 0), other=1.0).to(tl.float64)
        ab_prev = tl.where(ok, ab_prev, nan)
        ax, am, ex, em = _x0_eps_weights(sa, sb, PREDICTION)
        if KIND == 3:
            ab_last = tl.full([BLOCK_B], 0.5, tl.float64)
            if HAS_LAST:
                ab_last = tl.load(table_ptr + t_last, mask=live & ok, other=nan).to(tl.float64)
            bx, c0, c1, s = _dpm_solver_coef(ab, ab_prev, ab_last, tp >= 0, SDE, HAS_LAST)
            bm = tl.zeros_like(bx)
            ax = tl.where(ok, ax, nan)  # x̂0 of that sample is NaN too
            tl.store(coef_ptr + 6 * batch + b, c1.to(ACC), mask=live)
        elif KIND == 2:
            # DDIM (Song et al. 2021, eq. 12, σ_t(η) from eq. 16); 1 − ᾱ_prev − σ² clamped at 0
            eta = join_float(eta_hi, eta_lo, tl.float64)
            var = (1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev)
            s = eta * tl.sqrt(tl.maximum(var, 0.0))
            direction = tl.sqrt(tl.maximum(1.0 - ab_prev - s * s, 0.0))
            c0 = tl.sqrt(ab_prev)
            bx = direction * ex
            bm = direction * em
        else:
            # DDPM posterior mean and variance (Ho et al. 2020, eqs. 6-7); no noise at t = 0
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
        c0 = tl.where(ok, c0, nan)
        tl.store(coef_ptr + b, ax.to(ACC), mask=live)
        tl.store(coef_ptr + batch + b, am.to(ACC), mask=live)
        tl.store(coef_ptr + 2 * batch + b, c0.to(ACC), mask=live)
        tl.store(coef_ptr + 3 * batch + b, bx.to(ACC), mask=live)
        tl.store(coef_ptr + 4 * batch + b, bm.to(ACC), mask=live)
        tl.store(coef_ptr + 5 * batch + b, s.to(ACC), mask=live)


def per_sample_coefs(kind: int, t: torch.Tensor, table: torch.Tensor, acc: torch.dtype,
                     t_prev: torch.Tensor | None = None, eta: float = 0.0, prediction: str = "epsilon",
                     fixed_small: bool = False, t_last: torch.Tensor | None = None, sde: bool = False) -> torch.Tensor:
    """The [NUM_COEFS[kind], B] coefficients of every sample, in acc (torch.float32 or torch.float64)."""
    batch = t.shape[0]
    coef = torch.empty((NUM_COEFS[kind], batch), dtype=acc, device=t.device)
    if batch:
        eta_hi, eta_lo = split_float(eta)
        launch(_schedule_coef_kernel, (triton.cdiv(batch, _BLOCK_B),), t, t if t_prev is None else t_prev,
               t if t_last is None else t_last, table, coef, batch, table.numel(), eta_hi, eta_lo, KIND=kind,
               PREDICTION=PREDICTION[prediction], FIXED_SMALL=fixed_small, SDE=sde, HAS_LAST=t_last is not None,
               ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK_B=_BLOCK_B)
    return coef
