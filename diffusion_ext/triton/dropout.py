"""dropout in Triton: y = x·keep/(1 − p) with keep regenerated from (seed, offset), the mask of
csrc/common/dropout_mask.h: element e of x's memory takes Philox word e % 4 of block e // 4 (philox.py)
and is kept when the word's top 23 bits are at least the threshold round(p·2^23), which C++ computes
(`_C.check_dropout`) so every backend compares against the same integer."""
import torch
import triton
import triton.language as tl

from .._autograd import register_dropout_autograd
from .._loader import _C
from .._meta import dense_empty_like, dense_non_overlapping
from .philox import SEED_OFFSET_WORDS, philox4x32_10, split64, u32
from .scalars import join_float, split_float
from .target import launch

BLOCK = 1024


# threshold varies with p: never specialised on its value (=1, divisible by 16), like the seed words
@triton.jit(do_not_specialize=SEED_OFFSET_WORDS + ["threshold"])
def _dropout_kernel(
    x_ptr,  # [numel] x in its dense memory order
    y_ptr,  # [numel] same layout
    numel,
    threshold,  # keep iff (word >> 9) >= threshold, in [0, 2^23]
    scale_hi, scale_lo,  # 1 / (1 − p) as two fp32 words (scalars.py), joined in ACC
    seed_lo, seed_hi, off_lo, off_hi,  # 32-bit words of the Philox key and offset, as signed int32 (philox.py)
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    group = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    zero = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    r0, r1, r2, r3 = philox4x32_10((group & 0xFFFFFFFF).to(tl.uint32), (group >> 32).to(tl.uint32),
                                   zero + u32(off_lo), zero + u32(off_hi), zero + u32(seed_lo), zero + u32(seed_hi))
    # [g, i, j] = word 2i + j of block g, flattened row-major: element 4g + lane (as normals_for_block)
    words = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), [BLOCK])
    keep = (words >> 9).to(tl.int32) >= threshold
    e = start + tl.arange(0, BLOCK)
    mask = e < numel
    x = tl.load(x_ptr + e, mask=mask, other=0).to(ACC)
    # a multiply, not a select: NaN and inf inputs stay NaN where dropped, as on the CPU and in torch
    y = x * tl.where(keep, join_float(scale_hi, scale_lo, ACC), 0.0)
    tl.store(y_ptr + e, y.to(y_ptr.dtype.element_ty), mask=mask)


def launch_dropout(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    threshold = _C.check_dropout(x, p, seed, offset)
    if not dense_non_overlapping(x):
        x = x.contiguous()
    y = torch.empty_like(x)
    numel = x.numel()
    if numel:
        s_lo, s_hi = split64(seed)
        o_lo, o_hi = split64(offset)
        acc = tl.float64 if x.dtype == torch.float64 else tl.float32
        launch(_dropout_kernel, (triton.cdiv(numel, BLOCK),), x, y, numel, threshold, *split_float(1.0 / (1.0 - p)), s_lo, s_hi,
               o_lo, o_hi, ACC=acc, BLOCK=BLOCK, num_warps=4)
    return y


@torch.library.custom_op("diffusion_ext_triton::dropout", mutates_args=())
def dropout(x: torch.Tensor, p: float, seed: int, offset: int) -> torch.Tensor:
    return launch_dropout(x, p, seed, offset)


@dropout.register_fake
def _(x, p, seed, offset):
    return dense_empty_like(x)


register_dropout_autograd(dropout)
