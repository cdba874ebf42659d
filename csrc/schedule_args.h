#pragma once
// Validation and normalisation of the schedule ops' arguments, shared by the CPU and CUDA entry points:
// after prepare_*, every tensor the kernel reads or writes shares one flat, batch-outermost layout
// (see share_flat_batch_layout), the ᾱ table is contiguous (float32 or float64, as given), and the outputs
// exist.
// With allocate = false they only validate: the Triton launchers call them that way (through _C) so that
// every backend rejects the same inputs with the same messages.
#include <ATen/core/Tensor.h>
#include <optional>
#include <string_view>

#include "common/schedule_math.h"

namespace diffusion_ext {

struct FlatBatch {
  int64_t numel = 0;
  int64_t batch = 0;
  int64_t per_sample = 0;  // elements of one sample: numel / batch
};

struct QSampleArgs {
  at::Tensor x0, noise, t, table;  // noise is the output when make_noise
  at::Tensor out;
  bool make_noise = false;
  uint64_t seed = 0, offset = 0;
  // false: element e of the flat tensor is element e of stream (seed, offset); true: element j of
  // sample b is element j of stream (seed, offset + b), the noise of q_sample_with_noise(x0[b:b+1], ...,
  // offset + b), whatever the batch the sample is in
  bool per_sample_streams = false;
  int64_t num_timesteps = 0;
  FlatBatch shape;
};

// Which update a ReverseStepArgs describes (the per-sample coefficient functor of schedule_math.h).
enum class StepKind : int { kDdpm = 0, kDdim = 1, kDpmSolver = 2 };

struct ReverseStepArgs {
  at::Tensor x, model_output, model_output_uncond, noise, t, t_prev, table;  // undefined when unused
  at::Tensor x0_last, t_last;  // DPM-Solver++(2M): the last step's x̂0 and timestep; undefined: first order
  at::Tensor out;
  at::Tensor x0_out;  // DPM-Solver++: the x̂0 of this step (the next step's x0_last); undefined otherwise
  bool guided = false;
  double guidance_scale = 1.0;
  bool make_noise = false;  // noise comes from Philox(seed, offset) inside the kernel
  uint64_t seed = 0, offset = 0;
  double clip_range = INFINITY;
  double eta = 0.0;
  StepKind kind = StepKind::kDdpm;
  bool sde = false;  // DPM-Solver++: the SDE variant
  PredictionType prediction = PredictionType::kEpsilon;
  VarianceType variance = VarianceType::kFixedSmall;
  int64_t num_timesteps = 0;
  FlatBatch shape;
};

// fn(table_t{}) with table_t the C++ type of the ᾱ table (float or double).
template <typename Fn>
void dispatch_table_type(const at::Tensor& table, const Fn& fn) {
  if (table.scalar_type() == at::kDouble) {
    fn(double{});
  } else {
    fn(float{});
  }
}

// fn(coef) with coef the per-sample coefficient functor of the op (common/schedule_math.h) over the table's
// type: the one place that builds the functors from the arguments, for the CPU and CUDA kernels alike.
template <typename Fn>
void with_q_sample_coefs(const QSampleArgs& a, const Fn& fn) {
  dispatch_table_type(a.table, [&](auto table_v) {
    using table_t = decltype(table_v);
    fn(QSampleCoefFn<table_t>{a.t.const_data_ptr<int64_t>(), a.table.const_data_ptr<table_t>(), a.num_timesteps});
  });
}

template <typename Fn>
void with_step_coefs(const ReverseStepArgs& a, const Fn& fn) {
  dispatch_table_type(a.table, [&](auto table_v) {
    using table_t = decltype(table_v);
    const int64_t* t = a.t.const_data_ptr<int64_t>();
    const table_t* table = a.table.const_data_ptr<table_t>();
    switch (a.kind) {
      case StepKind::kDdpm:
        fn(DdpmCoefFn<table_t>{t, table, a.num_timesteps, a.variance, a.prediction});
        break;
      case StepKind::kDdim:
        fn(DdimCoefFn<table_t>{t, a.t_prev.const_data_ptr<int64_t>(), table, a.num_timesteps, a.eta, a.prediction});
        break;
      case StepKind::kDpmSolver:
        fn(DpmSolverCoefFn<table_t>{t, a.t_prev.const_data_ptr<int64_t>(),
                                    a.t_last.defined() ? a.t_last.const_data_ptr<int64_t>() : nullptr, table,
                                    a.num_timesteps, a.sde, a.prediction});
        break;
    }
  });
}

QSampleArgs prepare_q_sample(const char* op, const at::Tensor& x0, const at::Tensor& t,
                             const std::optional<at::Tensor>& noise, const at::Tensor& alphas_cumprod,
                             int64_t seed, int64_t offset, bool allocate = true);

ReverseStepArgs prepare_ddpm_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& x_t,
                                  const at::Tensor& alphas_cumprod, const std::optional<at::Tensor>& noise,
                                  int64_t seed, int64_t offset, bool clip_sample, double clip_range,
                                  std::string_view variance, std::string_view prediction_type,
                                  std::optional<double> guidance_scale,
                                  const std::optional<at::Tensor>& model_output_uncond, bool allocate = true);

ReverseStepArgs prepare_ddim_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
                                  const at::Tensor& x_t, const at::Tensor& alphas_cumprod, double eta,
                                  const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                                  bool clip_sample, double clip_range, std::string_view prediction_type,
                                  std::optional<double> guidance_scale,
                                  const std::optional<at::Tensor>& model_output_uncond, bool allocate = true);

ReverseStepArgs prepare_dpmpp_2m_step(const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
                                      const at::Tensor& x_t, const at::Tensor& alphas_cumprod,
                                      const std::optional<at::Tensor>& x0_last,
                                      const std::optional<at::Tensor>& t_last, bool sde,
                                      const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                                      bool clip_sample, double clip_range, std::string_view prediction_type,
                                      std::optional<double> guidance_scale,
                                      const std::optional<at::Tensor>& model_output_uncond, bool allocate = true);

}  // namespace diffusion_ext
