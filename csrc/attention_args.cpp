#include "attention_args.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <limits>

namespace diffusion_ext {
namespace {

constexpr const char* kOp = "diffusion_ext.attention";
constexpr const char* kBackward = "diffusion_ext.attention_backward";

bool supported_head_dim(int64_t d) { return d >= 8 && d <= kAttentionMaxHeadDim && d % 8 == 0; }

void check_rank4(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.dim() == 4, op, ": ", name, " has shape ", t.sizes(),
                    "; expected 4 dims (batch, heads, length, head_dim), the layout of scaled_dot_product_attention");
}

void check_same_kind(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but q has dtype ", q.scalar_type(), "; expected the same dtype");
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device(),
              "; expected the same device");
}

// The common checks of forward and backward; returns the shape.
AttentionShape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         double scale) {
  check_rank4(op, "q", q);
  check_rank4(op, "k", k);
  check_rank4(op, "v", v);
  const auto st = q.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kDouble || st == at::kHalf || st == at::kBFloat16, op,
                   ": q has dtype ", st, "; expected float32, float64, float16 or bfloat16");
  check_same_kind(op, "k", k, q);
  check_same_kind(op, "v", v, q);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0), op, ": batch sizes differ: q ", q.size(0),
                    ", k ", k.size(0), ", v ", v.size(0), "; expected the same batch size");
  TORCH_CHECK_VALUE(k.size(1) == q.size(1) && v.size(1) == q.size(1), op, ": head counts differ: q ", q.size(1),
                    ", k ", k.size(1), ", v ", v.size(1), "; expected the same number of heads");
  TORCH_CHECK_VALUE(k.size(3) == q.size(3) && v.size(3) == q.size(3), op, ": head dims differ: q ", q.size(3),
                    ", k ", k.size(3), ", v ", v.size(3), "; expected the same head dim");
  TORCH_CHECK_VALUE(v.size(2) == k.size(2), op, ": v has length ", v.size(2), " but k has length ", k.size(2),
                    "; expected one value per key");
  TORCH_CHECK_VALUE(supported_head_dim(q.size(3)), op, ": head dim ", q.size(3),
                    " is not supported; expected a multiple of 8 from 8 to ", kAttentionMaxHeadDim,
                    " (e.g. 32, 40, 64, 80, 128)");
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, op, ": scale = ", scale,
                    "; expected a finite scale > 0 (default 1/sqrt(head_dim))");
  return {q.size(0), q.size(1), q.size(2), k.size(2), q.size(3)};
}

at::Tensor head_dim_innermost(const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); }

at::ScalarType acc_type(const at::Tensor& q) { return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

bool empty_problem(const AttentionShape& s) { return s.B == 0 || s.H == 0 || s.Lq == 0 || s.Lk == 0; }

}  // namespace

at::Tensor attention_output_empty(int64_t B, int64_t H, int64_t L, int64_t D, const at::TensorOptions& options) {
  return at::empty({B, L, H, D}, options).transpose(1, 2);
}

AttentionArgs prepare_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale,
                                bool allocate) {
  AttentionArgs a;
  a.shape = check_qkv(kOp, q, k, v, scale);
  a.scale = scale;
  if (!allocate) return a;
  const auto& s = a.shape;
  a.q = head_dim_innermost(q);
  a.k = head_dim_innermost(k);
  a.v = head_dim_innermost(v);
  a.out = attention_output_empty(s.B, s.H, s.Lq, s.D, q.options());
  a.lse = at::empty({s.B, s.H, s.Lq}, q.options().dtype(acc_type(q)));
  if (empty_problem(s)) {
    a.out.zero_();
    a.lse.fill_(-std::numeric_limits<double>::infinity());
    a.done = true;
  }
  return a;
}

AttentionBackwardArgs prepare_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                 double scale, bool allocate) {
  AttentionBackwardArgs a;
  a.shape = check_qkv(kBackward, q, k, v, scale);
  a.scale = scale;
  const auto& s = a.shape;
  for (const auto* p : {&grad_out, &out}) {
    const char* name = p == &grad_out ? "grad_out" : "out";
    TORCH_CHECK_VALUE(p->dim() == 4 && p->size(0) == s.B && p->size(1) == s.H && p->size(2) == s.Lq &&
                          p->size(3) == s.D,
                      kBackward, ": ", name, " has shape ", p->sizes(), "; expected [", s.B, ", ", s.H, ", ", s.Lq,
                      ", ", s.D, "], the shape of q");
    check_same_kind(kBackward, name, *p, q);
  }
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.H && lse.size(2) == s.Lq &&
                  lse.scalar_type() == acc_type(q) && lse.device() == q.device(),
              kBackward, ": lse has shape ", lse.sizes(), " and dtype ", lse.scalar_type(), "; expected [", s.B, ", ",
              s.H, ", ", s.Lq, "] of ", acc_type(q), " on ", q.device(), ", as the forward returned");
  if (!allocate) return a;
  a.grad_out = head_dim_innermost(grad_out);
  a.q = head_dim_innermost(q);
  a.k = head_dim_innermost(k);
  a.v = head_dim_innermost(v);
  a.out = head_dim_innermost(out);
  a.lse = lse.contiguous();
  a.dq = attention_output_empty(s.B, s.H, s.Lq, s.D, q.options());
  a.dk = attention_output_empty(s.B, s.H, s.Lk, s.D, q.options());
  a.dv = attention_output_empty(s.B, s.H, s.Lk, s.D, q.options());
  if (empty_problem(s)) {
    a.dq.zero_();
    a.dk.zero_();
    a.dv.zero_();
    a.done = true;
  }
  return a;
}

}  // namespace diffusion_ext
