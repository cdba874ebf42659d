"""Counter-based normal noise in Triton: the same stream as csrc/common/philox.h (read its comment).

Element e of a kernel's flat range is lane e % 4 of Philox4x32-10 block e // 4 under key (lo, hi of the
seed) and counter (lo, hi of the block, lo, hi of the offset). `normals_for_block` makes the BLOCK
normals of elements [start, start + BLOCK) with one Philox call per four elements.

Seed and offset reach a kernel as four 32-bit words passed as *signed* int32 (`split64`) and
reinterpreted as uint32 inside (`u32`): Triton types an integer argument by its value (i32 below 2^31,
i64 above) and turns one equal to 1 into a compile-time constant, so raw words would make up to 16
signatures per kernel, recompiles at run time, and (for a word equal to 1) a constant with no `.to()`.
Kernels list the words in `do_not_specialize` (see SEED_OFFSET_WORDS); with both, every seed and offset
runs one compiled kernel.
"""
import triton
import triton.language as tl

# Module globals reach a compiled kernel only as tl.constexpr objects: an annotated plain int
# (`NAME: tl.constexpr = ...`) works under the interpreter but is a NameError for the GPU compiler.
PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


# The seed/offset word arguments of every noise-making kernel, never specialised on their value.
SEED_OFFSET_WORDS = ["seed_lo", "seed_hi", "off_lo", "off_hi"]


@triton.jit
def u32(word):
    """A 32-bit word passed as signed int32 (split64), as the uint32 it stands for."""
    return word.to(tl.uint32, bitcast=True)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    # Salmon et al. 2011: ten rounds of two 32x32 -> 64-bit multiplies and a Weyl key schedule.
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(a2, PHILOX_M1) ^ c1 ^ k0
        c2 = tl.umulhi(a0, PHILOX_M0) ^ c3 ^ k1
        c1 = a2 * PHILOX_M1
        c3 = a0 * PHILOX_M0
        k0 = k0 + PHILOX_W0
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


@triton.jit
def _uniform(x, ACC: tl.constexpr):
    # top 23 bits, + 1/2, times 2^-23: exact even in fp32, strictly inside (0, 1)
    return ((x >> 9).to(ACC) + 0.5) * 1.1920928955078125e-07


@triton.jit
def _radius(x, ACC: tl.constexpr):
    # Box-Muller's √(−2 ln u): −2 ln u > 0 for u < 1, but the largest u is 1 − 2^-24, where an approximate log
    # (a GPU's lg2.approx) may give 0 or above; max(·, 0) keeps that a 0, not a NaN, as csrc/common/philox.h does
    return tl.sqrt(tl.maximum(-2.0 * tl.log(_uniform(x, ACC)), 0.0))


@triton.jit
def normals_for_block(start, seed_lo, seed_hi, off_lo, off_hi, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Normals of elements start .. start + BLOCK - 1; start (int64) and BLOCK are multiples of 4."""
    group = start // 4 + tl.arange(0, BLOCK // 4).to(tl.int64)
    c0 = (group & 0xFFFFFFFF).to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    zero = tl.zeros([BLOCK // 4], dtype=tl.uint32)
    k0 = zero + u32(seed_lo)
    k1 = zero + u32(seed_hi)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, zero + u32(off_lo), zero + u32(off_hi), k0, k1)
    two_pi = tl.full([], 6.283185307179586, ACC)  # a bare float literal would be fp32, even for fp64 noise
    rad_a = _radius(r0, ACC)
    th_a = two_pi * _uniform(r1, ACC)
    rad_b = _radius(r2, ACC)
    th_b = two_pi * _uniform(r3, ACC)
    z0 = rad_a * tl.cos(th_a)
    z1 = rad_a * tl.sin(th_a)
    z2 = rad_b * tl.cos(th_b)
    z3 = rad_b * tl.sin(th_b)
    # join(a, b) stacks on a new last axis, so this is [g, i, j] = lane 2i + j of group g; flattened
    # row-major, element 4g + lane.
    z = tl.join(tl.join(z0, z2), tl.join(z1, z3))
    return tl.reshape(z, [BLOCK])


@triton.jit
def normals_per_element(k, stream_lo, stream_hi, seed_lo, seed_hi, ACC: tl.constexpr):
    """The normal of element k (int64 tensor) of stream (stream_lo, stream_hi) (uint32 tensors of k's
    shape): lane k % 4 of block k // 4. One Philox call per element, for the elements of a block that
    spans several streams (per-sample streams); normals_for_block shares a call between four."""
    c0 = ((k // 4) & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((k // 4) >> 32).to(tl.uint32)
    zero = tl.zeros(k.shape, dtype=tl.uint32)
    r0, r1, r2, r3 = philox4x32_10(c0, c1, stream_lo, stream_hi, zero + u32(seed_lo), zero + u32(seed_hi))
    lane = k % 4
    # lanes 0 and 1: Box-Muller of (r0, r1); lanes 2 and 3: of (r2, r3); cos for even lanes, sin for odd
    u_rad = tl.where(lane < 2, r0, r2)
    u_th = tl.where(lane < 2, r1, r3)
    two_pi = tl.full([], 6.283185307179586, ACC)
    radius = _radius(u_rad, ACC)
    theta = two_pi * _uniform(u_th, ACC)
    return tl.where(lane % 2 == 0, radius * tl.cos(theta), radius * tl.sin(theta))


def split64(v: int) -> tuple[int, int]:
    """(lo, hi) 32-bit words of a 64-bit value (as the C++ kernels cast int64 seeds to uint64), each as
    the signed int32 with the same bits, for `u32` to reinterpret in the kernel."""
    v &= (1 << 64) - 1
    return _signed32(v & 0xFFFFFFFF), _signed32(v >> 32)


def _signed32(w: int) -> int:
    return w - (1 << 32) if w >= 1 << 31 else w
