#pragma once
// Validation and normalisation of the schedule ops' arguments, shared by the CPU and CUDA entry points:
// after prepare_*, every tensor the kernel reads or writes shares one flat, batch-outermost layout
// (see share_flat_batch_layout), the ᾱ table is in the accumulation dtype, and the outputs exist.
// With allocate = false they only validate: the Triton launchers call them that way (through _C) so that
// every backend rejects the same inputs with the same messages.
#include <ATen/ATen.h>
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

struct ReverseStepArgs {
  at::Tensor x, model_output, model_output_uncond, noise, t, t_prev, table;  // undefined when unused
  at::Tensor out;
  bool guided = false;
  double guidance_scale = 1.0;
  bool make_noise = false;  // noise comes from Philox(seed, offset) inside the kernel
  uint64_t seed = 0, offset = 0;
  double clip_range = INFINITY;
  double eta = 0.0;
  bool is_ddim = false;
  PredictionType prediction = PredictionType::kEpsilon;
  VarianceType variance = VarianceType::kFixedSmall;
  int64_t num_timesteps = 0;
  FlatBatch shape;
};

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

}  // namespace diffusion_ext
