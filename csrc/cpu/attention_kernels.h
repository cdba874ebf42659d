#pragma once
// The inner loops of attention on the CPU: a register-blocked tile product C (+)= A·B on packed tiles,
// the packing of q, k, v, dO tiles into the accumulation dtype, and the per-row softmax steps.
//
// Every matrix product of FlashAttention-2 (Dao 2023) is written as one kernel, C[M×N] (+)= A[M×K]·B[K×N],
// with B row-major and contiguous along N (vector loads) and A read one scalar at a time (broadcast) through
// a row and a column stride, so that Aᵀ costs nothing: the backward's Pᵀ·dO and dSᵀ·Q use P and dS as
// stored. K is therefore packed transposed (Kᵀ: D × keys) for S = Q·Kᵀ, and every B operand is packed
// with its rows padded to a whole number of vectors (zeros), so the kernel never needs a masked column.
//
// This translation unit may use AVX-512 (at::vec keeps each capability in its own inline namespace, so
// it mixes with the AVX2 units of the other kernels): 32 vector registers hold a 6×64 fp32 tile of C.

// AVX-512 when the compiler targets it (setup.py builds with -march=native); otherwise the selection of
// vec_capability.h (AVX2 + FMA, or at::vec's portable default).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#endif
#include "vec_capability.h"

#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace diffusion_ext {
namespace attention_cpu_kernels {

using at::vec::Vectorized;

constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

#if defined(CPU_CAPABILITY_AVX512)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif

// The widest column panel, in vectors. With 32 registers a 6×4 tile (24 accumulators); with 16, a 2×4 tile
// would have 8 accumulators and 6 loads per 8 FMAs, so 6×2 (12 accumulators, 8 loads per 12 FMAs) is used.
#ifndef DIFFUSION_EXT_ATTN_WIDEST
#define DIFFUSION_EXT_ATTN_WIDEST (kVectorRegisters >= 32 ? 4 : 2)
#endif
constexpr int kWidest = DIFFUSION_EXT_ATTN_WIDEST;

// How C is updated: C = A·B, C += A·B, or C = α_row·C + A·B (the online softmax's rescale of the output
// accumulator, Dao 2023, Alg. 1 line 10, fused into the product so the accumulator is read only once).
enum class Update { kStore, kAdd, kScaleAdd };

// Rows of C per micro-tile for a tile NV vectors wide: MR·NV accumulators + NV loads of B + one broadcast
// of A must fit the register file (capped at 12 rows). With AVX-512 (32 registers): 6×4, 9×3, 12×2, 12×1;
// with 16 registers: 2×4, 4×3, 6×2, 12×1.
template <int NV>
constexpr int rows_for() {
  constexpr int budget = kVectorRegisters - NV - 1;
  constexpr int rows = budget / NV;
  return rows > 12 ? 12 : rows;
}

template <typename T, int MR, int NV>
inline void micro_tile(int64_t K, const T* __restrict__ A, int64_t rsa, int64_t csa, const T* __restrict__ B,
                       int64_t ldb, T* __restrict__ C, int64_t ldc, Update update, const T* __restrict__ alpha) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  V acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) acc[i][j] = V(T(0));
  for (int64_t k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) b[j] = V::loadu(B + k * ldb + j * W);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V a(A[i * rsa + k * csa]);
#pragma GCC unroll 16
      for (int j = 0; j < NV; ++j) acc[i][j] = at::vec::fmadd(a, b[j], acc[i][j]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    T* c = C + i * ldc;
#pragma GCC unroll 16
    for (int j = 0; j < NV; ++j) {
      V r = acc[i][j];
      if (update == Update::kAdd) {
        r = r + V::loadu(c + j * W);
      } else if (update == Update::kScaleAdd && alpha != nullptr) {  // (α always comes with kScaleAdd; the
        r = at::vec::fmadd(V::loadu(c + j * W), V(alpha[i]), r);     // test tells GCC, which warned otherwise)
      }
      r.store(c + j * W);
    }
  }
}

// The last rows of a panel (at most R), with a micro-tile of exactly that many rows.
template <typename T, int NV, int R>
inline void tail_rows(int64_t rows, int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B, int64_t ldb, T* C,
                      int64_t ldc, Update update, const T* alpha) {
  if constexpr (R > 0) {
    if (rows == R) {
      micro_tile<T, R, NV>(K, A, rsa, csa, B, ldb, C, ldc, update, alpha);
    } else {
      tail_rows<T, NV, R - 1>(rows, K, A, rsa, csa, B, ldb, C, ldc, update, alpha);
    }
  }
}

// One column panel NV vectors wide, all M rows: the K×NV·W panel of B stays in L1 while A streams.
template <typename T, int NV>
inline void panel(int64_t M, int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B, int64_t ldb, T* C,
                  int64_t ldc, Update update, const T* alpha) {
  constexpr int MR = rows_for<NV>();
  // A short remainder shares the last whole tile's rows instead (64 = 9·6 + 5 + 5, not 10·6 + 4): a tile of
  // few rows has few accumulators to hide the FMA latency behind (the 4-row tile ran at about half the 6-row
  // tile's rate and was 7% of the fp32 forward at (2, 1, 1024, 256) on an AVX2 EPYC).
  const int64_t rem = M % MR;
  const int64_t whole_end = rem > 0 && rem < MR - 1 && M > MR ? M - MR - rem : M - rem;
  int64_t m = 0;
  for (; m + MR <= whole_end; m += MR) {
    micro_tile<T, MR, NV>(K, A + m * rsa, rsa, csa, B, ldb, C + m * ldc, ldc, update, alpha ? alpha + m : nullptr);
  }
  while (m < M) {  // the rest: at most MR rows in one tile, else (up to 2·MR − 1) halved into two
    const int64_t rows = M - m > MR ? (M - m + 1) / 2 : M - m;
    tail_rows<T, NV, MR>(rows, K, A + m * rsa, rsa, csa, B, ldb, C + m * ldc, ldc, update,
                         alpha ? alpha + m : nullptr);
    m += rows;
  }
}

// C[M×N] (+)= A[M×K]·B[K×N]: A(m, k) = A[m·rsa + k·csa]; B(k, n) = B[k·ldb + n]; C(m, n) = C[m·ldc + n].
// N must be a multiple of the vector width (the packed operands are padded so that it is). With K = 0,
// kStore writes zeros.
template <typename T>
inline void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t rsa, int64_t csa, const T* B, int64_t ldb,
                 T* C, int64_t ldc, Update update, const T* alpha = nullptr) {
  constexpr int W = Vectorized<T>::size();
  int64_t n = 0;
  for (; N - n >= kWidest * W; n += kWidest * W) {
    panel<T, kWidest>(M, K, A, rsa, csa, B + n, ldb, C + n, ldc, update, alpha);
  }
  switch ((N - n) / W) {
    case 3: panel<T, 3>(M, K, A, rsa, csa, B + n, ldb, C + n, ldc, update, alpha); break;
    case 2: panel<T, 2>(M, K, A, rsa, csa, B + n, ldb, C + n, ldc, update, alpha); break;
    case 1: panel<T, 1>(M, K, A, rsa, csa, B + n, ldb, C + n, ldc, update, alpha); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------------
// packing: input tiles (any dtype, row stride ld, head dim contiguous) → acc_t tiles
// ---------------------------------------------------------------------------------------------------

// dst[r·ldd + d] = mul·src[r·ld + d] for d < D, 0 for D ≤ d < ldd (the padding of a B operand).
template <typename acc_t, typename scalar_t>
inline void pack_rows(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* dst, int64_t ldd, acc_t mul) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * ld;
    acc_t* o = dst + r * ldd;
    for (int64_t d = 0; d < D; ++d) o[d] = mul * static_cast<acc_t>(s[d]);
    for (int64_t d = D; d < ldd; ++d) o[d] = acc_t(0);
  }
}

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// dst[j·ldd + i] = src[i·ld + j] for i, j < 8, in eight 256-bit registers (unpack pairs, shuffle quads, swap
// 128-bit halves).
inline void transpose_8x8(const float* src, int64_t ld, float* dst, int64_t ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * ld);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(dst + i * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(dst + (i + 4) * ldd, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}
#endif

// dst[d·ldd + r] = src[r·ld + d] for r < rows, 0 for rows ≤ r < ldd: a key tile as Kᵀ (D × keys), so the
// scores S = Q·Kᵀ load whole vectors of keys. In blocks of 8 keys: row by row, every element would go to
// another of dst's D rows, and at D = 256 (a 64 KiB tile) those scattered stores missed L1 — 8% of the fp32
// forward at (8, 1, 256, 256) on an AVX2 EPYC; fp32 blocks of 8×8 are transposed in registers.
template <typename acc_t, typename scalar_t>
inline void pack_transposed(const scalar_t* src, int64_t ld, int64_t rows, int64_t D, acc_t* dst, int64_t ldd) {
  constexpr int64_t kRows = 8;
  int64_t r0 = 0;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc_t, float> && std::is_same_v<scalar_t, float>) {
    for (; r0 + kRows <= rows; r0 += kRows) {
      int64_t d = 0;
      for (; d + 8 <= D; d += 8) transpose_8x8(src + r0 * ld + d, ld, dst + d * ldd + r0, ldd);
      for (; d < D; ++d)
        for (int64_t r = r0; r < r0 + kRows; ++r) dst[d * ldd + r] = src[r * ld + d];
    }
  }
#endif
  for (; r0 < rows; r0 += kRows) {
    const int64_t r1 = std::min(rows, r0 + kRows);
    for (int64_t d = 0; d < D; ++d)
      for (int64_t r = r0; r < r1; ++r) dst[d * ldd + r] = static_cast<acc_t>(src[r * ld + d]);
  }
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = rows; r < ldd; ++r) dst[d * ldd + r] = acc_t(0);
}

// ---------------------------------------------------------------------------------------------------
// exp and max for the softmax
// ---------------------------------------------------------------------------------------------------

// e^x for the x ≤ 0 of a softmax (scores minus their running max or minus the logsumexp). The AVX-512
// fp32 form is inline: x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two so n·ln2_hi is exact), e^r by its
// degree-7 Taylor polynomial (truncation < 6e-9, under 1 ulp), and 2ⁿ applied by vscalefps, which gives 0
// for x = −inf (the padding); max error 0.93 ulp over [−100, 0.5] against double exp. Inline, it spares
// the softmax loop a library call per vector (at::vec's exp calls Sleef). AVX2 (below) likewise, with 2ⁿ
// built in the exponent field. Elsewhere (fp64, builds without AVX2) that
// Sleef exp (1 ulp).
template <typename T>
inline Vectorized<T> exp_nonpositive(const Vectorized<T>& x) {
  return x.exp();
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vectorized<float> exp_nonpositive(const Vectorized<float>& vx) {
  // Clamp below ln(2^-150): the result is 0 there either way; max(c, x) keeps a NaN x.
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), vx);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2_hi: 15 significant bits
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682030941723e-6f), r);    // ln2_lo = ln2 − ln2_hi
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}
#elif defined(CPU_CAPABILITY_AVX2)
// The same reduction and polynomial on 8 lanes. AVX2 has no vscalefps: 2ⁿ is built in the exponent field,
// so x is clamped to [ln 2^-126, 0.5] where 2ⁿ is a normal float, and lanes below the clamp (e^x < 1.2e-38,
// nothing against a row's maximum term of 1, and −inf from the padding) are set to 0 exactly.
template <>
inline Vectorized<float> exp_nonpositive(const Vectorized<float>& vx) {
  const __m256 lo = _mm256_set1_ps(-87.33654475f);                  // ln(2^-126)
  const __m256 x = _mm256_max_ps(lo, vx);                            // keeps a NaN x (max returns x then)
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860682030941723e-6f), r);
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(_mm256_cmp_ps(vx, lo, _CMP_LT_OQ), y);   // 0 below the clamp (NaN compares false)
}
#endif

// max without at::vec::maximum's NaN propagation (the scores are finite or −inf).
template <typename T>
inline Vectorized<T> fast_max(const Vectorized<T>& a, const Vectorized<T>& b) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_max_ps(a, b);
  if constexpr (std::is_same_v<T, double>) return _mm512_max_pd(a, b);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_max_ps(a, b);
  if constexpr (std::is_same_v<T, double>) return _mm256_max_pd(a, b);
#endif
  return at::vec::maximum(a, b);
}

// ---------------------------------------------------------------------------------------------------
// per-row softmax steps on a score tile S (rows × ncp, row stride lds; the first nc columns are keys)
// ---------------------------------------------------------------------------------------------------

// Padding columns of the last key tile get −inf, so that exp() makes them 0 and the max ignores them.
template <typename T>
inline void mask_padding(T* S, int64_t rows, int64_t lds, int64_t nc, int64_t ncp) {
  if (nc == ncp) return;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = nc; c < ncp; ++c) S[r * lds + c] = -std::numeric_limits<T>::infinity();
}

// Online softmax (Dao 2023, Alg. 1 lines 8–10) for one tile of key columns: m_new = max(m, rowmax S),
// P = exp(S − m_new) in place, l = e^{m − m_new}·l + rowsum P; alpha = e^{m − m_new} rescales the output.
template <typename T>
inline void online_softmax(T* S, int64_t rows, int64_t lds, int64_t ncp, T* m, T* l, T* alpha) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * lds;
    V vmax(-std::numeric_limits<T>::infinity());
    for (int64_t c = 0; c < ncp; c += W) vmax = fast_max(vmax, V::loadu(s + c));
    const T tile_max = at::vec::vec_reduce_all<T>([](V& x, V& y) { return fast_max(x, y); }, vmax);
    const T m_new = std::max(m[r], tile_max);
    const V vm(m_new);
    V vsum(T(0));
    for (int64_t c = 0; c < ncp; c += W) {
      const V p = exp_nonpositive(V::loadu(s + c) - vm);
      p.store(s + c);
      vsum = vsum + p;
    }
    const T a = std::exp(m[r] - m_new);  // 0 on the first tile (m = −inf)
    alpha[r] = a;
    l[r] = a * l[r] + at::vec::vec_reduce_all<T>([](V& x, V& y) { return x + y; }, vsum);
    m[r] = m_new;
  }
}

// Backward: P = exp(S − lse) in place (Dao 2023, Alg. 2 line 11; S already includes the scale).
template <typename T>
inline void probabilities(T* S, int64_t rows, int64_t lds, int64_t ncp, const T* lse) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  for (int64_t r = 0; r < rows; ++r) {
    T* s = S + r * lds;
    const V vl(lse[r]);
    for (int64_t c = 0; c < ncp; c += W) exp_nonpositive(V::loadu(s + c) - vl).store(s + c);
  }
}

// Backward: dS = P ∘ (dP − delta) in place of dP (Dao 2023, Alg. 2 line 14, without the scale).
template <typename T>
inline void score_grad(const T* P, T* dP, int64_t rows, int64_t lds, int64_t ncp, const T* delta) {
  using V = Vectorized<T>;
  constexpr int W = V::size();
  for (int64_t r = 0; r < rows; ++r) {
    const T* p = P + r * lds;
    T* g = dP + r * lds;
    const V vd(delta[r]);
    for (int64_t c = 0; c < ncp; c += W) (V::loadu(p + c) * (V::loadu(g + c) - vd)).store(g + c);
  }
}

}  // namespace attention_cpu_kernels
}  // namespace diffusion_ext
