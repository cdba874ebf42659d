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
// are computed in fp32 — except the bf16/fp16 forward where oneDNN's brgemm can take it (forward_brgemm
// below: inputs as they are, fp32 accumulation, P rounded once). The scale is folded into the packed q:
// S = (scale·q)·kᵀ, and then
// dK = scale·dSᵀ·Q = dSᵀ·(scale·Q) uses the same packed tile; dQ = scale·dS·K is scaled when written.
#include "attention_kernels.h"  // first: it selects at::vec's capability
#include "store_rounded.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

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

// The forward's tasks: each (b, h) split into `chunks` runs of `rows` query rows (a multiple of kBlockQ), at
// most what kChunkBytes holds at `row_bytes` per row, and enough of them to give every thread several tasks.
std::pair<int64_t, int64_t> query_chunks(const AttentionShape& s, int64_t row_bytes) {
  const int64_t cap = std::max<int64_t>(kBlockQ, kChunkBytes / row_bytes / kBlockQ * kBlockQ);
  const int64_t want = std::max(ceil_div(s.Lq, cap), splits_per_head(s.B * s.H, ceil_div(s.Lq, kBlockQ)));
  const int64_t rows = kern::round_up(ceil_div(s.Lq, want), kBlockQ);
  return {rows, ceil_div(s.Lq, rows)};
}

// The forward's tensors: pointers and strides, and the last step of a task.
template <typename scalar_t>
struct ForwardIo {
  using acc_t = at::opmath_type<scalar_t>;
  AttentionStrides sq, sk, sv, so;
  const scalar_t *q, *k, *v;
  scalar_t* out;
  acc_t* lse;
  explicit ForwardIo(const AttentionArgs& a)
      : sq(AttentionStrides::of(a.q)), sk(AttentionStrides::of(a.k)), sv(AttentionStrides::of(a.v)),
        so(AttentionStrides::of(a.out)), q(a.q.const_data_ptr<scalar_t>()), k(a.k.const_data_ptr<scalar_t>()),
        v(a.v.const_data_ptr<scalar_t>()), out(a.out.mutable_data_ptr<scalar_t>()),
        lse(a.lse.mutable_data_ptr<acc_t>()) {}

  // Query rows [r0, r0 + nr) of head (b, h): out = O / l (O's rows ldo apart), lse = m + log l (natural log:
  // m includes the scale).
  void write_rows(const AttentionShape& s, int64_t b, int64_t h, int64_t r0, int64_t nr, const acc_t* O, int64_t ldo,
                  const acc_t* m, const acc_t* l) const {
    acc_t* lse_h = lse + (b * s.H + h) * s.Lq + r0;
    scalar_t* out_h = out + b * so.b + h * so.h + r0 * so.l;
    for (int64_t r = 0; r < nr; ++r) {
      const acc_t inv = acc_t(1) / l[r];
      for (int64_t d = 0; d < s.D; ++d) out_h[r * so.l + d] = static_cast<scalar_t>(O[r * ldo + d] * inv);
      lse_h[r] = m[r] + std::log(l[r]);
    }
  }
};

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

  const auto [rows, chunks] = query_chunks(s, 2 * Dp * int64_t(sizeof(acc_t)));

  const ForwardIo<scalar_t> io(a);
  const AttentionStrides &sq = io.sq, &sk = io.sk, &sv = io.sv;
  const scalar_t *q = io.q, *k = io.k, *v = io.v;

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

      io.write_rows(s, b, h, r0, nr, O, Dp, m, l);
    }
  });
}

#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
// ---------------------------------------------------------------------------------------------------
// forward, bf16/fp16 on oneDNN's brgemm micro-kernels
// ---------------------------------------------------------------------------------------------------
// Where at::native::cpublas can pack the dtype (oneDNN's brgemm with AMX tiles: could_pack), the two tile
// products run there: S = Q·Kᵀ straight from q's rows and P·V with P rounded to the input dtype (the eager
// reference rounds P too, and S as well), both accumulated in fp32. The register-blocked fp32 products above
// run at ~90 GFLOP/s per core; brgemm at 0.9-1.4 TFLOP/s on this project's AMX VM (64×32·32×64 and 64×128·128×32
// tiles), which left the softmax as the forward's main cost: bf16 (64, 4, 256, 32) forward 12.0 ms, 0.65× SDPA's
// CPU flash kernel (which uses the same micro-kernels), before. The scale is applied in fp32 inside the
// softmax's exponent, e^{scale·s − m} as one FMA (folding it into q would round scale·q to bf16). brgemm's B
// operand is packed in its VNNI layout: pairs along the reduction dim, element (k, n) at [(k/2·N + n)·2 + k mod 2]
// (checked against cpublas::pack).
// Tiles of up to kBrgemmRows queries × kBlockKeys keys, each tile product one brgemm call: cpublas::brgemm
// looks its kernel up in a cache on every call, and with 64 × 64 tiles (20 calls per (64, 4, 256, 32) head)
// the two threads lost a third of their speed to it (1 thread: 3.2 ms per 64 heads; 2: 4.3 ms per 128).
// 256 keys per tile also bring a row's softmax bookkeeping (two reductions, e^{m − m_new}, the rescale of
// the accumulator) down to once per 256 keys.
constexpr int64_t kBrgemmRows = 256;
constexpr int64_t kBlockKeys = 256;

// Whether forward_brgemm takes this problem: a packable dtype and a head dim brgemm's N and VNNI accept.
bool brgemm_forward_applies(const AttentionArgs& a) {
  const int64_t D = a.shape.D;
  return D % 16 == 0 && D <= 64 && at::native::cpublas::could_pack(a.q.scalar_type());
}

// Kᵀ of keys [0, nc) (rows of ld elements) in VNNI layout for S = Q·Kᵀ, N = ncp (a multiple of 16):
// B(d, n) = k[n, d], so the pair (k[n, 2p], k[n, 2p + 1]) — one 32-bit word of key n's row — goes to word
// p·ncp + n. Keys nc ≤ n < ncp are zero.
template <typename T>
void pack_keys_vnni(const T* k, int64_t ld, int64_t nc, int64_t ncp, int64_t D, T* out) {
  static_assert(sizeof(T) == 2, "pairs of 16-bit elements");
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t n = 0; n < nc; ++n) {
    const T* row = k + n * ld;
    for (int64_t p = 0; p < D / 2; ++p) {
      uint32_t w;
      std::memcpy(&w, row + 2 * p, sizeof(w));
      dst[p * ncp + n] = w;
    }
  }
  for (int64_t p = 0; p < D / 2; ++p) std::fill(dst + p * ncp + nc, dst + (p + 1) * ncp, 0u);
}

// Values [0, nc) (rows of ld elements, D wide) in VNNI layout for O += P·V, K = ncp rows: cpublas::pack for
// a whole tile; element by element, with zero rows up to ncp, for the last one.
template <typename T>
void pack_values_vnni(const T* v, int64_t ld, int64_t nc, int64_t ncp, int64_t D, T* out) {
  if (nc == ncp) {
    const auto dt = c10::CppTypeToScalarType<T>::value;
    at::native::cpublas::pack(nc, D, ld, D, dt, dt, v, out);
    return;
  }
  for (int64_t r = 0; r < ncp; ++r) {
    for (int64_t d = 0; d < D; ++d) out[((r / 2) * D + d) * 2 + r % 2] = r < nc ? v[r * ld + d] : T(0);
  }
}

// One row of the online softmax (Dao 2023, Alg. 1 lines 8-10) on unscaled scores s[0, ncp) (−inf past the
// keys): m_new = max(m, scale·max s), P = e^{scale·s − m_new} rounded once into p (the input dtype), l and m
// updated; returns α = e^{m − m_new}. scale > 0, so the max of scale·s is scale times the max of s.
template <typename T>
float softmax_row_into(const float* s, int64_t ncp, float scale, float& m, float& l, T* p) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  V vmax(-std::numeric_limits<float>::infinity());
  for (int64_t c = 0; c < ncp; c += W) vmax = kern::fast_max(vmax, V::loadu(s + c));
  const float tile_max = at::vec::vec_reduce_all<float>([](V& x, V& y) { return kern::fast_max(x, y); }, vmax);
  const float m_new = std::max(m, scale * tile_max);
  const V vs(scale), vneg_m(-m_new);
  V vsum(0.0f);
  int64_t c = 0;
  for (; c + 2 * W <= ncp; c += 2 * W) {
    const V p0 = kern::exp_nonpositive(at::vec::fmadd(V::loadu(s + c), vs, vneg_m));
    const V p1 = kern::exp_nonpositive(at::vec::fmadd(V::loadu(s + c + W), vs, vneg_m));
    vsum = vsum + p0 + p1;
    store_rounded(p0, p1, p + c, 2 * W);
  }
  if (c < ncp) {  // one vector left (ncp is a multiple of W)
    const V p0 = kern::exp_nonpositive(at::vec::fmadd(V::loadu(s + c), vs, vneg_m));
    vsum = vsum + p0;
    store_rounded(p0, V(0.0f), p + c, W);
  }
  const float alpha = std::exp(m - m_new);  // 0 on the first tile (m = −inf)
  l = alpha * l + at::vec::vec_reduce_all<float>([](V& x, V& y) { return x + y; }, vsum);
  m = m_new;
  return alpha;
}

template <typename scalar_t>
void forward_brgemm(const AttentionArgs& a) {
  using acc_t = float;
  using V = at::vec::Vectorized<acc_t>;
  constexpr int64_t W = V::size();
  const AttentionShape& s = a.shape;
  const int64_t D = s.D, heads = s.B * s.H;
  const acc_t scale = static_cast<acc_t>(a.scale);
  const auto [rows, chunks] = query_chunks(s, D * int64_t(sizeof(acc_t)));
  const ForwardIo<scalar_t> io(a);
  const AttentionStrides &sq = io.sq, &sk = io.sk, &sv = io.sv;
  const scalar_t *q = io.q, *k = io.k, *v = io.v;

  at::parallel_for(0, heads * chunks, 1, [&](int64_t begin, int64_t end) {
    // O (rows × D) | m, l (rows) | S (kBrgemmRows × kBlockKeys), fp32; P (kBrgemmRows × kBlockKeys), Kᵀ and V
    // packed, in scalar_t
    std::vector<acc_t> buf(rows * D + 2 * rows + kBrgemmRows * kBlockKeys);
    acc_t* O = buf.data();
    acc_t* m = O + rows * D;
    acc_t* l = m + rows;
    acc_t* S = l + rows;
    std::vector<scalar_t> packed(kBrgemmRows * kBlockKeys + 2 * kBlockKeys * D);
    scalar_t* P = packed.data();
    scalar_t* Kp = P + kBrgemmRows * kBlockKeys;
    scalar_t* Vp = Kp + kBlockKeys * D;

    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / chunks, b = bh / s.H, h = bh % s.H;
      const int64_t r0 = (task % chunks) * rows, nr = std::min(rows, s.Lq - r0);
      const scalar_t* qh = q + b * sq.b + h * sq.h + r0 * sq.l;
      const scalar_t* kh = k + b * sk.b + h * sk.h;
      const scalar_t* vh = v + b * sv.b + h * sv.h;
      std::fill(m, m + nr, -std::numeric_limits<acc_t>::infinity());
      std::fill(l, l + nr, acc_t(0));

      for (int64_t j0 = 0; j0 < s.Lk; j0 += kBlockKeys) {
        const int64_t nc = std::min(kBlockKeys, s.Lk - j0), ncp = kern::round_up(nc, W);
        pack_keys_vnni(kh + j0 * sk.l, sk.l, nc, ncp, D, Kp);
        pack_values_vnni(vh + j0 * sv.l, sv.l, nc, ncp, D, Vp);
        for (int64_t i0 = 0; i0 < nr; i0 += kBrgemmRows) {
          const int64_t nq = std::min(kBrgemmRows, nr - i0);
          // S = q·kᵀ, unscaled
          at::native::cpublas::brgemm(nq, ncp, D, sq.l, ncp, kBlockKeys, false, qh + i0 * sq.l, Kp, S);
          kern::mask_padding(S, nq, kBlockKeys, nc, ncp);
          acc_t* Oi = O + i0 * D;
          for (int64_t r = 0; r < nq; ++r) {  // P in the input dtype; the accumulator rescaled by α
            const acc_t alpha = softmax_row_into(S + r * kBlockKeys, ncp, scale, m[i0 + r], l[i0 + r], P + r * ncp);
            if (j0 > 0) {
              for (int64_t d = 0; d < D; d += W) (V::loadu(Oi + r * D + d) * V(alpha)).store(Oi + r * D + d);
            }
          }
          at::native::cpublas::brgemm(nq, D, ncp, ncp, D, D, j0 > 0, P, Vp, Oi);
        }
      }

      io.write_rows(s, b, h, r0, nr, O, D, m, l);
    }
    at::native::cpublas::brgemm_release();
  });
}
#endif  // CPUBLAS_BRGEMM_*

// ---------------------------------------------------------------------------------------------------
// backward
// ---------------------------------------------------------------------------------------------------

// Σ a[d]·b[d] in acc_t: for fp32/fp64 in vector lanes (one serial chain of D scalar FMAs per row was 5% of
// the fp32 backward at (16, 1, 64, 256) on an AVX2 EPYC), half precision converted element by element.
template <typename acc_t, typename scalar_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t sum = 0;
  int64_t d = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    using V = at::vec::Vectorized<acc_t>;
    V acc(acc_t(0));
    for (; d + V::size() <= n; d += V::size()) acc = at::vec::fmadd(V::loadu(a + d), V::loadu(b + d), acc);
    sum = at::vec::vec_reduce_all<acc_t>([](V& x, V& y) { return x + y; }, acc);
  }
  for (; d < n; ++d) sum += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return sum;
}

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
      dst[i] = dot<acc_t>(gr, orow, s.D);
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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(), "attention_cpu", [&] {
#if defined(CPUBLAS_BRGEMM_BF16BF16F32) && defined(CPUBLAS_BRGEMM_F16F16F32)
      if constexpr (sizeof(scalar_t) == 2) {
        if (brgemm_forward_applies(a)) return forward_brgemm<scalar_t>(a);
      }
#endif
      forward<scalar_t>(a);
    });
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
