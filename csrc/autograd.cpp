// Autograd of group_norm_act, attention and dropout, in C++: the forward op keeps what its backward op needs (x,
// mean, rstd and FiLM's scale/shift; q, k, v, out and the row logsumexp), and the backward op recomputes the
// rest. In C++ rather than Python's torch.library.register_autograd because that wrapper cost ~60 µs per
// forward and ~200 µs per backward on the CPU here (an autograd.Function applied from the dispatcher, the
// schema's defaults filled, every argument converted twice): as much as the kernel itself for the U-Nets'
// small maps (measured with torch.profiler on bench_unet's training step, 51 group norms per step).
//
// The ops dispatch to whichever backend kernel is registered for the tensors' device (CPU or CUDA); the
// Triton kernels are separate Python ops with their own registration (diffusion_ext/_autograd.py). Double
// backward of group_norm_act and attention is refused with a clear error; dropout's backward is dropout
// itself, called through the dispatcher, so it differentiates again.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <string_view>
#include <tuple>

namespace diffusion_ext {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_group_norm_act(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, std::string_view activation,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("diffusion_ext::group_norm_act", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, int64_t, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
              std::string_view, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();
  return op.call(x, num_groups, weight, bias, eps, activation, scale, shift);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> call_group_norm_act_backward(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups,
    std::string_view activation, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, std::array<bool, 2> scale_shift_mask) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("diffusion_ext::group_norm_act_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
              const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, int64_t, std::string_view,
              std::array<bool, 3>, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
              std::array<bool, 2>)>();
  return op.call(grad_y, x, mean, rstd, weight, bias, num_groups, activation, output_mask, scale, shift,
                 scale_shift_mask);
}

std::optional<at::Tensor> given(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

void refuse_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "diffusion_ext.", op,
              ": double backward (create_graph=True) is not supported");
}

// needs_input_grad of a Function is indexed by the defined tensor inputs (its graph edges), in order;
// this walks them alongside the schema's arguments.
struct EdgeWalker {
  AutogradContext* ctx;
  size_t edge = 0;
  bool next(const at::Tensor& t) {  // whether the gradient of input t (undefined: absent) is needed
    if (!t.defined()) return false;
    return ctx->needs_input_grad(edge++);
  }
};

class GroupNormActFunction : public torch::autograd::Function<GroupNormActFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, int64_t num_groups,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                               double eps, std::string_view activation, const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& shift) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, mean, rstd] = call_group_norm_act(x, num_groups, weight, bias, eps, activation, scale, shift);
    const at::Tensor none;
    ctx->save_for_backward({x, mean, rstd, weight.value_or(none), bias.value_or(none), scale.value_or(none),
                            shift.value_or(none)});
    ctx->saved_data["num_groups"] = num_groups;
    ctx->saved_data["activation"] = std::string(activation);
    ctx->mark_non_differentiable({mean, rstd});
    ctx->set_materialize_grads(false);  // mean, rstd's gradients are never used: no zeros made for them
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("group_norm_act");
    if (!grads[0].defined()) return variable_list(8);  // nothing flowed back into y: no gradients, as eager
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &x = saved[0], &mean = saved[1], &rstd = saved[2], &weight = saved[3], &bias = saved[4],
                     &scale = saved[5], &shift = saved[6];
    EdgeWalker e{ctx};
    const bool gx = e.next(x), gw = e.next(weight), gb = e.next(bias), gs = e.next(scale), gt = e.next(shift);
    const std::string activation = ctx->saved_data["activation"].toStringRef();
    auto [grad_x, grad_w, grad_b, grad_scale, grad_shift] = call_group_norm_act_backward(
        grads[0], x, mean, rstd, given(weight), given(bias), ctx->saved_data["num_groups"].toInt(), activation,
        {gx, gw, gb}, given(scale), given(shift), {gs, gt});
    // one entry per forward argument: x, num_groups, weight, bias, eps, activation, scale, shift
    return {grad_x, at::Tensor(), grad_w, grad_b, at::Tensor(), at::Tensor(), grad_scale, grad_shift};
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_autograd(
    const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, std::string_view activation,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
  auto out = GroupNormActFunction::apply(x, num_groups, weight, bias, eps, activation, scale, shift);
  return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> call_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  double scale) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("diffusion_ext::attention", "")
                             .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                       const at::Tensor&, double)>();
  return op.call(q, k, v, scale);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> call_attention_backward(const at::Tensor& grad_out,
                                                                       const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& out,
                                                                       const at::Tensor& lse, double scale) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("diffusion_ext::attention_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&,
                                                                const at::Tensor&, const at::Tensor&, double)>();
  return op.call(grad_out, q, k, v, out, lse, scale);
}

class AttentionFunction : public torch::autograd::Function<AttentionFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               double scale) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, lse] = call_attention(q, k, v, scale);
    ctx->save_for_backward({q, k, v, out, lse});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({lse});
    ctx->set_materialize_grads(false);  // lse's gradient is never used: no zeros made for it
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    refuse_double_backward("attention");
    if (!grads[0].defined()) return variable_list(4);  // nothing flowed back into out: as eager
    const auto s = ctx->get_saved_variables();
    auto [dq, dk, dv] = call_attention_backward(grads[0], s[0], s[1], s[2], s[3], s[4],
                                                ctx->saved_data["scale"].toDouble());
    return {dq, dk, dv, at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> attention_autograd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      double scale) {
  auto out = AttentionFunction::apply(q, k, v, scale);
  return {out[0], out[1]};
}

at::Tensor call_dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("diffusion_ext::dropout", "")
                             .typed<at::Tensor(const at::Tensor&, double, int64_t, int64_t)>();
  return op.call(x, p, seed, offset);
}

// Whether g's elements lie in memory in the order of a dense tensor with these strides: the strides agree on every
// dim of size > 1 (a size-1 dim's stride never moves an element, and autograd may hand one over with any stride).
bool same_memory_order(const at::Tensor& g, const std::vector<int64_t>& strides) {
  for (int64_t d = 0; d < g.dim(); ++d) {
    if (g.size(d) > 1 && g.stride(d) != strides[d]) return false;
  }
  return true;
}

// dropout is linear in x with a mask regenerated from (seed, offset): its backward is the same op on the
// gradient, arranged in the output's layout first because the mask follows memory order
// (csrc/dropout_args.h). Called through the dispatcher, so it is differentiable in turn.
class DropoutFunction : public torch::autograd::Function<DropoutFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, double p, int64_t seed, int64_t offset) {
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = call_dropout(x, p, seed, offset);
    ctx->saved_data["p"] = p;
    ctx->saved_data["seed"] = seed;
    ctx->saved_data["offset"] = offset;
    ctx->saved_data["strides"] = y.strides().vec();
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    at::Tensor g = grads[0];
    const auto strides = ctx->saved_data["strides"].toIntVector();
    if (!same_memory_order(g, strides)) {
      g = at::empty_strided(g.sizes(), strides, g.options()).copy_(g);
    }
    return {call_dropout(g, ctx->saved_data["p"].toDouble(), ctx->saved_data["seed"].toInt(),
                         ctx->saved_data["offset"].toInt()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

at::Tensor dropout_autograd(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  return DropoutFunction::apply(x, p, seed, offset)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(diffusion_ext, Autograd, m) {
  m.impl("group_norm_act", &group_norm_act_autograd);
  m.impl("attention", &attention_autograd);
  m.impl("dropout", &dropout_autograd);
}

}  // namespace diffusion_ext
