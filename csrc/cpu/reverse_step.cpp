// ddpm_step, ddim_step and dpmpp_2m_step on the CPU. All are one element-wise formula with per-sample
// coefficients (common/schedule_math.h): x̂0 = clip(ax·x + am·m), x_prev = c0·x̂0 + c1·(x̂0 − x̂0_last) +
// bx·x + bm·m + s·z, where m is the model output, combined with the unconditional output first when
// guidance is on (all in one pass); DPM-Solver++ also writes x̂0, and reads x̂0_last at second order.
// vec_capability.h (through normal_fill.h) must precede every other ATen header.
#include "normal_fill.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "../ops.h"
#include "../schedule_args.h"
#include "flat_batch_loop.h"

namespace diffusion_ext {
namespace {

// What an element reads and writes besides x, m and out, as template arguments rather than branches in
// the inner loop, so that every variant vectorises: guidance (m_u), x̂0 written (DPM-Solver++), x̂0_last read
// (its second order).
struct Variant {
  bool guided, write_x0, read_last;
};

template <typename scalar_t, Variant kV, typename CoefFn>
void reverse_step_kernel(const ReverseStepArgs& a, const CoefFn& coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* m = a.model_output.const_data_ptr<scalar_t>();
  const scalar_t* mu = kV.guided ? a.model_output_uncond.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* last = kV.read_last ? a.x0_last.const_data_ptr<scalar_t>() : nullptr;
  const scalar_t* noise = a.noise.defined() ? a.noise.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  scalar_t* x0_out = kV.write_x0 ? a.x0_out.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t w = static_cast<acc_t>(a.guidance_scale);
  const acc_t r = static_cast<acc_t>(a.clip_range);
  for_each_sample_tile(a.shape.numel, a.shape.per_sample, [&](int64_t b, int64_t begin, int64_t end) {
    const StepCoef<acc_t> c = round_coef<acc_t>(coef(b));
    const int64_t n = end - begin;
    acc_t z[kCpuTile];
    if (c.s == acc_t(0)) {
      std::fill(z, z + n, acc_t(0));  // no noise at this step: none read, none made
    } else if (a.make_noise) {
      fill_normals<acc_t>(a.seed, a.offset, begin, n, z);
    } else {
      for (int64_t k = 0; k < n; ++k) z[k] = static_cast<acc_t>(noise[begin + k]);
    }
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = begin + k;
      const acc_t xi = static_cast<acc_t>(x[i]);
      acc_t mi = static_cast<acc_t>(m[i]);
      if constexpr (kV.guided) mi = guide(mi, static_cast<acc_t>(mu[i]), w);
      const acc_t x0 = predict_x0(c, xi, mi, r);
      const acc_t x0_last = kV.read_last ? static_cast<acc_t>(last[i]) : x0;
      out[i] = static_cast<scalar_t>(reverse_step<kV.read_last>(c, xi, mi, x0, x0_last, z[k]));
      if constexpr (kV.write_x0) x0_out[i] = static_cast<scalar_t>(x0);
    }
  });
}

template <typename scalar_t, bool kGuided, typename CoefFn>
void reverse_step_kernel(const ReverseStepArgs& a, const CoefFn& coef) {
  if (a.kind != StepKind::kDpmSolver) {
    reverse_step_kernel<scalar_t, Variant{kGuided, false, false}>(a, coef);
  } else if (a.x0_last.defined()) {
    reverse_step_kernel<scalar_t, Variant{kGuided, true, true}>(a, coef);
  } else {
    reverse_step_kernel<scalar_t, Variant{kGuided, true, false}>(a, coef);
  }
}

template <typename scalar_t, typename CoefFn>
void reverse_step_kernel(const ReverseStepArgs& a, const CoefFn& coef) {
  if (a.guided) {
    reverse_step_kernel<scalar_t, true>(a, coef);
  } else {
    reverse_step_kernel<scalar_t, false>(a, coef);
  }
}

void launch(const ReverseStepArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "reverse_step_cpu", [&] {
    with_step_coefs(a, [&](const auto& coef) { reverse_step_kernel<scalar_t>(a, coef); });
  });
}

}  // namespace

at::Tensor ddpm_step_cpu(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& x_t,
                         const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise, int64_t seed,
                         int64_t offset, bool clip_sample, double clip_range, std::string_view variance,
                         std::string_view prediction_type, std::optional<double> guidance_scale,
                         const std::optional<at::Tensor>& model_output_uncond) {
  auto a = prepare_ddpm_step(model_output, t, x_t, alphas_cumprod, noise, seed, offset, clip_sample, clip_range,
                             variance, prediction_type, guidance_scale, model_output_uncond);
  launch(a);
  return a.out;
}

at::Tensor ddim_step_cpu(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
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

std::tuple<at::Tensor, at::Tensor> dpmpp_2m_step_cpu(
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

TORCH_LIBRARY_IMPL(diffusion_ext, CPU, m) {
  m.impl("ddpm_step", &ddpm_step_cpu);
  m.impl("ddim_step", &ddim_step_cpu);
  m.impl("dpmpp_2m_step", &dpmpp_2m_step_cpu);
}

}  // namespace diffusion_ext
