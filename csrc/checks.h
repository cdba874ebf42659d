#pragma once
// Argument checks shared by every op's CPU and CUDA entry points. Each message starts with the op's
// name and names the argument and what was expected, so a user sees e.g.
//   "diffusion_ext.q_sample: noise has shape [2, 3] but x0 has shape [2, 4]; expected the same shape".
#include <ATen/core/Tensor.h>
#include <string>

namespace diffusion_ext {

// a must match ref in shape, dtype and device.
void check_like(const char* op, const char* name, const at::Tensor& a, const char* ref_name,
                const at::Tensor& ref);

// A float tensor of a dtype this backend supports (fp32/fp64/fp16/bf16 on CPU; fp32/fp16/bf16 and
// fp64 on CUDA), with the batch first: at least one dimension.
void check_float_input(const char* op, const char* name, const at::Tensor& x);

// A 1-D table of ᾱ on the device of x, float32 or float64.
void check_alpha_table(const char* op, const at::Tensor& table, const at::Tensor& like);

// A 1-D int64 tensor of length `batch` on the device of `like`. On the CPU its values are checked
// against [lowest, num_timesteps - 1] too; a device cannot raise without a host sync, so CUDA kernels
// poison the output of an out-of-range sample with NaN and assert instead.
void check_timesteps(const char* op, const char* name, const at::Tensor& t, int64_t batch,
                     const at::Tensor& like, int64_t num_timesteps, int64_t lowest);

// Tensors that share sizes, strides and a dense, non-overlapping layout whose outermost dimension is
// the batch can be walked as one flat array: element i belongs to sample i / (numel / batch). This
// holds for contiguous and channels_last alike. Returns true when the given tensors are so.
bool share_flat_batch_layout(at::TensorList tensors);

}  // namespace diffusion_ext
