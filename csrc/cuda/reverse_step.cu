// ddpm_step, ddim_step and dpmpp_2m_step on CUDA, the twin of cpu/reverse_step.cpp. All are one
// element-wise formula with per-sample coefficients (common/schedule_math.h): x̂0 = clip(ax·x + am·m),
// x_prev = c0·x̂0 + c1·(x̂0 − x̂0_last) + bx·x + bm·m + s·z, where m is the model output, combined with the
// unconditional output first when guidance is on (Ho & Salimans 2022), all in one pass over memory;
// DPM-Solver++ also writes x̂0 and, at second order, reads x̂0_last. The per-sample coefficients come
// from a pre-pass (per_sample_coef.cuh) that forms them in double.
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

template <typename scalar_t, typename index_t>
__global__ void reverse_step_kernel(
    scalar_t* __restrict__ out,             // [numel] x_prev, flat in the layout shared by every tensor here
    const scalar_t* __restrict__ x,         // [numel] x_t
    const scalar_t* __restrict__ m,         // [numel] model output (the conditional one when guided)
    const scalar_t* __restrict__ m_uncond,  // [numel] unconditional model output, or nullptr: no guidance
    const scalar_t* __restrict__ noise,     // [numel] given z, or nullptr (made here, or none: DDIM η = 0)
    const scalar_t* __restrict__ x0_last,   // [numel] the last step's x̂0 (DPM-Solver++(2M)), or nullptr
    scalar_t* __restrict__ x0_out,          // [numel] this step's x̂0 (DPM-Solver++), or nullptr: not written
    const StepCoef<at::opmath_type<scalar_t>>* __restrict__ coefs,  // [B] at t[b] (and t_prev[b], t_last[b])
    const index_t numel,                    // batch · per_sample
    const index_t per_sample,               // elements of one sample: element i is in sample i / per_sample
    const at::opmath_type<scalar_t> w,      // guidance scale: m = m_u + w·(m − m_u)
    const at::opmath_type<scalar_t> clip_range,  // r of clip(x̂0) to [−r, r]; +∞ when clipping is off
    const bool make_noise,                  // z from Philox(seed, offset) rather than from `noise`
    const bool vec,                         // all pointers Vec4-aligned: whole groups move as one vector
    const uint64_t seed,                    // Philox key
    const uint64_t offset) {                // Philox counter words 2-3: one stream per offset
  using acc_t = at::opmath_type<scalar_t>;
  const index_t groups = num_groups(numel);
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t g = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups; g += stride) {
    const index_t e = g * 4;  // first element of the group
    const int n = numel - e < 4 ? static_cast<int>(numel - e) : 4;
    const bool v = vec && n == 4;
    acc_t xv[4], mv[4], z[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    acc_t y[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)}, x0[4] = {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
    acc_t last[4];
    load4(x, e, n, v, xv);
    load4(m, e, n, v, mv);
    if (m_uncond != nullptr) {
      acc_t mu[4];
      load4(m_uncond, e, n, v, mu);
#pragma unroll
      for (int j = 0; j < 4; ++j) mv[j] = guide(mv[j], mu[j], w);
    }
    // The group lies in one sample unless per_sample % 4 != 0; then move to the next sample at its
    // first element (per_sample >= 1, so one step per element suffices; sample_end <= numel).
    index_t b = e / per_sample, sample_end = (b + 1) * per_sample;
    StepCoef<acc_t> c = coefs[b];
    // Noise is read or made unless the whole group lies in one sample whose step adds none (s = 0:
    // DDPM at t = 0, DDIM with σ = 0). Elements of a sample with s = 0 still take z = 0 below.
    if (c.s != acc_t(0) || e + n > sample_end) {
      if (make_noise) {
        normal4<acc_t>(static_cast<uint64_t>(g), offset, seed, z);  // lane j is element 4g + j
      } else if (noise != nullptr) {
        load4(noise, e, n, v, z);
      }
    }
    if (x0_last != nullptr) load4(x0_last, e, n, v, last);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j >= n) break;
      if (e + j == sample_end) {
        ++b;
        sample_end += per_sample;
        c = coefs[b];
      }
      x0[j] = predict_x0(c, xv[j], mv[j], clip_range);
      const acc_t zj = c.s == acc_t(0) ? acc_t(0) : z[j];
      y[j] = x0_last != nullptr ? reverse_step<true>(c, xv[j], mv[j], x0[j], last[j], zj)
                                : reverse_step<false>(c, xv[j], mv[j], x0[j], x0[j], zj);
    }
    store4(out, e, n, v, y);
    if (x0_out != nullptr) store4(x0_out, e, n, v, x0);
  }
}

template <typename scalar_t>
void launch_kernel(const ReverseStepArgs& a, const StepCoef<at::opmath_type<scalar_t>>* coefs,
                   cudaStream_t stream) {
  using acc_t = at::opmath_type<scalar_t>;
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* m = a.model_output.const_data_ptr<scalar_t>();
  const scalar_t* mu = a.guided ? a.model_output_uncond.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* noise = a.noise.defined() ? a.noise.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* last = a.x0_last.defined() ? a.x0_last.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* x0_out = a.x0_out.defined() ? a.x0_out.mutable_data_ptr<scalar_t>() : nullptr;
  const bool vec = can_vectorize<scalar_t>({out, x, m, mu, noise, last, x0_out});
  dispatch_index_type(a.shape.numel, [&](auto index) {
    using index_t = decltype(index);
    reverse_step_kernel<scalar_t, index_t><<<grid_for(a.shape.numel), kGroupThreads, 0, stream>>>(
        out, x, m, mu, noise, last, x0_out, coefs, static_cast<index_t>(a.shape.numel),
        static_cast<index_t>(a.shape.per_sample), static_cast<acc_t>(a.guidance_scale),
        static_cast<acc_t>(a.clip_range), a.make_noise, vec, a.seed, a.offset);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch(const ReverseStepArgs& a) {
  if (a.shape.numel == 0) return;  // nothing to do: prepare_* made the empty output
  const c10::cuda::CUDAGuard guard(a.x.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "reverse_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor coef_buf;
    with_step_coefs(a, [&](const auto& fn) {
      coef_buf = per_sample_coefs<acc_t>(fn, a.shape.batch, a.x.device(), stream);
    });
    launch_kernel<scalar_t>(a, reinterpret_cast<const StepCoef<acc_t>*>(coef_buf.const_data_ptr()), stream);
  });
}

}  // namespace

at::Tensor ddpm_step_cuda(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& x_t,
                          const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise, int64_t seed,
                          int64_t offset, bool clip_sample, double clip_range, std::string_view variance,
                          std::string_view prediction_type, std::optional<double> guidance_scale,
                          const std::optional<at::Tensor>& model_output_uncond) {
  auto a = prepare_ddpm_step(model_output, t, x_t, alphas_cumprod, noise, seed, offset, clip_sample, clip_range,
                             variance, prediction_type, guidance_scale, model_output_uncond);
  launch(a);
  return a.out;
}

at::Tensor ddim_step_cuda(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
                          const at::Tensor& x_t, const at::Tensor& alphas_cumprod, double eta,
                          const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, bool clip_sample,
                          double clip_range, std::string_view prediction_type,
                          std::optional<double> guidance_scale,
                          const std::optional<at::Tensor>& model_output_uncond) {
  auto a = prepare_ddim_step(model_output, t, t_prev, x_t, alphas_cumprod, eta, noise, seed, offset, clip_sample,
                             clip_range, prediction_type, guidance_scale, model_output_uncond);
  launch(a);
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> dpmpp_2m_step_cuda(
    const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& x_t,
    const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& x0_last, const std::optional<at::Tensor>& t_last,
    bool sde, const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, bool clip_sample, double clip_range,
    std::string_view prediction_type, std::optional<double> guidance_scale,
    const std::optional<at::Tensor>& model_output_uncond) {
  auto a = prepare_dpmpp_2m_step(model_output, t, t_prev, x_t, alphas_cumprod, x0_last, t_last, sde, noise, seed,
                                 offset, clip_sample, clip_range, prediction_type, guidance_scale,
                                 model_output_uncond);
  launch(a);
  return {a.out, a.x0_out};
}

TORCH_LIBRARY_IMPL(diffusion_ext, CUDA, m) {
  m.impl("ddpm_step", &ddpm_step_cuda);
  m.impl("ddim_step", &ddim_step_cuda);
  m.impl("dpmpp_2m_step", &dpmpp_2m_step_cuda);
}

}  // namespace diffusion_ext
