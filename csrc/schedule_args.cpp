#include "schedule_args.h"

#include <ATen/ops/empty_like.h>

#include <cmath>
#include <vector>

#include "checks.h"

namespace diffusion_ext {
namespace {

constexpr const char* kDdpm = "diffusion_ext.ddpm_step";
constexpr const char* kDdim = "diffusion_ext.ddim_step";
constexpr const char* kDpmpp = "diffusion_ext.dpmpp_2m_step";

PredictionType parse_prediction(const char* op, std::string_view s) {
  if (s == "epsilon") return PredictionType::kEpsilon;
  if (s == "sample") return PredictionType::kSample;
  if (s == "v_prediction") return PredictionType::kVPrediction;
  TORCH_CHECK_VALUE(false, op, ": prediction_type '", std::string(s),
                    "' is unknown; expected 'epsilon', 'sample' or 'v_prediction'");
}

VarianceType parse_variance(const char* op, std::string_view s) {
  if (s == "fixed_small") return VarianceType::kFixedSmall;
  if (s == "fixed_large") return VarianceType::kFixedLarge;
  TORCH_CHECK_VALUE(false, op, ": variance '", std::string(s),
                    "' is unknown; expected 'fixed_small' or 'fixed_large'");
}

FlatBatch flat_batch(const at::Tensor& x) {
  FlatBatch f;
  f.numel = x.numel();
  f.batch = x.size(0);
  f.per_sample = f.batch > 0 ? f.numel / f.batch : 0;
  return f;
}

// The table as given, float32 or float64 (common/schedule_math.h forms the coefficients from it in
// double): no conversion, so no copy on the hot path whatever the dtype of x.
at::Tensor table_for(const at::Tensor& table) { return table.contiguous(); }

// Brings every defined tensor into one flat batch-outermost layout: their own when they already share
// one (the hot path: no copy), else contiguous copies (non-contiguous views still give correct results).
void unify_layout(std::vector<at::Tensor*> tensors) {
  std::vector<at::Tensor> defined;
  for (auto* t : tensors) {
    if (t->defined()) defined.push_back(*t);
  }
  if (share_flat_batch_layout(defined)) return;
  for (auto* t : tensors) {
    if (t->defined()) *t = t->contiguous();
  }
}

void check_seed(const char* op, int64_t offset) {
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset = ", offset, " is negative; expected offset >= 0");
}

void prepare_guidance(const char* op, ReverseStepArgs& a, std::optional<double> guidance_scale,
                      const std::optional<at::Tensor>& uncond) {
  if (guidance_scale.has_value()) {
    TORCH_CHECK_VALUE(uncond.has_value() && uncond->defined(), op,
                      ": guidance_scale was given without model_output_uncond; classifier-free guidance "
                      "needs the unconditional model output too");
    TORCH_CHECK_VALUE(std::isfinite(*guidance_scale), op, ": guidance_scale = ", *guidance_scale,
                      "; expected a finite number");
    check_like(op, "model_output_uncond", *uncond, "x_t", a.x);
    a.guided = true;
    a.guidance_scale = *guidance_scale;
    a.model_output_uncond = *uncond;
  } else {
    TORCH_CHECK_VALUE(!(uncond.has_value() && uncond->defined()), op,
                      ": model_output_uncond was given without guidance_scale; pass both or neither");
  }
}

void prepare_noise(const char* op, ReverseStepArgs& a, const std::optional<at::Tensor>& noise, int64_t seed,
                   int64_t offset) {
  if (noise.has_value() && noise->defined()) {
    check_like(op, "noise", *noise, "x_t", a.x);
    a.noise = *noise;
  } else {
    check_seed(op, offset);
    a.make_noise = true;
    a.seed = static_cast<uint64_t>(seed);
    a.offset = static_cast<uint64_t>(offset);
  }
}

void prepare_clip(const char* op, ReverseStepArgs& a, bool clip_sample, double clip_range) {
  TORCH_CHECK_VALUE(clip_range > 0, op, ": clip_range = ", clip_range, "; expected a positive number");
  a.clip_range = clip_sample ? clip_range : INFINITY;
}

// On the CPU (a loop, not tensor ops: no allocation on every sampling step), every sample's `lower`
// timestep is below its `upper` one. On a device the per-sample functors give such a sample NaN.
void check_before(const char* op, const char* lower_name, const at::Tensor& lower, const char* upper_name,
                  const at::Tensor& upper, const char* why) {
  if (!lower.device().is_cpu()) return;
  const auto lc = lower.contiguous(), uc = upper.contiguous();
  const int64_t* lp = lc.const_data_ptr<int64_t>();
  const int64_t* up = uc.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < lower.numel(); ++b) {
    TORCH_CHECK_VALUE(lp[b] < up[b], op, ": ", lower_name, " must be smaller than ", upper_name,
                      " for every sample", why, ", but at sample ", b, " ", lower_name, " = ", lp[b], " >= ",
                      upper_name, " = ", up[b]);
  }
}

// What every reverse step checks and keeps first: x_t, model_output, the table, the prediction type, t, and
// t_prev (below t) when the step has one.
ReverseStepArgs begin_step(const char* op, StepKind kind, const at::Tensor& model_output, const at::Tensor& t,
                           const at::Tensor* t_prev, const at::Tensor& x_t, const at::Tensor& alphas_cumprod,
                           std::string_view prediction_type) {
  check_float_input(op, "x_t", x_t);
  check_like(op, "model_output", model_output, "x_t", x_t);
  check_alpha_table(op, alphas_cumprod, x_t);
  ReverseStepArgs a;
  a.kind = kind;
  a.prediction = parse_prediction(op, prediction_type);
  a.num_timesteps = alphas_cumprod.size(0);
  check_timesteps(op, "t", t, x_t.size(0), x_t, a.num_timesteps, 0);
  if (t_prev != nullptr) {
    check_timesteps(op, "t_prev", *t_prev, x_t.size(0), x_t, a.num_timesteps, -1);
    check_before(op, "t_prev", *t_prev, "t", t, "");
    a.t_prev = t_prev->contiguous();
  }
  a.x = x_t;
  a.model_output = model_output;
  a.t = t.contiguous();
  a.table = table_for(alphas_cumprod);
  return a;
}

// And last: guidance, the noise (read only when `noisy`; checked when given either way), clipping, then one
// flat layout for every tensor the kernel reads and the outputs (when allocate).
void end_step(const char* op, ReverseStepArgs& a, std::optional<double> guidance_scale,
              const std::optional<at::Tensor>& model_output_uncond, bool noisy, const std::optional<at::Tensor>& noise,
              int64_t seed, int64_t offset, bool clip_sample, double clip_range, bool allocate) {
  prepare_guidance(op, a, guidance_scale, model_output_uncond);
  if (noisy) {
    prepare_noise(op, a, noise, seed, offset);
  } else if (noise.has_value() && noise->defined()) {
    check_like(op, "noise", *noise, "x_t", a.x);
  }
  prepare_clip(op, a, clip_sample, clip_range);
  if (!allocate) return;
  unify_layout({&a.x, &a.model_output, &a.model_output_uncond, &a.noise, &a.x0_last});
  a.out = at::empty_like(a.x);
  if (a.kind == StepKind::kDpmSolver) a.x0_out = at::empty_like(a.x);
  a.shape = flat_batch(a.x);
}

}  // namespace

QSampleArgs prepare_q_sample(const char* op, const at::Tensor& x0, const at::Tensor& t,
                             const std::optional<at::Tensor>& noise, const at::Tensor& alphas_cumprod,
                             int64_t seed, int64_t offset, bool allocate) {
  check_float_input(op, "x0", x0);
  check_alpha_table(op, alphas_cumprod, x0);
  QSampleArgs a;
  a.num_timesteps = alphas_cumprod.size(0);
  check_timesteps(op, "t", t, x0.size(0), x0, a.num_timesteps, 0);
  if (noise.has_value()) {
    check_like(op, "noise", *noise, "x0", x0);
  } else {
    check_seed(op, offset);
  }
  if (!allocate) return a;
  a.x0 = x0;
  a.t = t.contiguous();
  a.table = table_for(alphas_cumprod);
  if (noise.has_value()) {
    a.noise = *noise;
    unify_layout({&a.x0, &a.noise});
  } else {
    unify_layout({&a.x0});
    a.make_noise = true;
    a.seed = static_cast<uint64_t>(seed);
    a.offset = static_cast<uint64_t>(offset);
    a.noise = at::empty_like(a.x0);
  }
  a.out = at::empty_like(a.x0);
  a.shape = flat_batch(a.x0);
  return a;
}

ReverseStepArgs prepare_ddpm_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& x_t,
                                  const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                                  int64_t seed, int64_t offset, bool clip_sample, double clip_range,
                                  std::string_view variance, std::string_view prediction_type,
                                  std::optional<double> guidance_scale,
                                  const std::optional<at::Tensor>& model_output_uncond, bool allocate) {
  const char* op = kDdpm;
  ReverseStepArgs a = begin_step(op, StepKind::kDdpm, model_output, t, nullptr, x_t, alphas_cumprod, prediction_type);
  a.variance = parse_variance(op, variance);
  end_step(op, a, guidance_scale, model_output_uncond, true, noise, seed, offset, clip_sample, clip_range, allocate);
  return a;
}

ReverseStepArgs prepare_ddim_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
                                  const at::Tensor& x_t, const at::Tensor& alphas_cumprod, double eta,
                                  const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                                  bool clip_sample, double clip_range, std::string_view prediction_type,
                                  std::optional<double> guidance_scale,
                                  const std::optional<at::Tensor>& model_output_uncond, bool allocate) {
  const char* op = kDdim;
  TORCH_CHECK_VALUE(std::isfinite(eta) && eta >= 0, op, ": eta = ", eta, "; expected a finite eta >= 0");
  ReverseStepArgs a = begin_step(op, StepKind::kDdim, model_output, t, &t_prev, x_t, alphas_cumprod, prediction_type);
  a.eta = eta;
  // η = 0 is deterministic: noise is checked when given but never read
  end_step(op, a, guidance_scale, model_output_uncond, eta > 0, noise, seed, offset, clip_sample, clip_range, allocate);
  return a;
}

ReverseStepArgs prepare_dpmpp_2m_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
                                      const at::Tensor& x_t, const at::Tensor& alphas_cumprod,
                                      const std::optional<at::Tensor>& x0_last,
                                      const std::optional<at::Tensor>& t_last, bool sde,
                                      const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                                      bool clip_sample, double clip_range, std::string_view prediction_type,
                                      std::optional<double> guidance_scale,
                                      const std::optional<at::Tensor>& model_output_uncond, bool allocate) {
  const char* op = kDpmpp;
  ReverseStepArgs a =
      begin_step(op, StepKind::kDpmSolver, model_output, t, &t_prev, x_t, alphas_cumprod, prediction_type);
  a.sde = sde;
  const bool has_x0 = x0_last.has_value() && x0_last->defined(), has_t = t_last.has_value() && t_last->defined();
  TORCH_CHECK_VALUE(has_x0 == has_t, op, ": ", has_x0 ? "x0_last was given without t_last" : "t_last was given "
                    "without x0_last", "; pass both (a second-order step: the last step's x̂0 and its timestep) or "
                    "neither (a first-order step)");
  if (has_x0) {
    check_like(op, "x0_last", *x0_last, "x_t", x_t);
    check_timesteps(op, "t_last", *t_last, x_t.size(0), x_t, a.num_timesteps, 0);
    check_before(op, "t", t, "t_last", *t_last, " (the last step started from more noise)");
    a.x0_last = *x0_last;
    a.t_last = t_last->contiguous();
  }
  // the ODE solver is deterministic: noise is checked when given but never read
  end_step(op, a, guidance_scale, model_output_uncond, sde, noise, seed, offset, clip_sample, clip_range, allocate);
  return a;
}

}  // namespace diffusion_ext
