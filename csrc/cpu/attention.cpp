// attention on the CPU: out = softmax(scale·q·kᵀ)·v and its backward, FlashAttention-2 style (Dao 2023):
// the Lq×Lk scores only ever exist one score tile (kBlockQ × key_block) at a time, in a per-thread buffer.
//
// Forward (Dao 2023, Alg. 1): one task per (b, h, chunk of query rows). The chunk's q rows are packed once
// (times the scale), then for each key tile: Kᵀ and V are packed once and every query tile of the chunk
// computes S = Q·Kᵀ, updates its running max m and sum l (online softmax) and adds P·V to its output
// accumulator, rescaled by e^{m_old − m_new}. Key tiles outermost let a chunk reuse each packed K, V tile
// across all its query tiles; the chunk is capped so its q and output tiles stay in L2.
//
// Backward (Dao 2023, Alg. 2): delta_i = rowsum(dO_i ∘ O_i) first; then one task per (b, h, range of key
// tiles) owns dK and dV of its keys: for each of its key tiles and every query tile it recomputes
// P = exp(S − lse), adds dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P ∘ (dP − delta), dK += dSᵀ·Q, dQ += dS·K. dQ is a
// sum over all keys; instead of atomics, each task accumulates it in its own buffer (the whole head's
// rows), written straight to dq when a task owns all keys of its head, else to a workspace slot that a
// last pass sums. The key range is split only when there are fewer than 4 heads per thread, so the
// common case does the 5 tile products of Alg. 2 and no second pass; the rare case (few, long heads)
// pays one extra Lq×D buffer per split instead of recomputing S and dP.
//
// Precision: tiles are packed to the accumulation dtype (fp32; fp64 for fp64 inputs), so fp16/bf16 inputs
// are computed in fp32. The scale is folded into the packed q: S = (scale·q)·kᵀ, and then
// dK = scale·dSᵀ·Q = dSᵀ·(scale·Q) uses the same packed tile; dQ = scale·dS·K is scaled when written.
#include "attention_kernels.h"  // first: it selects at::vec's capability

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../attention_args.h"
#include "../ops.h"

namespace diffusion_ext {
namespace {

namespace kern = attention_cpu_kernels;
using kern::Update;

constexpr int64_t kBlockQ = 64;                 // query rows of a score tile
constexpr int64_t kChunkBytes = 256 * 1024;     // forward: packed q + output accumulator of one task
constexpr int64_t kTasksPerThread = 4;          // enough tasks to balance the threads

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Key columns of a score tile. 128 for head dims up to 64, where the per-row softmax work (max, exp,
// sums, the rescale of the output) weighs more against the tile products: fp32 forward at (64, 4, 256,
// 32) on one AVX-512 core 67 → 73 GFLOP/s, D = 64 89 → 92. 64 above (D = 128: 94 vs 90 GFLOP/s with
// 128), where a 128-key Kᵀ tile would no longer fit L1 beside the others.
int64_t key_block(int64_t Dp) { return Dp <= 64 ? 128 : 64; }

// How many tasks to split each of `heads` heads into: 1 with enough heads, up to max_split otherwise.
int64_t splits_per_head(int64_t heads, int64_t max_split) {
  const int64_t target = kTasksPerThread * at::get_num_threads();
  return std::clamp<int64_t>(ceil_div(target, heads), 1, std::max<int64_t>(max_split, 1));
}

template <typename acc_t>
at::Tensor scratch(int64_t n) {
  return at::empty({n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// ---------------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward(const AttentionArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  const AttentionShape& s = a.shape;
  const int64_t D = s.D, Dp = kern::round_up(D, W), Bk = key_block(Dp), Bkp = kern::round_up(Bk, W);
  const int64_t heads = s.B * s.H;
  const auto acc_scale = static_cast<acc_t>(a.scale);

  // Query rows per task: a multiple of kBlockQ, at most what kChunkBytes holds, and small enough to give
  // every thread several tasks.
  const int64_t cap = std::max<int64_t>(kBlockQ, kChunkBytes / (2 * Dp * int64_t(sizeof(acc_t))) / kBlockQ * kBlockQ);
  const int64_t want = std::max(ceil_div(s.Lq, cap), splits_per_head(heads, ceil_div(s.Lq, kBlockQ)));
  const int64_t rows = kern::round_up(ceil_div(s.Lq, want), kBlockQ);
  const int64_t chunks = ceil_div(s.Lq, rows);

  const AttentionStrides sq = AttentionStrides::of(a.q), sk = AttentionStrides::of(a.k),
                         sv = AttentionStrides::of(a.v), so = AttentionStrides::of(a.out);
  const scalar_t* q = a.q.const_data_ptr<scalar_t>();
  const scalar_t* k = a.k.const_data_ptr<scalar_t>();
  const scalar_t* v = a.v.const_data_ptr<scalar_t>();
  scalar_t* out = a.out.mutable_data_ptr<scalar_t>();
  acc_t* lse = a.lse.mutable_data_ptr<acc_t>();

  // per-thread buffer: Qs, O (rows × Dp) | m, l, alpha (rows) | Kᵀ (D × Bkp) | V (Bk × Dp) | S
  const int64_t n_scratch = 2 * rows * Dp + 3 * rows + D * Bkp + Bk * Dp + kBlockQ * Bkp;

  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = scratch<acc_t>(n_scratch);
    acc_t* Qs = buf.mutable_data_ptr<acc_t>();
    acc_t* O = Qs + rows * Dp;
    acc_t* m = O + rows * Dp;
    acc_t* l = m + rows;
    acc_t* alpha = l + rows;
    acc_t* Kt = alpha + rows;
    acc_t* Vb = Kt + D * Bkp;
    acc_t* S = Vb + Bk * Dp;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, b = bh / s.H, h = bh % s.H;
      const int64_t r0 = (task % chunks) * rows, nr = std::min(rows, s.Lq - r0);
      const scalar_t* qh = q + b * sq.b + h * sq.h;
      const scalar_t* kh = k + b * sk.b + h * sk.h;
      const scalar_t* vh = v + b * sv.b + h * sv.h;

      kern::pack_rows(qh + r0 * sq.l, sq.l, nr, D, Qs, Dp, acc_scale);
      std::fill(m, m + nr, -std::numeric_limits<acc_t>::infinity());
      std::fill(l, l + nr, acc_t(0));

      for (int64_t j0 = 0; j0 < s.Lk; j0 += Bk) {
        const int64_t nc = std::min(Bk, s.Lk - j0), ncp = kern::round_up(nc, W);
        kern::pack_transposed(kh + j0 * sk.l, sk.l, nc, D, Kt, Bkp);
        kern::pack_rows(vh + j0 * sv.l, sv.l, nc, D, Vb, Dp, acc_t(1));
        for (int64_t i0 = 0; i0 < nr; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, nr - i0);
          kern::gemm(nq, ncp, D, Qs + i0 * Dp, Dp, 1, Kt, Bkp, S, Bkp, Update::kStore);
          kern::mask_padding(S, nq, Bkp, nc, ncp);
          kern::online_softmax(S, nq, Bkp, ncp, m + i0, l + i0, alpha + i0);
          // The first key tile stores (the accumulator holds garbage, and alpha = 0 would not clear a NaN).
          kern::gemm(nq, Dp, nc, S, Bkp, 1, Vb, Dp, O + i0 * Dp, Dp, j0 == 0 ? Update::kStore : Update::kScaleAdd,
                     alpha + i0);
        }
      }

      // out = O / l; lse = m + log l (natural log: S already includes the scale).
      acc_t* lse_h = lse + bh * s.Lq + r0;
      scalar_t* out_h = out + b * so.b + h * so.h + r0 * so.l;
      for (int64_t r = 0; r < nr; ++r) {
        const acc_t inv = acc_t(1) / l[r];
        const acc_t* o = O + r * Dp;
        scalar_t* dst = out_h + r * so.l;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<scalar_t>(o[d] * inv);
        lse_h[r] = m[r] + std::log(l[r]);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------

// delta_i = Σ_d dO_id·O_id (Dao 2023, Alg. 2 line 4), in the accumulation dtype, (B, H, Lq) contiguous.
template <typename scalar_t, typename acc_t>
at::Tensor row_dot(const AttentionBackwardArgs& a) {
  const AttentionShape& s = a.shape;
  at::Tensor delta = scratch<acc_t>(s.B * s.H * s.Lq);
  const AttentionStrides sg = AttentionStrides::of(a.grad_out), so = AttentionStrides::of(a.out);
  const scalar_t* g = a.grad_out.const_data_ptr<scalar_t>();
  const scalar_t* o = a.out.const_data_ptr<scalar_t>();
  acc_t* dst = delta.mutable_data_ptr<acc_t>();
  at::parallel_for(0, s.B * s.H * s.Lq, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i % s.Lq, bh = i / s.Lq, b = bh / s.H, h = bh % s.H;
      const scalar_t* gr = g + b * sg.b + h * sg.h + r * sg.l;
      const scalar_t* orow = o + b * so.b + h * so.h + r * so.l;
      acc_t sum = 0;
      for (int64_t d = 0; d < s.D; ++d) sum += static_cast<acc_t>(gr[d]) * static_cast<acc_t>(orow[d]);
      dst[i] = sum;
    }
  });
  return delta;
}

// dst (rows × D, row stride ld) = mul·src (rows × Dp).
template <typename scalar_t, typename acc_t>
void write_rows(const acc_t* src, int64_t Dp, int64_t rows, int64_t D, scalar_t* dst, int64_t ld, acc_t mul) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[r * ld + d] = static_cast<scalar_t>(mul * src[r * Dp + d]);
}

template <typename scalar_t>
void backward(const AttentionBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t W = at::vec::Vectorized<acc_t>::size();
  const AttentionShape& s = a.shape;
  const int64_t D = s.D, Dp = kern::round_up(D, W), Bk = key_block(Dp), Bkp = kern::round_up(Bk, W);
  const int64_t heads = s.B * s.H, Lq = s.Lq;
  const auto acc_scale = static_cast<acc_t>(a.scale);

  const at::Tensor delta = row_dot<scalar_t, acc_t>(a);

  const int64_t key_tiles = ceil_div(s.Lk, Bk);
  const int64_t tiles_per_task = ceil_div(key_tiles, splits_per_head(heads, key_tiles));
  const int64_t splits = ceil_div(key_tiles, tiles_per_task);
  // With the keys of a head split over tasks, each task's partial dQ goes to its own slot, summed below.
  at::Tensor workspace = splits > 1 ? scratch<acc_t>(heads * splits * Lq * Dp) : at::Tensor();

  const AttentionStrides sq = AttentionStrides::of(a.q), sk = AttentionStrides::of(a.k),
                         sv = AttentionStrides::of(a.v), sg = AttentionStrides::of(a.grad_out),
                         sdq = AttentionStrides::of(a.dq), sdk = AttentionStrides::of(a.dk),
                         sdv = AttentionStrides::of(a.dv);
  const scalar_t* q = a.q.const_data_ptr<scalar_t>();
  const scalar_t* k = a.k.const_data_ptr<scalar_t>();
  const scalar_t* v = a.v.const_data_ptr<scalar_t>();
  const scalar_t* g = a.grad_out.const_data_ptr<scalar_t>();
  const acc_t* lse = a.lse.const_data_ptr<acc_t>();
  const acc_t* dlt = delta.const_data_ptr<acc_t>();
  scalar_t* dq = a.dq.mutable_data_ptr<scalar_t>();
  scalar_t* dk = a.dk.mutable_data_ptr<scalar_t>();
  scalar_t* dv = a.dv.mutable_data_ptr<scalar_t>();
  acc_t* ws = splits > 1 ? workspace.mutable_data_ptr<acc_t>() : nullptr;

  // per-thread buffer: Qs, dO (Lq × Dp) | dQ (Lq × Dp, only without split) | Kᵀ, Vᵀ (D × Bkp)
  //                    | K, dK, dV (Bk × Dp) | P, dP (kBlockQ × Bkp)
  const int64_t n_scratch = (splits > 1 ? 2 : 3) * Lq * Dp + 2 * D * Bkp + 3 * Bk * Dp + 2 * kBlockQ * Bkp;

  at::parallel_for(0, heads * splits, 1, [&](int64_t begin, int64_t end) {
    at::Tensor buf = scratch<acc_t>(n_scratch);
    acc_t* Qs = buf.mutable_data_ptr<acc_t>();
    acc_t* dO = Qs + Lq * Dp;
    acc_t* p = dO + Lq * Dp;
    acc_t* dQ_own = nullptr;
    if (splits == 1) {
      dQ_own = p;
      p += Lq * Dp;
    }
    acc_t* Kt = p;
    acc_t* Vt = Kt + D * Bkp;
    acc_t* Kr = Vt + D * Bkp;
    acc_t* dK = Kr + Bk * Dp;
    acc_t* dV = dK + Bk * Dp;
    acc_t* P = dV + Bk * Dp;
    acc_t* dP = P + kBlockQ * Bkp;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / splits, b = bh / s.H, h = bh % s.H, split = task % splits;
      const scalar_t* kh = k + b * sk.b + h * sk.h;
      const scalar_t* vh = v + b * sv.b + h * sv.h;
      const acc_t* lse_h = lse + bh * Lq;
      const acc_t* delta_h = dlt + bh * Lq;
      acc_t* dQ = splits > 1 ? ws + task * Lq * Dp : dQ_own;

      kern::pack_rows(q + b * sq.b + h * sq.h, sq.l, Lq, D, Qs, Dp, acc_scale);
      kern::pack_rows(g + b * sg.b + h * sg.h, sg.l, Lq, D, dO, Dp, acc_t(1));
      std::fill(dQ, dQ + Lq * Dp, acc_t(0));

      const int64_t t_end = std::min(key_tiles, (split + 1) * tiles_per_task);
      for (int64_t t = split * tiles_per_task; t < t_end; ++t) {
        const int64_t j0 = t * Bk, nc = std::min(Bk, s.Lk - j0), ncp = kern::round_up(nc, W);
        kern::pack_transposed(kh + j0 * sk.l, sk.l, nc, D, Kt, Bkp);
        kern::pack_transposed(vh + j0 * sv.l, sv.l, nc, D, Vt, Bkp);
        kern::pack_rows(kh + j0 * sk.l, sk.l, nc, D, Kr, Dp, acc_t(1));
        for (int64_t i0 = 0; i0 < Lq; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, Lq - i0);
          const Update first = i0 == 0 ? Update::kStore : Update::kAdd;
          const acc_t* Qi = Qs + i0 * Dp;
          const acc_t* dOi = dO + i0 * Dp;
          kern::gemm(nq, ncp, D, Qi, Dp, 1, Kt, Bkp, P, Bkp, Update::kStore);  // S = (scale·Q)·Kᵀ
          kern::mask_padding(P, nq, Bkp, nc, ncp);
          kern::probabilities(P, nq, Bkp, ncp, lse_h + i0);                     // P = exp(S − lse)
          kern::gemm(nc, Dp, nq, P, 1, Bkp, dOi, Dp, dV, Dp, first);            // dV += Pᵀ·dO
          kern::gemm(nq, ncp, D, dOi, Dp, 1, Vt, Bkp, dP, Bkp, Update::kStore); // dP = dO·Vᵀ
          kern::score_grad(P, dP, nq, Bkp, ncp, delta_h + i0);                  // dS = P ∘ (dP − delta)
          kern::gemm(nc, Dp, nq, dP, 1, Bkp, Qi, Dp, dK, Dp, first);            // dK += dSᵀ·(scale·Q)
          kern::gemm(nq, Dp, nc, dP, Bkp, 1, Kr, Dp, dQ + i0 * Dp, Dp, Update::kAdd);  // dQ += dS·K
        }
        write_rows(dK, Dp, nc, D, dk + b * sdk.b + h * sdk.h + j0 * sdk.l, sdk.l, acc_t(1));
        write_rows(dV, Dp, nc, D, dv + b * sdv.b + h * sdv.h + j0 * sdv.l, sdv.l, acc_t(1));
      }
      if (splits == 1) write_rows(dQ, Dp, Lq, D, dq + b * sdq.b + h * sdq.h, sdq.l, acc_scale);
    }
  });

  if (splits > 1) {
    // dq = scale · Σ over the key splits of the partial dQ.
    at::parallel_for(0, heads * Lq, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t r = i % Lq, bh = i / Lq, b = bh / s.H, h = bh % s.H;
        scalar_t* dst = dq + b * sdq.b + h * sdq.h + r * sdq.l;
        for (int64_t d = 0; d < D; ++d) {
          acc_t sum = 0;
          for (int64_t sp = 0; sp < splits; ++sp) sum += ws[((bh * splits + sp) * Lq + r) * Dp + d];
          dst[d] = static_cast<scalar_t>(acc_scale * sum);
        }
      }
    });
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                 double scale) {
  AttentionArgs a = prepare_attention(q, k, v, scale);
  if (!a.done) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(), "attention_cpu",
                                    [&] { forward<scalar_t>(a); });
  }
  return {a.out, a.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(const at::Tensor& grad_out, const at::Tensor& q,
                                                                      const at::Tensor& k, const at::Tensor& v,
                                                                      const at::Tensor& out, const at::Tensor& lse,
                                                                      double scale) {
  AttentionBackwardArgs a = prepare_attention_backward(grad_out, q, k, v, out, lse, scale);
  if (!a.done) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(), "attention_backward_cpu",
                                    [&] { backward<scalar_t>(a); });
  }
  return {a.dq, a.dk, a.dv};
}

TORCH_LIBRARY_IMPL(diffusion_ext, CPU, m) {
  m.impl("attention", &attention_cpu);
  m.impl("attention_backward", &attention_backward_cpu);
}

}  // namespace diffusion_ext
