#pragma once
// Selects at::vec's AVX2 Vectorized when the compiler targets AVX2 + FMA (setup.py builds with
// -march=native), as PyTorch's own CPU kernels do per capability. Must be included before any other
// ATen header in a translation unit that uses at::vec.
#if defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#endif
#include <ATen/cpu/vec/vec.h>

// Raw AVX2 + FMA intrinsics (the hand-written loops of normal_fill.h and group_norm_kernels.h) are
// available whenever the compiler targets them, whichever at::vec capability the unit selected.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define DIFFUSION_EXT_AVX2 1
#endif
