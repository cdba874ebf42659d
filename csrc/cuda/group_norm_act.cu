// group_norm_act on CUDA: y = act(GroupNorm(x)) in one op, and its backward. The twin of
// cpu/group_norm_act.cpp; argument checks, allocation and the two layouts are in group_norm_args.h.
//
// Notation: x is (N, C, HW), G groups of Cg = C / G channels, M = Cg·HW elements per group (n, g), s a
// spatial position, c a channel, g(c) = c / Cg. The equations cited in the kernels (Wu & He 2018, "Group
// Normalization", then the activation of common/activations.h):
//   (1) μ = (1/M)·Σ x,   σ² = (1/M)·Σ (x − μ)²  (biased),   ρ = 1/√(σ² + ε)              per (n, g)
//   (2) x̂ = (x − μ)·ρ,   z = x̂·γ_c + β_c,   y = act(z)                                    per element
// Backward, recomputing z from x, μ and ρ (nothing else is saved):
//   (3) dz = dy·act'(z)
//   (4) ∂β_c = Σ_{n,s} dz,   ∂γ_c = Σ_{n,s} dz·x̂
//   (5) a = (1/M)·Σ_group dz·γ,   b = (1/M)·Σ_group dz·γ·x̂                                per (n, g)
//   (6) ∂x = ρ·(dz·γ − a − x̂·b)
// γ = 1 and β = 0 where weight and bias are absent. With FiLM (scale, shift), eqs. 2, 3, 5 and 6 use the
// per-(n, c) γ', β' of common/film.h (F1), tabulated once per call by gn_film_affine_kernel; gn_bwd_film_kernel
// turns the sums of eq. 4 into ∂s, ∂t (F2) and folds (1 + s) into them (F3), so that ∂γ, ∂β of eq. 4 then run
// unchanged. The FiLM kernels are separate instantiations (kFilm): without it they are the plain group norm's,
// instruction for instruction. Everything accumulates in acc_t = opmath_type (fp32, fp64 for fp64 x).
// Statistics are (count, mean, M2) triples: each thread computes them exactly for a chunk of up to 32 values
// held in registers (two passes over the registers, shifted by the chunk's first value), and chunks, threads,
// blocks and partial results are merged with Chan et al.'s formula (1979). No Σx² − (Σx)²/M anywhere, so
// x = 1000 + small noise keeps its variance. Every merge happens in a fixed order: results are bitwise
// reproducible run to run.
//
// The kernels (one launch plan per layout, chosen on the host):
//   forward, channels_first (a group is the contiguous run x[ng·M, (ng+1)·M)):
//     many groups (N·G >= #SMs): gn_fwd_cf_fused_kernel, one block per group: statistics, then y; x is
//       read once when the group fits in the block's registers (M <= 16384), else a second time from L2;
//     few groups: each group is cut into S chunks of one block each: gn_fwd_cf_partial_kernel (chunk
//       statistics) -> gn_combine_kernel (μ, ρ) -> gn_cf_apply_kernel (y).
//   forward, channels_last (a group is Cg adjacent channels of every row s): tiles of (rows) × (channel
//     packs): gn_fwd_cl_partial_kernel (per channel statistics over a chunk of rows, merged per group in
//     the block when the tile holds every channel) -> gn_combine_kernel -> gn_cl_apply_kernel.
//   backward, either layout: per (n, c) and row chunk r the sums (Σ dz, Σ dz·x̂) into a [N, R, C]
//     workspace (gn_bwd_cf_reduce_kernel or gn_bwd_cl_reduce_kernel); with FiLM gn_bwd_film_kernel (∂s, ∂t,
//     and for ∂γ, ∂β the sums folded to [N, 1, C] when there is a scale); then gn_bwd_param_grad_kernel (eq. 4,
//     summed over n and r) and gn_bwd_coef_kernel (eq. 5); then ∂x by gn_cf_apply_kernel or
//     gn_cl_apply_kernel with BackwardOp (eq. 6).
// Loads and stores move 16-byte packs of VL = 16 / sizeof(scalar_t) elements where the pointers are aligned
// and the packs cannot straddle a channel (channels_first: VL divides HW) or a row (channels_last: VL
// divides C); otherwise the same kernels run with VL = 1.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../common/activations.h"
#include "../common/film.h"
#include "../group_norm_args.h"
#include "../ops.h"

namespace diffusion_ext {
namespace {

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

constexpr int kWarp = 32;
constexpr int kUnroll = 4;             // packs (or rows) each thread loads before it computes
constexpr int kGroupThreadsMax = 512;  // block size limit of the channels_first statistics kernels
constexpr int kApplyThreadsMax = 256;  // block size limit of gn_cf_apply_kernel: at 512 threads (128 registers)
                                       // its 8-wide backward packs spilled on sm_90
constexpr int kTileThreads = 256;      // block size of the tile, combine and reduction kernels

// Rows (packs) each thread of the element-wise kernels (gn_cl_apply_kernel, gn_bwd_cl_reduce_kernel; the
// channels_first apply with 32-bit indices) loads before it computes: 2 for 8-wide packs, so that they fit in
// 128 registers (2 blocks per SM) and the channels_first bf16 apply does not spill on sm_90.
template <int VL>
constexpr int tile_unroll() {
  return VL >= 8 ? 2 : kUnroll;
}
// Packs each thread of the channels_first kernels loads before it computes: kUnroll with 32-bit indices; 2 with
// 64-bit ones (groups of 2^30 elements or more), whose index registers spilled on sm_90 at kUnroll.
template <typename index_t>
constexpr int cf_unroll() {
  return sizeof(index_t) == sizeof(int32_t) ? kUnroll : 2;
}
// Values per thread the fused forward keeps in registers (32 fp32 or 16 fp64 accumulators: 32 registers).
template <typename acc_t>
constexpr int kResidentValues = 128 / static_cast<int>(sizeof(acc_t));

// Elements per 16-byte pack: 4 for float, 8 for half and bfloat16, 2 for double.
template <typename scalar_t>
constexpr int pack_width() {
  return static_cast<int>(16 / sizeof(scalar_t));
}

// ---------------------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------------------

template <typename scalar_t, int VL>
struct alignas(sizeof(scalar_t) * VL) Pack {
  scalar_t v[VL];
};

// out[j] = p[j] for j < VL, in one load (p is aligned to the pack when VL > 1).
template <int VL, typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_pack(const scalar_t* __restrict__ p, acc_t* __restrict__ out) {
  const Pack<scalar_t, VL> q = *reinterpret_cast<const Pack<scalar_t, VL>*>(p);
#pragma unroll
  for (int j = 0; j < VL; ++j) out[j] = static_cast<acc_t>(q.v[j]);
}

// p[j] = in[j] rounded to scalar_t, in one store.
template <int VL, typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_pack(scalar_t* __restrict__ p, const acc_t* __restrict__ in) {
  Pack<scalar_t, VL> q;
#pragma unroll
  for (int j = 0; j < VL; ++j) q.v[j] = static_cast<scalar_t>(in[j]);
  *reinterpret_cast<Pack<scalar_t, VL>*>(p) = q;
}

template <typename T>
__device__ __forceinline__ T min_of(T a, T b) {
  return a < b ? a : b;
}

// a / b for a >= 0, b >= 1 whose quotient is a channel of a group (below 2^24 in practice), without a 64-bit
// division: fp32 division is within 1 of the quotient there, and the loops correct it (whatever the quotient).
__device__ __forceinline__ int64_t quotient_below_2_24(int64_t a, int64_t b) {
  int64_t q = static_cast<int64_t>(__fdividef(static_cast<float>(a), static_cast<float>(b)));
  while (q > 0 && q * b > a) --q;
  while ((q + 1) * b <= a) ++q;
  return q;
}

// a / b and a % b for a block index a < 2^31 and b >= 1, in 32-bit arithmetic: int64_t division is a
// subroutine call on the GPU, and a kernel that makes one spilled registers around it on sm_90.
struct SmallDiv {
  int64_t quot, rem;
};
__device__ __forceinline__ SmallDiv small_divmod(int64_t a, int64_t b) {
  if (b > a) return {0, a};
  const uint32_t ua = static_cast<uint32_t>(a), ub = static_cast<uint32_t>(b);
  return {static_cast<int64_t>(ua / ub), static_cast<int64_t>(ua % ub)};
}

// Statistics of a set of n values: their mean and M2 = Σ (v − mean)². {0, 0, 0} is the empty set.
template <typename acc_t>
struct Welford {
  acc_t n, mean, m2;
};

// The statistics of the union of two disjoint sets (Chan, Golub & LeVeque 1979).
template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> merge(const Welford<acc_t>& a, const Welford<acc_t>& b) {
  if (b.n == acc_t(0)) return a;
  if (a.n == acc_t(0)) return b;
  const acc_t n = a.n + b.n;
  const acc_t wb = b.n / n;
  const acc_t d = b.mean - a.mean;
  return {n, a.mean + d * wb, a.m2 + b.m2 + d * d * a.n * wb};
}

template <typename acc_t>
__device__ __forceinline__ Welford<acc_t> shfl_down(const Welford<acc_t>& w, int off) {
  return {__shfl_down_sync(0xffffffffu, w.n, off), __shfl_down_sync(0xffffffffu, w.mean, off),
          __shfl_down_sync(0xffffffffu, w.m2, off)};
}

// The two sums of eq. 4 (and, weighted by γ, of eq. 5) over a set of elements.
template <typename acc_t>
struct SumPair {
  acc_t dz, dz_xhat;  // Σ dz, Σ dz·x̂
};

// The workspaces are tensors of acc_t viewed as arrays of these structs.
static_assert(sizeof(Welford<float>) == 3 * sizeof(float) && sizeof(Welford<double>) == 3 * sizeof(double));
static_assert(sizeof(SumPair<float>) == 2 * sizeof(float) && sizeof(SumPair<double>) == 2 * sizeof(double));

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> merge(const SumPair<acc_t>& a, const SumPair<acc_t>& b) {
  return {a.dz + b.dz, a.dz_xhat + b.dz_xhat};
}

template <typename acc_t>
__device__ __forceinline__ SumPair<acc_t> shfl_down(const SumPair<acc_t>& p, int off) {
  return {__shfl_down_sync(0xffffffffu, p.dz, off), __shfl_down_sync(0xffffffffu, p.dz_xhat, off)};
}

// Lane 0 gets the merge of the warp's 32 values. Every lane of the warp must call it.
template <typename T>
__device__ __forceinline__ T warp_reduce(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) v = merge(v, shfl_down(v, off));
  return v;
}

// Every thread gets the merge of the block's values. blockDim.x is a multiple of 32; every thread calls.
template <typename T>
__device__ __forceinline__ T block_reduce_all(T v, T* sh /* __shared__ [kWarp] */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int nwarps = blockDim.x / kWarp;
  v = warp_reduce(v);
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < nwarps ? sh[lane] : T{};
    v = warp_reduce(v);
    if (lane == 0) sh[0] = v;
  }
  __syncthreads();
  const T all = sh[0];
  __syncthreads();  // sh may be reused
  return all;
}

// Exact statistics of v[0, k) (1 <= k <= K), computed in registers: the mean of v − v[0], then M2 from the
// deviations. Shifting by v[0] makes a common offset (x = 1000 + noise) cancel before any sum.
template <int K, typename acc_t>
__device__ __forceinline__ Welford<acc_t> chunk_stats(const acc_t (&v)[K], int k) {
  const acc_t shift = v[0];
  acc_t s = acc_t(0);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (i < k) s += v[i] - shift;
  }
  const acc_t cnt = static_cast<acc_t>(k);
  const acc_t d = s / cnt;  // mean − shift
  acc_t m2 = acc_t(0);
#pragma unroll
  for (int i = 0; i < K; ++i) {
    if (i < k) {
      const acc_t e = (v[i] - shift) - d;
      m2 += e * e;
    }
  }
  return {cnt, shift + d, m2};
}

// ρ of eq. 1 from a group's statistics, in double like the CPU kernel (once per group). An empty group
// has σ² = 0 and so ρ = 1/√ε.
template <typename acc_t>
__device__ __forceinline__ acc_t rstd_of(const Welford<acc_t>& w, double eps) {
  const double var = w.n > acc_t(0) ? static_cast<double>(w.m2) / static_cast<double>(w.n) : 0.0;
  return static_cast<acc_t>(1.0 / ::sqrt((var > 0.0 ? var : 0.0) + eps));
}

// Per-group values used element-wise: μ and ρ (eq. 1), and the backward's a and b (eq. 5).
template <typename acc_t>
struct GroupParams {
  acc_t mean, rstd, a, b;
};

// The γ, β that eqs. 2, 3, 5 and 6 apply to the channels of one sample: γ_c, β_c, or with FiLM γ'_nc, β'_nc
// (F1) from the table gn_film_affine_kernel makes once per call (one 2·acc_t load per channel where computing
// them in place would take four loads and the registers of four pointers). Made once (ParamSrc::sample) where
// a block or thread stays in one sample, so that the per-pack code indexes by channel alone.
// γ or β [C] in x's dtype, or in acc_t (float32 parameters of a half x: mixed precision, group_norm_args.cpp
// check_affine); `wide` is the same for every thread of a call, so the branch does not diverge.
template <typename scalar_t>
struct ChannelParam {
  using acc_t = acc_type<scalar_t>;
  const void* p;  // nullptr: absent
  bool wide;      // p holds acc_t

  __device__ __forceinline__ acc_t at(int64_t c, acc_t absent) const {
    if (p == nullptr) return absent;
    return wide ? static_cast<const acc_t*>(p)[c] : static_cast<acc_t>(static_cast<const scalar_t*>(p)[c]);
  }
};

// ∂γ or ∂β [C] out, in the parameter's dtype (ChannelParam), or nullptr: not wanted.
template <typename scalar_t>
struct ChannelGrad {
  using acc_t = acc_type<scalar_t>;
  void* p;
  bool wide;

  __device__ __forceinline__ void store(int64_t c, acc_t v) const {
    if (wide) {
      static_cast<acc_t*>(p)[c] = v;
    } else {
      static_cast<scalar_t*>(p)[c] = static_cast<scalar_t>(v);
    }
  }
};

template <typename scalar_t, bool kFilm>
struct SampleAffine {
  using acc_t = acc_type<scalar_t>;
  ChannelParam<scalar_t> gamma;  // [C] γ, or absent: γ = 1 (read without FiLM)
  ChannelParam<scalar_t> beta;   // [C] β, or absent: β = 0 (read without FiLM)
  const Affine<acc_t>* film;     // [C] this sample's γ', β' (read with FiLM)

  __device__ __forceinline__ Affine<acc_t> operator()(int64_t c) const {
    if constexpr (kFilm) {
      return film[c];
    } else {
      return {gamma.at(c, acc_t(1)), beta.at(c, acc_t(0))};
    }
  }
};

// Where the per-group, per-channel and (FiLM) per-(n, c) parameters live. scale, shift and the γ', β' table are
// read only when kFilm: the plain kernels never look at them.
template <typename scalar_t, bool kFilm = false>
struct ParamSrc {
  using acc_t = acc_type<scalar_t>;
  const acc_t* mean;      // [N, G] μ
  const acc_t* rstd;      // [N, G] ρ
  const acc_t* coef;      // [N, G, 2] (a, b) of eq. 5, or nullptr (forward)
  ChannelParam<scalar_t> gamma;  // [C] γ, or absent: γ = 1
  ChannelParam<scalar_t> beta;   // [C] β, or absent: β = 0
  int64_t G, Cg;
  const scalar_t* scale;  // [N, C] s, (n, c) at n·scale_sn + c, or nullptr: s = 0
  const scalar_t* shift;  // [N, C] t, (n, c) at n·shift_sn + c, or nullptr: t = 0
  int64_t scale_sn, shift_sn, C;
  const Affine<acc_t>* film;  // [N, C] γ', β' (F1), made by gn_film_affine_kernel from the above

  __device__ __forceinline__ GroupParams<acc_t> group(int64_t ng) const {
    GroupParams<acc_t> p{mean[ng], rstd[ng], acc_t(0), acc_t(0)};
    if (coef != nullptr) {
      p.a = coef[2 * ng];
      p.b = coef[2 * ng + 1];
    }
    return p;
  }
  __device__ __forceinline__ SampleAffine<scalar_t, kFilm> sample(int64_t n) const {
    return {gamma, beta, kFilm ? film + n * C : nullptr};
  }
  // γ_c, β_c, or with FiLM γ'_nc, β'_nc
  __device__ __forceinline__ Affine<acc_t> affine(int64_t n, int64_t c) const { return sample(n)(c); }
  // γ_c, β_c, s_nc and t_nc as given
  __device__ __forceinline__ Affine<acc_t> channel(int64_t c) const {
    return SampleAffine<scalar_t, false>{gamma, beta, nullptr}(c);
  }
  __device__ __forceinline__ acc_t scale_of(int64_t n, int64_t c) const {
    return scale != nullptr ? static_cast<acc_t>(scale[n * scale_sn + c]) : acc_t(0);
  }
  __device__ __forceinline__ acc_t shift_of(int64_t n, int64_t c) const {
    return shift != nullptr ? static_cast<acc_t>(shift[n * shift_sn + c]) : acc_t(0);
  }
};

// The element-wise maps of the apply kernels: out = f(x, dy) for one element of channel c in group (n, g).
template <Activation kAct>
struct ForwardOp {
  static constexpr bool kReadsDy = false;
  template <typename acc_t>
  __device__ __forceinline__ static acc_t apply(const GroupParams<acc_t>& p, acc_t gamma, acc_t beta, acc_t x,
                                                acc_t /*dy*/) {
    return activate<kAct>((x - p.mean) * (p.rstd * gamma) + beta);  // eq. 2: x̂·γ + β = (x − μ)·(ργ) + β
  }
};

// dz of eq. 3 for one element, given x̂.
template <Activation kAct, typename acc_t>
__device__ __forceinline__ acc_t dz_of(acc_t dy, acc_t xhat, acc_t gamma, acc_t beta) {
  return dy * activate_grad<kAct>(xhat * gamma + beta);
}

template <Activation kAct>
struct BackwardOp {
  static constexpr bool kReadsDy = true;
  template <typename acc_t>
  __device__ __forceinline__ static acc_t apply(const GroupParams<acc_t>& p, acc_t gamma, acc_t beta, acc_t x,
                                                acc_t dy) {
    const acc_t xhat = (x - p.mean) * p.rstd;                  // eq. 2
    const acc_t dz = dz_of<kAct>(dy, xhat, gamma, beta);       // eq. 3
    return p.rstd * (dz * gamma - p.a - xhat * p.b);           // eq. 6
  }
};

// ---------------------------------------------------------------------------------------------------------
// channels_first: a group is one contiguous run of M elements, M / VL packs
// ---------------------------------------------------------------------------------------------------------

// This thread's statistics of the packs [begin, end) of the run x (packs begin + threadIdx.x, then every
// blockDim.x-th), cf_unroll packs per chunk.
template <int VL, typename acc_t, typename scalar_t, typename index_t>
__device__ __forceinline__ Welford<acc_t> thread_stats(const scalar_t* __restrict__ x, index_t begin, index_t end) {
  const index_t nthreads = blockDim.x;
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  constexpr int kU = cf_unroll<index_t>();
  for (index_t it0 = begin + static_cast<index_t>(threadIdx.x); it0 < end; it0 += kU * nthreads) {
    acc_t v[kU * VL];
    int k = 0;  // valid values: the packs it0 + u·nthreads < end form a prefix in u
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const index_t it = it0 + u * nthreads;
      if (it < end) {
        load_pack<VL>(x + it * VL, v + u * VL);
        k += VL;
      } else {
#pragma unroll
        for (int j = 0; j < VL; ++j) v[u * VL + j] = acc_t(0);
      }
    }
    w = merge(w, chunk_stats(v, k));
  }
  return w;
}

// out = Op(x, dy) over the packs [begin, end) of one group (n, g), the pointers at the group's first element.
// Pack it holds elements it·VL .. it·VL + VL − 1, all of channel c0 + it·VL / HW (VL divides HW).
template <class Op, int VL, typename scalar_t, typename acc_t, typename index_t, bool kFilm>
__device__ __forceinline__ void apply_group_range(scalar_t* __restrict__ out, const scalar_t* __restrict__ x,
                                                  const scalar_t* __restrict__ dy, const GroupParams<acc_t>& gp,
                                                  const SampleAffine<scalar_t, kFilm>& aff, int64_t c0, index_t HW,
                                                  index_t begin, index_t end) {
  const index_t nthreads = blockDim.x;
  if constexpr (sizeof(index_t) == sizeof(int64_t)) {
    // 64-bit indices (groups of 2^30 elements or more): channel by channel, so that no pack needs a 64-bit
    // division to find its channel (a subroutine call, around which ptxas spilled registers on sm_90)
    const index_t per_channel = HW / VL;  // packs of one channel (VL is a power of two)
    for (index_t c = quotient_below_2_24(begin, per_channel); c * per_channel < end; ++c) {
      const Affine<acc_t> k = aff(c0 + static_cast<int64_t>(c));
      const index_t lo = c * per_channel > begin ? c * per_channel : begin;
      const index_t hi = min_of<index_t>(end, (c + 1) * per_channel);
      for (index_t it = lo + static_cast<index_t>(threadIdx.x); it < hi; it += nthreads) {
        acc_t xv[VL];
        acc_t dv[VL] = {};
        load_pack<VL>(x + it * VL, xv);
        if constexpr (Op::kReadsDy) load_pack<VL>(dy + it * VL, dv);
#pragma unroll
        for (int j = 0; j < VL; ++j) xv[j] = Op::apply(gp, k.gamma, k.beta, xv[j], dv[j]);
        store_pack<VL>(out + it * VL, xv);
      }
    }
    return;
  }
  constexpr int kU = tile_unroll<VL>();  // 2 for 8-wide packs: at 4 the bf16 forward spilled on sm_90
  for (index_t it0 = begin + static_cast<index_t>(threadIdx.x); it0 < end; it0 += kU * nthreads) {
    acc_t xv[kU][VL];
    acc_t dv[kU][VL] = {};
#pragma unroll
    for (int u = 0; u < kU; ++u) {  // all loads first: kU packs in flight per thread
      const index_t it = it0 + u * nthreads;
      if (it < end) {
        load_pack<VL>(x + it * VL, xv[u]);
        if constexpr (Op::kReadsDy) load_pack<VL>(dy + it * VL, dv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const index_t it = it0 + u * nthreads;
      if (it < end) {
        const Affine<acc_t> k = aff(c0 + static_cast<int64_t>((it * VL) / HW));
#pragma unroll
        for (int j = 0; j < VL; ++j) xv[u][j] = Op::apply(gp, k.gamma, k.beta, xv[u][j], dv[u][j]);
        store_pack<VL>(out + it * VL, xv[u]);
      }
    }
  }
}

// Forward for many groups: block ng computes the statistics of group ng (eq. 1), writes μ and ρ, then y
// (eq. 2). When the group fits in the block's registers (M <= 32·blockDim.x: 16384 elements at 512
// threads) x is read once; otherwise twice, the second time from L2 (the block has just read it).
// Grid: N·G blocks; block: a power of two in [64, 512] threads.
template <typename scalar_t, int VL, Activation kAct, typename index_t, bool kFilm>
__global__ void __launch_bounds__(kGroupThreadsMax) gn_fwd_cf_fused_kernel(
    scalar_t* __restrict__ y,                  // [N, C, HW] contiguous, out
    acc_type<scalar_t>* __restrict__ mean,     // [N, G] μ, out
    acc_type<scalar_t>* __restrict__ rstd,     // [N, G] ρ, out
    const scalar_t* __restrict__ x,            // [N, C, HW] contiguous: group ng is x[ng·M, (ng+1)·M)
    const ParamSrc<scalar_t, kFilm> src,       // γ, β [C]; scale, shift [N, C] (its mean, rstd are not read)
    const index_t HW,                          // spatial size; VL divides it
    const index_t M,                           // Cg·HW >= 1
    const double eps) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kResident = kResidentValues<acc_t> / VL;  // packs a thread can keep in registers
  __shared__ Welford<acc_t> red[kWarp];
  const int64_t ng = blockIdx.x;
  const int64_t base = ng * static_cast<int64_t>(M);
  const SmallDiv n_g = small_divmod(ng, src.G);  // (sample, group)
  const int64_t c0 = n_g.rem * src.Cg;  // the group's first channel
  const index_t packs = M / VL;
  const index_t nthreads = blockDim.x;
  // (never with 64-bit indices: a group that fits in registers is far below 2^30 elements, and compiling the
  // path for them spilled on sm_90)
  if (sizeof(index_t) == sizeof(int32_t) && packs <= kResident * nthreads) {
    // The whole group fits in the block's registers: x is read once. Thread t holds packs t + u·nthreads.
    acc_t v[kResident * VL];
    int k = 0;  // valid values: a prefix of v
#pragma unroll
    for (int u = 0; u < kResident; ++u) {
      const index_t it = static_cast<index_t>(threadIdx.x) + u * nthreads;
      if (it < packs) {
        load_pack<VL>(x + base + it * VL, v + u * VL);
        k += VL;
      } else {
#pragma unroll
        for (int j = 0; j < VL; ++j) v[u * VL + j] = acc_t(0);
      }
    }
    // 1. μ, σ² of the group (eq. 1): this thread's values, then Chan merges over the block
    const Welford<acc_t> w = block_reduce_all(
        k > 0 ? chunk_stats(v, k) : Welford<acc_t>{acc_t(0), acc_t(0), acc_t(0)}, red);
    const GroupParams<acc_t> gp{w.mean, rstd_of(w, eps), acc_t(0), acc_t(0)};
    if (threadIdx.x == 0) {
      mean[ng] = gp.mean;
      rstd[ng] = gp.rstd;
    }
    // 2. y = act((x − μ)·ρ·γ + β) (eq. 2) from the registers
    const SampleAffine<scalar_t, kFilm> aff = src.sample(n_g.quot);  // made here: not live during step 1
#pragma unroll
    for (int u = 0; u < kResident; ++u) {
      const index_t it = static_cast<index_t>(threadIdx.x) + u * nthreads;
      if (it < packs) {
        const Affine<acc_t> k = aff(c0 + static_cast<int64_t>((it * VL) / HW));
#pragma unroll
        for (int j = 0; j < VL; ++j) {
          v[u * VL + j] = ForwardOp<kAct>::apply(gp, k.gamma, k.beta, v[u * VL + j], acc_t(0));
        }
        store_pack<VL>(y + base + it * VL, v + u * VL);
      }
    }
    return;
  }
  // 1. μ, σ² of the group (eq. 1): per thread chunks, then Chan merges over the block
  const Welford<acc_t> w = block_reduce_all(thread_stats<VL, acc_t>(x + base, index_t(0), packs), red);
  const GroupParams<acc_t> gp{w.mean, rstd_of(w, eps), acc_t(0), acc_t(0)};
  if (threadIdx.x == 0) {
    mean[ng] = gp.mean;
    rstd[ng] = gp.rstd;
  }
  // 2. y = act((x − μ)·ρ·γ + β) (eq. 2), reading the group again (from L2: the block just read it)
  apply_group_range<ForwardOp<kAct>, VL>(y + base, x + base, static_cast<const scalar_t*>(nullptr), gp,
                                         src.sample(n_g.quot), c0, HW, index_t(0), packs);
}

// Forward for few groups, step 1: the statistics of chunk s of group ng, packs [s·chunk, (s+1)·chunk).
// Grid: N·G·S blocks, block b = ng·S + s.
template <typename scalar_t, int VL, typename index_t>
__global__ void __launch_bounds__(kGroupThreadsMax) gn_fwd_cf_partial_kernel(
    Welford<acc_type<scalar_t>>* __restrict__ ws,  // [N·G, S] out: statistics of chunk s of group ng
    const scalar_t* __restrict__ x,                // [N, C, HW] contiguous: group ng is x[ng·M, (ng+1)·M)
    const index_t M,                               // Cg·HW
    const index_t chunk,                           // packs per chunk; every chunk is non-empty
    const int64_t S) {                             // chunks per group
  using acc_t = acc_type<scalar_t>;
  __shared__ Welford<acc_t> red[kWarp];
  const SmallDiv b = small_divmod(blockIdx.x, S);  // (group, chunk)
  const int64_t ng = b.quot, s = b.rem;
  const index_t packs = M / VL;
  const index_t begin = static_cast<index_t>(s) * chunk;
  const index_t end = min_of<index_t>(packs, begin + chunk);
  const Welford<acc_t> w =
      block_reduce_all(thread_stats<VL, acc_t>(x + ng * static_cast<int64_t>(M), begin, end), red);
  if (threadIdx.x == 0) ws[blockIdx.x] = w;
}

// out = Op(x, dy) over chunk s of group ng (the forward's y, or the backward's ∂x). Grid: N·G·S blocks,
// block b = ng·S + s.
template <class Op, typename scalar_t, int VL, typename index_t, bool kFilm>
__global__ void __launch_bounds__(kApplyThreadsMax) gn_cf_apply_kernel(
    scalar_t* __restrict__ out,      // [N, C, HW] contiguous, out: y or ∂x
    const scalar_t* __restrict__ x,  // [N, C, HW] contiguous: group ng is x[ng·M, (ng+1)·M)
    const scalar_t* __restrict__ dy, // [N, C, HW] contiguous (backward), or nullptr (forward)
    const ParamSrc<scalar_t, kFilm> src,  // μ, ρ [N, G]; (a, b) [N, G, 2] (backward); γ, β [C]; scale, shift
    const index_t HW,                // spatial size; VL divides it
    const index_t M,                 // Cg·HW
    const index_t chunk,             // packs per chunk
    const int64_t S) {               // chunks per group
  const SmallDiv b = small_divmod(blockIdx.x, S);  // (group, chunk)
  const int64_t ng = b.quot, s = b.rem;
  const int64_t base = ng * static_cast<int64_t>(M);
  const index_t packs = M / VL;
  const index_t begin = static_cast<index_t>(s) * chunk;
  const index_t end = min_of<index_t>(packs, begin + chunk);
  const SmallDiv n_g = small_divmod(ng, src.G);  // (sample, group)
  apply_group_range<Op, VL>(out + base, x + base, dy == nullptr ? dy : dy + base, src.group(ng),
                            src.sample(n_g.quot), n_g.rem * src.Cg, HW, begin, end);
}

// Backward, step 1 for channels_first: the sums of eq. 4 over chunk r of each row (n, c). A block is
// kTileThreads / tpr rows of tpr threads (tpr a power of two >= 32, so a warp lies in one row).
// Grid: ceil(N·C / rows per block)·R blocks, block b covers rows (b / R)·rpb ... and chunk r = b % R.
template <typename scalar_t, int VL, Activation kAct, typename index_t, bool kFilm>
__global__ void __launch_bounds__(kTileThreads) gn_bwd_cf_reduce_kernel(
    SumPair<acc_type<scalar_t>>* __restrict__ ws,  // [N, R, C] out: (Σ dz, Σ dz·x̂) over chunk r of row (n, c)
    const scalar_t* __restrict__ dy,  // [N, C, HW] contiguous: row (n, c) is [(n·C + c)·HW, +HW)
    const scalar_t* __restrict__ x,   // [N, C, HW] contiguous, as dy
    const ParamSrc<scalar_t, kFilm> src,  // μ, ρ [N, G]; γ, β [C]; scale, shift [N, C]
    const int64_t rows,               // N·C
    const int64_t C,
    const index_t HW,                 // VL divides it
    const index_t chunk,              // packs per chunk of a row
    const int64_t R,                  // chunks per row
    const int tpr) {                  // threads per row
  using acc_t = acc_type<scalar_t>;
  __shared__ SumPair<acc_t> red[kTileThreads / kWarp];
  const int rpb = kTileThreads / tpr;
  const int64_t r = blockIdx.x % R;
  const int64_t row0 = (blockIdx.x / R) * rpb;
  const int64_t row = row0 + threadIdx.x / tpr;
  const index_t lane_in_row = threadIdx.x % tpr;
  SumPair<acc_t> acc{acc_t(0), acc_t(0)};
  if (row < rows) {
    const int64_t n = row / C, c = row % C;
    const GroupParams<acc_t> gp = src.group(n * src.G + c / src.Cg);
    const Affine<acc_t> k = src.affine(n, c);
    const scalar_t* xr = x + row * static_cast<int64_t>(HW);
    const scalar_t* dyr = dy + row * static_cast<int64_t>(HW);
    const index_t packs = HW / VL;
    const index_t begin = static_cast<index_t>(r) * chunk;
    const index_t end = min_of<index_t>(packs, begin + chunk);
    constexpr int kU = cf_unroll<index_t>();
    for (index_t it0 = begin + lane_in_row; it0 < end; it0 += kU * tpr) {
      acc_t xv[kU][VL], dv[kU][VL];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const index_t it = it0 + u * tpr;
        if (it < end) {
          load_pack<VL>(xr + it * VL, xv[u]);
          load_pack<VL>(dyr + it * VL, dv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (it0 + u * tpr < end) {
#pragma unroll
          for (int j = 0; j < VL; ++j) {
            const acc_t xhat = (xv[u][j] - gp.mean) * gp.rstd;            // eq. 2
            const acc_t dz = dz_of<kAct>(dv[u][j], xhat, k.gamma, k.beta);  // eq. 3
            acc.dz += dz;                                                  // eq. 4
            acc.dz_xhat += dz * xhat;
          }
        }
      }
    }
  }
  acc = warp_reduce(acc);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  if (lane == 0) red[warp] = acc;
  __syncthreads();
  const int wpr = tpr / kWarp;  // warps per row
  if (static_cast<int>(threadIdx.x) < rpb) {
    const int64_t rw = row0 + threadIdx.x;
    if (rw < rows) {
      SumPair<acc_t> t = red[threadIdx.x * wpr];
      for (int k = 1; k < wpr; ++k) t = merge(t, red[threadIdx.x * wpr + k]);
      ws[((rw / C) * R + r) * C + rw % C] = t;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// channels_last: x is [N, HW, C] in memory; tiles of (a chunk of rows) × (TX channel packs)
// ---------------------------------------------------------------------------------------------------------

// The tiling, computed on the host (make_tile). Thread t of a block is (tx, ty) = (t % TX, t / TX); thread
// (tx, ty) of tile (n, r, ct) handles channel pack cv = ct·TX + tx (channels cv·VL .. cv·VL + VL − 1) of rows
// r·rows + ty, + TY, ... below min(HW, (r + 1)·rows). Grid: N·R·CT blocks, block b = (n·R + r)·CT + ct.
struct Tile {
  int64_t HW, C;     // x's rows and channels
  int64_t R, rows;   // row chunks per sample, rows per chunk (the last may be shorter)
  int64_t CT;        // channel tiles: ceil((C / VL) / TX)
  int TX, TY;        // threads across channel packs and across rows; TX·TY <= kTileThreads
};

struct TilePos {
  int64_t n, r, cv, row_begin, row_end;
  int tx, ty;
  bool active;  // (tx, ty) is inside the tile: ty < TY and its channel pack exists
};

template <int VL>
__device__ __forceinline__ TilePos tile_pos(const Tile& t) {
  TilePos p;
  const SmallDiv b = small_divmod(blockIdx.x, t.CT);  // (n·R + r, ct)
  const int64_t ct = b.rem;
  const SmallDiv nr = small_divmod(b.quot, t.R);
  p.r = nr.rem;
  p.n = nr.quot;
  p.tx = static_cast<int>(threadIdx.x) % t.TX;
  p.ty = static_cast<int>(threadIdx.x) / t.TX;
  p.cv = ct * t.TX + p.tx;
  p.row_begin = p.r * t.rows;
  p.row_end = min_of<int64_t>(t.HW, p.row_begin + t.rows);
  p.active = p.ty < t.TY && p.cv < t.C / VL;
  return p;
}

// Merges v over the TY rows of threads of the tile, in a fixed tree. Afterwards (behind the final
// __syncthreads) sh[tx·VL + j] holds the total of channel pack tx, element j. Every thread calls it; threads
// outside the tile pass identities that are never read.
template <int VL, typename T>
__device__ __forceinline__ void tile_reduce_rows(const T (&v)[VL], T* sh /* __shared__ [kTileThreads·VL] */,
                                                 int ty, int TX, int TY) {
  const int t = threadIdx.x;
#pragma unroll
  for (int j = 0; j < VL; ++j) sh[t * VL + j] = v[j];
  __syncthreads();
  for (int cnt = TY; cnt > 1;) {  // rows [0, cnt) hold partial results
    const int h = (cnt + 1) / 2;
    if (ty + h < cnt) {  // row ty takes row ty + h; the rows read, [h, cnt), are not written this step
#pragma unroll
      for (int j = 0; j < VL; ++j) sh[t * VL + j] = merge(sh[t * VL + j], sh[(t + h * TX) * VL + j]);
    }
    __syncthreads();
    cnt = h;
  }
}

// Forward step 1 for channels_last: the statistics of each channel over the rows of the tile (eq. 1's
// pieces). When the tile holds every channel (CT == 1), the block merges them per group and writes
// ws[(n·R + r)·G + g]; otherwise it writes per channel, ws[(n·R + r)·C + c].
template <typename scalar_t, int VL>
__global__ void __launch_bounds__(kTileThreads) gn_fwd_cl_partial_kernel(
    Welford<acc_type<scalar_t>>* __restrict__ ws,  // out: [N, R, G] if merge_groups else [N, R, C]
    const scalar_t* __restrict__ x,  // [N, HW, C] in memory: element (n, s, c) at (n·HW + s)·C + c
    const Tile tile,
    const int64_t G,
    const bool merge_groups) {       // tile.CT == 1
  using acc_t = acc_type<scalar_t>;
  __shared__ Welford<acc_t> sh[kTileThreads * VL];
  const TilePos p = tile_pos<VL>(tile);
  const int64_t C = tile.C;
  Welford<acc_t> w[VL];
#pragma unroll
  for (int j = 0; j < VL; ++j) w[j] = {acc_t(0), acc_t(0), acc_t(0)};
  if (p.active) {
    const scalar_t* xp = x + p.n * tile.HW * C + p.cv * VL;
    for (int64_t s0 = p.row_begin + p.ty; s0 < p.row_end; s0 += kUnroll * tile.TY) {
      acc_t v[kUnroll][VL];
      int k = 0;  // valid rows: a prefix in u
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t s = s0 + static_cast<int64_t>(u) * tile.TY;
        if (s < p.row_end) {
          load_pack<VL>(xp + s * C, v[u]);
          ++k;
        } else {
#pragma unroll
          for (int j = 0; j < VL; ++j) v[u][j] = acc_t(0);
        }
      }
#pragma unroll
      for (int j = 0; j < VL; ++j) {
        acc_t col[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) col[u] = v[u][j];
        w[j] = merge(w[j], chunk_stats(col, k));
      }
    }
  }
  tile_reduce_rows<VL>(w, sh, p.ty, tile.TX, tile.TY);
  if (!merge_groups) {
    if (p.ty == 0 && p.active) {
#pragma unroll
      for (int j = 0; j < VL; ++j) ws[(p.n * tile.R + p.r) * C + p.cv * VL + j] = sh[p.tx * VL + j];
    }
  } else {
    // sh[c] is channel c (CT == 1 so cv = tx): a warp per group merges its Cg channels
    const int64_t Cg = C / G;
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
    for (int64_t g = warp; g < G; g += kTileThreads / kWarp) {
      Welford<acc_t> m{acc_t(0), acc_t(0), acc_t(0)};
      for (int64_t j = lane; j < Cg; j += kWarp) m = merge(m, sh[g * Cg + j]);
      m = warp_reduce(m);
      if (lane == 0) ws[(p.n * tile.R + p.r) * G + g] = m;
    }
  }
}

// out = Op(x, dy) over one tile (the forward's y, or the backward's ∂x). Each thread holds the parameters of
// its VL channels and walks its rows.
template <class Op, typename scalar_t, int VL, bool kFilm>
__global__ void __launch_bounds__(kTileThreads, 2) gn_cl_apply_kernel(
    scalar_t* __restrict__ out,       // [N, HW, C] in memory, out: y or ∂x
    const scalar_t* __restrict__ x,   // [N, HW, C] in memory: element (n, s, c) at (n·HW + s)·C + c
    const scalar_t* __restrict__ dy,  // [N, HW, C] in memory (backward), or nullptr (forward)
    const ParamSrc<scalar_t, kFilm> src,  // μ, ρ [N, G]; (a, b) [N, G, 2] (backward); γ, β [C]; scale, shift
    const Tile tile) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kU = tile_unroll<VL>();
  const TilePos p = tile_pos<VL>(tile);
  if (!p.active) return;  // no barrier below
  GroupParams<acc_t> gp[VL];
  acc_t gamma[VL], beta[VL];
#pragma unroll
  for (int j = 0; j < VL; ++j) {
    const int64_t c = p.cv * VL + j;
    gp[j] = src.group(p.n * src.G + c / src.Cg);
    const Affine<acc_t> k = src.affine(p.n, c);
    gamma[j] = k.gamma;
    beta[j] = k.beta;
  }
  const int64_t C = tile.C;
  const int64_t base = p.n * tile.HW * C + p.cv * VL;
  for (int64_t s0 = p.row_begin + p.ty; s0 < p.row_end; s0 += kU * tile.TY) {
    acc_t xv[kU][VL];
    acc_t dv[kU][VL] = {};
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t s = s0 + static_cast<int64_t>(u) * tile.TY;
      if (s < p.row_end) {
        load_pack<VL>(x + base + s * C, xv[u]);
        if constexpr (Op::kReadsDy) load_pack<VL>(dy + base + s * C, dv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kU; ++u) {
      const int64_t s = s0 + static_cast<int64_t>(u) * tile.TY;
      if (s < p.row_end) {
#pragma unroll
        for (int j = 0; j < VL; ++j) xv[u][j] = Op::apply(gp[j], gamma[j], beta[j], xv[u][j], dv[u][j]);
        store_pack<VL>(out + base + s * C, xv[u]);
      }
    }
  }
}

// Backward step 1 for channels_last: the sums of eq. 4 of each channel over the rows of the tile.
template <typename scalar_t, int VL, Activation kAct, bool kFilm>
__global__ void __launch_bounds__(kTileThreads, 2) gn_bwd_cl_reduce_kernel(
    SumPair<acc_type<scalar_t>>* __restrict__ ws,  // [N, R, C] out: (Σ dz, Σ dz·x̂) over row chunk r
    const scalar_t* __restrict__ dy,  // [N, HW, C] in memory: element (n, s, c) at (n·HW + s)·C + c
    const scalar_t* __restrict__ x,   // [N, HW, C] in memory, as dy
    const ParamSrc<scalar_t, kFilm> src,  // μ, ρ [N, G]; γ, β [C]; scale, shift [N, C]
    const Tile tile) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kU = tile_unroll<VL>();
  __shared__ SumPair<acc_t> sh[kTileThreads * VL];
  const TilePos p = tile_pos<VL>(tile);
  const int64_t C = tile.C;
  SumPair<acc_t> acc[VL];
#pragma unroll
  for (int j = 0; j < VL; ++j) acc[j] = {acc_t(0), acc_t(0)};
  if (p.active) {
    GroupParams<acc_t> gp[VL];
    acc_t gamma[VL], beta[VL];
#pragma unroll
    for (int j = 0; j < VL; ++j) {
      const int64_t c = p.cv * VL + j;
      gp[j] = src.group(p.n * src.G + c / src.Cg);
      const Affine<acc_t> k = src.affine(p.n, c);
      gamma[j] = k.gamma;
      beta[j] = k.beta;
    }
    const int64_t base = p.n * tile.HW * C + p.cv * VL;
    for (int64_t s0 = p.row_begin + p.ty; s0 < p.row_end; s0 += kU * tile.TY) {
      acc_t xv[kU][VL], dv[kU][VL];
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        const int64_t s = s0 + static_cast<int64_t>(u) * tile.TY;
        if (s < p.row_end) {
          load_pack<VL>(x + base + s * C, xv[u]);
          load_pack<VL>(dy + base + s * C, dv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kU; ++u) {
        if (s0 + static_cast<int64_t>(u) * tile.TY < p.row_end) {
#pragma unroll
          for (int j = 0; j < VL; ++j) {
            const acc_t xhat = (xv[u][j] - gp[j].mean) * gp[j].rstd;               // eq. 2
            const acc_t dz = dz_of<kAct>(dv[u][j], xhat, gamma[j], beta[j]);      // eq. 3
            acc[j].dz += dz;                                                       // eq. 4
            acc[j].dz_xhat += dz * xhat;
          }
        }
      }
    }
  }
  tile_reduce_rows<VL>(acc, sh, p.ty, tile.TX, tile.TY);
  if (p.ty == 0 && p.active) {
#pragma unroll
    for (int j = 0; j < VL; ++j) ws[(p.n * tile.R + p.r) * C + p.cv * VL + j] = sh[p.tx * VL + j];
  }
}

// ---------------------------------------------------------------------------------------------------------
// Small kernels on the (N, R, C) and (N, G) workspaces
// ---------------------------------------------------------------------------------------------------------

// μ and ρ of eq. 1 from partial statistics: one warp per group (n, g) merges ws[n·sN + r·sR + g·sG + j] for
// r < R, j < J. Grid: ceil(N·G / 8) blocks of kTileThreads.
template <typename acc_t>
__global__ void __launch_bounds__(kTileThreads) gn_combine_kernel(
    acc_t* __restrict__ mean,                // [N, G] out
    acc_t* __restrict__ rstd,                // [N, G] out
    const Welford<acc_t>* __restrict__ ws,   // partial statistics, strides below
    const int64_t NG, const int64_t G,
    const int64_t R, const int64_t J,        // partials per group: R × J
    const int64_t sN, const int64_t sR, const int64_t sG,
    const double eps) {
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * (kTileThreads / kWarp) + threadIdx.x / kWarp;
  if (ng >= NG) return;  // whole warps leave
  const int lane = threadIdx.x % kWarp;
  const int64_t n = ng / G, g = ng % G;
  const Welford<acc_t>* wg = ws + n * sN + g * sG;
  Welford<acc_t> w{acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t k = lane; k < R * J; k += kWarp) w = merge(w, wg[(k / J) * sR + k % J]);
  w = warp_reduce(w);
  if (lane == 0) {
    mean[ng] = w.n > acc_t(0) ? w.mean : acc_t(0);
    rstd[ng] = rstd_of(w, eps);
  }
}

// a and b of eq. 5: one warp per group (n, g) sums γ_c·Σdz and γ_c·Σdz·x̂ over its channels and the R
// chunks (γ'_nc with FiLM: the product eq. 6 forms, so that dz·γ' − a cancels exactly when M = 1).
// Grid: ceil(N·G / 8) blocks of kTileThreads.
template <typename scalar_t, bool kFilm>
__global__ void __launch_bounds__(kTileThreads) gn_bwd_coef_kernel(
    acc_type<scalar_t>* __restrict__ coef,               // [N, G, 2] out: (a, b)
    const SumPair<acc_type<scalar_t>>* __restrict__ ws,  // [N, R, C] sums of eq. 4
    const ParamSrc<scalar_t, kFilm> src,                 // γ [C] or nullptr: γ = 1; scale [N, C]
    const int64_t NG, const int64_t G, const int64_t Cg, const int64_t C, const int64_t R,
    const int64_t M) {                                   // Cg·HW
  using acc_t = acc_type<scalar_t>;
  const int64_t ng = static_cast<int64_t>(blockIdx.x) * (kTileThreads / kWarp) + threadIdx.x / kWarp;
  if (ng >= NG) return;  // whole warps leave
  const int lane = threadIdx.x % kWarp;
  const int64_t n = ng / G, g = ng % G;
  SumPair<acc_t> s{acc_t(0), acc_t(0)};
  for (int64_t k = lane; k < R * Cg; k += kWarp) {
    const int64_t r = k / Cg, c = g * Cg + k % Cg;
    const acc_t ga = src.affine(n, c).gamma;
    const SumPair<acc_t> q = ws[(n * R + r) * C + c];
    s.dz += ga * q.dz;
    s.dz_xhat += ga * q.dz_xhat;
  }
  s = warp_reduce(s);
  if (lane == 0) {
    const acc_t m = static_cast<acc_t>(M);
    coef[2 * ng] = s.dz / m;           // a
    coef[2 * ng + 1] = s.dz_xhat / m;  // b
  }
}

// FiLM's γ', β' (F1) of every (n, c), once per call, for SampleAffine. One thread per (n, c).
// Grid: ceil(N·C / kTileThreads) blocks of kTileThreads.
template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads) gn_film_affine_kernel(
    Affine<acc_type<scalar_t>>* __restrict__ out,  // [N, C] out
    const ParamSrc<scalar_t, true> src,            // γ, β [C]; scale, shift [N, C]
    const int64_t NC) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kTileThreads + threadIdx.x;
  if (i >= NC) return;
  const int64_t n = i / src.C, c = i % src.C;
  const auto k = src.channel(c);
  out[i] = film_affine(k.gamma, k.beta, src.scale_of(n, c), src.shift_of(n, c));
}

// FiLM's share of the backward (common/film.h): per (n, c), S1 = Σ dz and S2 = Σ dz·x̂ summed over the R row
// chunks of ws, then ∂s and ∂t (F2) and, when `folded` is given, (1 + s)·(S1, S2) (F3), on which the plain
// gn_bwd_param_grad_kernel then runs with R = 1. One thread per (n, c), consecutive threads on consecutive
// channels. Grid: ceil(N·C / kTileThreads) blocks of kTileThreads.
template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads) gn_bwd_film_kernel(
    scalar_t* __restrict__ grad_scale,                    // [N, C] out, or nullptr
    scalar_t* __restrict__ grad_shift,                    // [N, C] out, or nullptr
    SumPair<acc_type<scalar_t>>* __restrict__ folded,     // [N, C] out: (1 + s)·(S1, S2), or nullptr
    const SumPair<acc_type<scalar_t>>* __restrict__ ws,   // [N, R, C] sums of eq. 4
    const ParamSrc<scalar_t, true> src,                   // γ, β [C]; scale [N, C]
    const int64_t NC, const int64_t R, const int64_t C) {
  using acc_t = acc_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kTileThreads + threadIdx.x;
  if (i >= NC) return;
  const int64_t n = i / C, c = i % C;
  SumPair<acc_t> s{acc_t(0), acc_t(0)};
  for (int64_t r = 0; r < R; ++r) s = merge(s, ws[(n * R + r) * C + c]);
  const Affine<acc_t> k = src.channel(c);
  const FilmGrads<acc_t> g = film_grads(k.gamma, k.beta, s.dz, s.dz_xhat);
  if (grad_scale != nullptr) grad_scale[i] = static_cast<scalar_t>(g.scale);
  if (grad_shift != nullptr) grad_shift[i] = static_cast<scalar_t>(g.shift);
  if (folded != nullptr) {
    const acc_t f = acc_t(1) + src.scale_of(n, c);
    folded[i] = {f * s.dz, f * s.dz_xhat};
  }
}

// ∂γ and ∂β of eq. 4: ws summed over its N·R rows. Block: 32 channels × 8 row strides; grid: ceil(C / 32).
template <typename scalar_t>
__global__ void __launch_bounds__(kTileThreads) gn_bwd_param_grad_kernel(
    const ChannelGrad<scalar_t> grad_weight,             // [C] out, or nullptr
    const ChannelGrad<scalar_t> grad_bias,               // [C] out, or nullptr
    const SumPair<acc_type<scalar_t>>* __restrict__ ws,  // [N·R, C] sums of eq. 4
    const int64_t NR, const int64_t C) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kRowsPar = kTileThreads / kWarp;
  __shared__ SumPair<acc_t> sh[kRowsPar][kWarp];
  const int tx = threadIdx.x % kWarp, ty = threadIdx.x / kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kWarp + tx;
  SumPair<acc_t> s{acc_t(0), acc_t(0)};
  if (c < C) {
    for (int64_t k = ty; k < NR; k += kRowsPar) s = merge(s, ws[k * C + c]);
  }
  sh[ty][tx] = s;
  __syncthreads();
  if (ty == 0 && c < C) {
    for (int k = 1; k < kRowsPar; ++k) s = merge(s, sh[k][tx]);
    if (grad_weight.p != nullptr) grad_weight.store(c, s.dz_xhat);
    if (grad_bias.p != nullptr) grad_bias.store(c, s.dz);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  return true;
}

unsigned grid_of(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks >= 1 && blocks <= std::numeric_limits<int32_t>::max(), op, ": ", blocks,
              " blocks exceed the CUDA grid limit");
  return static_cast<unsigned>(blocks);
}

// Threads for a block that walks `packs` packs, kUnroll per thread per step: a power of two in [lo, hi].
int threads_for(int64_t packs, int lo, int hi) {
  int t = lo;
  while (t < hi && static_cast<int64_t>(t) * kUnroll < packs) t *= 2;
  return t;
}

// channels_first groups cut into S chunks of `chunk` packs, so that few groups still fill the GPU.
struct Split {
  int64_t S, chunk;
};

Split cf_split(int64_t NG, int64_t packs, int sms) {
  int64_t S = 1;
  if (NG < sms) S = std::min(ceil_div(2 * sms, NG), std::max<int64_t>(1, packs / 1024));
  const int64_t chunk = std::max<int64_t>(1, ceil_div(packs, S));
  return {ceil_div(packs, chunk), chunk};  // every chunk non-empty
}

// The channels_last tiling: TX threads across the C / VL channel packs (all of them when they fit in a
// block), TY rows of threads, and enough row chunks for about 8 blocks per SM while each chunk keeps at
// least 32 rows (the per-chunk workspace stays small next to x).
Tile make_tile(int64_t N, int64_t HW, int64_t C, int VL, int sms) {
  Tile t;
  t.HW = HW;
  t.C = C;
  const int64_t CV = C / VL;
  t.TX = static_cast<int>(std::min<int64_t>(CV, kTileThreads));
  t.TY = kTileThreads / t.TX;
  t.CT = ceil_div(CV, t.TX);
  const int64_t want = ceil_div(8 * static_cast<int64_t>(sms), N * t.CT);
  const int64_t most = std::max<int64_t>(1, HW / std::max<int64_t>(32, static_cast<int64_t>(t.TY) * kUnroll));
  const int64_t R = std::max<int64_t>(1, std::min(want, most));
  t.rows = ceil_div(HW, R);
  t.R = ceil_div(HW, t.rows);
  return t;
}

template <typename Fn>
void dispatch_activation(Activation act, const Fn& fn) {
  switch (act) {
    case Activation::kSilu:
      return fn(std::integral_constant<Activation, Activation::kSilu>{});
    case Activation::kRelu:
      return fn(std::integral_constant<Activation, Activation::kRelu>{});
    case Activation::kNone:
      return fn(std::integral_constant<Activation, Activation::kNone>{});
  }
  TORCH_CHECK(false, "diffusion_ext.group_norm_act: unknown activation");
}

// fn(integral_constant<int, kV>) when packs can be used, else fn(integral_constant<int, 1>).
template <int kV, typename Fn>
void dispatch_pack(bool vec, const Fn& fn) {
  if (vec) {
    fn(std::integral_constant<int, kV>{});
  } else {
    fn(std::integral_constant<int, 1>{});
  }
}

// fn(int32_t{}) when every index a channels_first kernel forms in index_t fits in 31 bits with room to spare,
// else fn(int64_t{}). Those indices count from the start of a group or row (the bases ng·M and row·HW are
// int64_t), so they stay below the group size M = Cg·HW plus a few block strides.
template <typename Fn>
void dispatch_index(int64_t group_size, const Fn& fn) {
  if (group_size < (int64_t{1} << 30)) {
    fn(int32_t{0});
  } else {
    fn(int64_t{0});
  }
}

// fn(std::true_type{}) when b, else fn(std::false_type{}): a runtime choice made a template argument.
template <typename Fn>
void dispatch_bool(bool b, const Fn& fn) {
  if (b) {
    fn(std::true_type{});
  } else {
    fn(std::false_type{});
  }
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

template <typename acc_t>
at::Tensor workspace(const at::Tensor& like, int64_t n_acc) {
  return at::empty({n_acc}, like.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// γ, β and (kFilm) scale and shift of a call, with the statistics μ, ρ [N, G]. With FiLM, the γ', β' table is
// made here into film_t, which must outlive the kernels that read it.
template <typename scalar_t, bool kFilm, typename Args>
ParamSrc<scalar_t, kFilm> param_src(const Args& a, const acc_type<scalar_t>* mean, const acc_type<scalar_t>* rstd,
                                    at::Tensor& film_t, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  const auto ptr = [](const at::Tensor& t) -> const scalar_t* {
    return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
  };
  const auto row_stride = [](const at::Tensor& t) -> int64_t { return t.defined() ? t.stride(0) : 0; };
  const auto param = [&](const at::Tensor& t) -> ChannelParam<scalar_t> {
    return {t.defined() ? t.const_data_ptr() : nullptr, t.defined() && t.scalar_type() != a.x.scalar_type()};
  };
  ParamSrc<scalar_t, kFilm> src{mean, rstd, nullptr, param(a.weight), param(a.bias), a.shape.G,
                                a.shape.channels_per_group(), ptr(a.scale), ptr(a.shift), row_stride(a.scale),
                                row_stride(a.shift), a.shape.C, nullptr};
  if constexpr (kFilm) {
    const int64_t NC = a.shape.N * a.shape.C;
    film_t = workspace<acc_t>(a.x, NC * 2);
    auto* table = reinterpret_cast<Affine<acc_t>*>(film_t.mutable_data_ptr<acc_t>());
    gn_film_affine_kernel<scalar_t><<<grid_of("diffusion_ext.group_norm_act", ceil_div(NC, kTileThreads)),
                                      kTileThreads, 0, stream>>>(table, src, NC);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    src.film = table;
  }
  return src;
}

template <typename scalar_t, Activation kAct, bool kFilm>
void forward(const GroupNormArgs& a, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kV = pack_width<scalar_t>();
  constexpr const char* kOp = "diffusion_ext.group_norm_act";
  const GroupNormShape& sh = a.shape;
  const int64_t N = sh.N, C = sh.C, HW = sh.HW, G = sh.G, Cg = C / G, M = Cg * HW, NG = N * G;
  const int sms = sm_count();
  scalar_t* y = a.y.mutable_data_ptr<scalar_t>();
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  acc_t* mean = a.mean.mutable_data_ptr<acc_t>();
  acc_t* rstd = a.rstd.mutable_data_ptr<acc_t>();
  at::Tensor film_t;
  const ParamSrc<scalar_t, kFilm> src = param_src<scalar_t, kFilm>(a, mean, rstd, film_t, stream);
  const auto combine = [&](const Welford<acc_t>* ws, int64_t R, int64_t J, int64_t sN, int64_t sR, int64_t sG) {
    gn_combine_kernel<acc_t><<<grid_of(kOp, ceil_div(NG, kTileThreads / kWarp)), kTileThreads, 0, stream>>>(
        mean, rstd, ws, NG, G, R, J, sN, sR, sG, a.eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };

  if (!sh.channels_last) {
    dispatch_pack<kV>(HW % kV == 0 && aligned16({x, y}), [&](auto vl) {
      constexpr int VL = decltype(vl)::value;
      dispatch_index(M, [&](auto index) {
        using index_t = decltype(index);
        const int64_t packs = M / VL;
        const Split sp = cf_split(NG, packs, sms);
        if (sp.S == 1) {
          gn_fwd_cf_fused_kernel<scalar_t, VL, kAct, index_t, kFilm>
              <<<grid_of(kOp, NG), threads_for(packs, 64, kGroupThreadsMax), 0, stream>>>(
                  y, mean, rstd, x, src, static_cast<index_t>(HW), static_cast<index_t>(M), a.eps);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          return;
        }
        const unsigned blocks = grid_of(kOp, NG * sp.S);
        const int threads = threads_for(sp.chunk, 64, kGroupThreadsMax);
        at::Tensor ws_t = workspace<acc_t>(a.x, NG * sp.S * 3);
        auto* ws = reinterpret_cast<Welford<acc_t>*>(ws_t.mutable_data_ptr<acc_t>());
        gn_fwd_cf_partial_kernel<scalar_t, VL, index_t><<<blocks, threads, 0, stream>>>(
            ws, x, static_cast<index_t>(M), static_cast<index_t>(sp.chunk), sp.S);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        combine(ws, /*R=*/sp.S, /*J=*/1, /*sN=*/G * sp.S, /*sR=*/1, /*sG=*/sp.S);  // ws[(n·G + g)·S + s]
        gn_cf_apply_kernel<ForwardOp<kAct>, scalar_t, VL, index_t, kFilm>
            <<<blocks, threads_for(sp.chunk, 64, kApplyThreadsMax), 0, stream>>>(
            y, x, nullptr, src, static_cast<index_t>(HW), static_cast<index_t>(M), static_cast<index_t>(sp.chunk),
            sp.S);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
    return;
  }

  dispatch_pack<kV>(C % kV == 0 && aligned16({x, y}), [&](auto vl) {
    constexpr int VL = decltype(vl)::value;
    const Tile tile = make_tile(N, HW, C, VL, sms);
    const unsigned blocks = grid_of(kOp, N * tile.R * tile.CT);
    const bool merge_groups = tile.CT == 1;
    at::Tensor ws_t = workspace<acc_t>(a.x, N * tile.R * (merge_groups ? G : C) * 3);
    auto* ws = reinterpret_cast<Welford<acc_t>*>(ws_t.mutable_data_ptr<acc_t>());
    gn_fwd_cl_partial_kernel<scalar_t, VL><<<blocks, kTileThreads, 0, stream>>>(ws, x, tile, G, merge_groups);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (merge_groups) {
      combine(ws, tile.R, /*J=*/1, /*sN=*/tile.R * G, /*sR=*/G, /*sG=*/1);  // ws[(n·R + r)·G + g]
    } else {
      combine(ws, tile.R, /*J=*/Cg, /*sN=*/tile.R * C, /*sR=*/C, /*sG=*/Cg);  // ws[(n·R + r)·C + g·Cg + j]
    }
    gn_cl_apply_kernel<ForwardOp<kAct>, scalar_t, VL, kFilm>
        <<<blocks, kTileThreads, 0, stream>>>(y, x, nullptr, src, tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t, Activation kAct, bool kFilm>
void backward(const GroupNormBackwardArgs& a, cudaStream_t stream) {
  using acc_t = acc_type<scalar_t>;
  constexpr int kV = pack_width<scalar_t>();
  constexpr const char* kOp = "diffusion_ext.group_norm_act_backward";
  const GroupNormShape& sh = a.shape;
  const int64_t N = sh.N, C = sh.C, HW = sh.HW, G = sh.G, Cg = C / G, M = Cg * HW, NG = N * G;
  const int sms = sm_count();
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  const scalar_t* dy = a.grad_y.const_data_ptr<scalar_t>();
  scalar_t* dx = a.grad_x.defined() ? a.grad_x.mutable_data_ptr<scalar_t>() : nullptr;
  const auto grad_of = [&](const at::Tensor& t) -> ChannelGrad<scalar_t> {
    return {t.defined() ? t.mutable_data_ptr() : nullptr, t.defined() && t.scalar_type() != a.x.scalar_type()};
  };
  const ChannelGrad<scalar_t> dw = grad_of(a.grad_weight), db = grad_of(a.grad_bias);
  at::Tensor coef_t, film_t, fold_t;
  ParamSrc<scalar_t, kFilm> src =
      param_src<scalar_t, kFilm>(a, a.mean.const_data_ptr<acc_t>(), a.rstd.const_data_ptr<acc_t>(), film_t, stream);
  // After the sums of eq. 4 are in ws [N, R, C]: ∂x's a and b (eq. 5); with FiLM ∂s, ∂t (F2), and with a scale
  // the sums folded with (1 + s) (F3) into [N, 1, C]; then ∂γ, ∂β (eq. 4).
  const auto finish_sums = [&](const SumPair<acc_t>* ws, int64_t R) {
    if (dx != nullptr) {
      coef_t = workspace<acc_t>(a.x, NG * 2);
      acc_t* coef = coef_t.mutable_data_ptr<acc_t>();
      gn_bwd_coef_kernel<scalar_t, kFilm>
          <<<grid_of(kOp, ceil_div(NG, kTileThreads / kWarp)), kTileThreads, 0, stream>>>(coef, ws, src, NG, G, Cg,
                                                                                           C, R, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      src.coef = coef;
    }
    if constexpr (kFilm) {
      scalar_t* ds = a.grad_scale.defined() ? a.grad_scale.mutable_data_ptr<scalar_t>() : nullptr;
      scalar_t* dt = a.grad_shift.defined() ? a.grad_shift.mutable_data_ptr<scalar_t>() : nullptr;
      SumPair<acc_t>* folded = nullptr;
      if (a.scale.defined() && (dw.p != nullptr || db.p != nullptr)) {
        fold_t = workspace<acc_t>(a.x, N * C * 2);
        folded = reinterpret_cast<SumPair<acc_t>*>(fold_t.mutable_data_ptr<acc_t>());
      }
      if (ds != nullptr || dt != nullptr || folded != nullptr) {
        gn_bwd_film_kernel<scalar_t><<<grid_of(kOp, ceil_div(N * C, kTileThreads)), kTileThreads, 0, stream>>>(
            ds, dt, folded, ws, src, N * C, R, C);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (folded != nullptr) {
        ws = folded;
        R = 1;
      }
    }
    if (dw.p != nullptr || db.p != nullptr) {
      gn_bwd_param_grad_kernel<scalar_t><<<grid_of(kOp, ceil_div(C, kWarp)), kTileThreads, 0, stream>>>(
          dw, db, ws, N * R, C);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  };

  if (!sh.channels_last) {
    dispatch_pack<kV>(HW % kV == 0 && aligned16({x, dy, dx}), [&](auto vl) {
      constexpr int VL = decltype(vl)::value;
      dispatch_index(M, [&](auto index) {
        using index_t = decltype(index);
        // 1. sums of eq. 4 per row (n, c) and chunk
        const int64_t row_packs = HW / VL;
        const int tpr = threads_for(row_packs, kWarp, kTileThreads);
        const int64_t rpb = kTileThreads / tpr;
        const int64_t row_blocks = ceil_div(N * C, rpb);
        int64_t R = 1;
        if (row_blocks < 4 * static_cast<int64_t>(sms)) {
          R = std::min(ceil_div(4 * static_cast<int64_t>(sms), row_blocks),
                       std::max<int64_t>(1, row_packs / (static_cast<int64_t>(tpr) * kUnroll)));
        }
        const int64_t chunk = std::max<int64_t>(1, ceil_div(row_packs, R));
        R = ceil_div(row_packs, chunk);
        at::Tensor ws_t = workspace<acc_t>(a.x, N * R * C * 2);
        auto* ws = reinterpret_cast<SumPair<acc_t>*>(ws_t.mutable_data_ptr<acc_t>());
        gn_bwd_cf_reduce_kernel<scalar_t, VL, kAct, index_t, kFilm>
            <<<grid_of(kOp, row_blocks * R), kTileThreads, 0, stream>>>(
                ws, dy, x, src, N * C, C, static_cast<index_t>(HW), static_cast<index_t>(chunk), R, tpr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        // 2. ∂γ, ∂β; a, b
        finish_sums(ws, R);
        // 3. ∂x (eq. 6)
        if (dx != nullptr) {
          const Split sp = cf_split(NG, M / VL, sms);
          gn_cf_apply_kernel<BackwardOp<kAct>, scalar_t, VL, index_t, kFilm>
              <<<grid_of(kOp, NG * sp.S), threads_for(sp.chunk, 64, kApplyThreadsMax), 0, stream>>>(
                  dx, x, dy, src, static_cast<index_t>(HW), static_cast<index_t>(M), static_cast<index_t>(sp.chunk),
                  sp.S);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
    return;
  }

  dispatch_pack<kV>(C % kV == 0 && aligned16({x, dy, dx}), [&](auto vl) {
    constexpr int VL = decltype(vl)::value;
    const Tile tile = make_tile(N, HW, C, VL, sms);
    const unsigned blocks = grid_of(kOp, N * tile.R * tile.CT);
    // 1. sums of eq. 4 per channel and row chunk
    at::Tensor ws_t = workspace<acc_t>(a.x, N * tile.R * C * 2);
    auto* ws = reinterpret_cast<SumPair<acc_t>*>(ws_t.mutable_data_ptr<acc_t>());
    gn_bwd_cl_reduce_kernel<scalar_t, VL, kAct, kFilm><<<blocks, kTileThreads, 0, stream>>>(ws, dy, x, src, tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // 2. ∂γ, ∂β; a, b
    finish_sums(ws, tile.R);
    // 3. ∂x (eq. 6)
    if (dx != nullptr) {
      gn_cl_apply_kernel<BackwardOp<kAct>, scalar_t, VL, kFilm>
          <<<blocks, kTileThreads, 0, stream>>>(dx, x, dy, src, tile);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_cuda(const at::Tensor& x, int64_t num_groups,
                                                                   const std::optional<at::Tensor>& weight,
                                                                   const std::optional<at::Tensor>& bias, double eps,
                                                                   std::string_view activation,
                                                                   const std::optional<at::Tensor>& scale,
                                                                   const std::optional<at::Tensor>& shift) {
  GroupNormArgs a = prepare_group_norm_act(x, num_groups, weight, bias, eps, activation, scale, shift);
  const c10::cuda::CUDAGuard guard(a.x.device());
  if (a.x.numel() == 0) {
    // No elements: every group (if any) is empty, with μ = 0 and σ² = 0, so ρ = 1/√ε (as the CPU kernel).
    a.mean.fill_(0.0);
    a.rstd.fill_(1.0 / std::sqrt(eps));
    return {a.y, a.mean, a.rstd};
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "group_norm_act_cuda", [&] {
    dispatch_activation(a.activation, [&](auto act) {
      dispatch_bool(a.film(), [&](auto film) {
        forward<scalar_t, decltype(act)::value, decltype(film)::value>(a, stream);
      });
    });
  });
  return {a.y, a.mean, a.rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_norm_act_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& rstd,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, int64_t num_groups,
    std::string_view activation, std::array<bool, 3> output_mask, const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift, std::array<bool, 2> scale_shift_mask) {
  GroupNormBackwardArgs a = prepare_group_norm_act_backward(grad_y, x, mean, rstd, weight, bias, num_groups,
                                                            activation, output_mask, scale, shift, scale_shift_mask);
  const c10::cuda::CUDAGuard guard(a.x.device());
  const auto outputs = [&] {
    return std::make_tuple(a.grad_x, a.grad_weight, a.grad_bias, a.grad_scale, a.grad_shift);
  };
  if (a.x.numel() == 0) {
    // Empty sums: ∂γ = ∂β = ∂s = ∂t = 0; ∂x is empty.
    for (at::Tensor* g : {&a.grad_weight, &a.grad_bias, &a.grad_scale, &a.grad_shift}) {
      if (g->defined()) g->zero_();
    }
    return outputs();
  }
  if (!a.grad_x.defined() && !a.grad_weight.defined() && !a.grad_bias.defined() && !a.grad_scale.defined() &&
      !a.grad_shift.defined()) {
    return outputs();
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "group_norm_act_backward_cuda", [&] {
    dispatch_activation(a.activation, [&](auto act) {
      dispatch_bool(a.film(), [&](auto film) {
        backward<scalar_t, decltype(act)::value, decltype(film)::value>(a, stream);
      });
    });
  });
  return outputs();
}

TORCH_LIBRARY_IMPL(diffusion_ext, CUDA, m) {
  m.impl("group_norm_act", &group_norm_act_cuda);
  m.impl("group_norm_act_backward", &group_norm_act_backward_cuda);
}

}  // namespace diffusion_ext
