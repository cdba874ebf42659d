// The one place where the op schemas are declared, and the pybind11 module diffusion_ext._C.
//
// Per-sample values (timesteps, the ᾱ table) are Tensors, so one compiled kernel serves every step and
// torch.compile / CUDA graphs see no Python scalars that change between steps. seed and offset address
// the counter-based generator of common/philox.h.
#include <torch/library.h>

#ifndef DIFFUSION_EXT_NO_PYTHON
// pybind11 with torch's Tensor casters, not <torch/extension.h>: that pulls in all of libtorch's C++ API
// (nn, optim, ...) and made this file the slowest of the build (15 s of headers against 3)
#include <torch/csrc/utils/pybind.h>
#endif

#ifdef DIFFUSION_EXT_WITH_CUDA
#include <cuda.h>
#endif
#include <string>

#include "attention_args.h"
#include "dropout_args.h"
#include "group_norm_args.h"
#include "schedule_args.h"

TORCH_LIBRARY(diffusion_ext, m) {
  m.def("q_sample(Tensor x0, Tensor t, Tensor noise, Tensor alphas_cumprod) -> Tensor");
  m.def(
      "q_sample_with_noise(Tensor x0, Tensor t, Tensor alphas_cumprod, int seed, int offset,"
      " bool per_sample_streams=False) -> (Tensor, Tensor)");
  m.def(
      "ddpm_step(Tensor model_output, Tensor t, Tensor x_t, Tensor alphas_cumprod, Tensor? noise,"
      " int seed, int offset, bool clip_sample, float clip_range, str variance, str prediction_type,"
      " float? guidance_scale, Tensor? model_output_uncond) -> Tensor");
  m.def(
      "ddim_step(Tensor model_output, Tensor t, Tensor t_prev, Tensor x_t, Tensor alphas_cumprod,"
      " float eta, Tensor? noise, int seed, int offset, bool clip_sample, float clip_range,"
      " str prediction_type, float? guidance_scale, Tensor? model_output_uncond) -> Tensor");
  // One DPM-Solver++ step t -> t_prev in data-prediction form (Lu et al. 2022); second order (2M) when the
  // last step's x̂0 and timestep (x0_last, t_last) are given, first order when both are None; sde: the SDE
  // variant, its noise given or made from (seed, offset). Returns x_prev and this step's x̂0 (the next
  // step's x0_last).
  m.def(
      "dpmpp_2m_step(Tensor model_output, Tensor t, Tensor t_prev, Tensor x_t, Tensor alphas_cumprod,"
      " Tensor? x0_last, Tensor? t_last, bool sde, Tensor? noise, int seed, int offset, bool clip_sample,"
      " float clip_range, str prediction_type, float? guidance_scale, Tensor? model_output_uncond)"
      " -> (Tensor x_prev, Tensor x0_pred)");
  // y = act(GroupNorm(x)); also returns mean and rstd (N, G) for the backward. activation: silu|relu|none.
  // scale, shift: optional (N, C) FiLM, y = act(GroupNorm(x)·(1 + scale) + shift) (csrc/common/film.h).
  m.def(
      "group_norm_act(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, str activation,"
      " Tensor? scale=None, Tensor? shift=None) -> (Tensor y, Tensor mean, Tensor rstd)");
  // (grad_x, grad_weight, grad_bias, grad_scale, grad_shift); an output is undefined (None) where its mask
  // (output_mask for the first three, scale_shift_mask for the last two) is false or its input is absent.
  // Recomputes the activation from x, mean and rstd.
  m.def(
      "group_norm_act_backward(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias,"
      " int num_groups, str activation, bool[3] output_mask, Tensor? scale=None, Tensor? shift=None,"
      " bool[2] scale_shift_mask=[True, True]) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // out = softmax(scale·q·kᵀ)·v without materialising the Lq×Lk scores (FlashAttention-2); q (B, H, Lq, D),
  // k and v (B, H, Lk, D). Returns out, a (B, H, Lq, D) view of (B, Lq, H, D) memory, and the row
  // logsumexp lse (B, H, Lq) that the backward recomputes the probabilities from.
  m.def("attention(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)");
  // (dq, dk, dv), recomputing the score tiles from q, k, v and lse (FlashAttention-2, Alg. 2).
  m.def(
      "attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
      " -> (Tensor, Tensor, Tensor)");
  // x·keep/(1 − p) with keep made from (seed, offset) (csrc/dropout_args.h, common/dropout_mask.h); its
  // backward is the same op on the gradient, so the mask is never stored.
  m.def("dropout(Tensor x, float p, int seed, int offset) -> Tensor");
}

#ifndef DIFFUSION_EXT_NO_PYTHON

#ifndef DIFFUSION_EXT_CUDA_ARCHS
#define DIFFUSION_EXT_CUDA_ARCHS ""
#endif
#ifndef DIFFUSION_EXT_TORCH_VERSION
#define DIFFUSION_EXT_TORCH_VERSION ""
#endif

namespace py = pybind11;

// What this build of _C holds, so that Python can report it and refuse a torch it was not built for.
static py::dict build_info() {
  py::dict info;
  py::list backends;
  backends.append("cpu");
#ifdef DIFFUSION_EXT_WITH_CUDA
  backends.append("cuda");
  info["cuda_version"] = std::to_string(CUDA_VERSION / 1000) + "." + std::to_string(CUDA_VERSION % 1000 / 10);
#else
  info["cuda_version"] = py::none();
#endif
  info["backends"] = backends;
  info["cuda_archs"] = std::string(DIFFUSION_EXT_CUDA_ARCHS);
  info["torch_version"] = std::string(DIFFUSION_EXT_TORCH_VERSION);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  return info;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "diffusion_ext kernels; the ops are registered as torch.ops.diffusion_ext.*";
  m.def("build_info", &build_info, "backends, CUDA version and archs, OpenMP and the torch version of this build");
  // The argument checks of the C++ ops, without a launch: the Triton backend validates through these so
  // that every backend rejects the same inputs with the same messages.
  m.def("check_q_sample", [](const char* op, const at::Tensor& x0, const at::Tensor& t,
                             const std::optional<at::Tensor>& noise, const at::Tensor& table, int64_t seed,
                             int64_t offset) {
    diffusion_ext::prepare_q_sample(op, x0, t, noise, table, seed, offset, /*allocate=*/false);
  });
  m.def("check_ddpm_step", [](const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& x_t,
                              const at::Tensor& table, const std::optional<at::Tensor>& noise, int64_t seed,
                              int64_t offset, bool clip_sample, double clip_range, std::string variance,
                              std::string prediction_type, std::optional<double> guidance_scale,
                              const std::optional<at::Tensor>& model_output_uncond) {
    diffusion_ext::prepare_ddpm_step(model_output, t, x_t, table, noise, seed, offset, clip_sample, clip_range,
                                     variance, prediction_type, guidance_scale, model_output_uncond, false);
  });
  m.def("check_ddim_step", [](const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev,
                              const at::Tensor& x_t, const at::Tensor& table, double eta,
                              const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset,
                              bool clip_sample, double clip_range, std::string prediction_type,
                              std::optional<double> guidance_scale,
                              const std::optional<at::Tensor>& model_output_uncond) {
    diffusion_ext::prepare_ddim_step(model_output, t, t_prev, x_t, table, eta, noise, seed, offset, clip_sample,
                                     clip_range, prediction_type, guidance_scale, model_output_uncond, false);
  });
  m.def("check_dpmpp_2m_step",
        [](const at::Tensor& model_output, const at::Tensor& t, const at::Tensor& t_prev, const at::Tensor& x_t,
           const at::Tensor& table, const std::optional<at::Tensor>& x0_last, const std::optional<at::Tensor>& t_last,
           bool sde, const std::optional<at::Tensor>& noise, int64_t seed, int64_t offset, bool clip_sample,
           double clip_range, std::string prediction_type, std::optional<double> guidance_scale,
           const std::optional<at::Tensor>& model_output_uncond) {
          diffusion_ext::prepare_dpmpp_2m_step(model_output, t, t_prev, x_t, table, x0_last, t_last, sde, noise, seed,
                                               offset, clip_sample, clip_range, prediction_type, guidance_scale,
                                               model_output_uncond, false);
        });
  m.def("check_group_norm_act", [](const at::Tensor& x, int64_t num_groups, const std::optional<at::Tensor>& weight,
                                   const std::optional<at::Tensor>& bias, double eps, std::string activation,
                                   const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift) {
    diffusion_ext::prepare_group_norm_act(x, num_groups, weight, bias, eps, activation, scale, shift, false);
  });
  m.def("check_group_norm_act_backward",
        [](const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
           const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups,
           std::string activation, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& scale,
           const std::optional<at::Tensor>& shift, std::array<bool, 2> scale_shift_mask) {
          diffusion_ext::prepare_group_norm_act_backward(grad_y, x, mean, rstd, weight, bias, num_groups, activation,
                                                         output_mask, scale, shift, scale_shift_mask, false);
        });
  m.def("check_attention", [](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale) {
    diffusion_ext::prepare_attention(q, k, v, scale, false);
  });
  m.def("check_attention_backward",
        [](const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
           const at::Tensor& out, const at::Tensor& lse, double scale) {
          diffusion_ext::prepare_attention_backward(grad_out, q, k, v, out, lse, scale, false);
        });
  // dropout's checks, and the integer threshold of its mask (common/dropout_mask.h), for the Triton launcher
  m.def("check_dropout", [](const at::Tensor& x, double p, int64_t seed, int64_t offset) {
    return static_cast<int64_t>(diffusion_ext::prepare_dropout(x, p, seed, offset, false).threshold);
  });
}

#endif  // DIFFUSION_EXT_NO_PYTHON
