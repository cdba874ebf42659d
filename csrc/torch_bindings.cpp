// The one place where the op schemas are declared, and the pybind11 module diffusion_ext._C.
//
// Per-sample values (timesteps, the ᾱ table) are Tensors, so one compiled kernel serves every step and
// torch.compile / CUDA graphs see no Python scalars that change between steps. seed and offset address
// the counter-based generator of common/philox.h.
#include <torch/library.h>

#ifndef DIFFUSION_EXT_NO_PYTHON
#include <torch/extension.h>
#endif

#ifdef DIFFUSION_EXT_WITH_CUDA
#include <cuda.h>
#endif
#include <string>

TORCH_LIBRARY(diffusion_ext, m) {
  m.def("q_sample(Tensor x0, Tensor t, Tensor noise, Tensor alphas_cumprod) -> Tensor");
  m.def(
      "q_sample_with_noise(Tensor x0, Tensor t, Tensor alphas_cumprod, int seed, int offset)"
      " -> (Tensor, Tensor)");
  m.def(
      "ddpm_step(Tensor model_output, Tensor t, Tensor x_t, Tensor alphas_cumprod, Tensor? noise,"
      " int seed, int offset, bool clip_sample, float clip_range, str variance, str prediction_type,"
      " float? guidance_scale, Tensor? model_output_uncond) -> Tensor");
  m.def(
      "ddim_step(Tensor model_output, Tensor t, Tensor t_prev, Tensor x_t, Tensor alphas_cumprod,"
      " float eta, Tensor? noise, int seed, int offset, bool clip_sample, float clip_range,"
      " str prediction_type, float? guidance_scale, Tensor? model_output_uncond) -> Tensor");
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
}

#endif  // DIFFUSION_EXT_NO_PYTHON
