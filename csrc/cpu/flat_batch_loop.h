#pragma once
// The parallel loop of the element-wise schedule ops on the CPU: the flat range [0, numel) is split
// between threads with at::parallel_for, then each thread's range into runs that lie in one sample, so
// that per-sample coefficients are computed once per run and the inner loop is a plain vectorisable
// loop over a tile.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace diffusion_ext {

// Elements per tile: the noise buffer of one tile lives on the stack.
constexpr int64_t kCpuTile = 512;
// Below this many elements a second thread costs more than it saves.
constexpr int64_t kCpuGrain = 32768;

// fn(sample, begin, end) for tiles [begin, end) of at most kCpuTile elements, each within one sample.
template <typename Fn>
void for_each_sample_tile(int64_t numel, int64_t per_sample, const Fn& fn) {
  if (numel == 0) return;
  at::parallel_for(0, numel, kCpuGrain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t sample = i / per_sample;
      const int64_t stop = std::min({end, (sample + 1) * per_sample, i + kCpuTile});
      fn(sample, i, stop);
      i = stop;
    }
  });
}

}  // namespace diffusion_ext
