#pragma once
// Standard normals of the counter-based stream (common/philox.h) for a run of element indices, on the
// CPU. Element e is lane e % 4 of Philox block e / 4, whatever the run's start, so any split of the
// work between threads gives the same noise as the CUDA and Triton kernels.
#include <algorithm>
#include <cstdint>

#include "../common/philox.h"

namespace diffusion_ext {

// out[k] = normal(first + k) for k in [0, count).
template <typename acc_t>
inline void fill_normals(uint64_t seed, uint64_t offset, int64_t first, int64_t count, acc_t* out) {
  int64_t k = 0;
  while (k < count) {
    const int64_t e = first + k;
    const int64_t group = e >> 2;
    const int lane = static_cast<int>(e & 3);
    acc_t z[4];
    normal4<acc_t>(static_cast<uint64_t>(group), offset, seed, z);
    const int take = static_cast<int>(std::min<int64_t>(4 - lane, count - k));
    for (int j = 0; j < take; ++j) out[k + j] = z[lane + j];
    k += take;
  }
}

}  // namespace diffusion_ext
