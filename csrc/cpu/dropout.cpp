// dropout on the CPU: y = x·keep/(1 − p) with keep regenerated from (seed, offset) (common/dropout_mask.h),
// one read and one write per element. torch's CPU dropout draws a Bernoulli mask through its generator
// (~7 ms per million elements on this project's CPU, more than the convolution around it costs per
// element) and multiplies in a second pass; here the mask is made in AVX2 registers, eight Philox
// blocks at a time (philox_avx2.h), and applied in the same pass.
// vec_capability.h (through philox_avx2.h) must precede every other ATen header.
#include "philox_avx2.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/dropout_mask.h"
#include "../dropout_args.h"
#include "../ops.h"
#include "flat_batch_loop.h"

namespace diffusion_ext {
namespace {

// m[k] = scale when element first + k is kept, else 0, for k in [0, count).
template <typename acc_t>
void fill_keep_scales(const DropoutArgs& a, int64_t first, int64_t count, acc_t* m) {
  const acc_t scale = static_cast<acc_t>(a.scale);
#ifdef DIFFUSION_EXT_AVX2
  if constexpr (std::is_same_v<acc_t, float>) {
    // thr − 1 as int32: (w >> 9) < 2^23 compares exactly as signed, and thr = 0 (p = 0) gives −1: keep all
    const __m256i below = _mm256_set1_epi32(static_cast<int>(a.threshold) - 1);
    const __m256 s = _mm256_set1_ps(scale);
    fill_in_blocks(first, count, m, [&](uint64_t group0, int batches, float* dst) {
      auto emit = [&](const auto& c, int q) {
        alignas(32) float z[4][8];
        for (int j = 0; j < 4; ++j) {
          const __m256i keep = _mm256_cmpgt_epi32(_mm256_srli_epi32(c[j][q], 32 - kDropoutBits), below);
          _mm256_store_ps(z[j], _mm256_and_ps(_mm256_castsi256_ps(keep), s));
        }
        float* o = dst + 32 * q;
        for (int l = 0; l < 8; ++l) {  // lane l of word j is element 4l + j of this register's 32
          for (int j = 0; j < 4; ++j) o[4 * l + j] = z[j][l];
        }
      };
      if (batches == 4) {
        __m256i c[4][4];
        philox_avx2<4>(group0, a.offset, a.seed, c);
        for (int q = 0; q < 4; ++q) emit(c, q);
      } else {
        __m256i c[4][1];
        philox_avx2<1>(group0, a.offset, a.seed, c);
        emit(c, 0);
      }
    });
    return;
  }
#endif
  int64_t k = 0;
  while (k < count) {
    const int64_t e = first + k;
    const int lane = static_cast<int>(e & 3);
    const Philox4 r = philox4x32_10(static_cast<uint64_t>(e >> 2), a.offset, a.seed);
    const int take = static_cast<int>(std::min<int64_t>(4 - lane, count - k));
    for (int j = 0; j < take; ++j) m[k + j] = dropout_keeps(r.x[lane + j], a.threshold) ? scale : acc_t(0);
    k += take;
  }
}

template <typename scalar_t>
void dropout_kernel(const DropoutArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = a.x.const_data_ptr<scalar_t>();
  scalar_t* y = a.out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, a.x.numel(), kCpuGrain, [&](int64_t begin, int64_t end) {
    acc_t m[kCpuTile];
    for (int64_t i0 = begin; i0 < end; i0 += kCpuTile) {
      const int64_t n = std::min(kCpuTile, end - i0);
      fill_keep_scales<acc_t>(a, i0, n, m);
      for (int64_t k = 0; k < n; ++k) {
        y[i0 + k] = static_cast<scalar_t>(static_cast<acc_t>(x[i0 + k]) * m[k]);
      }
    }
  });
}

}  // namespace

at::Tensor dropout_cpu(const at::Tensor& x, double p, int64_t seed, int64_t offset) {
  auto a = prepare_dropout(x, p, seed, offset);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "dropout_cpu",
                                  [&] { dropout_kernel<scalar_t>(a); });
  return a.out;
}

TORCH_LIBRARY_IMPL(diffusion_ext, CPU, m) { m.impl("dropout", &dropout_cpu); }

}  // namespace diffusion_ext
