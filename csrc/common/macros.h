#pragma once
// HOST_DEVICE lets one definition of the math below serve the CPU kernels (compiled by the host
// compiler) and the CUDA kernels (compiled by nvcc) verbatim: tested on CPU, reused on GPU.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define DX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DX_HOST_DEVICE inline
#endif
