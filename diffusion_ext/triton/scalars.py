"""fp64 scalars for Triton kernels: a Python float argument reaches a kernel as fp32, so a value that
must stay exact in fp64 arithmetic (a softmax scale, eps, DDIM η, a guidance scale) travels as two fp32
words hi + lo (exact to about 2^-48 relative) and is joined inside the kernel in its accumulation dtype.
"""
import numpy as np
import triton
import triton.language as tl


def split_float(x: float) -> tuple[float, float]:
    """x as hi + lo, two values exactly representable in fp32."""
    hi = float(np.float32(x))
    if not np.isfinite(hi):  # ±inf (an unbounded clip range) or NaN: hi carries it, lo would be NaN
        return hi, 0.0
    return hi, float(np.float32(x - hi))


@triton.jit
def join_float(hi, lo, ACC: tl.constexpr):
    """hi + lo in ACC (fp32: the rounded sum; fp64: x to ~2^-48)."""
    return (tl.zeros([], ACC) + hi) + lo
