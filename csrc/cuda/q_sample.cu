// q_sample on CUDA: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4), with ε given or made here.
// The twin of cpu/q_sample.cpp: same coefficients (QSampleCoefFn, formed per sample in a pre-pass:
// per_sample_coef.cuh), same noise stream, one read of each input and one write of each output per element.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include "../common/philox.h"
#include "../ops.h"
#include "../schedule_args.h"
#include "launch_utils.cuh"
#include "per_sample_coef.cuh"

namespace diffusion_ext {
namespace {

// z[j] for the elements e .. e + n − 1 under per-sample streams: element k of sample b is lane k % 4 of
// Philox block k / 4 of stream offset + b. With per_sample % 4 == 0 (3·64·64, 4·8·8, ...) the group is
// one block of one stream and this is one normal4 call; otherwise a group straddling two samples (or,
// for per_sample < 4, several) needs one call per block it touches.
template <typename acc_t, typename index_t>
__device__ __forceinline__ void per_sample_normals(index_t e, int n, index_t per_sample, uint64_t offset,
                                                   uint64_t seed, acc_t z[4]) {
  acc_t block[4];
  uint64_t have_block = ~uint64_t{0}, have_stream = ~uint64_t{0};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (j >= n) break;
    const index_t b = (e + j) / per_sample, k = e + j - b * per_sample;
    const uint64_t blk = static_cast<uint64_t>(k) >> 2, stream = offset + static_cast<uint64_t>(b);
    if (blk != have_block || stream != have_stream) {
      normal4<acc_t>(blk, stream, seed, block);
      have_block = blk;
      have_stream = stream;
    }
    z[j] = block[k & 3];
  }
}

template <typename scalar_t, typename index_t>
__global__ void q_sample_kernel(
    scalar_t* __restrict__ out,             // [numel] x_t, flat in the layout shared by every tensor here
    scalar_t* __restrict__ noise_out,       // [numel] the noise made here, or nullptr when it is given
    const scalar_t* __restrict__ x0,        // [numel] clean samples
    const scalar_t* __restrict__ noise_in,  // [numel] the given noise, or nullptr when it is made here
    const QSampleCoef<at::opmath_type<scalar_t>>* __restrict__ coefs,  // [B] (√ᾱ, √(1−ᾱ)) at t[b]
    const index_t numel,                    // batch · per_sample
    const index_t per_sample,               // elements of one sample: element i is in sample i / per_sample
    const bool vec,                         // all pointers Vec4-aligned: whole groups move as one vector
    const uint64_t seed,                    // Philox key
    const uint64_t offset,                  // Philox counter words 2-3: one stream per offset
    const bool per_sample_streams) {        // sample b draws from stream offset + b (QSampleArgs)
  using acc_t = at::opmath_type<scalar_t>;
  const index_t groups = num_groups(numel);
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t g = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const index_t e = g * 4;  // first element of the group
    const int n = numel - e < 4 ? static_cast<int>(numel - e) : 4;
    const bool v = vec && n == 4;
    acc_t x[4], z[4], y[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    load4(x0, e, n, v, x);
    if (noise_in != nullptr) {
      load4(noise_in, e, n, v, z);
    } else if (!per_sample_streams) {
      normal4<acc_t>(static_cast<uint64_t>(g), offset, seed, z);  // lane j is element 4g + j
    } else {
      per_sample_normals(e, n, per_sample, offset, seed, z);
    }
    // The group lies in one sample unless per_sample % 4 != 0; then move to the next sample at its
    // first element (per_sample >= 1, so one step per element suffices; sample_end <= numel).
    index_t b = e / per_sample, sample_end = (b + 1) * per_sample;
    QSampleCoef<acc_t> c = coefs[b];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= n) break;
      if (e + j == sample_end) {
        ++b;
        sample_end += per_sample;
        c = coefs[b];
      }
      y[j] = c.a * x[j] + c.s * z[j];  // eq. 4
    }
    store4(out, e, n, v, y);
    if (noise_out != nullptr) store4(noise_out, e, n, v, z);
  }
}

void launch(const QSampleArgs& a) {
  if (a.shape.numel == 0) return;  // nothing to do: prepare_q_sample made the empty outputs
  const c10::cuda::CUDAGuard guard(a.x0.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x0.scalar_type(), "q_sample_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor coef_buf;
    with_q_sample_coefs(a, [&](const auto& fn) {
      coef_buf = per_sample_coefs<acc_t>(fn, a.shape.batch, a.x0.device(), stream);
    });
    const auto* coefs = reinterpret_cast<const QSampleCoef<acc_t>*>(coef_buf.const_data_ptr());
    scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
    scalar_t* noise_out = a.make_noise ? a.noise.mutable_data_ptr<scalar_t>() : nullptr;
    const scalar_t* noise_in = a.make_noise ? nullptr : a.noise.const_data_ptr<scalar_t>();
    const scalar_t* x0 = a.x0.const_data_ptr<scalar_t>();
    const bool vec = can_vectorize<scalar_t>({out, noise_out, x0, noise_in});
    dispatch_index_type(a.shape.numel, [&](auto index) {
      using index_t = decltype(index);
      q_sample_kernel<scalar_t, index_t><<<grid_for(a.shape.numel), kGroupThreads, 0, stream>>>(
          out, noise_out, x0, noise_in, coefs, static_cast<index_t>(a.shape.numel),
          static_cast<index_t>(a.shape.per_sample), vec, a.seed, a.offset, a.per_sample_streams);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

at::Tensor q_sample_cuda(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& noise,
                         const at::Tensor& alphas_cumprod) {
  auto a = prepare_q_sample("diffusion_ext.q_sample", x0, t, noise, alphas_cumprod, 0, 0);
  launch(a);
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> q_sample_with_noise_cuda(const at::Tensor& x0, const at::Tensor& t,
                                                            const at::Tensor& alphas_cumprod, int64_t seed,
                                                            int64_t offset, bool per_sample_streams) {
  auto a = prepare_q_sample("diffusion_ext.q_sample_with_noise", x0, t, std::nullopt, alphas_cumprod, seed,
                            offset);
  a.per_sample_streams = per_sample_streams;
  launch(a);
  return {a.out, a.noise};
}

TORCH_LIBRARY_IMPL(diffusion_ext, CUDA, m) {
  m.impl("q_sample", &q_sample_cuda);
  m.impl("q_sample_with_noise", &q_sample_with_noise_cuda);
}

}  // namespace diffusion_ext
