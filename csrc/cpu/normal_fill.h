#pragma once
// Standard normals of the counter-based stream (common/philox.h) for a run of element indices, on the
// CPU. Element e is lane e % 4 of Philox block e / 4, whatever the run's start, so any split of the
// work between threads gives the same noise as the CUDA and Triton kernels.
//
// With AVX2 the float stream is made 32 elements (8 Philox blocks) at a time in AVX2 registers, and
// Box-Muller uses SLEEF's logf/sincosf (1 ulp), so the result stays within a few ulp of the scalar path
// and of the GPU.
#include "vec_capability.h"

#include <algorithm>
#include <cstdint>

#include "../common/philox.h"

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

#ifdef DIFFUSION_EXT_SLEEF_AVX2
// hi32(a·m) for 8 uint32 lanes: _mm256_mul_epu32 multiplies the even lanes to 64 bits; the odd lanes
// are shifted down into even position for a second multiply.
inline __m256i mulhi_epu32(__m256i a, __m256i m) {
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, m), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  return _mm256_blend_epi32(even, odd, 0xAA);  // odd lanes: the high words of the odd products
}

// The 32 normals of Philox blocks group0 .. group0 + 7, in element order: philox4x32_10 of
// common/philox.h on 8 blocks at once, then Box-Muller with SLEEF's logf and sincosf (1 ulp).
inline void normal32_avx2(uint64_t group0, uint64_t offset, uint64_t seed, float* out) {
  using Vec = at::vec::Vectorized<float>;
  static_assert(Vec::size() == 8, "one Vectorized<float> per Philox output word");
  alignas(32) uint32_t lo[8], hi[8];
  for (int l = 0; l < 8; ++l) {  // blocks group0 + l, as 64-bit counters split in two words
    lo[l] = static_cast<uint32_t>(group0 + l);
    hi[l] = static_cast<uint32_t>((group0 + l) >> 32);
  }
  __m256i c0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
  __m256i c1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
  __m256i c2 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
  __m256i c3 = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(mulhi_epu32(c2, m1), c1),
                                        _mm256_set1_epi32(static_cast<int>(k0)));
    const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(mulhi_epu32(c0, m0), c3),
                                        _mm256_set1_epi32(static_cast<int>(k1)));
    c1 = _mm256_mullo_epi32(c2, m1);
    c3 = _mm256_mullo_epi32(c0, m0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  // uniform_open01: ((x >> 9) + 0.5) · 2^-23, exact; x >> 9 < 2^23 converts exactly as a signed int
  const __m256 half = _mm256_set1_ps(0.5f), ulp = _mm256_set1_ps(1.1920928955078125e-07f);
  auto uniform = [&](__m256i x) {
    return Vec(_mm256_mul_ps(_mm256_add_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(x, 9)), half), ulp));
  };
  const Vec two_pi(6.283185307179586476925286766559f), minus_two(-2.f), zero(0.f);
  float z[4][8];
  const __m256i words[4] = {c0, c1, c2, c3};
  for (int pair = 0; pair < 2; ++pair) {
    const Vec r2 = minus_two * uniform(words[2 * pair]).log();
    const Vec radius = at::vec::maximum(r2, zero).sqrt();
    const Sleef___m256_2 sc = Sleef_sincosf8_u10(two_pi * uniform(words[2 * pair + 1]));  // x: sin, y: cos
    (radius * Vec(sc.y)).store(z[2 * pair]);
    (radius * Vec(sc.x)).store(z[2 * pair + 1]);
  }
  for (int l = 0; l < 8; ++l) {
    for (int j = 0; j < 4; ++j) out[4 * l + j] = z[j][l];
  }
}
#endif

// out[k] = normal(first + k) for k in [0, count).
template <typename acc_t>
inline void fill_normals(uint64_t seed, uint64_t offset, int64_t first, int64_t count, acc_t* out) {
#ifdef DIFFUSION_EXT_SLEEF_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    // Every element comes from the 32-wide path, also in a partial block at either end, so the noise does
    // not depend on where a thread's range starts (SLEEF and libm may differ in the last bit).
    int64_t k = 0;
    while (k < count) {
      const int64_t e = first + k;
      const int64_t block_start = e & ~int64_t{31};
      const int64_t take = std::min<int64_t>(count - k, block_start + 32 - e);
      if (take == 32) {
        normal32_avx2(static_cast<uint64_t>(e >> 2), offset, seed, out + k);
      } else {
        float z[32];
        normal32_avx2(static_cast<uint64_t>(block_start >> 2), offset, seed, z);
        std::copy(z + (e - block_start), z + (e - block_start) + take, out + k);
      }
      k += take;
    }
    return;
  }
#endif
  fill_normals_scalar(seed, offset, first, count, out);
}

}  // namespace diffusion_ext
