// q_sample on the CPU: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4), with ε given or made here.
// One read of each input and one write of each output per element.
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

template <typename scalar_t, typename CoefFn>
void q_sample_kernel(const QSampleArgs& a, const CoefFn& coef) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x0 = a.x0.const_data_ptr<scalar_t>();
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  if (!a.make_noise) {
    const scalar_t* noise = a.noise.const_data_ptr<scalar_t>();
    for_each_sample_tile(a.shape.numel, a.shape.per_sample, [&](int64_t b, int64_t begin, int64_t end) {
      const auto c = round_coef<acc_t>(coef(b));
      for (int64_t i = begin; i < end; ++i) {
        out[i] = static_cast<scalar_t>(c.a * static_cast<acc_t>(x0[i]) + c.s * static_cast<acc_t>(noise[i]));
      }
    });
    return;
  }
  scalar_t* noise = a.noise.mutable_data_ptr<scalar_t>();
  for_each_sample_tile(a.shape.numel, a.shape.per_sample, [&](int64_t b, int64_t begin, int64_t end) {
    const auto c = round_coef<acc_t>(coef(b));
    acc_t z[kCpuTile];
    const int64_t n = end - begin;
    if (a.per_sample_streams) {  // a tile lies in one sample: element begin − b·per_sample of stream offset + b
      fill_normals<acc_t>(a.seed, a.offset + static_cast<uint64_t>(b), begin - b * a.shape.per_sample, n, z);
    } else {
      fill_normals<acc_t>(a.seed, a.offset, begin, n, z);
    }
    for (int64_t k = 0; k < n; ++k) {
      const int64_t i = begin + k;
      noise[i] = static_cast<scalar_t>(z[k]);
      out[i] = static_cast<scalar_t>(c.a * static_cast<acc_t>(x0[i]) + c.s * z[k]);
    }
  });
}

void launch(const QSampleArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x0.scalar_type(), "q_sample_cpu", [&] {
    with_q_sample_coefs(a, [&](const auto& coef) { q_sample_kernel<scalar_t>(a, coef); });
  });
}

}  // namespace

at::Tensor q_sample_cpu(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& noise,
                        const at::Tensor& alphas_cumprod) {
  auto a = prepare_q_sample("diffusion_ext.q_sample", x0, t, noise, alphas_cumprod, 0, 0);
  launch(a);
  return a.out;
}

std::tuple<at::Tensor, at::Tensor> q_sample_with_noise_cpu(const at::Tensor& x0, const at::Tensor& t,
                                                           const at::Tensor& alphas_cumprod, int64_t seed,
                                                           int64_t offset, bool per_sample_streams) {
  auto a = prepare_q_sample("diffusion_ext.q_sample_with_noise", x0, t, std::nullopt, alphas_cumprod, seed,
                            offset);
  a.per_sample_streams = per_sample_streams;
  launch(a);
  return {a.out, a.noise};
}

TORCH_LIBRARY_IMPL(diffusion_ext, CPU, m) {
  m.impl("q_sample", &q_sample_cpu);
  m.impl("q_sample_with_noise", &q_sample_with_noise_cpu);
}

}  // namespace diffusion_ext
