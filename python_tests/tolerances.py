"""Per-dtype tolerances, stated once.

Rule (flash-attention's): against the exact answer (the reference in float64), a kernel may err at most
twice as much as the reference computed in the kernel's own dtype, plus a small floor that covers the
kernels' fp32 accumulation being *better* than the reference in half precision, and last-bit differences
of transcendental functions between backends.
"""
import torch

FLOOR = {
    torch.float64: 1e-12,
    torch.float32: 2e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_matches_oracle(out: torch.Tensor, ref_same_dtype: torch.Tensor, ref64: torch.Tensor) -> None:
    """out: the kernel's result; ref_same_dtype: the reference in out's dtype; ref64: the reference in fp64."""
    assert out.shape == ref64.shape, (out.shape, ref64.shape)
    assert out.dtype == ref_same_dtype.dtype
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    err = max_err(out, ref64)
    ref_err = max_err(ref_same_dtype, ref64)
    bound = 2 * ref_err + FLOOR[out.dtype] * scale
    assert err <= bound, f"error {err:.3g} > bound {bound:.3g} (reference's own error {ref_err:.3g}, dtype {out.dtype})"
