// attention on CUDA: out = softmax(scale·q·kᵀ)·v and its backward, without materialising the Lq×Lk
// scores (FlashAttention-2, Dao 2023, arXiv:2307.08691). Argument checks, allocation and the output
// layout ((B, H, L, D) views of (B, L, H, D) memory) are in attention_args.h; every tensor is read and
// written through its own (b, h, l) strides, the head dim being contiguous.
//
// Notation, for one (b, h): S = scale·Q·Kᵀ (Lq × Lk), P = softmax_rows(S), O = P·V,
// lse_i = log Σ_j exp(S_ij) (natural log, the layout of the lse output). Backward (FA-2, Alg. 2):
//   (1) δ_i = Σ_d dO_id·O_id                        (= rowsum(dP ∘ P), since dP = dO·Vᵀ and O = P·V)
//   (2) P_ij = exp(S_ij − lse_i)                    (recomputed from q, k and lse)
//   (3) dV = Pᵀ·dO,   dP = dO·Vᵀ,   dS = P ∘ (dP − δ)
//   (4) dQ = scale·dS·K,   dK = scale·dSᵀ·Q
// Exponentials are taken in base 2: the kernels scale S by scale·log2(e) and use ex2 (FA-2 does the same);
// lse is converted to and from the natural log at the boundary.
//
// fp16 / bf16: tensor cores (mma.sync m16n8k16, fp32 accumulation; attention_mma.cuh documents the
// fragment layouts). The head dim D (a multiple of 8 up to 256) is padded to a bucket DP ∈ {32, 48, 64, 80,
// 128, 256}: the tiles hold DP columns, those ≥ D are zero-filled when loaded (so they add nothing to Q·Kᵀ)
// and never stored. Rows past Lq or Lk are zero-filled as well, and scores of keys ≥ Lk are masked to −inf
// (forward) or their P to 0 (backward): zero V rows alone would not do, since 0·NaN garbage is NaN.
//   forward  attn_fwd_tc_kernel: one CTA of 4 warps per (64-query tile, b·h), each warp owning 16 query
//            rows; loop over key tiles with the online softmax (FA-2, Alg. 1); K and V tiles are double
//            buffered with cp.async so that the next tile loads while this one is multiplied.
//   backward attn_bwd_delta_kernel (eq. 1, one warp per row) → attn_bwd_tc_kernel: one CTA of 4 warps per
//            (key tile, b·h), holding K, V and the dK, dV accumulators while it loops over query tiles
//            (double buffered); dQ is accumulated with fp32 atomics (red.global.add) into a zeroed fp32
//            workspace, then scaled and rounded by attn_dq_convert_kernel.
//            Why atomics rather than a second kernel parallel over query tiles: that kernel would recompute
//            S and dP (2 of the 5 matmuls) again; the atomics go to L2 and cost less. The price: dq is not
//            bitwise reproducible run to run (float addition order); dk, dv and the forward are.
// fp32 / fp64: a SIMT path (plain FMA loops over shared-memory tiles of 16 rows, 4 threads per row,
//            accumulation in the input dtype, which is the op's accumulation dtype for these): correctness
//            over speed, the tensor-core path is the one tuned for speed.
// Tile sizes: 64 queries per forward CTA so that small problems (B=64, H=4, L=256) give hundreds of CTAs;
// key tiles of 64 (32 for DP = 256, for registers and shared memory). The largest configuration, forward
// DP = 256, takes 99 KiB of shared memory: the limit of sm_86/sm_89, so it runs on every sm_80+ GPU.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>

#include "../attention_args.h"
#include "../ops.h"
#include "attention_mma.cuh"

namespace diffusion_ext {
namespace {

constexpr const char* kOp = "diffusion_ext.attention";
constexpr const char* kBackwardOp = "diffusion_ext.attention_backward";
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// ---------------------------------------------------------------------------------------------------------
// Parameters. Pointers are at element (0, 0, 0, 0); strides in elements.

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  void* lse;  // (B, H, Lq) contiguous, accumulation dtype
  AttentionStrides qs, ks, vs, os;
  int64_t H, Lq, Lk;
  int D;
  int64_t q_tiles;   // query tiles per (b, h)
  float scale_log2;  // scale·log2(e), tensor-core path
  double scale;      // SIMT path
  bool vec;          // 16-byte loads: pointers 16-byte aligned, strides multiples of 8 (fp16/bf16 only)
};

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;
  void* dq;  // tensor-core path: the fp32 workspace [B·H][Lq][D]; SIMT path: the dq output (zeroed)
  void* dk;
  void* dv;
  const void* lse;    // (B, H, Lq) contiguous, accumulation dtype
  const void* delta;  // (B, H, Lq) contiguous, accumulation dtype (eq. 1)
  AttentionStrides qs, ks, vs, dos, dqs, dks, dvs;
  int64_t H, Lq, Lk;
  int D;
  int64_t k_tiles;  // key tiles per (b, h)
  float scale_log2;
  double scale;
  bool vec;
};

// ---------------------------------------------------------------------------------------------------------
// Tensor-core path (fp16 / bf16).

// Rows [row0, row0 + ROWS) of one (b, h) slice g (rows of stride l_stride) into a shared tile of pitch DP + 8
// elements: 16-byte chunks, zero for rows ≥ L and columns ≥ D. The pitch of DP + 8 (an odd number of
// 16-byte units, since DP is a multiple of 16) puts the 8 rows that one ldmatrix phase reads in 8
// different bank groups: no conflicts without a swizzle. vec: cp.async (asynchronous, the caller commits
// and waits); otherwise 2-byte loads and stores (strides that are not multiples of 8 elements, e.g. a
// slice at an odd offset), made visible by the caller's __syncthreads() like the cp.async ones.
template <int ROWS, int DP, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ g, int64_t l_stride, int64_t row0,
                                          int64_t L, int D, bool vec) {
  constexpr int kChunks = DP / 8;
  constexpr int kPitch = DP + 8;
#pragma unroll 2
  for (int c = threadIdx.x; c < ROWS * kChunks; c += NTHREADS) {
    const int r = c / kChunks;
    const int col = (c - r * kChunks) * 8;
    T* dst = s + r * kPitch + col;
    const bool valid = row0 + r < L && col < D;
    if (vec) {
      attn::cp_async_16(dst, valid ? g + (row0 + r) * l_stride + col : g, valid);
    } else {
      auto* d16 = reinterpret_cast<uint16_t*>(dst);
      if (valid) {
        const auto* s16 = reinterpret_cast<const uint16_t*>(g + (row0 + r) * l_stride + col);
#pragma unroll
        for (int j = 0; j < 8; ++j) d16[j] = s16[j];
      } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) d16[j] = 0;
      }
    }
  }
}

// Lane l's address in a row-major 16×16 tile for an A fragment (ldmatrix.x4): row l % 16, col 8·(l / 16).
template <typename T>
__device__ __forceinline__ const T* a_frag_addr(const T* tile, int pitch, int lane) {
  return tile + (lane % 16) * pitch + (lane / 16) * 8;
}
// Lane l's address for the B fragments of two n-blocks (n0, n0 + 8) × 16 k from a matrix stored [n][k]
// (ldmatrix.x4, no .trans): matrices (n0, k0), (n0, k0+8), (n0+8, k0), (n0+8, k0+8) → b0, b1 of n-block
// n0 then b0, b1 of n-block n0 + 8. tile points at (n0, k0).
template <typename T>
__device__ __forceinline__ const T* b_frag_addr_nk(const T* tile, int pitch, int lane) {
  return tile + ((lane % 8) + (lane / 16) * 8) * pitch + ((lane / 8) % 2) * 8;
}
// The same from a matrix stored [k][n] (ldmatrix.x4.trans): matrices (k0, n0), (k0+8, n0), (k0, n0+8),
// (k0+8, n0+8) → b0, b1 of n-block n0 then of n-block n0 + 8. tile points at (k0, n0).
template <typename T>
__device__ __forceinline__ const T* b_frag_addr_kn(const T* tile, int pitch, int lane) {
  return tile + ((lane % 8) + ((lane / 8) % 2) * 8) * pitch + (lane / 16) * 8;
}

// acc[0..2·NP) += A (16 × 16·KSTEPS, row-major in shared memory at a, pitch pa) · Bᵀ where B is stored
// [n][k] at b (pitch pb, 16·NP rows): the S = Q·Kᵀ shape.
template <typename T, int KSTEPS, int NP>
__device__ __forceinline__ void mma_rows_x_rowsT(float (*acc)[4], const T* a, int pa, const T* b, int pb, int lane) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    uint32_t af[4];
    attn::ldmatrix_x4(af, a_frag_addr(a + kk * 16, pa, lane));
#pragma unroll
    for (int nb = 0; nb < NP; ++nb) {
      uint32_t bf[4];
      attn::ldmatrix_x4(bf, b_frag_addr_nk(b + nb * 16 * pb + kk * 16, pb, lane));
      attn::mma_16816<T>(acc[2 * nb], af, bf[0], bf[1]);
      attn::mma_16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
    }
  }
}

// The same with A already in registers as KSTEPS A fragments (ldmatrix'ed once: Q in the forward).
template <typename T, int KSTEPS, int NP>
__device__ __forceinline__ void mma_frags_x_rowsT(float (*acc)[4], const uint32_t (*af)[4], const T* b, int pb,
                                                  int lane) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
#pragma unroll
    for (int nb = 0; nb < NP; ++nb) {
      uint32_t bf[4];
      attn::ldmatrix_x4(bf, b_frag_addr_nk(b + nb * 16 * pb + kk * 16, pb, lane));
      attn::mma_16816<T>(acc[2 * nb], af[kk], bf[0], bf[1]);
      attn::mma_16816<T>(acc[2 * nb + 1], af[kk], bf[2], bf[3]);
    }
  }
}

// acc[0..2·NP) += A·B where A (16 × 16·KSTEPS) is an fp32 accumulator in registers (p, 2·KSTEPS n-blocks of
// 8, rounded to T: the register reuse of the header of attention_mma.cuh) and B is stored [k][n] at b
// (pitch pb; 16·NP columns from b): the O = P·V shape.
template <typename T, int KSTEPS, int NP>
__device__ __forceinline__ void mma_regs_x_rows(float (*acc)[4], const float (*p)[4], const T* b, int pb, int lane) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    const uint32_t af[4] = {attn::pack2<T>(p[2 * kk][0], p[2 * kk][1]), attn::pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                            attn::pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]),
                            attn::pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int nb = 0; nb < NP; ++nb) {
      uint32_t bf[4];
      attn::ldmatrix_x4_trans(bf, b_frag_addr_kn(b + kk * 16 * pb + nb * 16, pb, lane));
      attn::mma_16816<T>(acc[2 * nb], af, bf[0], bf[1]);
      attn::mma_16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
    }
  }
}

// acc[0..2·NP) += A·B with A (16 × 16·KSTEPS) row-major in shared memory and B stored [k][n]: dQ = dS·K.
template <typename T, int KSTEPS, int NP>
__device__ __forceinline__ void mma_rows_x_rows(float (*acc)[4], const T* a, int pa, const T* b, int pb, int lane) {
#pragma unroll
  for (int kk = 0; kk < KSTEPS; ++kk) {
    uint32_t af[4];
    attn::ldmatrix_x4(af, a_frag_addr(a + kk * 16, pa, lane));
#pragma unroll
    for (int nb = 0; nb < NP; ++nb) {
      uint32_t bf[4];
      attn::ldmatrix_x4_trans(bf, b_frag_addr_kn(b + kk * 16 * pb + nb * 16, pb, lane));
      attn::mma_16816<T>(acc[2 * nb], af, bf[0], bf[1]);
      attn::mma_16816<T>(acc[2 * nb + 1], af, bf[2], bf[3]);
    }
  }
}

template <int DP>
struct FwdTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int BM = 16 * kWarps;          // query rows per CTA, 16 per warp
  static constexpr int BN = DP <= 128 ? 64 : 32;  // keys per step
  static constexpr int kPitch = DP + 8;
  // Q's A fragments stay in registers across the key loop (DP/4 registers) up to DP = 128; for DP = 256
  // they would push the O accumulator (128 registers) into spills, so they are re-read from shared memory.
  static constexpr bool kQInRegs = DP <= 128;
  // sQ [BM][kPitch], sK [2][BN][kPitch], sV [2][BN][kPitch]
  static constexpr int kSmemBytes = (BM + 4 * BN) * kPitch * 2;
};

template <typename T, int DP>
__global__ void __launch_bounds__(FwdTile<DP>::kThreads) attn_fwd_tc_kernel(const FwdParams p) {
  using Cfg = FwdTile<DP>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, kPitch = Cfg::kPitch, kThreads = Cfg::kThreads;
  constexpr int NBO = DP / 8;  // n-blocks of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * kPitch;
  T* sV = sK + 2 * BN * kPitch;

  const int64_t bh = blockIdx.x / p.q_tiles;
  const int64_t q0 = (blockIdx.x - bh * p.q_tiles) * BM;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.qs.b + h * p.qs.h;
  const T* k = static_cast<const T*>(p.k) + b * p.ks.b + h * p.ks.h;
  const T* v = static_cast<const T*>(p.v) + b * p.vs.b + h * p.vs.h;
  const int n_tiles = static_cast<int>((p.Lk + BN - 1) / BN);

  load_tile<BM, DP, kThreads>(sQ, q, p.qs.l, q0, p.Lq, p.D, p.vec);
  load_tile<BN, DP, kThreads>(sK, k, p.ks.l, 0, p.Lk, p.D, p.vec);
  load_tile<BN, DP, kThreads>(sV, v, p.vs.l, 0, p.Lk, p.D, p.vec);
  attn::cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // this thread holds rows g and g + 8 of its warp's 16
  const T* sQw = sQ + warp * 16 * kPitch;
  float o[NBO][4] = {};
  float m[2] = {-INFINITY, -INFINITY};  // running max of the scaled scores (base 2), rows g and g + 8
  float l[2] = {0.f, 0.f};              // running Σ 2^(s − m) over this thread's columns only
  uint32_t qf[Cfg::kQInRegs ? DP / 16 : 1][4];

  for (int j = 0; j < n_tiles; ++j) {
    // Tile j has landed, and every warp is done with tile j − 1, whose buffer the next load overwrites.
    attn::cp_async_wait_all();
    __syncthreads();
    const int buf = j & 1;
    if (j + 1 < n_tiles) {
      const int64_t k1 = static_cast<int64_t>(j + 1) * BN;
      load_tile<BN, DP, kThreads>(sK + (buf ^ 1) * BN * kPitch, k, p.ks.l, k1, p.Lk, p.D, p.vec);
      load_tile<BN, DP, kThreads>(sV + (buf ^ 1) * BN * kPitch, v, p.vs.l, k1, p.Lk, p.D, p.vec);
      attn::cp_async_commit();
    }
    const T* sKj = sK + buf * BN * kPitch;
    const T* sVj = sV + buf * BN * kPitch;

    // S = Q·Kᵀ for this warp's 16 rows and the BN keys: s[nb] is the accumulator of keys 8nb..8nb+7.
    float s[BN / 8][4] = {};
    if constexpr (Cfg::kQInRegs) {
      if (j == 0) {  // sQ has landed with tile 0
#pragma unroll
        for (int kk = 0; kk < DP / 16; ++kk) attn::ldmatrix_x4(qf[kk], a_frag_addr(sQw + kk * 16, kPitch, lane));
      }
      mma_frags_x_rowsT<T, DP / 16, BN / 16>(s, qf, sKj, kPitch, lane);
    } else {
      mma_rows_x_rowsT<T, DP / 16, BN / 16>(s, sQw, kPitch, sKj, kPitch, lane);
    }

    const int64_t k0 = static_cast<int64_t>(j) * BN;
    if (k0 + BN > p.Lk) {  // the tail tile: keys ≥ Lk get −inf, so P = 0 there
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (k0 + nb * 8 + 2 * t + (e & 1) >= p.Lk) s[nb][e] = -INFINITY;
        }
      }
    }

    // Online softmax (FA-2, Alg. 1 lines 8-10), per row i ∈ {g, g + 8}: the row max is reduced over the 4
    // threads t that share the row (lanes 4g..4g+3: xor 1 and 2); the row sum stays per thread until the end.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float mx = -INFINITY;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[nb][2 * i], s[nb][2 * i + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
      const float m_new = fmaxf(m[i], mx * p.scale_log2);  // scale > 0: max commutes with the scaling
      // A row with every score −inf so far keeps m = −inf; subtract 0 instead so that no −inf − (−inf) = NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = attn::exp2_approx(m[i] - m_use);  // rescales the old sums; 0 on the first tile
      m[i] = m_new;
      float rs = 0.f;
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb) {
#pragma unroll
        for (int e = 2 * i; e < 2 * i + 2; ++e) {
          s[nb][e] = attn::exp2_approx(fmaf(s[nb][e], p.scale_log2, -m_use));
          rs += s[nb][e];
        }
      }
      l[i] = l[i] * alpha + rs;
#pragma unroll
      for (int nb = 0; nb < NBO; ++nb) {
        o[nb][2 * i] *= alpha;
        o[nb][2 * i + 1] *= alpha;
      }
    }

    // O += P·V, P rounded to T straight from the accumulator registers.
    mma_regs_x_rows<T, BN / 16, DP / 16>(o, s, sVj, kPitch, lane);
  }

  // Epilogue (Alg. 1 lines 12-14): O / l and lse = (m + log2 l)·ln 2, l summed over the row's 4 threads.
  T* out = static_cast<T*>(p.out) + b * p.os.b + h * p.os.h;
  float* lse = static_cast<float*>(p.lse) + bh * p.Lq;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(kFullMask, l[i], 1);
    l[i] += __shfl_xor_sync(kFullMask, l[i], 2);
    const int64_t row = q0 + warp * 16 + g + 8 * i;
    if (row >= p.Lq) continue;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    if (t == 0) lse[row] = l[i] > 0.f ? (m[i] + log2f(l[i])) * kLn2 : -INFINITY;
    T* orow = out + row * p.os.l;
#pragma unroll
    for (int nb = 0; nb < NBO; ++nb) {
      const int col = nb * 8 + 2 * t;
      // out is allocated by prepare_attention: (B, L, H, D) memory with D a multiple of 8, so an even
      // column is 4-byte aligned.
      if (col < p.D) *reinterpret_cast<uint32_t*>(orow + col) = attn::pack2<T>(o[nb][2 * i] * inv, o[nb][2 * i + 1] * inv);
    }
  }
}

template <int DP>
struct BwdTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // Keys per CTA: kKeyBlocks blocks of 16. Warp w owns key block w % kKeyBlocks and, of dK and dV, the
  // column part w / kKeyBlocks of kDSplit (for DP = 256 two warps share a key block, so that one warp's
  // dK and dV accumulators stay at 128 registers; they both compute that block's P and dP).
  static constexpr int kKeyBlocks = DP <= 128 ? 4 : 2;
  static constexpr int kDSplit = kWarps / kKeyBlocks;
  static constexpr int BN = 16 * kKeyBlocks;
  static constexpr int BM = DP <= 80 ? 64 : (DP <= 128 ? 32 : 16);  // queries per step
  static constexpr int kPitch = DP + 8;
  static constexpr int kDsPitch = BN + 8;  // odd number of 16-byte units, as kPitch
  // dQ of a query tile: BM / 16 row blocks, each split by columns over kQSplit warps.
  static constexpr int kQRowBlocks = BM / 16;
  static constexpr int kQSplit = kWarps / kQRowBlocks;
  static constexpr int kNbKV = DP / 8 / kDSplit;  // dK, dV n-blocks per warp
  static constexpr int kNbQ = DP / 8 / kQSplit;   // dQ n-blocks per warp
  static_assert(kNbKV % 2 == 0 && kNbQ % 2 == 0, "B fragments are loaded by pairs of n-blocks");
  // sK, sV [BN][kPitch]; sQ, sdO [2][BM][kPitch]; sdS [BM][kDsPitch]; sLse, sDelta [2][BM] fp32
  static constexpr int kSmemBytes = (2 * BN + 4 * BM) * kPitch * 2 + BM * kDsPitch * 2 + 4 * BM * 4;
};

// The query-side tile qt of the backward: Q and dO rows (cp.async or plain), lse·log2(e) and δ (plain
// stores; rows ≥ Lq get lse = +inf, so that P = 2^(s − inf) = 0 there, and δ = 0).
template <typename T, int DP>
__device__ __forceinline__ void load_query_tile(const BwdParams& p, T* sQ, T* sdO, float* sLse, float* sDelta,
                                                const T* q, const T* dout, const float* lse, const float* delta,
                                                int64_t q0) {
  using Cfg = BwdTile<DP>;
  load_tile<Cfg::BM, DP, Cfg::kThreads>(sQ, q, p.qs.l, q0, p.Lq, p.D, p.vec);
  load_tile<Cfg::BM, DP, Cfg::kThreads>(sdO, dout, p.dos.l, q0, p.Lq, p.D, p.vec);
  if (threadIdx.x < Cfg::BM) {
    const int64_t row = q0 + threadIdx.x;
    sLse[threadIdx.x] = row < p.Lq ? lse[row] * kLog2e : INFINITY;
    sDelta[threadIdx.x] = row < p.Lq ? delta[row] : 0.f;
  }
}

template <typename T, int DP>
__global__ void __launch_bounds__(BwdTile<DP>::kThreads) attn_bwd_tc_kernel(const BwdParams p) {
  using Cfg = BwdTile<DP>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, kPitch = Cfg::kPitch, kDsPitch = Cfg::kDsPitch;
  constexpr int kNbKV = Cfg::kNbKV, kNbQ = Cfg::kNbQ, kNbS = BM / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BN * kPitch;
  T* sQ = sV + BN * kPitch;      // [2][BM][kPitch]
  T* sdO = sQ + 2 * BM * kPitch;  // [2][BM][kPitch]
  T* sdS = sdO + 2 * BM * kPitch;  // [BM][kDsPitch]: dS (queries × keys) for dQ = dS·K
  float* sLse = reinterpret_cast<float*>(sdS + BM * kDsPitch);  // [2][BM]
  float* sDelta = sLse + 2 * BM;                                // [2][BM]

  const int64_t bh = blockIdx.x / p.k_tiles;
  const int64_t k0 = (blockIdx.x - bh * p.k_tiles) * BN;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const T* q = static_cast<const T*>(p.q) + b * p.qs.b + h * p.qs.h;
  const T* k = static_cast<const T*>(p.k) + b * p.ks.b + h * p.ks.h;
  const T* v = static_cast<const T*>(p.v) + b * p.vs.b + h * p.vs.h;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dos.b + h * p.dos.h;
  const float* lse = static_cast<const float*>(p.lse) + bh * p.Lq;
  const float* delta = static_cast<const float*>(p.delta) + bh * p.Lq;
  float* dq = static_cast<float*>(p.dq) + bh * p.Lq * p.D;  // fp32 workspace [Lq][D] of this (b, h)
  const int n_tiles = static_cast<int>((p.Lq + BM - 1) / BM);

  load_tile<BN, DP, Cfg::kThreads>(sK, k, p.ks.l, k0, p.Lk, p.D, p.vec);
  load_tile<BN, DP, Cfg::kThreads>(sV, v, p.vs.l, k0, p.Lk, p.D, p.vec);
  load_query_tile<T, DP>(p, sQ, sdO, sLse, sDelta, q, dout, lse, delta, 0);
  attn::cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;
  const int kb = warp % Cfg::kKeyBlocks;  // key block: rows kb·16 + g and kb·16 + g + 8 of the tile
  const int part = warp / Cfg::kKeyBlocks;  // dK, dV n-blocks [part·kNbKV, (part + 1)·kNbKV)
  const int qrb = warp % Cfg::kQRowBlocks;  // dQ: rows qrb·16.. of the query tile
  const int qpart = warp / Cfg::kQRowBlocks;  // dQ: n-blocks [qpart·kNbQ, (qpart + 1)·kNbQ)
  const bool key_tail = k0 + BN > p.Lk;
  const T* sKw = sK + kb * 16 * kPitch;
  const T* sVw = sV + kb * 16 * kPitch;
  float dk[kNbKV][4] = {};
  float dv[kNbKV][4] = {};

  for (int j = 0; j < n_tiles; ++j) {
    // Tile j has landed; every warp is done with tile j − 1 (its buffers and sdS).
    attn::cp_async_wait_all();
    __syncthreads();
    const int buf = j & 1;
    if (j + 1 < n_tiles) {
      load_query_tile<T, DP>(p, sQ + (buf ^ 1) * BM * kPitch, sdO + (buf ^ 1) * BM * kPitch, sLse + (buf ^ 1) * BM,
                             sDelta + (buf ^ 1) * BM, q, dout, lse, delta, static_cast<int64_t>(j + 1) * BM);
      attn::cp_async_commit();
    }
    const T* sQj = sQ + buf * BM * kPitch;
    const T* sdOj = sdO + buf * BM * kPitch;
    const float* sLsej = sLse + buf * BM;
    const float* sDeltaj = sDelta + buf * BM;

    // Sᵀ = K·Qᵀ for this warp's 16 keys (rows) and the BM queries (columns, n-block nb = queries 8nb..).
    // Computing the transpose puts Pᵀ and dSᵀ in A-fragment order for dV = Pᵀ·dO and dK = dSᵀ·Q.
    float pt[kNbS][4] = {};
    mma_rows_x_rowsT<T, DP / 16, BM / 16>(pt, sKw, kPitch, sQj, kPitch, lane);
    // Pᵀ (eq. 2), element e of n-block nb: key kb·16 + g + 8·(e / 2), query nb·8 + 2t + e % 2.
#pragma unroll
    for (int nb = 0; nb < kNbS; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        pt[nb][e] = attn::exp2_approx(fmaf(pt[nb][e], p.scale_log2, -sLsej[nb * 8 + 2 * t + (e & 1)]));
        if (key_tail && k0 + kb * 16 + g + 8 * (e >> 1) >= p.Lk) pt[nb][e] = 0.f;
      }
    }
    // dV += Pᵀ·dO (eq. 3), this warp's columns.
    mma_regs_x_rows<T, BM / 16, kNbKV / 2>(dv, pt, sdOj + part * kNbKV * 8, kPitch, lane);
    // dPᵀ = V·dOᵀ, then dSᵀ = Pᵀ ∘ (dPᵀ − δ) (eq. 3), in place.
    float ds[kNbS][4] = {};
    mma_rows_x_rowsT<T, DP / 16, BM / 16>(ds, sVw, kPitch, sdOj, kPitch, lane);
#pragma unroll
    for (int nb = 0; nb < kNbS; ++nb) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[nb][e] = pt[nb][e] * (ds[nb][e] - sDeltaj[nb * 8 + 2 * t + (e & 1)]);
    }
    // dK += dSᵀ·Q (eq. 4 without the scale, applied once at the end).
    mma_regs_x_rows<T, BM / 16, kNbKV / 2>(dk, ds, sQj + part * kNbKV * 8, kPitch, lane);
    // dS (queries × keys) to shared memory for dQ, which needs whole rows of queries across the warps.
    if (part == 0) {
#pragma unroll
      for (int nb = 0; nb < kNbS; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          sdS[(nb * 8 + 2 * t + (e & 1)) * kDsPitch + kb * 16 + g + 8 * (e >> 1)] = static_cast<T>(ds[nb][e]);
        }
      }
    }
    __syncthreads();
    // dQ (rows qrb·16.., this warp's columns) = dS·K, added to the fp32 workspace (scaled by the convert).
    float dqa[kNbQ][4] = {};
    mma_rows_x_rows<T, BN / 16, kNbQ / 2>(dqa, sdS + qrb * 16 * kDsPitch, kDsPitch, sK + qpart * kNbQ * 8, kPitch,
                                          lane);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t row = static_cast<int64_t>(j) * BM + qrb * 16 + g + 8 * i;
      if (row >= p.Lq) continue;
#pragma unroll
      for (int nb = 0; nb < kNbQ; ++nb) {
        const int col = (qpart * kNbQ + nb) * 8 + 2 * t;
        if (col < p.D) {
          atomicAdd(dq + row * p.D + col, dqa[nb][2 * i]);
          atomicAdd(dq + row * p.D + col + 1, dqa[nb][2 * i + 1]);
        }
      }
    }
  }

  // dK·scale and dV; dk and dv are allocated by prepare_attention_backward ((B, L, H, D) memory, D a
  // multiple of 8), so an even column is 4-byte aligned.
  T* dkp = static_cast<T*>(p.dk) + b * p.dks.b + h * p.dks.h;
  T* dvp = static_cast<T*>(p.dv) + b * p.dvs.b + h * p.dvs.h;
  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int64_t key = k0 + kb * 16 + g + 8 * i;
    if (key >= p.Lk) continue;
#pragma unroll
    for (int nb = 0; nb < kNbKV; ++nb) {
      const int col = (part * kNbKV + nb) * 8 + 2 * t;
      if (col < p.D) {
        *reinterpret_cast<uint32_t*>(dkp + key * p.dks.l + col) =
            attn::pack2<T>(dk[nb][2 * i] * scale, dk[nb][2 * i + 1] * scale);
        *reinterpret_cast<uint32_t*>(dvp + key * p.dvs.l + col) = attn::pack2<T>(dv[nb][2 * i], dv[nb][2 * i + 1]);
      }
    }
  }
}

// dq = scale·workspace, rounded to T, 8 columns per thread (D is a multiple of 8; dq is allocated by
// prepare_attention_backward, so the 16-byte stores are aligned).
template <typename T>
__global__ void attn_dq_convert_kernel(T* __restrict__ dq, AttentionStrides s, const float* __restrict__ ws, int64_t H,
                                       int64_t Lq, int D, float scale, int64_t n_chunks) {
  const int chunks_per_row = D / 8;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < n_chunks;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = c / chunks_per_row;  // row of the [B·H·Lq] workspace
    const int col = static_cast<int>(c - r * chunks_per_row) * 8;
    const int64_t bh = r / Lq, l = r - bh * Lq;
    const int64_t b = bh / H, h = bh - b * H;
    const float4 x0 = *reinterpret_cast<const float4*>(ws + r * D + col);
    const float4 x1 = *reinterpret_cast<const float4*>(ws + r * D + col + 4);
    const uint4 y = {attn::pack2<T>(x0.x * scale, x0.y * scale), attn::pack2<T>(x0.z * scale, x0.w * scale),
                     attn::pack2<T>(x1.x * scale, x1.y * scale), attn::pack2<T>(x1.z * scale, x1.w * scale)};
    *reinterpret_cast<uint4*>(dq + b * s.b + h * s.h + l * s.l + col) = y;
  }
}

// ---------------------------------------------------------------------------------------------------------
// δ_i = Σ_d dO_id·O_id (eq. 1), every dtype: one warp per row (b, h, i).

constexpr int kDeltaThreads = 256;

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kDeltaThreads)
    attn_bwd_delta_kernel(acc_t* __restrict__ delta, const scalar_t* __restrict__ dout, AttentionStrides dos,
                          const scalar_t* __restrict__ out, AttentionStrides os, int64_t H, int64_t Lq, int D,
                          int64_t rows) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (kDeltaThreads / 32);
  for (int64_t r = blockIdx.x * static_cast<int64_t>(kDeltaThreads / 32) + threadIdx.x / 32; r < rows; r += warps) {
    const int64_t bh = r / Lq, l = r - bh * Lq;
    const int64_t b = bh / H, h = bh - b * H;
    const scalar_t* dr = dout + b * dos.b + h * dos.h + l * dos.l;
    const scalar_t* orow = out + b * os.b + h * os.h + l * os.l;
    acc_t sum = 0;
    for (int d = lane; d < D; d += 32) sum += static_cast<acc_t>(dr[d]) * static_cast<acc_t>(orow[d]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(kFullMask, sum, off);
    if (lane == 0) delta[r] = sum;  // r = (b·H + h)·Lq + l: the contiguous (B, H, Lq) index
  }
}

// ---------------------------------------------------------------------------------------------------------
// SIMT path (fp32, fp64): tiles of 16 rows in shared memory ([16][D], acc_t = scalar_t), 64 threads: thread
// (r = tid / 4, c = tid % 4) owns row r, and of it the columns c, c + 4, ... (scores, then head dims). The
// output rows (out in the forward, dk and dv in the backward) accumulate in place in global memory, each
// element read and written by its one owner thread: no extra shared memory for D up to 256 in fp64.

constexpr int kSimtRows = 16;
constexpr int kSimtThreads = 64;

template <typename acc_t>
__device__ __forceinline__ void simt_load_rows(acc_t* __restrict__ s, const acc_t* __restrict__ g, int64_t l_stride,
                                               int64_t row0, int64_t L, int D) {
  for (int i = threadIdx.x; i < kSimtRows * D; i += kSimtThreads) {
    const int r = i / D, d = i - r * D;
    s[i] = row0 + r < L ? g[(row0 + r) * l_stride + d] : acc_t(0);
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t simt_dot(const acc_t* __restrict__ x, const acc_t* __restrict__ y, int D) {
  acc_t sum = 0;
  for (int d = 0; d < D; ++d) sum = fma(x[d], y[d], sum);
  return sum;
}

template <typename acc_t>
__global__ void __launch_bounds__(kSimtThreads) attn_fwd_simt_kernel(const FwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int D = p.D;
  acc_t* sQ = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sK = sQ + kSimtRows * D;
  acc_t* sV = sK + kSimtRows * D;
  acc_t* sP = sV + kSimtRows * D;  // [16][16]

  const int64_t bh = blockIdx.x / p.q_tiles;
  const int64_t q0 = (blockIdx.x - bh * p.q_tiles) * kSimtRows;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const auto* q = static_cast<const acc_t*>(p.q) + b * p.qs.b + h * p.qs.h;
  const auto* k = static_cast<const acc_t*>(p.k) + b * p.ks.b + h * p.ks.h;
  const auto* v = static_cast<const acc_t*>(p.v) + b * p.vs.b + h * p.vs.h;
  const int r = threadIdx.x / 4, c = threadIdx.x % 4;
  const int64_t row = q0 + r;
  const bool valid = row < p.Lq;
  acc_t* orow = static_cast<acc_t*>(p.out) + b * p.os.b + h * p.os.h + (valid ? row : 0) * p.os.l;
  const acc_t scale = static_cast<acc_t>(p.scale);

  simt_load_rows(sQ, q, p.qs.l, q0, p.Lq, D);
  if (valid) {
    for (int d = c; d < D; d += 4) orow[d] = 0;
  }
  acc_t m = -INFINITY, l = 0;
  for (int64_t k0 = 0; k0 < p.Lk; k0 += kSimtRows) {
    __syncthreads();  // sQ loaded; every thread done with the previous sK, sV, sP
    simt_load_rows(sK, k, p.ks.l, k0, p.Lk, D);
    simt_load_rows(sV, v, p.vs.l, k0, p.Lk, D);
    __syncthreads();
    acc_t s[4];
    acc_t mx = -INFINITY;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int key = c + 4 * jj;
      s[jj] = k0 + key < p.Lk ? scale * simt_dot(sQ + r * D, sK + key * D, D) : acc_t(-INFINITY);
      mx = fmax(mx, s[jj]);
    }
    mx = fmax(mx, __shfl_xor_sync(kFullMask, mx, 1));  // the row's 4 threads are lanes 4r'..4r'+3 of a warp
    mx = fmax(mx, __shfl_xor_sync(kFullMask, mx, 2));
    const acc_t m_new = fmax(m, mx);
    const acc_t m_use = m_new == -INFINITY ? acc_t(0) : m_new;
    const acc_t alpha = exp(m - m_use);
    acc_t rs = 0;
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const acc_t pv = exp(s[jj] - m_use);
      sP[r * kSimtRows + c + 4 * jj] = pv;
      rs += pv;
    }
    rs += __shfl_xor_sync(kFullMask, rs, 1);
    rs += __shfl_xor_sync(kFullMask, rs, 2);
    l = l * alpha + rs;
    m = m_new;
    __syncwarp();  // the row's P, written by its 4 threads
    if (valid) {
      for (int d = c; d < D; d += 4) {
        acc_t acc = orow[d] * alpha;
#pragma unroll
        for (int key = 0; key < kSimtRows; ++key) acc = fma(sP[r * kSimtRows + key], sV[key * D + d], acc);
        orow[d] = acc;
      }
    }
  }
  if (valid) {
    const acc_t inv = l > 0 ? acc_t(1) / l : acc_t(0);
    for (int d = c; d < D; d += 4) orow[d] *= inv;
    if (c == 0) static_cast<acc_t*>(p.lse)[bh * p.Lq + row] = l > 0 ? m + log(l) : acc_t(-INFINITY);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kSimtThreads) attn_bwd_simt_kernel(const BwdParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int D = p.D;
  constexpr int R = kSimtRows;
  acc_t* sK = reinterpret_cast<acc_t*>(smem_raw);
  acc_t* sV = sK + R * D;
  acc_t* sQ = sV + R * D;
  acc_t* sdO = sQ + R * D;
  acc_t* sP = sdO + R * D;  // Pᵀ [key][query]
  acc_t* sdS = sP + R * R;  // dSᵀ [key][query]
  acc_t* sLse = sdS + R * R;
  acc_t* sDelta = sLse + R;

  const int64_t bh = blockIdx.x / p.k_tiles;
  const int64_t k0 = (blockIdx.x - bh * p.k_tiles) * R;
  const int64_t b = bh / p.H, h = bh - b * p.H;
  const auto* q = static_cast<const acc_t*>(p.q) + b * p.qs.b + h * p.qs.h;
  const auto* k = static_cast<const acc_t*>(p.k) + b * p.ks.b + h * p.ks.h;
  const auto* v = static_cast<const acc_t*>(p.v) + b * p.vs.b + h * p.vs.h;
  const auto* dout = static_cast<const acc_t*>(p.dout) + b * p.dos.b + h * p.dos.h;
  const auto* lse = static_cast<const acc_t*>(p.lse) + bh * p.Lq;
  const auto* delta = static_cast<const acc_t*>(p.delta) + bh * p.Lq;
  auto* dq = static_cast<acc_t*>(p.dq) + b * p.dqs.b + h * p.dqs.h;
  const int r = threadIdx.x / 4, c = threadIdx.x % 4;
  const int64_t key = k0 + r;
  const bool kvalid = key < p.Lk;
  acc_t* dkrow = static_cast<acc_t*>(p.dk) + b * p.dks.b + h * p.dks.h + (kvalid ? key : 0) * p.dks.l;
  acc_t* dvrow = static_cast<acc_t*>(p.dv) + b * p.dvs.b + h * p.dvs.h + (kvalid ? key : 0) * p.dvs.l;
  const acc_t scale = static_cast<acc_t>(p.scale);

  simt_load_rows(sK, k, p.ks.l, k0, p.Lk, D);
  simt_load_rows(sV, v, p.vs.l, k0, p.Lk, D);
  if (kvalid) {
    for (int d = c; d < D; d += 4) dkrow[d] = dvrow[d] = 0;
  }
  for (int64_t q0 = 0; q0 < p.Lq; q0 += R) {
    __syncthreads();  // sK, sV loaded; every thread done with the previous query tile
    simt_load_rows(sQ, q, p.qs.l, q0, p.Lq, D);
    simt_load_rows(sdO, dout, p.dos.l, q0, p.Lq, D);
    if (threadIdx.x < R) {
      const int64_t qr = q0 + threadIdx.x;
      sLse[threadIdx.x] = qr < p.Lq ? lse[qr] : acc_t(INFINITY);  // P = exp(s − inf) = 0 past Lq
      sDelta[threadIdx.x] = qr < p.Lq ? delta[qr] : acc_t(0);
    }
    __syncthreads();
    // Pᵀ and dSᵀ for key r and queries c, c + 4, ... (eqs. 2, 3).
#pragma unroll
    for (int jj = 0; jj < 4; ++jj) {
      const int qc = c + 4 * jj;
      const acc_t pv = kvalid ? exp(scale * simt_dot(sK + r * D, sQ + qc * D, D) - sLse[qc]) : acc_t(0);
      const acc_t dp = simt_dot(sV + r * D, sdO + qc * D, D);
      sP[r * R + qc] = pv;
      sdS[r * R + qc] = pv * (dp - sDelta[qc]);
    }
    __syncthreads();  // dQ reads dSᵀ across all keys
    if (kvalid) {  // dV += Pᵀ·dO, dK += dSᵀ·Q (scale at the end)
      for (int d = c; d < D; d += 4) {
        acc_t av = 0, ak = 0;
#pragma unroll
        for (int qc = 0; qc < R; ++qc) {
          av = fma(sP[r * R + qc], sdO[qc * D + d], av);
          ak = fma(sdS[r * R + qc], sQ[qc * D + d], ak);
        }
        dvrow[d] += av;
        dkrow[d] += ak;
      }
    }
    // dQ = scale·dS·K for query q0 + r (thread (r, c) now owns a query row), added atomically: other key
    // tiles add to the same rows.
    const int64_t qrow = q0 + r;
    if (qrow < p.Lq) {
      for (int d = c; d < D; d += 4) {
        acc_t acc = 0;
#pragma unroll
        for (int kr = 0; kr < R; ++kr) acc = fma(sdS[kr * R + r], sK[kr * D + d], acc);
        atomicAdd(dq + qrow * p.dqs.l + d, scale * acc);
      }
    }
  }
  if (kvalid) {
    for (int d = c; d < D; d += 4) dkrow[d] *= scale;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Host side.

// fn(std::integral_constant<int, DP>) for the padded head-dim bucket DP of D (see the header).
template <typename Fn>
void dispatch_head_dim(int64_t D, const Fn& fn) {
  if (D <= 32) {
    fn(std::integral_constant<int, 32>{});
  } else if (D <= 48) {
    fn(std::integral_constant<int, 48>{});
  } else if (D <= 64) {
    fn(std::integral_constant<int, 64>{});
  } else if (D <= 80) {
    fn(std::integral_constant<int, 80>{});
  } else if (D <= 128) {
    fn(std::integral_constant<int, 128>{});
  } else {
    fn(std::integral_constant<int, 256>{});
  }
}

// True when every tensor can be moved in 16-byte chunks of 8 elements (2-byte dtypes): data pointer
// 16-byte aligned and b, h, l strides multiples of 8 (the head dim, a multiple of 8, is contiguous). The
// stride of a dim of size 1 is never multiplied by a nonzero index, so it does not matter.
bool tiles_vectorizable(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts) {
    if (t->element_size() != 2 || reinterpret_cast<uintptr_t>(t->const_data_ptr()) % 16 != 0) return false;
    for (int dim = 0; dim < 3; ++dim) {
      if (t->size(dim) > 1 && t->stride(dim) % 8 != 0) return false;
    }
  }
  return true;
}

// CTAs of a 1-D grid of tiles × B·H; checks the grid limit.
unsigned grid_of(const char* op, int64_t tiles, int64_t BH) {
  const int64_t n = tiles * BH;
  TORCH_CHECK(n <= std::numeric_limits<int32_t>::max(), op, ": ", tiles, " tiles × ", BH,
              " (batch × heads) blocks exceed the CUDA grid limit of 2^31 − 1");
  return static_cast<unsigned>(n);
}

// Raises the dynamic shared memory limit of kernel to bytes (above the default 48 KiB), checking the device.
template <typename Kernel>
void set_smem(const char* op, Kernel kernel, int64_t bytes, int64_t D) {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(static_cast<size_t>(bytes) <= prop->sharedMemPerBlockOptin, op, ": head dim ", D, " needs ", bytes,
              " bytes of shared memory per block, but ", prop->name, " allows ", prop->sharedMemPerBlockOptin);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

int64_t simt_fwd_smem(int64_t D, size_t elem) { return (3 * kSimtRows * D + kSimtRows * kSimtRows) * elem; }
int64_t simt_bwd_smem(int64_t D, size_t elem) {
  return (4 * kSimtRows * D + 2 * kSimtRows * kSimtRows + 2 * kSimtRows) * elem;
}

template <typename scalar_t>
void forward(const AttentionArgs& a, cudaStream_t stream) {
  const auto& s = a.shape;
  FwdParams p{};
  p.q = a.q.const_data_ptr();
  p.k = a.k.const_data_ptr();
  p.v = a.v.const_data_ptr();
  p.out = a.out.mutable_data_ptr();
  p.lse = a.lse.mutable_data_ptr();
  p.qs = AttentionStrides::of(a.q);
  p.ks = AttentionStrides::of(a.k);
  p.vs = AttentionStrides::of(a.v);
  p.os = AttentionStrides::of(a.out);
  p.H = s.H;
  p.Lq = s.Lq;
  p.Lk = s.Lk;
  p.D = static_cast<int>(s.D);
  p.scale = a.scale;
  p.scale_log2 = static_cast<float>(a.scale * 1.4426950408889634);
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    p.q_tiles = (s.Lq + kSimtRows - 1) / kSimtRows;
    const int64_t smem = simt_fwd_smem(s.D, sizeof(scalar_t));
    set_smem(kOp, attn_fwd_simt_kernel<scalar_t>, smem, s.D);
    attn_fwd_simt_kernel<scalar_t>
        <<<grid_of(kOp, p.q_tiles, s.B * s.H), kSimtThreads, static_cast<size_t>(smem), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    p.vec = tiles_vectorizable({&a.q, &a.k, &a.v});
    dispatch_head_dim(s.D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using Cfg = FwdTile<DP>;
      p.q_tiles = (s.Lq + Cfg::BM - 1) / Cfg::BM;
      set_smem(kOp, attn_fwd_tc_kernel<scalar_t, DP>, Cfg::kSmemBytes, s.D);
      attn_fwd_tc_kernel<scalar_t, DP>
          <<<grid_of(kOp, p.q_tiles, s.B * s.H), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

template <typename scalar_t>
void backward(const AttentionBackwardArgs& a, cudaStream_t stream) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const auto& s = a.shape;
  const int64_t rows = s.B * s.H * s.Lq;
  // 1. δ (eq. 1)
  at::Tensor delta = at::empty({s.B, s.H, s.Lq}, a.lse.options());
  {
    const int64_t warps_per_block = kDeltaThreads / 32;
    const int64_t blocks = std::min<int64_t>((rows + warps_per_block - 1) / warps_per_block, 1 << 20);
    attn_bwd_delta_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kDeltaThreads, 0, stream>>>(
        delta.mutable_data_ptr<acc_t>(), a.grad_out.const_data_ptr<scalar_t>(), AttentionStrides::of(a.grad_out),
        a.out.const_data_ptr<scalar_t>(), AttentionStrides::of(a.out), s.H, s.Lq, static_cast<int>(s.D), rows);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  BwdParams p{};
  p.q = a.q.const_data_ptr();
  p.k = a.k.const_data_ptr();
  p.v = a.v.const_data_ptr();
  p.dout = a.grad_out.const_data_ptr();
  p.dk = a.dk.mutable_data_ptr();
  p.dv = a.dv.mutable_data_ptr();
  p.lse = a.lse.const_data_ptr();
  p.delta = delta.const_data_ptr();
  p.qs = AttentionStrides::of(a.q);
  p.ks = AttentionStrides::of(a.k);
  p.vs = AttentionStrides::of(a.v);
  p.dos = AttentionStrides::of(a.grad_out);
  p.dqs = AttentionStrides::of(a.dq);
  p.dks = AttentionStrides::of(a.dk);
  p.dvs = AttentionStrides::of(a.dv);
  p.H = s.H;
  p.Lq = s.Lq;
  p.Lk = s.Lk;
  p.D = static_cast<int>(s.D);
  p.scale = a.scale;
  p.scale_log2 = static_cast<float>(a.scale * 1.4426950408889634);
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    // 2. dk, dv and (atomically, into the zeroed output) dq.
    a.dq.zero_();
    p.dq = a.dq.mutable_data_ptr();
    p.k_tiles = (s.Lk + kSimtRows - 1) / kSimtRows;
    const int64_t smem = simt_bwd_smem(s.D, sizeof(scalar_t));
    set_smem(kBackwardOp, attn_bwd_simt_kernel<scalar_t>, smem, s.D);
    attn_bwd_simt_kernel<scalar_t>
        <<<grid_of(kBackwardOp, p.k_tiles, s.B * s.H), kSimtThreads, static_cast<size_t>(smem), stream>>>(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    // 2. dk, dv and dq into an fp32 workspace; 3. dq = scale·workspace.
    at::Tensor ws = at::zeros({s.B, s.H, s.Lq, s.D}, a.q.options().dtype(at::kFloat));
    p.dq = ws.mutable_data_ptr<float>();
    p.vec = tiles_vectorizable({&a.q, &a.k, &a.v, &a.grad_out});
    dispatch_head_dim(s.D, [&](auto dp) {
      constexpr int DP = decltype(dp)::value;
      using Cfg = BwdTile<DP>;
      p.k_tiles = (s.Lk + Cfg::BN - 1) / Cfg::BN;
      set_smem(kBackwardOp, attn_bwd_tc_kernel<scalar_t, DP>, Cfg::kSmemBytes, s.D);
      attn_bwd_tc_kernel<scalar_t, DP>
          <<<grid_of(kBackwardOp, p.k_tiles, s.B * s.H), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    const int64_t chunks = rows * (s.D / 8);
    const int64_t blocks = std::min<int64_t>((chunks + 255) / 256, 1 << 20);
    attn_dq_convert_kernel<scalar_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        a.dq.mutable_data_ptr<scalar_t>(), AttentionStrides::of(a.dq), ws.const_data_ptr<float>(), s.H, s.Lq,
        static_cast<int>(s.D), static_cast<float>(a.scale), chunks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  double scale) {
  AttentionArgs a = prepare_attention(q, k, v, scale);
  if (a.done) return {a.out, a.lse};
  const c10::cuda::CUDAGuard guard(a.q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(), "attention_cuda",
                                  [&] { forward<scalar_t>(a, stream); });
  return {a.out, a.lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(const at::Tensor& grad_out, const at::Tensor& q,
                                                                       const at::Tensor& k, const at::Tensor& v,
                                                                       const at::Tensor& out, const at::Tensor& lse,
                                                                       double scale) {
  AttentionBackwardArgs a = prepare_attention_backward(grad_out, q, k, v, out, lse, scale);
  if (a.done) return {a.dq, a.dk, a.dv};
  const c10::cuda::CUDAGuard guard(a.q.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.q.scalar_type(), "attention_backward_cuda",
                                  [&] { backward<scalar_t>(a, stream); });
  return {a.dq, a.dk, a.dv};
}

TORCH_LIBRARY_IMPL(diffusion_ext, CUDA, m) {
  m.impl("attention", &attention_cuda);
  m.impl("attention_backward", &attention_backward_cuda);
}

}  // namespace diffusion_ext
