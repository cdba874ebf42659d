#pragma once
// Entry points of every kernel, one per (op, device). Schemas live in torch_bindings.cpp; each
// implementation file registers its own functions with TORCH_LIBRARY_IMPL.
#include <ATen/core/Tensor.h>
#include <optional>
#include <array>
#include <string_view>
#include <tuple>

namespace diffusion_ext {

#define DX_SCHEDULE_OP_DECLS(dev)                                                                         \
  at::Tensor q_sample_##dev(const at::Tensor& x0, const at::Tensor& t, const at::Tensor& noise,              \
                            const at::Tensor& alphas_cumprod);                                              \
  std::tuple<at::Tensor, at::Tensor> q_sample_with_noise_##dev(                                             \
      const at::Tensor& x0, const at::Tensor& t, const at::Tensor& alphas_cumprod, int64_t seed,           \
      int64_t offset, bool per_sample_streams);                                                             \
  at::Tensor ddpm_step_##dev(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& x_t,   \
                             const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,     \
                             int64_t seed, int64_t offset, bool clip_sample, double clip_range,            \
                             std::string_view variance, std::string_view prediction_type,                  \
                             std::optional<double> guidance_scale,                                          \
                             const std::optional<at::Tensor>& model_output_uncond);                         \
  at::Tensor ddim_step_##dev(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev, \
                             const at::Tensor& x_t, const at::Tensor& alphas_cumprod, double eta,           \
                             const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,         \
                             bool clip_sample, double clip_range, std::string_view prediction_type,        \
                             std::optional<double> guidance_scale,                                          \
                             const std::optional<at::Tensor>& model_output_uncond);                         \
  std::tuple<at::Tensor, at::Tensor> dpmpp_2m_step_##dev(                                                   \
      const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& x_t,  \
      const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& x0_last,                           \
      const std::optional<at::Tensor>& t_last, bool sde, const std::optional<at::Tensor>& noise, int64_t seed, \
      int64_t offset, bool clip_sample, double clip_range, std::string_view prediction_type,              \
      std::optional<double> guidance_scale, const std::optional<at::Tensor>& model_output_uncond);

#define DX_GROUP_NORM_OP_DECLS(dev)                                                                         \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_##dev(                                       \
      const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,                     \
      const std::optional<at::Tensor>& bias, double eps, std::string_view activation,                       \
      const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift);                      \
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_##dev(      \
      const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,        \
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups,   \
      std::string_view activation, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& scale, \
      const std::optional<at::Tensor>& shift, std::array<bool, 2> scale_shift_mask);

#define DX_ATTENTION_OP_DECLS(dev)                                                                          \
  std::tuple<at::Tensor, at::Tensor> attention_##dev(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, \
                                                     double scale);                                                 \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_##dev(                                           \
      const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,                     \
      const at::Tensor& out, const at::Tensor& lse, double scale);

#define DX_DROPOUT_OP_DECLS(dev) \
  at::Tensor dropout_##dev(const at::Tensor& x, double p, int64_t seed, int64_t offset);

DX_SCHEDULE_OP_DECLS(cpu)
DX_SCHEDULE_OP_DECLS(cuda)
DX_GROUP_NORM_OP_DECLS(cpu)
DX_GROUP_NORM_OP_DECLS(cuda)
DX_ATTENTION_OP_DECLS(cpu)
DX_ATTENTION_OP_DECLS(cuda)
DX_DROPOUT_OP_DECLS(cpu)
DX_DROPOUT_OP_DECLS(cuda)

#undef DX_SCHEDULE_OP_DECLS
#undef DX_GROUP_NORM_OP_DECLS
#undef DX_ATTENTION_OP_DECLS

}  // namespace diffusion_ext
