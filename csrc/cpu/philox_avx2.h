#pragma once
// The counter-based stream of common/philox.h on the CPU, eight Philox blocks per AVX2 register, and the
// walk that turns any run of element indices into whole 32-element blocks of it. Shared by the normals
// of normal_fill.h and the dropout mask of dropout.cpp. Element e is lane e % 4 of block e / 4 whatever
// the run's start, so any split of the work between threads gives what the CUDA and Triton kernels give.
#include "vec_capability.h"

#include <algorithm>
#include <cstdint>

#include "../common/philox.h"

namespace diffusion_ext {

#ifdef DIFFUSION_EXT_AVX2
// hi32(a·m) for 8 uint32 lanes: _mm256_mul_epu32 multiplies the even lanes to 64 bits; the odd lanes
// are shifted down into even position for a second multiply.
inline __m256i mulhi_epu32(__m256i a, __m256i m) {
  const __m256i even = _mm256_srli_epi64(_mm256_mul_epu32(a, m), 32);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  return _mm256_blend_epi32(even, odd, 0xAA);  // odd lanes: the high words of the odd products
}

// philox4x32_10 of common/philox.h for blocks group0 .. group0 + 8·kBatches − 1: c[j][q] holds output
// word j of blocks group0 + 8q .. group0 + 8q + 7, one per lane. Each round is a chain of dependent
// multiplies, so several independent registers go through the rounds together to keep the multipliers busy.
template <int kBatches>
inline void philox_avx2(uint64_t group0, uint64_t offset, uint64_t seed, __m256i (&c)[4][kBatches]) {
  for (int q = 0; q < kBatches; ++q) {
    alignas(32) uint32_t lo[8], hi[8];
    for (int l = 0; l < 8; ++l) {  // block group0 + 8q + l, a 64-bit counter split in two words
      const uint64_t g = group0 + 8 * q + l;
      lo[l] = static_cast<uint32_t>(g);
      hi[l] = static_cast<uint32_t>(g >> 32);
    }
    c[0][q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    c[1][q] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    c[2][q] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset)));
    c[3][q] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(offset >> 32)));
  }
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const __m256i key0 = _mm256_set1_epi32(static_cast<int>(k0)), key1 = _mm256_set1_epi32(static_cast<int>(k1));
    for (int q = 0; q < kBatches; ++q) {
      const __m256i n0 = _mm256_xor_si256(_mm256_xor_si256(mulhi_epu32(c[2][q], m1), c[1][q]), key0);
      const __m256i n2 = _mm256_xor_si256(_mm256_xor_si256(mulhi_epu32(c[0][q], m0), c[3][q]), key1);
      c[1][q] = _mm256_mullo_epi32(c[2][q], m1);
      c[3][q] = _mm256_mullo_epi32(c[0][q], m0);
      c[0][q] = n0;
      c[2][q] = n2;
    }
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
}
#endif

// out[k] = value(first + k) for k in [0, count), where make(group0, batches, dst) writes the values of the
// 32·batches elements of blocks group0 .. group0 + 8·batches − 1 (batches 1 or 4) in element order. Every
// element comes from a whole 32-element block, also in a partial block at either end, so a value does not
// depend on where a thread's range starts.
template <typename T, typename Make>
inline void fill_in_blocks(int64_t first, int64_t count, T* out, const Make& make) {
  int64_t k = 0;
  while (k < count) {
    const int64_t e = first + k;
    if ((e & 127) == 0 && count - k >= 128) {
      make(static_cast<uint64_t>(e >> 2), 4, out + k);
      k += 128;
      continue;
    }
    const int64_t block_start = e & ~int64_t{31};
    const int64_t take = std::min<int64_t>(count - k, block_start + 32 - e);
    if (take == 32) {
      make(static_cast<uint64_t>(e >> 2), 1, out + k);
    } else {
      T z[32];
      make(static_cast<uint64_t>(block_start >> 2), 1, z);
      std::copy(z + (e - block_start), z + (e - block_start) + take, out + k);
    }
    k += take;
  }
}

}  // namespace diffusion_ext
