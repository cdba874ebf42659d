#pragma once
// The inner loops of group_norm_act on the CPU, over one contiguous run of elements: shifted sums for the
// statistics, the fused normalise + activate, and the backward's per-element terms. Each has a scalar
// form for every dtype and an AVX2 form for float (at::vec, with the sums kept in double lanes).
//
// at::vec is AVX-512 here when the compiler targets it (setup.py: -march=native): the normalise +
// activate loop is bound by SiLU's exp and division, which 16 lanes halve. Each capability lives in its
// own inline namespace of at::vec, so this unit mixes with the AVX2 units of the other kernels.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include "vec_capability.h"

#include <cstdint>

#include "../common/activations.h"

namespace diffusion_ext {

// Σ(x − K) and Σ(x − K)² in double: the shift K (an element of the same channel) keeps the variance
// free of cancellation when |mean| ≫ std, and double lanes keep long sums exact enough for fp32 data.
struct ShiftedSums {
  double s1 = 0, s2 = 0;
};

template <typename scalar_t>
inline void add_shifted_sums(const scalar_t* p, int64_t n, double K, ShiftedSums& acc) {
  int64_t i = 0;
#ifdef DIFFUSION_EXT_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    __m256d a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(), b1 = _mm256_setzero_pd(), b2 = _mm256_setzero_pd();
    const __m256d k = _mm256_set1_pd(K);
    for (; i + 8 <= n; i += 8) {
      const __m256 v = _mm256_loadu_ps(p + i);
      const __m256d lo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), k);
      const __m256d hi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), k);
      a1 = _mm256_add_pd(a1, lo);
      a2 = _mm256_add_pd(a2, hi);
      b1 = _mm256_fmadd_pd(lo, lo, b1);
      b2 = _mm256_fmadd_pd(hi, hi, b2);
    }
    alignas(32) double t1[4], t2[4];
    _mm256_store_pd(t1, _mm256_add_pd(a1, a2));
    _mm256_store_pd(t2, _mm256_add_pd(b1, b2));
    acc.s1 += (t1[0] + t1[1]) + (t1[2] + t1[3]);
    acc.s2 += (t2[0] + t2[1]) + (t2[2] + t2[3]);
  }
#endif
  for (; i < n; ++i) {
    const double d = static_cast<double>(p[i]) - K;
    acc.s1 += d;
    acc.s2 += d * d;
  }
}

// (mean, M2) of one channel from its shifted sums over `count` elements.
struct Moments {
  double count = 0, mean = 0, m2 = 0;
};

inline Moments moments_of(const ShiftedSums& s, double K, double count) {
  if (count == 0) return {};
  const double d = s.s1 / count;
  return {count, K + d, s.s2 - s.s1 * d > 0 ? s.s2 - s.s1 * d : 0};
}

// Chan et al.'s pairwise update: the moments of the union of two disjoint sets.
inline Moments combine(const Moments& a, const Moments& b) {
  if (a.count == 0) return b;
  if (b.count == 0) return a;
  const double n = a.count + b.count, delta = b.mean - a.mean;
  return {n, a.mean + delta * b.count / n, a.m2 + b.m2 + delta * delta * a.count * b.count / n};
}

// μ as an unevaluated sum hi + lo of two acc_t: x − hi is exact when x is near μ (Sterbenz), so
// (x − hi) − lo keeps the digits that x − (acc_t)μ would lose when |μ| ≫ std.
template <typename acc_t>
struct SplitMean {
  acc_t hi, lo;
  explicit SplitMean(double mu) : hi(static_cast<acc_t>(mu)), lo(static_cast<acc_t>(mu - static_cast<double>(hi))) {}
};

// y[i] = act((x[i] − μ)·scale + β) for a run of n elements of one channel, scale = rstd·γ. (Not
// x·scale + (β − μ·scale): with |μ| ≫ std that constant is large and its rounding swamps y.)
template <Activation kAct, typename scalar_t, typename acc_t>
inline void normalize_activate(const scalar_t* x, scalar_t* y, int64_t n, SplitMean<acc_t> mu, acc_t scale,
                               acc_t beta) {
  int64_t i = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec vh(mu.hi), vl(mu.lo), vs(scale), vb(beta), one(acc_t(1)), zero(acc_t(0));
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec z = at::vec::fmadd((Vec::loadu(x + i) - vh) - vl, vs, vb);
      Vec out = z;
      if constexpr (kAct == Activation::kSilu) out = z / (one + z.neg().exp_u20());
      if constexpr (kAct == Activation::kRelu) out = at::vec::maximum(z, zero);
      out.store(y + i);
    }
  }
  for (; i < n; ++i) {
    y[i] = static_cast<scalar_t>(activate<kAct>((static_cast<acc_t>(x[i]) - mu.hi - mu.lo) * scale + beta));
  }
}

// The backward's per-element terms along one run of one channel (γ, β of that channel):
//   x̂ = (x − μ)·rstd, z = x̂·γ + β, dz = dy·act'(z);  returns Σdz and Σdz·x̂ (in double).
// With grad_x: writes grad_x = rstd·(dz·γ − a − x̂·b) instead of summing.
// dz_cache (n acc_t, or nullptr): the summing pass stores dz there and the grad_x pass reads it back
// instead of evaluating the activation's derivative again.
template <Activation kAct, typename scalar_t, typename acc_t>
inline void backward_run(const scalar_t* dy, const scalar_t* x, int64_t n, acc_t mu, acc_t rstd, acc_t gamma,
                         acc_t beta, ShiftedSums* sums, scalar_t* grad_x, acc_t a, acc_t b, acc_t* dz_cache) {
  int64_t i = 0;
  double s_dz = 0, s_dzx = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec vmu(mu), vr(rstd), vg(gamma), vb(beta), one(acc_t(1)), zero(acc_t(0)), va(a), vbb(b);
    Vec acc_dz(acc_t(0)), acc_dzx(acc_t(0));
    // Vector lanes sum at most kLaneRun elements before they are added into the double totals.
    constexpr int64_t kLaneRun = 64 * Vec::size();
    int64_t run_end = 0;
    auto flush = [&] {  // add the vector lanes into the double totals and restart them
      acc_t t1[Vec::size()], t2[Vec::size()];
      acc_dz.store(t1);
      acc_dzx.store(t2);
      for (int l = 0; l < Vec::size(); ++l) {
        s_dz += t1[l];
        s_dzx += t2[l];
      }
      acc_dz = Vec(acc_t(0));
      acc_dzx = Vec(acc_t(0));
    };
    for (; i + Vec::size() <= n; i += Vec::size()) {
      const Vec xh = (Vec::loadu(x + i) - vmu) * vr;
      Vec dz;
      if (grad_x != nullptr && dz_cache != nullptr) {
        dz = Vec::loadu(dz_cache + i);
      } else {
        const Vec z = at::vec::fmadd(xh, vg, vb);
        dz = Vec::loadu(dy + i);
        if constexpr (kAct == Activation::kSilu) {
          const Vec s = one / (one + z.neg().exp_u20());
          dz = dz * s * (one + z * (one - s));
        }
        if constexpr (kAct == Activation::kRelu) dz = Vec::blendv(zero, dz, z > zero);
        if (dz_cache != nullptr) dz.store(dz_cache + i);
      }
      if (grad_x != nullptr) {
        (vr * (dz * vg - va - xh * vbb)).store(grad_x + i);
      } else {
        acc_dz = acc_dz + dz;
        acc_dzx = at::vec::fmadd(dz, xh, acc_dzx);
        if (i >= run_end) {
          flush();
          run_end = i + kLaneRun;
        }
      }
    }
    flush();
  }
  for (; i < n; ++i) {
    const acc_t xh = (static_cast<acc_t>(x[i]) - mu) * rstd;
    acc_t dz;
    if (grad_x != nullptr && dz_cache != nullptr) {
      dz = dz_cache[i];
    } else {
      dz = static_cast<acc_t>(dy[i]) * activate_grad<kAct>(xh * gamma + beta);
      if (dz_cache != nullptr) dz_cache[i] = dz;
    }
    if (grad_x != nullptr) {
      grad_x[i] = static_cast<scalar_t>(rstd * (dz * gamma - a - xh * b));
    } else {
      s_dz += dz;
      s_dzx += dz * xh;
    }
  }
  if (sums != nullptr) {
    sums->s1 += s_dz;
    sums->s2 += s_dzx;
  }
}

// ---- channels_last: a run is one spatial position's C channels, each with its own coefficients ----

// s1[c] += x[c] − K[c], s2[c] += (x[c] − K[c])² (independent lanes: the compiler vectorises this).
template <typename scalar_t>
inline void add_row_sums(const scalar_t* x, int64_t C, const double* K, double* s1, double* s2) {
  for (int64_t c = 0; c < C; ++c) {
    const double d = static_cast<double>(x[c]) - K[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

// y[c] = act((x[c] − μ[c])·scale[c] + β[c]), μ[c] = mu[c] + mu_lo[c] (see SplitMean).
template <Activation kAct, typename scalar_t, typename acc_t>
inline void normalize_activate_row(const scalar_t* x, scalar_t* y, int64_t C, const acc_t* mu, const acc_t* mu_lo,
                                   const acc_t* scale, const acc_t* beta) {
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec one(acc_t(1)), zero(acc_t(0));
    for (; c + Vec::size() <= C; c += Vec::size()) {
      const Vec xc = (Vec::loadu(x + c) - Vec::loadu(mu + c)) - Vec::loadu(mu_lo + c);
      const Vec z = at::vec::fmadd(xc, Vec::loadu(scale + c), Vec::loadu(beta + c));
      Vec out = z;
      if constexpr (kAct == Activation::kSilu) out = z / (one + z.neg().exp_u20());
      if constexpr (kAct == Activation::kRelu) out = at::vec::maximum(z, zero);
      out.store(y + c);
    }
  }
  for (; c < C; ++c) {
    y[c] = static_cast<scalar_t>(activate<kAct>((static_cast<acc_t>(x[c]) - mu[c] - mu_lo[c]) * scale[c] + beta[c]));
  }
}

// Per-channel coefficients of the backward at one sample n: μ and rstd of the channel's group, γ, β, and
// a, b of the group (zero while the sums are being taken).
template <typename acc_t>
struct ChannelCoefs {
  const acc_t *mu, *rstd, *gamma, *beta, *a, *b;
};

// The backward along one spatial position: with grad_x == nullptr, ds[c] += dz, db[c] += dz·x̂;
// else grad_x[c] = rstd·(dz·γ − a − x̂·b). tmp holds 2·C acc_t.
template <Activation kAct, typename scalar_t, typename acc_t>
inline void backward_row(const scalar_t* dy, const scalar_t* x, int64_t C, const ChannelCoefs<acc_t>& k,
                         double* ds, double* db, scalar_t* grad_x, acc_t* tmp) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t xh = (static_cast<acc_t>(x[c]) - k.mu[c]) * k.rstd[c];
    tmp[c] = xh;
    tmp[C + c] = xh * k.gamma[c] + k.beta[c];
  }
  // dz = dy·act'(z), vectorised for the activation's exp
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t> && kAct == Activation::kSilu) {
    using Vec = at::vec::Vectorized<acc_t>;
    const Vec one(acc_t(1));
    for (; c + Vec::size() <= C; c += Vec::size()) {
      const Vec z = Vec::loadu(tmp + C + c);
      const Vec s = one / (one + z.neg().exp_u20());
      (Vec::loadu(dy + c) * s * (one + z * (one - s))).store(tmp + C + c);
    }
  }
  for (; c < C; ++c) tmp[C + c] = static_cast<acc_t>(dy[c]) * activate_grad<kAct>(tmp[C + c]);
  if (grad_x == nullptr) {
    for (int64_t j = 0; j < C; ++j) {
      ds[j] += tmp[C + j];
      db[j] += static_cast<double>(tmp[C + j]) * tmp[j];
    }
  } else {
    for (int64_t j = 0; j < C; ++j) {
      grad_x[j] = static_cast<scalar_t>(k.rstd[j] * (tmp[C + j] * k.gamma[j] - k.a[j] - tmp[j] * k.b[j]));
    }
  }
}

}  // namespace diffusion_ext
