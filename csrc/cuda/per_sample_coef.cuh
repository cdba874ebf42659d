#pragma once
// The per-sample coefficient pre-pass of the schedule kernels (q_sample.cu, reverse_step.cu).
//
// Each sample's coefficients are formed in double (common/schedule_math.h says why) by one thread per
// sample and stored rounded to the accumulation type; the element-wise kernel that follows on the same
// stream reads coefs[b]. Forming them per element would cost ~300 double-precision instructions per
// 4 elements and make a memory-bound step compute-bound; here it costs one small launch. A timestep the
// host could not check without a sync (a device tensor) gives that sample NaN, as the Triton kernels do:
// the functors form NaN coefficients and never read outside the table (csrc/tests/device_timesteps_test.cpp).
// No device assert: it would poison the process's CUDA context for every later call (DESIGN.md section 4).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "../common/schedule_math.h"

namespace diffusion_ext {

constexpr int kCoefThreads = 128;

template <typename acc_t, typename CoefFn, typename Out>
__global__ void per_sample_coef_kernel(Out* __restrict__ out,  // [batch] coefficients rounded to acc_t
                                       const CoefFn coef,     // sample b -> CoefFn::Coef in double
                                       const int64_t batch) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  out[b] = round_coef<acc_t>(coef(b));
}

// The [batch] coefficients of coef, rounded to acc_t, in a device buffer from the caching allocator
// (safe under CUDA-graph capture); keep the returned tensor alive until the consuming kernel is queued.
template <typename acc_t, typename CoefFn>
at::Tensor per_sample_coefs(const CoefFn& coef, int64_t batch, const at::Device& device, cudaStream_t stream) {
  using Out = decltype(round_coef<acc_t>(coef(0)));
  at::Tensor buf = at::empty({batch * static_cast<int64_t>(sizeof(Out))},
                             at::TensorOptions().dtype(at::kByte).device(device));
  const int64_t blocks = (batch + kCoefThreads - 1) / kCoefThreads;
  per_sample_coef_kernel<acc_t, CoefFn, Out><<<static_cast<unsigned>(blocks), kCoefThreads, 0, stream>>>(
      reinterpret_cast<Out*>(buf.mutable_data_ptr()), coef, batch);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return buf;
}

}  // namespace diffusion_ext
