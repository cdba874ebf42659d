#pragma once
// Which elements dropout keeps, shared by the CPU and CUDA kernels (diffusion_ext/triton/dropout.py and
// reference.dropout compute the same): element e of the flat tensor takes the 32-bit Philox word of lane
// e % 4 of block e / 4 under (seed, offset), the stream layout of common/philox.h, and is kept when the
// word's top 23 bits are at least `threshold` = round(p·2^23). So an element is dropped with probability
// threshold / 2^23 (p to within 6e-8), the decision is an exact integer compare on every backend, and
// the backward regenerates the same mask from (seed, offset) instead of storing it.
#include <cstdint>
#include <cmath>

#include "macros.h"

namespace diffusion_ext {

constexpr int kDropoutBits = 23;  // the top bits of a Philox word that a keep decision reads

// round(p·2^23) for p in [0, 1): in [0, 2^23]; p = 0 keeps every element.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(std::llround(std::ldexp(p, kDropoutBits)));
}

DX_HOST_DEVICE bool dropout_keeps(uint32_t word, uint32_t threshold) {
  return (word >> (32 - kDropoutBits)) >= threshold;
}

}  // namespace diffusion_ext
