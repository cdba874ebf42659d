#pragma once
// Validation and normalisation of group_norm_act's arguments, shared by the CPU and CUDA entry points
// (and, with allocate = false, by the Triton launcher through _C).
//
// x is (N, C, *spatial) and is seen as (N, C, HW) in one of two layouts, both read without a copy:
//   channels_first (contiguous): element (n, c, s) at n·C·HW + c·HW + s — a group is one contiguous run;
//   channels_last  (NHWC, NDHWC, or (N, C, L) with C innermost): at n·HW·C + s·C + c.
// Anything else (a strided view) is made contiguous first. mean and rstd are (N, G) in the accumulation
// dtype (fp32, or fp64 for fp64 x).
// The optional FiLM inputs scale and shift (common/film.h) are (N, C) in x's dtype, element (n, c) at
// n·stride(0) + c: a view with unit channel stride (one half of torch.chunk(emb, 2, dim=1), as the U-Nets
// make them) is read as it is; anything else is made contiguous first (N·C elements, not x's size).
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <string_view>

#include "common/activations.h"

namespace diffusion_ext {

struct GroupNormShape {
  int64_t N = 0, C = 0, HW = 0, G = 0;
  int64_t channels_per_group() const { return G ? C / G : 0; }
  bool channels_last = false;
};

struct GroupNormArgs {
  at::Tensor x, weight, bias;  // weight, bias: (C) or undefined (affine = false: γ = 1, β = 0); x's dtype,
                               // or float32 with a half x (group_norm_args.cpp check_affine)
  at::Tensor scale, shift;     // (N, C) or undefined (s = 0, t = 0)
  at::Tensor y, mean, rstd;
  GroupNormShape shape;
  double eps = 1e-5;
  Activation activation = Activation::kSilu;
  bool film() const { return scale.defined() || shift.defined(); }
};

struct GroupNormBackwardArgs {
  at::Tensor grad_y, x, mean, rstd, weight, bias, scale, shift;
  at::Tensor grad_x, grad_weight, grad_bias;  // undefined where output_mask is false or weight is absent;
                                              // grad_weight, grad_bias in the parameters' dtype
  at::Tensor grad_scale, grad_shift;          // (N, C) contiguous; undefined where scale_shift_mask is false
                                              // or the input is absent
  std::array<bool, 3> output_mask{true, true, true};
  GroupNormShape shape;
  Activation activation = Activation::kSilu;
  bool film() const { return scale.defined() || shift.defined(); }
};

Activation parse_activation(const char* op, std::string_view name);

GroupNormArgs prepare_group_norm_act(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, double eps, std::string_view activation,
                                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                     bool allocate = true);

GroupNormBackwardArgs prepare_group_norm_act_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& mean, const at::Tensor& rstd,
                                                      const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias, int64_t num_groups,
                                                      std::string_view activation,
                                                      std::array<bool, 3> output_mask,
                                                      const std::optional<at::Tensor>& scale,
                                                      const std::optional<at::Tensor>& shift,
                                                      std::array<bool, 2> scale_shift_mask, bool allocate = true);

}  // namespace diffusion_ext
