#pragma once
// Per-sample coefficients of the forward process and of the DDPM and DDIM reverse steps, shared by the
// CPU and CUDA kernels. Everything is derived from the cumulative product table ᾱ (alphas_cumprod) as
// diffusers' schedulers derive it, with α_t = ᾱ_t / ᾱ_prev and β_t = 1 − α_t.
//
// Both reverse steps reduce to one element-wise formula. Every prediction type makes x̂0 and ε̂ linear
// in (x_t, m), m the model output:
//   epsilon:       x̂0 = (x_t − √(1−ᾱ_t)·m) / √ᾱ_t           ε̂ = m
//   sample:        x̂0 = m                                    ε̂ = (x_t − √ᾱ_t·m) / √(1−ᾱ_t)
//   v_prediction:  x̂0 = √ᾱ_t·x_t − √(1−ᾱ_t)·m                ε̂ = √(1−ᾱ_t)·x_t + √ᾱ_t·m
// (Salimans & Ho 2022 for v), so one reverse step is
//   x̂0 = clip(ax·x_t + am·m),   x_prev = c0·x̂0 + c1·(x̂0 − x̂0_last) + bx·x_t + bm·m + s·z
// with clip(y) = min(max(y, −r), r) (r = +∞ when clipping is off) and z ~ N(0, I).
// DDPM puts the posterior mean's x_t weight into bx; DDIM puts its direction term √(1−ᾱ_prev−σ²)·ε̂
// into bx and bm. ε̂ is taken from the unclipped x̂0, as diffusers does (use_clipped_model_output=False).
// Only the multistep DPM-Solver++(2M) has c1 ≠ 0: x̂0_last is the x̂0 of the step before, and the
// backward difference x̂0 − x̂0_last is formed before it is weighted, as the paper's D does (see
// dpm_solver_coef), so that its large weights at uneven steps do not multiply two large cancelling terms.
#include <cmath>
#include "macros.h"

namespace diffusion_ext {

enum class PredictionType : int { kEpsilon = 0, kSample = 1, kVPrediction = 2 };
enum class VarianceType : int { kFixedSmall = 0, kFixedLarge = 1 };

template <typename acc_t>
struct StepCoef {
  acc_t ax, am;  // x̂0 = ax·x_t + am·m
  acc_t c0;      // weight of clip(x̂0)
  acc_t bx, bm;  // weights of x_t and m outside the clip
  acc_t s;       // noise scale; 0 means no noise is read or made
  acc_t c1;      // weight of x̂0 − x̂0_last (DPM-Solver++(2M)); 0 for every other step
};

// x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε  (Ho et al. 2020, eq. 4).
template <typename acc_t>
struct QSampleCoef {
  acc_t a, s;
};

template <typename acc_t>
DX_HOST_DEVICE QSampleCoef<acc_t> q_sample_coef(acc_t alpha_bar) {
  return QSampleCoef<acc_t>{std::sqrt(alpha_bar), std::sqrt(acc_t(1) - alpha_bar)};
}

template <typename acc_t>
DX_HOST_DEVICE void x0_eps_weights(PredictionType p, acc_t alpha_bar, acc_t* ax, acc_t* am, acc_t* ex,
                                   acc_t* em) {
  const acc_t sa = std::sqrt(alpha_bar), sb = std::sqrt(acc_t(1) - alpha_bar);
  switch (p) {
    case PredictionType::kEpsilon:
      *ax = acc_t(1) / sa; *am = -sb / sa; *ex = acc_t(0); *em = acc_t(1);
      break;
    case PredictionType::kSample:
      *ax = acc_t(0); *am = acc_t(1); *ex = acc_t(1) / sb; *em = -sa / sb;
      break;
    default:  // kVPrediction
      *ax = sa; *am = -sb; *ex = sb; *em = sa;
      break;
  }
}

// DDPM (Ho et al. 2020, Alg. 2; eqs. 6-7 for the posterior q(x_{t-1} | x_t, x0)):
//   μ = √ᾱ_prev·β_t/(1−ᾱ_t)·x̂0 + √α_t·(1−ᾱ_prev)/(1−ᾱ_t)·x_t
//   σ² = (1−ᾱ_prev)/(1−ᾱ_t)·β_t clamped at 1e-20 (fixed_small) or β_t (fixed_large); no noise at t = 0.
template <typename acc_t>
DX_HOST_DEVICE StepCoef<acc_t> ddpm_coef(acc_t alpha_bar, acc_t alpha_bar_prev, bool add_noise,
                                         VarianceType v, PredictionType p) {
  StepCoef<acc_t> c;
  acc_t ex, em;
  x0_eps_weights(p, alpha_bar, &c.ax, &c.am, &ex, &em);
  const acc_t beta_prod = acc_t(1) - alpha_bar;
  const acc_t beta_prod_prev = acc_t(1) - alpha_bar_prev;
  const acc_t alpha_t = alpha_bar / alpha_bar_prev;
  const acc_t beta_t = acc_t(1) - alpha_t;
  c.c0 = std::sqrt(alpha_bar_prev) * beta_t / beta_prod;
  c.bx = std::sqrt(alpha_t) * beta_prod_prev / beta_prod;
  c.bm = acc_t(0);
  acc_t var = v == VarianceType::kFixedSmall ? beta_prod_prev / beta_prod * beta_t : beta_t;
  if (v == VarianceType::kFixedSmall && var < acc_t(1e-20)) var = acc_t(1e-20);
  c.s = add_noise ? std::sqrt(var) : acc_t(0);
  c.c1 = acc_t(0);
  return c;
}

// DDIM (Song et al. 2021, eq. 12, with σ_t(η) from eq. 16):
//   x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̂ + σ·z,  σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)).
// 1−ᾱ_prev−σ² is clamped at 0: it is ≥ 0 for η ≤ 1 and would make a NaN for larger η.
template <typename acc_t>
DX_HOST_DEVICE StepCoef<acc_t> ddim_coef(acc_t alpha_bar, acc_t alpha_bar_prev, acc_t eta,
                                         PredictionType p) {
  StepCoef<acc_t> c;
  acc_t ex, em;
  x0_eps_weights(p, alpha_bar, &c.ax, &c.am, &ex, &em);
  const acc_t var = (acc_t(1) - alpha_bar_prev) / (acc_t(1) - alpha_bar) * (acc_t(1) - alpha_bar / alpha_bar_prev);
  const acc_t sigma = eta * std::sqrt(var > acc_t(0) ? var : acc_t(0));
  acc_t dir2 = acc_t(1) - alpha_bar_prev - sigma * sigma;
  const acc_t dir = std::sqrt(dir2 > acc_t(0) ? dir2 : acc_t(0));
  c.c0 = std::sqrt(alpha_bar_prev);
  c.bx = dir * ex;
  c.bm = dir * em;
  c.s = sigma;
  c.c1 = acc_t(0);
  return c;
}

// λ = log(α/σ) = ½·log(ᾱ/(1−ᾱ)), the half log-SNR in which DPM-Solver integrates (Lu et al. 2022a, §3.1).
template <typename acc_t>
DX_HOST_DEVICE acc_t half_log_snr(acc_t alpha_bar) {
  return acc_t(0.5) * (std::log(alpha_bar) - std::log(acc_t(1) - alpha_bar));
}

// DPM-Solver++ in data-prediction form (Lu et al. 2022b, "DPM-Solver++: Fast Solver for Guided Sampling of
// Diffusion Probabilistic Models"), with α = √ᾱ, σ = √(1−ᾱ) and h = λ_t − λ_s > 0 for a step from the
// current timestep s to the target t. Integrating the data-prediction ODE exactly for a constant x̂0
// gives the first-order solver (§4.1; it is DDIM with η = 0):
//   x_t = (σ_t/σ_s)·x_s + α_t·(1 − e^{−h})·D,    D = x̂0(x_s, s);
// the multistep second-order solver (Algorithm 2, DPM-Solver++(2M)) takes instead
//   D = x̂0 + (x̂0 − x̂0')/(2r),   r = h'/h,   h' = λ_s − λ_{s'},
// where x̂0' is the prediction of the step before, made at s' (t_last). The SDE variant (SDE-DPM-Solver++
// (2M), the midpoint form of diffusers' "sde-dpmsolver++") solves the reverse SDE the same way:
//   x_t = (σ_t/σ_s)·e^{−h}·x_s + α_t·(1 − e^{−2h})·D + σ_t·√(1 − e^{−2h})·z.
// So c0 = α_t·(1 − e^{−h}) (or α_t·(1 − e^{−2h})), c1 = c0/(2r), bx the weight of x_s, bm = 0.
// e^{−h} = (σ_t·α_s)/(α_t·σ_s) is formed as that ratio, without logarithms; only r needs the λs.
// The step to the clean end (t = −1: ᾱ = 1, σ_t = 0, λ_t = ∞, e^{−h} = 0) is always first order: there
// h = ∞ makes 1/(2r) = h/(2h') infinite, while the first-order step's exact answer is x̂0 itself
// (diffusers forces first order there too, final_sigmas_type = "zero").
template <typename acc_t>
DX_HOST_DEVICE StepCoef<acc_t> dpm_solver_coef(acc_t ab_s, acc_t ab_t, acc_t ab_last, bool second_order, bool sde,
                                               PredictionType p) {
  StepCoef<acc_t> c;
  acc_t ex, em;
  x0_eps_weights(p, ab_s, &c.ax, &c.am, &ex, &em);
  const acc_t alpha_s = std::sqrt(ab_s), sigma_s = std::sqrt(acc_t(1) - ab_s);
  const acc_t alpha_t = std::sqrt(ab_t), sigma_t = std::sqrt(acc_t(1) - ab_t);
  const acc_t e = sigma_t * alpha_s / (alpha_t * sigma_s);  // e^{−h}
  if (sde) {
    const acc_t one_minus_e2 = acc_t(1) - e * e;
    c.bx = sigma_t / sigma_s * e;
    c.c0 = alpha_t * one_minus_e2;
    c.s = sigma_t * std::sqrt(one_minus_e2 > acc_t(0) ? one_minus_e2 : acc_t(0));
  } else {
    c.bx = sigma_t / sigma_s;
    c.c0 = alpha_t * (acc_t(1) - e);
    c.s = acc_t(0);
  }
  c.bm = acc_t(0);
  c.c1 = acc_t(0);
  if (second_order && sigma_t > acc_t(0)) {
    const acc_t lambda_s = half_log_snr(ab_s);
    const acc_t h = half_log_snr(ab_t) - lambda_s, h_last = lambda_s - half_log_snr(ab_last);
    c.c1 = c.c0 * h / (acc_t(2) * h_last);  // c0/(2r)
  }
  return c;
}

// Classifier-free guidance (Ho & Salimans 2022): m = m_uncond + w·(m_cond − m_uncond).
template <typename acc_t>
DX_HOST_DEVICE acc_t guide(acc_t cond, acc_t uncond, acc_t w) {
  return uncond + w * (cond - uncond);
}

// clip that propagates NaN, like torch.clamp.
template <typename acc_t>
DX_HOST_DEVICE acc_t clip_symmetric(acc_t y, acc_t r) {
  return y < -r ? -r : (y > r ? r : y);
}

// x̂0 = clip(ax·x + am·m), the prediction every step starts from (and DPM-Solver++ also returns).
template <typename acc_t>
DX_HOST_DEVICE acc_t predict_x0(const StepCoef<acc_t>& c, acc_t x, acc_t m, acc_t clip_range) {
  return clip_symmetric(c.ax * x + c.am * m, clip_range);
}

// x_prev from x̂0; kLast: a multistep step, which adds c1·(x̂0 − x̂0_last) (x̂0_last is not read otherwise).
template <bool kLast, typename acc_t>
DX_HOST_DEVICE acc_t reverse_step(const StepCoef<acc_t>& c, acc_t x, acc_t m, acc_t x0, acc_t x0_last, acc_t z) {
  acc_t y = c.c0 * x0 + c.bx * x + c.bm * m + c.s * z;
  if constexpr (kLast) y += c.c1 * (x0 - x0_last);
  return y;
}

}  // namespace diffusion_ext

namespace diffusion_ext {

// Per-sample coefficient functors: given a sample index, read its timestep(s) and ᾱ and return the
// coefficients of that sample, formed in double whatever the table's type (float or double, read as
// given) and the kernel's accumulation type. Kernels round them once (round_coef). Why double: near
// t = 0, 1 − ᾱ_t, 1 − ᾱ_prev and β_t = 1 − ᾱ_t/ᾱ_prev cancel catastrophically in fp32 (β_0 ≈ 1e-4 keeps
// about 3 of an fp32 quotient's 7 digits), which made the fp32 DDPM step at t = 1 err 7× more than
// diffusers' own fp32 step against an fp64 evaluation; in double the cancellation costs nothing that
// survives the final rounding. The CPU forms them once per tile; CUDA and Triton in a pre-pass with one
// thread per sample, since double arithmetic per element would make the memory-bound step compute-bound.
// An out-of-range timestep (the CPU wrapper rejects those before launching; a device cannot raise) gives
// NaN coefficients and never reads outside the table; in_range says whether a sample's timesteps are valid.
template <typename table_t>
DX_HOST_DEVICE double alpha_bar_at(const table_t* table, int64_t num_timesteps, int64_t t, bool* ok) {
  if (t < 0 || t >= num_timesteps) {
    *ok = false;
    return NAN;
  }
  return static_cast<double>(table[t]);
}

template <typename acc_t>
DX_HOST_DEVICE StepCoef<acc_t> round_coef(const StepCoef<double>& c) {
  return StepCoef<acc_t>{static_cast<acc_t>(c.ax), static_cast<acc_t>(c.am), static_cast<acc_t>(c.c0),
                         static_cast<acc_t>(c.bx), static_cast<acc_t>(c.bm), static_cast<acc_t>(c.s),
                         static_cast<acc_t>(c.c1)};
}

template <typename acc_t>
DX_HOST_DEVICE QSampleCoef<acc_t> round_coef(const QSampleCoef<double>& c) {
  return QSampleCoef<acc_t>{static_cast<acc_t>(c.a), static_cast<acc_t>(c.s)};
}

template <typename table_t>
struct QSampleCoefFn {
  using Coef = QSampleCoef<double>;
  const int64_t* t;
  const table_t* table;
  int64_t num_timesteps;
  DX_HOST_DEVICE bool in_range(int64_t b) const { return t[b] >= 0 && t[b] < num_timesteps; }
  DX_HOST_DEVICE Coef operator()(int64_t b) const {
    bool ok = true;
    return q_sample_coef(alpha_bar_at(table, num_timesteps, t[b], &ok));
  }
};

template <typename table_t>
struct DdpmCoefFn {
  using Coef = StepCoef<double>;
  const int64_t* t;
  const table_t* table;
  int64_t num_timesteps;
  VarianceType variance;
  PredictionType prediction;
  DX_HOST_DEVICE bool in_range(int64_t b) const { return t[b] >= 0 && t[b] < num_timesteps; }
  DX_HOST_DEVICE Coef operator()(int64_t b) const {
    bool ok = true;
    const int64_t tb = t[b];
    const double ab = alpha_bar_at(table, num_timesteps, tb, &ok);
    const double ab_prev = tb > 0 ? alpha_bar_at(table, num_timesteps, tb - 1, &ok) : 1.0;
    return ddpm_coef(ab, ab_prev, tb > 0, variance, prediction);
  }
};

template <typename table_t>
struct DdimCoefFn {
  using Coef = StepCoef<double>;
  const int64_t* t;
  const int64_t* t_prev;
  const table_t* table;
  int64_t num_timesteps;
  double eta;
  PredictionType prediction;
  DX_HOST_DEVICE bool in_range(int64_t b) const {
    return t[b] >= 0 && t[b] < num_timesteps && t_prev[b] >= -1 && t_prev[b] < t[b];
  }
  DX_HOST_DEVICE Coef operator()(int64_t b) const {
    bool ok = true;
    const int64_t tb = t[b], pb = t_prev[b];
    const double ab = alpha_bar_at(table, num_timesteps, tb, &ok);
    // t_prev = -1 is the end of the chain: ᾱ_prev = 1 (diffusers' set_alpha_to_one).
    const double ab_prev = pb == -1 ? 1.0 : alpha_bar_at(table, num_timesteps, pb, &ok);
    if (pb >= tb) ok = false;
    Coef c = ddim_coef(ab, ab_prev, eta, prediction);
    if (!ok) c.c0 = NAN;
    return c;
  }
};

// DPM-Solver++ from t to t_prev (−1: the clean end); t_last is the timestep of the step before (its x̂0 is
// the second-order term's), nullptr for a first-order step.
template <typename table_t>
struct DpmSolverCoefFn {
  using Coef = StepCoef<double>;
  const int64_t* t;
  const int64_t* t_prev;
  const int64_t* t_last;
  const table_t* table;
  int64_t num_timesteps;
  bool sde;
  PredictionType prediction;
  DX_HOST_DEVICE bool in_range(int64_t b) const {
    return t[b] >= 0 && t[b] < num_timesteps && t_prev[b] >= -1 && t_prev[b] < t[b] &&
           (t_last == nullptr || (t_last[b] > t[b] && t_last[b] < num_timesteps));
  }
  DX_HOST_DEVICE Coef operator()(int64_t b) const {
    bool ok = in_range(b);
    const int64_t tb = t[b], pb = t_prev[b];
    const double ab = alpha_bar_at(table, num_timesteps, tb, &ok);
    const double ab_prev = pb == -1 ? 1.0 : alpha_bar_at(table, num_timesteps, pb, &ok);
    const double ab_last = t_last == nullptr ? 0.5 : alpha_bar_at(table, num_timesteps, t_last[b], &ok);
    Coef c = dpm_solver_coef(ab, ab_prev, ab_last, t_last != nullptr, sde, prediction);
    if (!ok) c.ax = c.c0 = NAN;  // x̂0 and x_prev of that sample are NaN
    return c;
  }
};

}  // namespace diffusion_ext
