"""q_sample in Triton: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4), ε given or made here; the
per-sample coefficients come from the fp64 pre-pass of schedule_coef.py."""
import torch
import triton
import triton.language as tl

from .._loader import _C
from .._meta import flat_batch_empty_like, share_flat_batch_layout
from .philox import SEED_OFFSET_WORDS, normals_for_block, normals_per_element, split64, u32
from .schedule_coef import Q_SAMPLE, per_sample_coefs
from .target import launch

BLOCK = 1024


@triton.jit(do_not_specialize=SEED_OFFSET_WORDS)
def _q_sample_kernel(
    x0_ptr,  # [numel] x0 in its flat batch-outermost layout (contiguous or channels_last memory order)
    noise_ptr,  # [numel] same layout: read when MAKE_NOISE is false, written when it is true
    out_ptr,  # [numel] same layout
    coef_ptr,  # [2, B] ACC per-sample (√ᾱ_t, √(1−ᾱ_t)) from schedule_coef.per_sample_coefs
    numel,
    per_sample,  # numel / B: element e belongs to sample e // per_sample
    batch,
    seed_lo, seed_hi, off_lo, off_hi,  # 32-bit words of the Philox key and offset, as signed int32 (philox.py)
    MAKE_NOISE: tl.constexpr,
    PER_SAMPLE_STREAMS: tl.constexpr,  # sample b draws from stream offset + b (csrc/schedule_args.h)
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    e = start + tl.arange(0, BLOCK)
    mask = e < numel
    b = e // per_sample
    a = tl.load(coef_ptr + b, mask=mask, other=0)
    s = tl.load(coef_ptr + batch + b, mask=mask, other=0)
    x0 = tl.load(x0_ptr + e, mask=mask, other=0).to(ACC)
    if MAKE_NOISE and PER_SAMPLE_STREAMS:
        stream = ((u32(off_hi).to(tl.uint64) << 32) | u32(off_lo).to(tl.uint64)) + b.to(tl.uint64)
        z = normals_per_element(e - b * per_sample, (stream & 0xFFFFFFFF).to(tl.uint32), (stream >> 32).to(tl.uint32),
                                seed_lo, seed_hi, ACC)
        tl.store(noise_ptr + e, z.to(noise_ptr.dtype.element_ty), mask=mask)
    elif MAKE_NOISE:
        z = normals_for_block(start, seed_lo, seed_hi, off_lo, off_hi, BLOCK, ACC)
        tl.store(noise_ptr + e, z.to(noise_ptr.dtype.element_ty), mask=mask)
    else:
        z = tl.load(noise_ptr + e, mask=mask, other=0).to(ACC)
    out = a * x0 + s * z
    tl.store(out_ptr + e, out.to(out_ptr.dtype.element_ty), mask=mask)


def _acc(x: torch.Tensor):
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _warps(x: torch.Tensor) -> int:
    # fp64 noise (log, sin, cos in double, one Philox call per element under per-sample streams) needs ~2×
    # the registers: 8 warps give each thread 4 of the 1024 elements instead of 8 (4 warps spilled 80 bytes
    # on sm_90 with Triton 3.6)
    return 8 if x.dtype == torch.float64 else 4


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _flat(*tensors):
    """The tensors in one flat batch-outermost layout: their own, or contiguous copies (the C++ rule)."""
    if share_flat_batch_layout(*tensors):
        return tensors
    return tuple(None if t is None else t.contiguous() for t in tensors)


def launch_q_sample(x0, t, noise, table, seed=0, offset=0, make_noise=False, per_sample_streams=False):
    op = "diffusion_ext.q_sample_with_noise" if make_noise else "diffusion_ext.q_sample"
    _C.check_q_sample(op, x0, t, noise, table, seed, offset)
    if make_noise:
        (x0,) = _flat(x0)
        noise = torch.empty_like(x0)
    else:
        x0, noise = _flat(x0, noise)
    out = torch.empty_like(x0)
    numel = x0.numel()
    if numel:
        s_lo, s_hi = split64(seed)
        o_lo, o_hi = split64(offset)
        coef = per_sample_coefs(Q_SAMPLE, t.contiguous(), table.contiguous(), acc_dtype(x0))
        launch(_q_sample_kernel, (triton.cdiv(numel, BLOCK),), x0, noise, out, coef, numel, numel // x0.shape[0],
               x0.shape[0], s_lo, s_hi, o_lo, o_hi, MAKE_NOISE=make_noise, PER_SAMPLE_STREAMS=per_sample_streams,
               ACC=_acc(x0), BLOCK=BLOCK, num_warps=_warps(x0))
    return out, noise


@torch.library.custom_op("diffusion_ext_triton::q_sample", mutates_args=())
def q_sample(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    return launch_q_sample(x0, t, noise, alphas_cumprod)[0]


@torch.library.custom_op("diffusion_ext_triton::q_sample_with_noise", mutates_args=())
def q_sample_with_noise(x0: torch.Tensor, t: torch.Tensor, alphas_cumprod: torch.Tensor, seed: int,
                        offset: int, per_sample_streams: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    return launch_q_sample(x0, t, None, alphas_cumprod, seed, offset, make_noise=True,
                           per_sample_streams=per_sample_streams)


@q_sample.register_fake
def _(x0, t, noise, alphas_cumprod):
    return flat_batch_empty_like(x0, noise)


@q_sample_with_noise.register_fake
def _(x0, t, alphas_cumprod, seed, offset, per_sample_streams=False):
    return flat_batch_empty_like(x0), flat_batch_empty_like(x0)
