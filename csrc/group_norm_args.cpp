#include "group_norm_args.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <cmath>

#include "checks.h"

namespace diffusion_ext {
namespace {

constexpr const char* kOp = "diffusion_ext.group_norm_act";
constexpr const char* kBackward = "diffusion_ext.group_norm_act_backward";

// channels_last in the sense of group_norm_args.h: C innermost (stride 1), the spatial dims dense
// around it in any order, the batch outermost.
bool is_channels_last(const at::Tensor& x) {
  if (x.dim() < 3 || x.size(1) == 1) return false;
  if (x.is_contiguous()) return false;  // C·HW with HW = 1 is both; call it channels_first
  if (x.stride(1) != 1) return false;
  const auto t = x.movedim(1, -1);  // (N, *spatial, C): dense in its own order?
  return t.is_non_overlapping_and_dense() && (x.size(0) == 1 || x.stride(0) == x.numel() / x.size(0));
}

bool given(const std::optional<at::Tensor>& p) { return p.has_value() && p->defined(); }

void check_dtype_and_device(const char* op, const char* name, const at::Tensor& p, const at::Tensor& x) {
  TORCH_CHECK_TYPE(p.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", p.scalar_type(),
                   " but x has dtype ", x.scalar_type(), "; expected the same dtype");
  TORCH_CHECK(p.device() == x.device(), op, ": ", name, " is on ", p.device(), " but x is on ", x.device(),
              "; expected the same device");
}

// γ and β: x's dtype, or float32 with a float16/bfloat16 x (mixed precision: an autocast model's fp32
// parameters on its half activations, read without a cast per call; their gradients come back in float32,
// summed without rounding to the activations' dtype). Both in one dtype when both are given.
void check_affine(const char* op, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& x) {
  const bool half = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  for (const auto* p : {&weight, &bias}) {
    if (!given(*p)) continue;
    const char* name = p == &weight ? "weight" : "bias";
    TORCH_CHECK((*p)->dim() == 1 && (*p)->size(0) == x.size(1), op, ": ", name, " has shape ", (*p)->sizes(),
                "; expected [", x.size(1), "], one value per channel");
    const auto st = (*p)->scalar_type();
    TORCH_CHECK_TYPE(st == x.scalar_type() || (half && st == at::kFloat), op, ": ", name, " has dtype ", st,
                     " but x has dtype ", x.scalar_type(), "; expected x's dtype",
                     half ? " or float32" : "");
    TORCH_CHECK((*p)->device() == x.device(), op, ": ", name, " is on ", (*p)->device(), " but x is on ",
                x.device(), "; expected the same device");
  }
  TORCH_CHECK_TYPE(!given(weight) || !given(bias) || weight->scalar_type() == bias->scalar_type(), op,
                   ": weight has dtype ", weight->scalar_type(), " but bias has dtype ",
                   bias->scalar_type(), "; expected the same dtype");
}

// scale or shift of FiLM (common/film.h): (N, C), one value per sample and channel.
void check_film(const char* op, const char* name, const std::optional<at::Tensor>& p, const at::Tensor& x) {
  if (!given(p)) return;
  TORCH_CHECK(p->dim() == 2 && p->size(0) == x.size(0) && p->size(1) == x.size(1), op, ": ", name, " has shape ",
              p->sizes(), "; expected [", x.size(0), ", ", x.size(1), "], one value per sample and channel (N, C)");
  check_dtype_and_device(op, name, *p, x);
}

// The FiLM input as the kernels read it, (n, c) at n·stride(0) + c: as given when its channels are adjacent.
at::Tensor film_operand(const std::optional<at::Tensor>& p) {
  if (!given(p)) return {};
  return p->size(1) <= 1 || p->stride(1) == 1 ? *p : p->contiguous();
}

GroupNormShape shape_of(const char* op, const at::Tensor& x, int64_t num_groups) {
  TORCH_CHECK(x.dim() >= 2, op, ": x has shape ", x.sizes(), "; expected (N, C, *) with at least 2 dims");
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": x has dtype ", st, "; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK_VALUE(num_groups >= 1, op, ": num_groups = ", num_groups, "; expected at least 1");
  TORCH_CHECK_VALUE(x.size(1) % num_groups == 0, op, ": the ", x.size(1),
                    " channels of x are not divisible by num_groups = ", num_groups);
  GroupNormShape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.G = num_groups;
  s.HW = s.N * s.C ? x.numel() / (s.N * s.C) : 1;
  for (int64_t d = 2; d < x.dim(); ++d) {
    if (x.size(d) == 0) s.HW = 0;
  }
  return s;
}

}  // namespace

Activation parse_activation(const char* op, std::string_view name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "relu") return Activation::kRelu;
  if (name == "none") return Activation::kNone;
  TORCH_CHECK_VALUE(false, op, ": activation '", std::string(name), "' is unknown; expected 'silu', 'relu' or 'none'");
}

GroupNormArgs prepare_group_norm_act(const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                     const std::optional<at::Tensor>& bias, double eps, std::string_view activation,
                                     const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                                     bool allocate) {
  GroupNormArgs a;
  a.shape = shape_of(kOp, x, num_groups);
  check_affine(kOp, weight, bias, x);
  check_film(kOp, "scale", scale, x);
  check_film(kOp, "shift", shift, x);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0, kOp, ": eps = ", eps, "; expected a finite eps > 0");
  a.activation = parse_activation(kOp, activation);
  a.eps = eps;
  if (!allocate) return a;
  a.shape.channels_last = is_channels_last(x);
  a.x = a.shape.channels_last ? x : x.contiguous();
  if (given(weight)) a.weight = weight->contiguous();
  if (given(bias)) a.bias = bias->contiguous();
  a.scale = film_operand(scale);
  a.shift = film_operand(shift);
  a.y = at::empty_like(a.x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  a.mean = at::empty({a.shape.N, a.shape.G}, x.options().dtype(acc));
  a.rstd = at::empty({a.shape.N, a.shape.G}, x.options().dtype(acc));
  return a;
}

GroupNormBackwardArgs prepare_group_norm_act_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                      const at::Tensor& mean, const at::Tensor& rstd,
                                                      const std::optional<at::Tensor>& weight,
                                                      const std::optional<at::Tensor>& bias, int64_t num_groups,
                                                      std::string_view activation,
                                                      std::array<bool, 3> output_mask,
                                                      const std::optional<at::Tensor>& scale,
                                                      const std::optional<at::Tensor>& shift,
                                                      std::array<bool, 2> scale_shift_mask, bool allocate) {
  GroupNormBackwardArgs a;
  a.shape = shape_of(kBackward, x, num_groups);
  check_like(kBackward, "grad_y", grad_y, "x", x);
  check_affine(kBackward, weight, bias, x);
  check_film(kBackward, "scale", scale, x);
  check_film(kBackward, "shift", shift, x);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto* p : {&mean, &rstd}) {
    TORCH_CHECK(p->dim() == 2 && p->size(0) == a.shape.N && p->size(1) == a.shape.G && p->scalar_type() == acc &&
                    p->device() == x.device(),
                kBackward, ": ", p == &mean ? "mean" : "rstd", " has shape ", p->sizes(), " and dtype ",
                p->scalar_type(), "; expected [", a.shape.N, ", ", a.shape.G, "] of ", acc, " on ", x.device(),
                ", as the forward returned");
  }
  a.activation = parse_activation(kBackward, activation);
  a.output_mask = output_mask;
  if (!allocate) return a;
  a.shape.channels_last = is_channels_last(x);
  a.x = a.shape.channels_last ? x : x.contiguous();
  // grad_y in x's layout, so both are walked with the same index
  a.grad_y = grad_y.strides() == a.x.strides() ? grad_y : at::empty_like(a.x).copy_(grad_y);
  a.mean = mean.contiguous();
  a.rstd = rstd.contiguous();
  if (given(weight)) a.weight = weight->contiguous();
  if (given(bias)) a.bias = bias->contiguous();
  if (output_mask[0]) a.grad_x = at::empty_like(a.x);
  if (a.weight.defined() && output_mask[1]) a.grad_weight = at::empty({a.shape.C}, a.weight.options());
  if (a.bias.defined() && output_mask[2]) a.grad_bias = at::empty({a.shape.C}, a.bias.options());
  a.scale = film_operand(scale);
  a.shift = film_operand(shift);
  if (a.scale.defined() && scale_shift_mask[0]) a.grad_scale = at::empty({a.shape.N, a.shape.C}, x.options());
  if (a.shift.defined() && scale_shift_mask[1]) a.grad_shift = at::empty({a.shape.N, a.shape.C}, x.options());
  return a;
}

}  // namespace diffusion_ext
