#pragma once
// Launch helpers of the element-wise kernels (q_sample.cu, reverse_step.cu, dropout.cu).
//
// They walk the flat range [0, numel) of tensors that share one batch-outermost layout (schedule_args.h),
// one thread per group of 4 consecutive elements: element e is lane e % 4 of Philox block e / 4
// (common/philox.h), so one Philox call gives a whole group its noise, the same noise the CPU's
// fill_normals gives element e. Groups start at multiples of 4, so they are also the unit of the optional
// vector loads below.
#include <ATen/cuda/CUDAContext.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

namespace diffusion_ext {

constexpr int kGroupThreads = 256;  // threads per block; each handles one group of 4 elements per step

// Groups of a flat range of numel elements; the last one holds numel % 4 elements when that is not 0.
// Written without numel + 3 so that it cannot overflow a 32-bit index_t.
template <typename index_t>
C10_HOST_DEVICE inline index_t num_groups(index_t numel) {
  return numel / 4 + (numel % 4 != 0 ? 1 : 0);
}

// Blocks for numel elements: one wave that fills every SM at full occupancy, fewer for small tensors.
// The kernels' grid-stride loops cover the groups beyond the first wave.
inline dim3 grid_for(int64_t numel) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  const int64_t wave = static_cast<int64_t>(prop->multiProcessorCount) *
                       std::max(1, prop->maxThreadsPerMultiProcessor / kGroupThreads);
  const int64_t need = (num_groups<int64_t>(numel) + kGroupThreads - 1) / kGroupThreads;
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min(need, wave))));
}

// fn(index_t{}) with index_t = int32_t when numel fits it, else int64_t: tensors may exceed 2^31
// elements, but 64-bit division and multiplication cost several instructions each. With int32_t no
// intermediate overflows: every index the kernels form is at most numel (see the schedule kernels' sample_end).
template <typename Fn>
void dispatch_index_type(int64_t numel, const Fn& fn) {
  if (numel <= std::numeric_limits<int32_t>::max()) {
    fn(int32_t{0});
  } else {
    fn(int64_t{0});
  }
}

// Four elements loaded or stored by one instruction (16 bytes for float, 8 for half and bfloat16).
template <typename scalar_t>
struct alignas(4 * sizeof(scalar_t)) Vec4 {
  scalar_t v[4];
};

// True when whole groups can move as Vec4: every given pointer (nullptr = unused) is aligned to a Vec4.
// Not for double, whose Vec4 (32 bytes) is wider than one load on most GPUs.
template <typename scalar_t>
bool can_vectorize(std::initializer_list<const void*> ptrs) {
  if constexpr (4 * sizeof(scalar_t) > 16) {
    return false;
  } else {
    for (const void* p : ptrs) {
      if (p != nullptr && reinterpret_cast<uintptr_t>(p) % (4 * sizeof(scalar_t)) != 0) return false;
    }
    return true;
  }
}

// v[j] = p[e + j] for j < n (n <= 4), 0 beyond; one Vec4 load when vec (then n == 4 and p is aligned).
template <typename acc_t, typename scalar_t, typename index_t>
__device__ __forceinline__ void load4(const scalar_t* __restrict__ p, index_t e, int n, bool vec, acc_t v[4]) {
  if (vec) {
    const Vec4<scalar_t> q = *reinterpret_cast<const Vec4<scalar_t>*>(p + e);
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = static_cast<acc_t>(q.v[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) v[j] = j < n ? static_cast<acc_t>(p[e + j]) : acc_t(0);
  }
}

// p[e + j] = v[j] for j < n, rounded to scalar_t; one Vec4 store when vec.
template <typename acc_t, typename scalar_t, typename index_t>
__device__ __forceinline__ void store4(scalar_t* __restrict__ p, index_t e, int n, bool vec, const acc_t v[4]) {
  if (vec) {
    Vec4<scalar_t> q;
#pragma unroll
    for (int j = 0; j < 4; ++j) q.v[j] = static_cast<scalar_t>(v[j]);
    *reinterpret_cast<Vec4<scalar_t>*>(p + e) = q;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < n) p[e + j] = static_cast<scalar_t>(v[j]);
    }
  }
}

}  // namespace diffusion_ext
