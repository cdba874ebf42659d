// dropout on CUDA: y = x·keep/(1 − p), keep regenerated from (seed, offset) (common/dropout_mask.h). The
// twin of cpu/dropout.cpp: one thread per group of 4 elements, whose 4 keep decisions are the 4 words of
// one Philox block (launch_utils.cuh), one read and one write per element, vector loads when aligned.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common/dropout_mask.h"
#include "../common/philox.h"
#include "../dropout_args.h"
#include "../ops.h"
#include "launch_utils.cuh"

namespace diffusion_ext {
namespace {

template <typename scalar_t, typename index_t>
__global__ void dropout_kernel(scalar_t* __restrict__ y,        // [numel] in x's memory order
                               const scalar_t* __restrict__ x,  // [numel] dense
                               const index_t numel,
                               const bool vec,                  // both pointers Vec4-aligned
                               const uint32_t threshold,        // keep iff the word's top 23 bits >= threshold
                               const at::opmath_type<scalar_t> scale,  // 1 / (1 − p)
                               const uint64_t seed, const uint64_t offset) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t groups = num_groups(numel);
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t g = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const index_t e = g * 4;
    const int n = numel - e < 4 ? static_cast<int>(numel - e) : 4;
    const bool v = vec && n == 4;
    acc_t a[4];
    load4(x, e, n, v, a);
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(g), offset, seed);  // word j: element 4g + j
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // a multiply, not a select: NaN and inf stay NaN where dropped, as on the CPU
      a[j] *= dropout_keeps(r.x[j], threshold) ? scale : acc_t(0);
    }
    store4(y, e, n, v, a);
  }
}

}  // namespace

at::Tensor dropout_cuda(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  auto a = prepare_dropout(x, p, seed, offset);
  const int64_t numel = a.x.numel();
  if (numel == 0) return a.out;
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "dropout_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    scalar_t* y = a.out.mutable_data_ptr<scalar_t>();
    const scalar_t* xp = a.x.const_data_ptr<scalar_t>();
    const bool vec = can_vectorize<scalar_t>({y, xp});
    dispatch_index_type(numel, [&](auto index) {
      using index_t = decltype(index);
      dropout_kernel<scalar_t, index_t><<<grid_for(numel), kGroupThreads, 0, stream>>>(
          y, xp, static_cast<index_t>(numel), vec, a.threshold, static_cast<acc_t>(a.scale), a.seed, a.offset);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return a.out;
}

TORCH_LIBRARY_IMPL(diffusion_ext, CUDA, m) { m.impl("dropout", &dropout_cuda); }

}  // namespace diffusion_ext
