"""Builds diffusion_ext._C with torch.utils.cpp_extension and ninja.

CPU kernels always; CUDA kernels when torch was built with CUDA and nvcc is found, or when FORCE_CUDA=1.
Environment: TORCH_CUDA_ARCH_LIST (default "8.0;9.0": A100 and H100/H200), MAX_JOBS, DEBUG=1 (-O0 -g),
DIFFUSION_EXT_CPU_ARCH (the -march of the CPU kernels; default "native" on x86-64, "" for none),
DIFFUSION_EXT_PTXAS_VERBOSE=1 (ptxas -v: registers, spills and shared memory of every CUDA kernel in the build
output, which benchmarks/cuda_resources.py checks; CI does).
Sources are globbed from csrc/: there is no source list to keep in step.
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG", "0") == "1"


def _want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def _cpu_arch_flags() -> list[str]:
    # The CPU kernels are written as plain loops that the compiler vectorises; -march=native lets it use
    # the wide vector units of the machine that builds (and so runs) the extension.
    default = "native" if platform.machine() in ("x86_64", "AMD64") else ""
    arch = os.environ.get("DIFFUSION_EXT_CPU_ARCH", default)
    return [f"-march={arch}"] if arch else []


def _cuda_wheel_includes() -> list[str]:
    # The CUDA wheels of torch ship the CUDA library headers (cuBLAS, cuSPARSE, ...) that torch's own
    # headers include, under site-packages/nvidia/<cuXX>/include rather than in CUDA_HOME: add them, so
    # that a plain `pip install .` finds them without CPATH.
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "cu*", "include")))


def _extension():
    with_cuda = _want_cuda()
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    define_macros = [("DIFFUSION_EXT_TORCH_VERSION", f'"{torch.__version__}"')]
    cxx = opt + ["-std=c++20", "-fopenmp"] + _cpu_arch_flags()
    kwargs = dict(extra_link_args=["-fopenmp"])
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        define_macros += [("DIFFUSION_EXT_WITH_CUDA", None), ("DIFFUSION_EXT_CUDA_ARCHS", f'"{archs}"')]
        # No --use_fast_math: its approximate log/sin/cos would make the in-kernel noise differ from the CPU
        # and Triton streams by more than a few ulp (and __logf can turn -2·log(u) negative near u = 1).
        nvcc = opt + ["-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
        if os.environ.get("DIFFUSION_EXT_PTXAS_VERBOSE", "0") == "1":
            nvcc.append("-Xptxas=-v")
        print(f"diffusion_ext: building CPU and CUDA kernels (archs {archs}, CUDA_HOME={CUDA_HOME})")
        return CUDAExtension("diffusion_ext._C", sources, define_macros=define_macros,
                             include_dirs=_cuda_wheel_includes(),
                             extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)
    why = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)"
    print(f"diffusion_ext: building CPU kernels only ({why}; FORCE_CUDA=1 forces CUDA)")
    return CppExtension("diffusion_ext._C", sources, define_macros=define_macros,
                        extra_compile_args={"cxx": cxx}, **kwargs)


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
