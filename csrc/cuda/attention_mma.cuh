#pragma once
// Warp-level tensor-core primitives of the fp16/bf16 attention kernels (attention.cu): mma.sync
// m16n8k16, ldmatrix and cp.async, as inline PTX (sm_80+), with the fragment layouts they rely on.
//
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"), with
// g = lane / 4 (the "groupID") and t = lane % 4 (the "threadID_in_group"). Each .b32 register holds two
// 16-bit elements, the lower-indexed column in the low half:
//   A (16×16, row-major)  a0: (row g,   cols 2t, 2t+1)      a1: (row g+8, cols 2t, 2t+1)
//                         a2: (row g,   cols 2t+8, 2t+9)    a3: (row g+8, cols 2t+8, 2t+9)
//   B (16×8, "col")       b0: (rows 2t, 2t+1, col g)        b1: (rows 2t+8, 2t+9, col g)
//   C, D (16×8, fp32)     c0, c1: (row g, cols 2t, 2t+1)    c2, c3: (row g+8, cols 2t, 2t+1)
// ldmatrix.m8n8.x4 (PTX ISA, "ldmatrix"): lanes 8i..8i+7 give the addresses of the 8 rows (16 bytes each)
// of matrix i, and register i of lane l receives elements (row l/4, cols 2(l%4), 2(l%4)+1) of matrix i;
// with .trans it receives (rows 2(l%4), 2(l%4)+1, col l/4) instead. So:
//   - a row-major 16×16 tile gives the A fragment with lane l addressing row l%16, col 8·(l/16);
//   - an 8×16 block of a matrix stored as [n][k] (K stored [key][d] for S = Q·Kᵀ) gives B fragments
//     without .trans, since B[k][n] = M[n][k] and lane l then holds (n = l/4, k = 2(l%4)): b0 of matrix
//     (n0, k0), b1 of matrix (n0, k0+8);
//   - a block of a matrix stored as [k][n] (V stored [key][d] for O = P·V) gives B fragments with .trans.
// The fp32 accumulator of one 16×16 product (two n-blocks of 8) has exactly the element → thread map of
// an A fragment of the next product (FlashAttention-2, Dao 2023, §3.3: P stays in registers):
//   a0 = (c0, c1) of n-block 2j, a1 = (c2, c3) of n-block 2j, a2 = (c0, c1) of 2j+1, a3 = (c2, c3) of 2j+1.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

namespace diffusion_ext {
namespace attn {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8×8 b16 matrices; see the header comment for which lane addresses which row.
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// d += a·b for one 16×16 (A) by 16×8 (B) product, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<c10::Half>(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<c10::BFloat16>(float d[4], const uint32_t a[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed as one .b32 register: lo in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);

template <>
__device__ __forceinline__ uint32_t pack2<c10::Half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}

template <>
__device__ __forceinline__ uint32_t pack2<c10::BFloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, sizeof(r));
  return r;
}

// 2^x with the SFU (ex2.approx.ftz: relative error about 2^-22, ex2(−inf) = +0), as FlashAttention-2
// computes exp(x) = 2^(x·log2 e) with the log2 e folded into the softmax scale.
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// 16 bytes global → shared, asynchronously (PTX ISA, "cp.async"): with valid = false nothing is read
// (src-size 0) and the 16 bytes are zero-filled, which is how the tails are masked. .cg: bypass L1,
// the tiles are reused from shared memory, not from L1.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits for every cp.async this thread issued; a __syncthreads() must follow before other threads read.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

}  // namespace attn
}  // namespace diffusion_ext
