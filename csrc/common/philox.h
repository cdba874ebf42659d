#pragma once
// Counter-based normal noise shared by the CPU, CUDA and Triton kernels (diffusion_ext/triton/philox.py
// implements the same function), so that one (seed, offset) gives the same noise on every backend.
//
// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a bijection of a
// 128-bit counter under a 64-bit key, ten rounds. The stream is laid out as:
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(g), hi32(g), lo32(offset), hi32(offset))  with g = element_index / 4
// so element e takes lane e % 4 of block g. The offset lives in its own counter words, which makes the
// streams of offsets k and k+1 independent (they are not shifted copies of each other).
//
// Uniforms take the top 23 bits: u = ((x >> 9) + 1/2) * 2^-23, exact in fp32 (24 significant bits) and
// so the same number in fp32 and fp64 on every backend, strictly inside (0, 1), so log(u) is finite. Normals by Box-Muller: lanes (0,1) from (u0,u1), lanes (2,3) from (u2,u3):
//   z0 = r cos(2π u1), z1 = r sin(2π u1), r = sqrt(-2 ln u0).
#include <cstdint>
#include <cmath>
#include "macros.h"

namespace diffusion_ext {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;  // sqrt(3) - 1
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t x[4];
};

DX_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

DX_HOST_DEVICE Philox4 philox4x32_10(uint64_t group, uint64_t offset, uint64_t seed) {
  uint32_t c0 = static_cast<uint32_t>(group), c1 = static_cast<uint32_t>(group >> 32);
  uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kPhiloxM0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(kPhiloxM1, c2, &hi1);
    c0 = hi1 ^ c1 ^ k0;
    c1 = lo1;
    c2 = hi0 ^ c3 ^ k1;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// ((x >> 9) + 0.5) scaled by 2^-23: exact in fp32, in [2^-24, 1 - 2^-24].
DX_HOST_DEVICE float uniform_open01(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-07f;
}

// The four standard normals of one Philox block, computed in acc_t (float, or double for fp64 tensors).
template <typename acc_t>
DX_HOST_DEVICE void normal4(uint64_t group, uint64_t offset, uint64_t seed, acc_t out[4]) {
  const Philox4 r = philox4x32_10(group, offset, seed);
  constexpr acc_t kTwoPi = static_cast<acc_t>(6.283185307179586476925286766559);
  for (int pair = 0; pair < 2; ++pair) {
    const acc_t u0 = static_cast<acc_t>(uniform_open01(r.x[2 * pair]));
    const acc_t u1 = static_cast<acc_t>(uniform_open01(r.x[2 * pair + 1]));
    const acc_t r2 = static_cast<acc_t>(-2) * std::log(u0);  // > 0 for u0 < 1; guard an approximate log
    const acc_t radius = std::sqrt(r2 > acc_t(0) ? r2 : acc_t(0));
    const acc_t theta = kTwoPi * u1;
    out[2 * pair] = radius * std::cos(theta);
    out[2 * pair + 1] = radius * std::sin(theta);
  }
}

}  // namespace diffusion_ext
