#pragma once
// Standard normals of the counter-based stream (common/philox.h) for a run of element indices, on the
// CPU. Element e is lane e % 4 of Philox block e / 4, whatever the run's start, so any split of the
// work between threads gives the same noise as the CUDA and Triton kernels.
//
// With AVX2 the float stream is made 32 elements (8 Philox blocks) at a time in AVX2 registers, with
// inlined ~1-ulp log and sincos for Box-Muller, so it stays within a few ulp of the scalar path and of
// the GPU. (Library calls, libm or SLEEF, cost more than the rest of the kernel together.)
#include "vec_capability.h"

#include <algorithm>
#include <cstdint>

#include "philox_avx2.h"

namespace diffusion_ext {

template <typename acc_t>
inline void fill_normals_scalar(uint64_t seed, uint64_t offset, int64_t first, int64_t count, acc_t* out) {
  int64_t k = 0;
  while (k < count) {
    const int64_t e = first + k;
    const int lane = static_cast<int>(e & 3);
    acc_t z[4];
    normal4<acc_t>(static_cast<uint64_t>(e >> 2), offset, seed, z);
    const int take = static_cast<int>(std::min<int64_t>(4 - lane, count - k));
    for (int j = 0; j < take; ++j) out[k + j] = z[lane + j];
    k += take;
  }
}

#ifdef DIFFUSION_EXT_AVX2
// ln(u) for 8 positive normal floats: Cephes' logf (Moshier), as in sse_mathfun: u = m·2^e with
// m in [√½, √2), ln u = e·ln2 + ln m, ln(1 + x) by a degree-9 polynomial. About 1 ulp, branch-free and
// inlined, several times cheaper than a library call.
inline __m256 log_ps(__m256 u) {
  const __m256 one = _mm256_set1_ps(1.f);
  __m256i bits = _mm256_castps_si256(u);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  // mantissa in [0.5, 1)
  __m256 x = _mm256_or_ps(_mm256_castsi256_ps(_mm256_and_si256(bits, _mm256_set1_epi32(0x007FFFFF))),
                          _mm256_set1_ps(0.5f));
  const __m256 small = _mm256_cmp_ps(x, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(one, small));
  x = _mm256_add_ps(_mm256_sub_ps(x, one), _mm256_and_ps(x, small));  // x − 1, or 2x − 1 below √½
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(7.0376836292E-2f);
  for (float c : {-1.1514610310E-1f, 1.1676998740E-1f, -1.2420140846E-1f, 1.4249322787E-1f, -1.6668057665E-1f,
                  2.0000714765E-1f, -2.4999993993E-1f, 3.3333331174E-1f}) {
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
  }
  y = _mm256_mul_ps(_mm256_mul_ps(y, x), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  x = _mm256_add_ps(x, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), x);
}

// sin and cos of 8 non-negative angles below 8192: Cephes' sinf/cosf as in sse_mathfun. Octant j from
// x·4/π, a three-term Cody-Waite reduction by π/4, then the sine or cosine polynomial per octant. ~1 ulp.
inline void sincos_ps(__m256 x, __m256* s, __m256* c) {
  const __m256i one_i = _mm256_set1_epi32(1), two_i = _mm256_set1_epi32(2), four_i = _mm256_set1_epi32(4);
  __m256i j = _mm256_cvttps_epi32(_mm256_mul_ps(x, _mm256_set1_ps(1.27323954473516f)));
  j = _mm256_and_si256(_mm256_add_epi32(j, one_i), _mm256_set1_epi32(~1));  // round up to even
  const __m256 y = _mm256_cvtepi32_ps(j);
  const __m256 sign_sin = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_and_si256(j, four_i), 29));
  const __m256 sign_cos =
      _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_andnot_si256(_mm256_sub_epi32(j, two_i), four_i), 29));
  const __m256 use_sin_poly = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(j, two_i), _mm256_setzero_si256()));
  x = _mm256_fmadd_ps(y, _mm256_set1_ps(-0.78515625f), x);
  x = _mm256_fmadd_ps(y, _mm256_set1_ps(-2.4187564849853515625e-4f), x);
  x = _mm256_fmadd_ps(y, _mm256_set1_ps(-3.77489497744594108e-8f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 pc = _mm256_fmadd_ps(_mm256_set1_ps(2.443315711809948E-005f), z, _mm256_set1_ps(-1.388731625493765E-003f));
  pc = _mm256_fmadd_ps(pc, z, _mm256_set1_ps(4.166664568298827E-002f));
  pc = _mm256_mul_ps(_mm256_mul_ps(pc, z), z);
  pc = _mm256_add_ps(_mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, pc), _mm256_set1_ps(1.f));  // cos of reduced x
  __m256 ps = _mm256_fmadd_ps(_mm256_set1_ps(-1.9515295891E-4f), z, _mm256_set1_ps(8.3321608736E-3f));
  ps = _mm256_fmadd_ps(ps, z, _mm256_set1_ps(-1.6666654611E-1f));
  ps = _mm256_fmadd_ps(_mm256_mul_ps(ps, z), x, x);  // sin of reduced x
  *s = _mm256_xor_ps(_mm256_blendv_ps(pc, ps, use_sin_poly), sign_sin);
  *c = _mm256_xor_ps(_mm256_blendv_ps(ps, pc, use_sin_poly), sign_cos);
}

// The 32·kBatches normals of Philox blocks group0 .. group0 + 8·kBatches − 1, in element order:
// philox_avx2, then Box-Muller with log_ps and sincos_ps; a block's result does not depend on kBatches.
template <int kBatches>
inline void normals_avx2(uint64_t group0, uint64_t offset, uint64_t seed, float* out) {
  using Vec = at::vec::Vectorized<float>;
  static_assert(Vec::size() == 8, "one Vectorized<float> per Philox output word");
  __m256i c[4][kBatches];
  philox_avx2<kBatches>(group0, offset, seed, c);
  // uniform_open01: ((x >> 9) + 0.5) · 2^-23, exact; x >> 9 < 2^23 converts exactly as a signed int
  const __m256 half = _mm256_set1_ps(0.5f), ulp = _mm256_set1_ps(1.1920928955078125e-07f);
  auto uniform = [&](__m256i x) {
    return Vec(_mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 9)), half), ulp));
  };
  const Vec two_pi(6.283185307179586476925286766559f), minus_two(-2.f), zero(0.f);
  for (int q = 0; q < kBatches; ++q) {
    float z[4][8];
    const __m256i words[4] = {c[0][q], c[1][q], c[2][q], c[3][q]};
    for (int pair = 0; pair < 2; ++pair) {
      const Vec r2 = minus_two * Vec(log_ps(uniform(words[2 * pair])));
      const Vec radius = at::vec::maximum(r2, zero).sqrt();
      __m256 sin_t, cos_t;
      sincos_ps(two_pi * uniform(words[2 * pair + 1]), &sin_t, &cos_t);
      (radius * Vec(cos_t)).store(z[2 * pair]);
      (radius * Vec(sin_t)).store(z[2 * pair + 1]);
    }
    float* o = out + 32 * q;
    for (int l = 0; l < 8; ++l) {
      for (int j = 0; j < 4; ++j) o[4 * l + j] = z[j][l];
    }
  }
}
#endif

// out[k] = normal(first + k) for k in [0, count).
template <typename acc_t>
inline void fill_normals(uint64_t seed, uint64_t offset, int64_t first, int64_t count, acc_t* out) {
#ifdef DIFFUSION_EXT_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    // normals_avx2 everywhere, also in a partial block at either end, so the noise does not depend on
    // where a thread's range starts (log_ps/sincos_ps and libm may differ in the last bit).
    fill_in_blocks(first, count, out, [&](uint64_t group0, int batches, float* dst) {
      if (batches == 4) {
        normals_avx2<4>(group0, offset, seed, dst);
      } else {
        normals_avx2<1>(group0, offset, seed, dst);
      }
    });
    return;
  }
#endif
  fill_normals_scalar(seed, offset, first, count, out);
}

}  // namespace diffusion_ext
