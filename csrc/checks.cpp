#include "checks.h"

#include <sstream>

namespace diffusion_ext {

void check_like(const char* op, const char* name, const at::Tensor& a, const char* ref_name,
                const at::Tensor& ref) {
  TORCH_CHECK(a.sizes() == ref.sizes(), op, ": ", name, " has shape ", a.sizes(), " but ", ref_name,
              " has shape ", ref.sizes(), "; expected the same shape");
  TORCH_CHECK_TYPE(a.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", a.scalar_type(),
                   " but ", ref_name, " has dtype ", ref.scalar_type(), "; expected the same dtype");
  TORCH_CHECK(a.device() == ref.device(), op, ": ", name, " is on ", a.device(), " but ", ref_name,
              " is on ", ref.device(), "; expected the same device");
}

void check_float_input(const char* op, const char* name, const at::Tensor& x) {
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": ", name, " has dtype ", st, "; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK(x.dim() >= 1, op, ": ", name,
              " is a 0-dim tensor; expected at least one dimension, the batch first");
}

void check_alpha_table(const char* op, const at::Tensor& table, const at::Tensor& like) {
  TORCH_CHECK(table.dim() == 1 && table.numel() >= 1, op,
              ": alphas_cumprod must be a non-empty 1-D table of ᾱ_t, got shape ", table.sizes());
  TORCH_CHECK_TYPE(table.scalar_type() == at::kFloat || table.scalar_type() == at::kDouble, op,
                   ": alphas_cumprod has dtype ", table.scalar_type(), "; expected float32 or float64");
  TORCH_CHECK(table.device() == like.device(), op, ": alphas_cumprod is on ", table.device(),
              " but the inputs are on ", like.device(), "; call NoiseSchedule.to(device)");
}

void check_timesteps(const char* op, const char* name, const at::Tensor& t, int64_t batch,
                     const at::Tensor& like, int64_t num_timesteps, int64_t lowest) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": ", name, " has dtype ", t.scalar_type(),
                   "; expected int64 (a LongTensor of timesteps)");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == batch, op, ": ", name, " has shape ", t.sizes(),
              "; expected [", batch, "], one timestep per sample of the batch");
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(),
              " but the inputs are on ", like.device(), "; expected the same device");
  if (t.device().is_cpu() && batch > 0) {
    const auto tc = t.contiguous();
    const int64_t* p = tc.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_VALUE(p[b] >= lowest && p[b] < num_timesteps, op, ": ", name, "[", b, "] = ", p[b],
                        " is outside [", lowest, ", ", num_timesteps - 1,
                        "] (timesteps are 0-indexed, num_timesteps = ", num_timesteps, ")");
    }
  }
}

bool share_flat_batch_layout(at::TensorList tensors) {
  const at::Tensor& first = tensors[0];
  if (!first.is_non_overlapping_and_dense()) return false;
  if (first.numel() > 0 && first.size(0) > 1 && first.stride(0) != first.numel() / first.size(0)) {
    return false;
  }
  for (const auto& t : tensors) {
    if (t.strides() != first.strides()) return false;
  }
  return true;
}

}  // namespace diffusion_ext
