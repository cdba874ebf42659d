#pragma once
// Validation and normalisation of dropout's arguments, shared by the CPU and CUDA entry points (and,
// with allocate = false, by the Triton launcher through _C, so every backend rejects the same inputs).
//
// dropout(x, p, seed, offset) = x·keep/(1 − p) (Srivastava et al. 2014, inverted dropout), keep from
// common/dropout_mask.h. Element e is x's e-th element in memory: a dense tensor (contiguous,
// channels_last or any other dense permutation) is walked as it lies and the output takes its layout; any
// other tensor is copied to contiguous first. So the mask depends on the layout, as the noise of the
// schedule ops does, and the backward (the same op on the gradient) must see the gradient in the
// output's layout (csrc/autograd.cpp arranges it).
#include <ATen/core/Tensor.h>

namespace diffusion_ext {

struct DropoutArgs {
  at::Tensor x, out;      // x dense; out empty_like(x)
  uint32_t threshold = 0;  // keep iff the word's top 23 bits >= threshold (common/dropout_mask.h)
  double scale = 1;        // 1 / (1 − p)
  uint64_t seed = 0, offset = 0;
};

DropoutArgs prepare_dropout(const at::Tensor& x, double p, int64_t seed, int64_t offset, bool allocate = true);

}  // namespace diffusion_ext
