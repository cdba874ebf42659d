#pragma once
// The activations fused after group norm, and their derivatives for the backward pass, which recomputes
// z = x̂·γ + β from x, mean and rstd instead of saving it.
#include <cmath>
#include "macros.h"

namespace diffusion_ext {

enum class Activation : int { kNone = 0, kSilu = 1, kRelu = 2 };

// SiLU(z) = z·σ(z) (Elfwing et al. 2018; Hendrycks & Gimpel's SiLU/Swish), the U-Net's activation.
template <typename acc_t>
DX_HOST_DEVICE acc_t sigmoid(acc_t z) {
  return acc_t(1) / (acc_t(1) + std::exp(-z));
}

template <Activation kAct, typename acc_t>
DX_HOST_DEVICE acc_t activate(acc_t z) {
  if constexpr (kAct == Activation::kSilu) {
    return z * sigmoid(z);
  } else if constexpr (kAct == Activation::kRelu) {
    return z > acc_t(0) ? z : acc_t(0);
  } else {
    return z;
  }
}

// d act / dz: SiLU' = σ(z)·(1 + z·(1 − σ(z))); ReLU' = [z > 0] (0 at 0, as PyTorch).
template <Activation kAct, typename acc_t>
DX_HOST_DEVICE acc_t activate_grad(acc_t z) {
  if constexpr (kAct == Activation::kSilu) {
    const acc_t s = sigmoid(z);
    return s * (acc_t(1) + z * (acc_t(1) - s));
  } else if constexpr (kAct == Activation::kRelu) {
    return z > acc_t(0) ? acc_t(1) : acc_t(0);
  } else {
    return acc_t(1);
  }
}

}  // namespace diffusion_ext
