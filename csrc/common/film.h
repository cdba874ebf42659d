#pragma once
// FiLM on top of group norm (Perez et al. 2018), the "scale_shift" time-embedding norm of Nichol & Dhariwal
// 2021 and of diffusers' ResnetBlock2D: a per-(sample, channel) scale s and shift t after the affine,
//   z = (γ_c·x̂ + β_c)·(1 + s_nc) + t_nc = x̂·γ'_nc + β'_nc,   γ' = γ·(1 + s),  β' = β·(1 + s) + t      (F1)
// so every element-wise step is the plain group norm's, with per-(n, c) γ', β' in place of γ, β.
// Backward: with dz = dy·act'(z) and the per-(n, c) sums the kernels already take, S1 = Σ_s dz and
// S2 = Σ_s dz·x̂,
//   ∂t_nc = S1,   ∂s_nc = Σ_s dz·(γ_c·x̂ + β_c) = γ_c·S2 + β_c·S1                                     (F2)
//   ∂β_c = Σ_n (1 + s_nc)·S1,   ∂γ_c = Σ_n (1 + s_nc)·S2                                               (F3)
// and ∂x keeps its form with γ' for γ: a = (1/M)·Σ_group γ'·S1 = (1/M)·Σ_group γ_c·(1 + s_nc)·S1, b likewise
// with S2. So once (1 + s_nc) is folded into S1 and S2 (F3's summands), the plain kernels finish ∂γ, ∂β, a
// and b unchanged. Shared by the CPU and CUDA kernels (the Triton kernels write the same lines).
#include "macros.h"

namespace diffusion_ext {

template <typename acc_t>
struct alignas(2 * sizeof(acc_t)) Affine {  // aligned: one load on a GPU
  acc_t gamma, beta;  // γ, β, or γ', β' of (F1)
};

template <typename acc_t>
DX_HOST_DEVICE Affine<acc_t> film_affine(acc_t gamma, acc_t beta, acc_t scale, acc_t shift) {
  const acc_t k = acc_t(1) + scale;
  return {gamma * k, beta * k + shift};
}

// ∂s and ∂t of (F2) from S1 = Σ dz and S2 = Σ dz·x̂ of one (n, c).
template <typename acc_t>
struct FilmGrads {
  acc_t scale, shift;
};

template <typename acc_t>
DX_HOST_DEVICE FilmGrads<acc_t> film_grads(acc_t gamma, acc_t beta, acc_t s1, acc_t s2) {
  return {gamma * s2 + beta * s1, s1};
}

}  // namespace diffusion_ext
