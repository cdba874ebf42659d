#pragma once
// Two vectors of fp32 lanes rounded once to a 16-bit float dtype and stored: the half-precision store of the
// group-norm and attention kernels. Include after vec_capability.h (it uses the unit's at::vec capability).
#include <ATen/cpu/vec/functional.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

namespace diffusion_ext {

// The first `count` (≤ 2·W) of lo's then hi's lanes, rounded to T, stored at dst. bf16 with AVX512-BF16: one
// vcvtne2ps2bf16 (round to nearest even, as at::vec's conversion, which takes ~8 integer instructions per vector
// instead: perf put it at a sixth of the bf16 attention forward). It flushes inputs below 2^-126 to zero.
template <typename T>
inline void store_rounded(const at::vec::Vectorized<float>& lo, const at::vec::Vectorized<float>& hi, T* dst,
                          int64_t count) {
#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const __m512i r = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
    if (count == 32) {
      _mm512_storeu_si512(dst, r);
    } else {
      _mm512_mask_storeu_epi16(dst, static_cast<__mmask32>((uint64_t(1) << count) - 1), r);
    }
    return;
  }
#endif
  at::vec::convert_from_float<T>(lo, hi).store(dst, static_cast<int>(count));
}

}  // namespace diffusion_ext
