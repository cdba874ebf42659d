#pragma once
// The inner loops of group_norm_act on the CPU, over one contiguous run of elements: shifted sums for the
// statistics, the fused normalise + activate, and the backward's per-element terms. Each has a vector form
// for every dtype (at::vec; bf16 and fp16 widened to fp32 lanes on load, see AccLanes) and a scalar tail.
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
#include "store_rounded.h"

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../common/activations.h"

namespace diffusion_ext {

// Vectorized<acc_t> lanes over scalar_t memory, acc_t = at::opmath_type<scalar_t>. fp32 and fp64 tensors
// load and store their lanes as they are; bf16 and fp16 are widened to fp32 on load and rounded once on
// store (at::vec's conversions, AVX-512 BF16 / F16C instructions where the compiler targets them), so a
// half-precision tensor runs the same fp32 vector code at half the memory traffic instead of a scalar loop
// (issue 14: the scalar loop made bf16 group norm 3-5x slower than PyTorch's). One step covers
// Vectorized<scalar_t>::size() elements as kParts acc_t vectors (1 for fp32/fp64, 2 for bf16/fp16).
template <typename scalar_t>
struct AccLanes {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  static constexpr bool kWiden = !std::is_same_v<scalar_t, acc_t>;
  static constexpr int64_t kStep = at::vec::Vectorized<scalar_t>::size();
  static constexpr int kParts = static_cast<int>(kStep / Vec::size());
  static_assert(kParts * Vec::size() == kStep, "AccLanes: a step must be whole acc_t vectors");
  struct Parts {
    Vec v[kParts];
  };
  static Parts load(const scalar_t* p) {
    Parts out;
    if constexpr (kWiden) {
      std::tie(out.v[0], out.v[1]) = at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p));
    } else {
      out.v[0] = Vec::loadu(p);
    }
    return out;
  }
  static void store(scalar_t* p, const Parts& in) {
    if constexpr (kWiden) {
      store_rounded(in.v[0], in.v[1], p, kStep);
    } else {
      in.v[0].store(p);
    }
  }
  // The last count < kStep elements of a run as one step: the lanes past them load as zeros (at::vec's
  // partial load) and are not stored. A scalar tail would evaluate std::exp element by element; with bf16's
  // 32-element steps that was every element of a 4×4 channel (the demo's UNet: 3× slower than eager there).
  static Parts load(const scalar_t* p, int64_t count) {
    Parts out;
    if constexpr (kWiden) {
      std::tie(out.v[0], out.v[1]) =
          at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(p, static_cast<int16_t>(count)));
    } else {
      out.v[0] = Vec::loadu(p, count);
    }
    return out;
  }
  static void store(scalar_t* p, const Parts& in, int64_t count) {
    if constexpr (kWiden) {
      store_rounded(in.v[0], in.v[1], p, count);
    } else {
      in.v[0].store(p, static_cast<int>(count));
    }
  }
  // Lanes [j·W, (j+1)·W) of a partial step of `count` elements: how many of them are elements.
  static int64_t part_count(int j, int64_t count) {
    return std::clamp<int64_t>(count - j * Vec::size(), 0, Vec::size());
  }
  // How many acc_t vectors of a step of `count` elements hold any (a bf16 run of 16 fills one of two).
  static int parts_of(int64_t count) {
    return count >= kStep ? kParts : static_cast<int>((count + Vec::size() - 1) / Vec::size());
  }
};

// act(z) on a vector of lanes (exp_u20: at::vec's exp to ~20 ulp, ample for fp32 SiLU and faster than exp).
template <Activation kAct, typename Vec>
inline Vec activate_vec(const Vec& z) {
  if constexpr (kAct == Activation::kSilu) return z / (Vec(1) + z.neg().exp_u20());
  if constexpr (kAct == Activation::kRelu) return at::vec::maximum(z, Vec(0));
  return z;
}

// dy·act'(z) on a vector of lanes (activate_grad of common/activations.h).
template <Activation kAct, typename Vec>
inline Vec activate_grad_vec(const Vec& dy, const Vec& z) {
  if constexpr (kAct == Activation::kSilu) {
    const Vec one(1), s = one / (one + z.neg().exp_u20());
    return dy * s * (one + z * (one - s));
  }
  if constexpr (kAct == Activation::kRelu) return Vec::blendv(Vec(0), dy, z > Vec(0));
  return dy;
}

#ifdef DIFFUSION_EXT_AVX2
// 8 elements widened to fp32 (exact for every dtype here): the statistics' double-lane sums read through it.
template <typename scalar_t>
constexpr bool kLoads8AsFloat = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16>
#ifdef __F16C__
                                || std::is_same_v<scalar_t, c10::Half>
#endif
    ;

template <typename scalar_t>
inline __m256 load8_as_float(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm256_loadu_ps(p);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16 = fp32's top half
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}
#endif

// Elements ahead of the current step that the streaming passes (the statistics, the backward's sums) ask the
// cache for: the hardware prefetcher alone left those passes waiting on their loads (perf: the loads' first use
// took a fifth of the backward), and 256 elements ahead made the bf16 summing pass 1.3× and the fp32 one 1.44×
// faster at 16×128×32×32, one thread (128: 1.28×, 1.34×; 512 and 1024 no better).
constexpr int64_t kPrefetchAhead = 256;

// Σ(x − K) and Σ(x − K)² in double: the shift K (an element of the same channel) keeps the variance
// free of cancellation when |mean| ≫ std, and double lanes keep long sums exact enough for fp32 data.
struct ShiftedSums {
  double s1 = 0, s2 = 0;
};

template <typename scalar_t>
inline void add_shifted_sums(const scalar_t* p, int64_t n, double K, ShiftedSums& acc) {
  int64_t i = 0;
#ifdef DIFFUSION_EXT_AVX2
  if constexpr (kLoads8AsFloat<scalar_t>) {
    __m256d a1 = _mm256_setzero_pd(), a2 = _mm256_setzero_pd(), b1 = _mm256_setzero_pd(), b2 = _mm256_setzero_pd();
    const __m256d k = _mm256_set1_pd(K);
    for (; i + 8 <= n; i += 8) {
      if (i % 32 == 0) __builtin_prefetch(p + i + kPrefetchAhead);
      const __m256 v = load8_as_float(p + i);
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
  using L = AccLanes<scalar_t>;
  using Vec = typename L::Vec;
  const Vec vh(mu.hi), vl(mu.lo), vs(scale), vb(beta);
  int64_t i = 0;
  for (; i + L::kStep <= n; i += L::kStep) {
    auto v = L::load(x + i);
    for (auto& p : v.v) p = activate_vec<kAct>(at::vec::fmadd((p - vh) - vl, vs, vb));
    L::store(y + i, v);
  }
  if (i < n) {
    auto v = L::load(x + i, n - i);
    for (int j = 0; j < L::parts_of(n - i); ++j) v.v[j] = activate_vec<kAct>(at::vec::fmadd((v.v[j] - vh) - vl, vs, vb));
    L::store(y + i, v, n - i);
  }
}

// Σ of a vector's lanes in double: widened, then added pairwise as a log-depth tree (lane l + lane l + W/2
// first, then the halves of that, ...). The fallback of lanes_sums_as_double (fp64 lanes, builds without AVX2).
template <typename acc_t>
inline double lanes_sum_as_double(const at::vec::Vectorized<acc_t>& v) {
  constexpr int W = at::vec::Vectorized<acc_t>::size();
  acc_t u[W];
  v.store(u);
  double t[W];
  for (int l = 0; l < W; ++l) t[l] = u[l];
  for (int w = W / 2; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) t[l] += t[l + w];
  }
  return t[0];
}

// Σ of a's lanes and Σ of b's lanes, added together: the backward's flush reduces its two lane accumulators at
// once. fp32 with AVX-512 or AVX2: both trees share each shuffle and addition (a's lanes in one half of the
// register, b's in the other), in fp32, widened at the end, in place of two trees in double lanes (one flush per
// 16-element channel at 4×4 maps: the fp32 backward at 64×256×4×4 went 318 → 270 µs, one thread, AVX-512 EPYC).
// An fp32 tree adds log2(W) roundings of 2^-24 to lanes that already hold fp32 sums of up to kLaneRun steps.
template <typename acc_t>
inline std::pair<double, double> lanes_sums_as_double(const at::vec::Vectorized<acc_t>& a,
                                                      const at::vec::Vectorized<acc_t>& b) {
  if constexpr (std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX512)
    // [a0..7 + a8..15 | b0..7 + b8..15], then within each 256-bit half: 128-bit halves, pairs, neighbours.
    __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, 0xB1));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
    t = _mm512_add_ps(t, _mm512_permute_ps(t, 0xB1));
    return {_mm512_cvtss_f32(t), _mm_cvtss_f32(_mm512_extractf32x4_ps(t, 2))};
#elif defined(CPU_CAPABILITY_AVX2)
    // [a0..3 + a4..7 | b0..3 + b4..7], then within each 128-bit half: pairs, neighbours.
    __m256 t = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    t = _mm256_add_ps(t, _mm256_permute_ps(t, 0x4E));
    t = _mm256_add_ps(t, _mm256_permute_ps(t, 0xB1));
    return {_mm256_cvtss_f32(t), _mm_cvtss_f32(_mm256_extractf128_ps(t, 1))};
#endif
  }
  return {lanes_sum_as_double(a), lanes_sum_as_double(b)};
}

// The backward's per-element terms along one run of one channel (γ, β of that channel):
//   x̂ = (x − μ)·rstd, z = x̂·γ + β, dz = dy·act'(z);  returns Σdz and Σdz·x̂ (in double).
// With grad_x: writes grad_x = rstd·(dz·γ − a − x̂·b) instead of summing.
// dz_cache (n acc_t, or nullptr): the summing pass stores dz there and the grad_x pass reads it back
// instead of evaluating the activation's derivative again.
// Always inlined: a 4×4 channel is two vector steps, and an out-of-line call per channel (its prologue, the
// broadcasts of μ, rstd, γ, β) cost as much as the steps.
template <Activation kAct, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void backward_run(const scalar_t* dy, const scalar_t* x, int64_t n, acc_t mu,
                                                        acc_t rstd, acc_t gamma, acc_t beta, ShiftedSums* sums,
                                                        scalar_t* grad_x, acc_t a, acc_t b, acc_t* dz_cache) {
  using L = AccLanes<scalar_t>;
  using Vec = typename L::Vec;
  constexpr int64_t W = Vec::size();
  int64_t i = 0;
  double s_dz = 0, s_dzx = 0;
  const Vec vmu(mu), vr(rstd), vg(gamma), vb(beta), va(a), vbb(b);
  Vec acc_dz(acc_t(0)), acc_dzx(acc_t(0));
  // Vector lanes sum about kLaneRun elements (at most kLaneRun plus one step) before they are added into the
  // double totals.
  constexpr int64_t kLaneRun = 64 * W;
  int64_t run_end = kLaneRun;
  // Add the vector lanes into the double totals and restart them (a chain of 2·W dependent double additions,
  // twice per run, cost ~4 ns per element where a run is one vector — 4×4 channels — and made that backward
  // 2.5× eager's; lanes_sums_as_double adds them as a log-depth tree in registers).
  auto flush = [&]() __attribute__((always_inline)) {
    const auto [t_dz, t_dzx] = lanes_sums_as_double(acc_dz, acc_dzx);
    s_dz += t_dz;
    s_dzx += t_dzx;
    acc_dz = Vec(acc_t(0));
    acc_dzx = Vec(acc_t(0));
  };
  // One step of `count` elements at o (count < kStep only for the run's last: partial loads give zeros
  // past it, so dz = 0·act'(z) = 0 there and the sums are unchanged; nothing past it is stored).
  auto step = [&](int64_t o, int64_t count) __attribute__((always_inline)) {
    const bool whole = count == L::kStep;
    const int parts = L::parts_of(count);  // the vectors past them hold only padding: skipped
    if (grad_x == nullptr) {  // the summing pass streams x and dy from memory (the grad_x pass finds them cached)
      __builtin_prefetch(x + o + kPrefetchAhead);
      __builtin_prefetch(dy + o + kPrefetchAhead);
    }
    auto xh = whole ? L::load(x + o) : L::load(x + o, count);  // x̂ = (x − μ)·rstd, for both uses below
    for (int j = 0; j < parts; ++j) xh.v[j] = (xh.v[j] - vmu) * vr;
    typename L::Parts dz;
    if (grad_x != nullptr && dz_cache != nullptr) {
      for (int j = 0; j < parts; ++j) dz.v[j] = Vec::loadu(dz_cache + o + j * W, L::part_count(j, count));
    } else {
      dz = whole ? L::load(dy + o) : L::load(dy + o, count);
      for (int j = 0; j < parts; ++j) {
        dz.v[j] = activate_grad_vec<kAct>(dz.v[j], at::vec::fmadd(xh.v[j], vg, vb));
        if (dz_cache != nullptr) dz.v[j].store(dz_cache + o + j * W, L::part_count(j, count));
      }
    }
    if (grad_x != nullptr) {
      typename L::Parts gx = xh;  // (a skipped vector's lanes are stored nowhere)
      for (int j = 0; j < parts; ++j) gx.v[j] = vr * (dz.v[j] * vg - va - xh.v[j] * vbb);
      whole ? L::store(grad_x + o, gx) : L::store(grad_x + o, gx, count);
    } else {
      for (int j = 0; j < parts; ++j) {
        acc_dz = acc_dz + dz.v[j];
        acc_dzx = at::vec::fmadd(dz.v[j], xh.v[j], acc_dzx);
      }
      if (o >= run_end) {
        flush();
        run_end = o + kLaneRun;
      }
    }
  };
  for (; i + L::kStep <= n; i += L::kStep) step(i, L::kStep);
  if (i < n) step(i, n - i);
  if (grad_x == nullptr) flush();
  if (sums != nullptr) {
    sums->s1 += s_dz;
    sums->s2 += s_dzx;
  }
}

// ---- channels_last: a run is one spatial position's C channels, each with its own coefficients ----

// s1[c] += x[c] − K[c], s2[c] += (x[c] − K[c])², in double lanes.
template <typename scalar_t>
inline void add_row_sums(const scalar_t* x, int64_t C, const double* K, double* s1, double* s2) {
  int64_t c = 0;
#ifdef DIFFUSION_EXT_AVX2
  if constexpr (kLoads8AsFloat<scalar_t>) {  // bf16/fp16 would not auto-vectorise: widen 8 at a time
    for (; c + 8 <= C; c += 8) {
      const __m256 v = load8_as_float(x + c);
      const __m256d lo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), _mm256_loadu_pd(K + c));
      const __m256d hi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), _mm256_loadu_pd(K + c + 4));
      _mm256_storeu_pd(s1 + c, _mm256_add_pd(_mm256_loadu_pd(s1 + c), lo));
      _mm256_storeu_pd(s1 + c + 4, _mm256_add_pd(_mm256_loadu_pd(s1 + c + 4), hi));
      _mm256_storeu_pd(s2 + c, _mm256_fmadd_pd(lo, lo, _mm256_loadu_pd(s2 + c)));
      _mm256_storeu_pd(s2 + c + 4, _mm256_fmadd_pd(hi, hi, _mm256_loadu_pd(s2 + c + 4)));
    }
  }
#endif
  for (; c < C; ++c) {
    const double d = static_cast<double>(x[c]) - K[c];
    s1[c] += d;
    s2[c] += d * d;
  }
}

// fp32/bf16/fp16 rows: f1[c] += x[c] − K[c], f2[c] += (x[c] − K[c])² in fp32 lanes (K in fp32), which the caller
// adds into its double sums every kRowRun rows. bf16/fp16: the difference is exact in fp32 for values within 2^16
// of each other's magnitude (8- and 11-bit significands); the square and the sum of at most kRowRun terms round at
// fp32's 2^-24, far below the input's own 2^-8 (bf16) or 2^-11 (fp16). fp32: the difference rounds relative to
// itself (the shift keeps it small when |μ| ≫ σ), and a run's sum errs by at most ~kRowRun·2^-24 relative, bounded
// whatever H·W is, against PyTorch's fp32 channels_last kernel's Σx² − (Σx)²/n in fp32 over all H·W rows. The double
// lanes of add_row_sums move 4× the bytes through L1 per element (the bf16 channels_last forward was 4× a copy's
// time; fp32 rows through them made the (1, 512, 32, 32) forward slower than PyTorch's): fp64 rows keep them.
constexpr int64_t kRowRun = 64;

template <typename scalar_t>
inline void add_row_sums_lanes(const scalar_t* x, int64_t C, const float* K, float* f1, float* f2) {
  using L = AccLanes<scalar_t>;
  using Vec = typename L::Vec;
  static_assert(std::is_same_v<typename L::acc_t, float>, "add_row_sums_lanes: fp32 lanes for bf16/fp16 rows");
  constexpr int64_t W = Vec::size();
  int64_t c = 0;
  for (; c + L::kStep <= C; c += L::kStep) {
    const auto v = L::load(x + c);
    for (int j = 0; j < L::kParts; ++j) {
      const int64_t o = c + j * W;
      const Vec d = v.v[j] - Vec::loadu(K + o);
      (Vec::loadu(f1 + o) + d).store(f1 + o);
      at::vec::fmadd(d, d, Vec::loadu(f2 + o)).store(f2 + o);
    }
  }
  for (; c < C; ++c) {
    const float d = static_cast<float>(x[c]) - K[c];
    f1[c] += d;
    f2[c] += d * d;
  }
}

// y[c] = act((x[c] − μ[c])·scale[c] + β[c]), μ[c] = mu[c] + mu_lo[c] (see SplitMean).
template <Activation kAct, typename scalar_t, typename acc_t>
inline void normalize_activate_row(const scalar_t* x, scalar_t* y, int64_t C, const acc_t* mu, const acc_t* mu_lo,
                                   const acc_t* scale, const acc_t* beta) {
  using L = AccLanes<scalar_t>;
  using Vec = typename L::Vec;
  constexpr int64_t W = Vec::size();
  int64_t c = 0;
  for (; c + L::kStep <= C; c += L::kStep) {
    auto v = L::load(x + c);
    for (int j = 0; j < L::kParts; ++j) {
      const int64_t o = c + j * W;
      const Vec xc = (v.v[j] - Vec::loadu(mu + o)) - Vec::loadu(mu_lo + o);
      v.v[j] = activate_vec<kAct>(at::vec::fmadd(xc, Vec::loadu(scale + o), Vec::loadu(beta + o)));
    }
    L::store(y + c, v);
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

// The backward along one spatial position: with grad_x == nullptr, ls[c] += dz, lb[c] += dz·x̂ in acc_t lanes
// straight from the registers (the caller adds them into its double sums every kRowRun rows, as the bf16
// forward's statistics do: a row's x̂ and dz through tmp and then into double partials per row cost the fp32
// backward at 8×8 maps 1.3× eager's); else grad_x[c] = rstd·(dz·γ − a − x̂·b), tmp holding 2·C acc_t.
// dz_store (summing pass, or nullptr): the row's dz is also written there. dz_load (grad_x pass, or nullptr;
// only where scalar_t is acc_t): dz is read from there instead of evaluated again — the activation's
// derivative costs an exp and a division per element, the load one read. dz_load may be grad_x itself.
template <Activation kAct, typename scalar_t, typename acc_t>
inline void backward_row(const scalar_t* dy, const scalar_t* x, int64_t C, const ChannelCoefs<acc_t>& k,
                         acc_t* ls, acc_t* lb, scalar_t* grad_x, acc_t* tmp, acc_t* dz_store = nullptr,
                         const acc_t* dz_load = nullptr) {
  using L = AccLanes<scalar_t>;
  using Vec = typename L::Vec;
  constexpr int64_t W = Vec::size();
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (grad_x != nullptr && dz_load != nullptr) {  // grad_x = rstd·(dz·γ − a − x̂·b) with the stored dz
      for (; c + W <= C; c += W) {
        const Vec r = Vec::loadu(k.rstd + c), xh = (Vec::loadu(x + c) - Vec::loadu(k.mu + c)) * r;
        const Vec dz = Vec::loadu(dz_load + c);  // read before grad_x[c..] is written: they may be one row
        (r * (dz * Vec::loadu(k.gamma + c) - Vec::loadu(k.a + c) - xh * Vec::loadu(k.b + c))).store(grad_x + c);
      }
      for (; c < C; ++c) {
        const acc_t xh = (x[c] - k.mu[c]) * k.rstd[c], dz = dz_load[c];
        grad_x[c] = k.rstd[c] * (dz * k.gamma[c] - k.a[c] - xh * k.b[c]);
      }
      return;
    }
  }
  if (grad_x == nullptr) {  // the sums
    for (; c + L::kStep <= C; c += L::kStep) {
      const auto xv = L::load(x + c), dv = L::load(dy + c);
      for (int j = 0; j < L::kParts; ++j) {
        const int64_t o = c + j * W;
        const Vec xh = (xv.v[j] - Vec::loadu(k.mu + o)) * Vec::loadu(k.rstd + o);
        const Vec z = at::vec::fmadd(xh, Vec::loadu(k.gamma + o), Vec::loadu(k.beta + o));
        const Vec dz = activate_grad_vec<kAct>(dv.v[j], z);
        if (dz_store != nullptr) dz.store(dz_store + o);
        (Vec::loadu(ls + o) + dz).store(ls + o);
        at::vec::fmadd(dz, xh, Vec::loadu(lb + o)).store(lb + o);
      }
    }
    for (; c < C; ++c) {
      const acc_t xh = (static_cast<acc_t>(x[c]) - k.mu[c]) * k.rstd[c];
      const acc_t dz = static_cast<acc_t>(dy[c]) * activate_grad<kAct>(xh * k.gamma[c] + k.beta[c]);
      if (dz_store != nullptr) dz_store[c] = dz;
      ls[c] += dz;
      lb[c] += dz * xh;
    }
    return;
  }
  // 1. x̂ into tmp[0, C), dz = dy·act'(x̂·γ + β) into tmp[C, 2C)
  for (; c + L::kStep <= C; c += L::kStep) {
    const auto xv = L::load(x + c), dv = L::load(dy + c);
    for (int j = 0; j < L::kParts; ++j) {
      const int64_t o = c + j * W;
      const Vec xh = (xv.v[j] - Vec::loadu(k.mu + o)) * Vec::loadu(k.rstd + o);
      xh.store(tmp + o);
      const Vec z = at::vec::fmadd(xh, Vec::loadu(k.gamma + o), Vec::loadu(k.beta + o));
      activate_grad_vec<kAct>(dv.v[j], z).store(tmp + C + o);
    }
  }
  for (; c < C; ++c) {
    const acc_t xh = (static_cast<acc_t>(x[c]) - k.mu[c]) * k.rstd[c];
    tmp[c] = xh;
    tmp[C + c] = static_cast<acc_t>(dy[c]) * activate_grad<kAct>(xh * k.gamma[c] + k.beta[c]);
  }
  // 2. grad_x = rstd·(dz·γ − a − x̂·b)
  c = 0;
  for (; c + L::kStep <= C; c += L::kStep) {
    typename L::Parts gx;
    for (int j = 0; j < L::kParts; ++j) {
      const int64_t o = c + j * W;
      gx.v[j] = Vec::loadu(k.rstd + o) * (Vec::loadu(tmp + C + o) * Vec::loadu(k.gamma + o) - Vec::loadu(k.a + o) -
                                          Vec::loadu(tmp + o) * Vec::loadu(k.b + o));
    }
    L::store(grad_x + c, gx);
  }
  for (; c < C; ++c) {
    grad_x[c] = static_cast<scalar_t>(k.rstd[c] * (tmp[C + c] * k.gamma[c] - k.a[c] - tmp[c] * k.b[c]));
  }
}

}  // namespace diffusion_ext
