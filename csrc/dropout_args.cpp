#include "dropout_args.h"

#include <ATen/ops/empty_like.h>

#include <cmath>

#include "common/dropout_mask.h"

namespace diffusion_ext {

DropoutArgs prepare_dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset, bool allocate) {
  constexpr const char* op = "diffusion_ext.dropout";
  const auto st = x.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": x has dtype ", st, "; expected float32, float64, float16 or bfloat16");
  TORCH_CHECK_VALUE(std::isfinite(p) && p >= 0 && p < 1, op, ": p = ", p,
                    " is not a dropout probability; expected 0 <= p < 1");
  TORCH_CHECK_VALUE(offset >= 0, op, ": offset = ", offset, " is negative; expected offset >= 0");
  DropoutArgs a;
  a.threshold = dropout_threshold(p);
  a.scale = 1.0 / (1.0 - p);
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  if (!allocate) return a;
  a.x = x.is_non_overlapping_and_dense() ? x : x.contiguous();
  a.out = at::empty_like(a.x);  // empty_like keeps a dense layout's strides
  return a;
}

}  // namespace diffusion_ext
