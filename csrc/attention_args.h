#pragma once
// Validation and normalisation of attention's arguments, shared by the CPU and CUDA entry points (and,
// with allocate = false, by the Triton launcher through _C), so every backend rejects the same inputs
// with the same messages.
//
// q is (B, H, Lq, D), k and v are (B, H, Lk, D): the layout of F.scaled_dot_product_attention. Any
// strides are read in place as long as the head dim is innermost (stride 1); otherwise a copy is made.
// Outputs (out, dq, dk, dv) are allocated in (B, L, H, D) memory order and returned as (B, H, L, D)
// views, as SDPA's CPU flash kernel does: a block that merges heads back, out.transpose(1, 2)
// .reshape(B, L, H·D), then gets a view instead of a copy. Kernels must therefore use every tensor's
// strides. lse is (B, H, Lq), contiguous, in the accumulation dtype (fp32; fp64 for fp64 inputs),
// natural log: lse_i = log Σ_j exp(scale·q_i·k_j).
#include <ATen/core/Tensor.h>

namespace diffusion_ext {

constexpr int64_t kAttentionMaxHeadDim = 256;

// Element (b, h, l, d) of a tensor lies at b·b_stride + h·h_stride + l·l_stride + d (d stride 1).
struct AttentionStrides {
  int64_t b = 0, h = 0, l = 0;
  static AttentionStrides of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
};

struct AttentionShape {
  int64_t B = 0, H = 0, Lq = 0, Lk = 0, D = 0;
};

struct AttentionArgs {
  at::Tensor q, k, v;   // inputs, head dim innermost
  at::Tensor out, lse;  // out: (B, H, Lq, D) view of (B, Lq, H, D) memory; lse: (B, H, Lq) contiguous
  AttentionShape shape;
  double scale = 1.0;
  // True when Lq, Lk, B or H is 0: the outputs are already filled (out = 0, lse = −inf, as SDPA gives
  // for Lk = 0) and no kernel must run.
  bool done = false;
};

struct AttentionBackwardArgs {
  at::Tensor grad_out, q, k, v, out, lse;
  at::Tensor dq, dk, dv;  // (B, H, L, D) views of (B, L, H, D) memory
  AttentionShape shape;
  double scale = 1.0;
  bool done = false;  // gradients already filled (zeros) for an empty problem
};

AttentionArgs prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                bool allocate = true);

AttentionBackwardArgs prepare_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                 double scale, bool allocate = true);

// An empty (B, H, L, D) tensor in (B, L, H, D) memory order, the layout of every attention output.
at::Tensor attention_output_empty(int64_t B, int64_t H, int64_t L, int64_t D, const at::TensorOptions& options);

}  // namespace diffusion_ext
