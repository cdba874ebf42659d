"""attention in Triton: out = softmax(scale·q·kᵀ)·v without storing the Lq×Lk scores (FlashAttention-2,
Dao 2023), and its backward, which recomputes the score tiles from q, k and the saved row logsumexp.

Layouts (csrc/attention_args.h): q (B, H, Lq, D), k and v (B, H, Lk, D), read through their (b, h, l)
strides with the head dim innermost (a copy is made otherwise); out, dq, dk, dv are (B, H, L, D) views of
(B, L, H, D) memory, written through their strides; lse (B, H, Lq) contiguous, natural log,
lse_i = log Σ_j exp(scale·q_i·k_j), fp32 (fp64 for fp64 inputs).

Forward (FA2 Alg. 1), one launch, a program per (BLOCK_M queries of one (b, h)):
  for each key block: S = scale·Q·Kᵀ; m' = max(m, rowmax S); P = exp(S − m'); l = e^(m−m')·l + rowsum P;
  acc = e^(m−m')·acc + P·V. At the end out = acc / l, lse = m + log l. The running max keeps every exp ≤ 1
  (scores of 1e4 do not overflow) and the division by l waits for the last block (FA2 §3.1.1).
Backward (FA2 Alg. 2, with dK/dV and dQ in separate kernels, as FA2's Triton version does, so that no
atomics are needed and the result is deterministic):
  1. _attn_bwd_delta_kernel: Δ_i = Σ_d dO_id·O_id (= rowsum(dP∘P), FA2 eq. after Alg. 2);
  2. _attn_bwd_dkdv_kernel, a program per key block, loops over query blocks:
     P = exp(S − lse), dV += Pᵀ·dO, dP = dO·Vᵀ, dS = P∘(dP − Δ), dK += dSᵀ·Q; finally dK ·= scale;
  3. _attn_bwd_dq_kernel, a program per query block, loops over key blocks: same P, dS; dQ += dS·K.
  (FA2's single kernel adds dQ with atomics into an fp32 workspace; recomputing S and dP for dQ costs
  7 matmuls per tile pair instead of 5, but no Lq×D fp32 workspace and no atomics: deterministic, and
  the same under the interpreter.)

Numerics: fp32 accumulation (fp64 for fp64), tl.dot on fp16/bf16 inputs with fp32 accumulators; P and dS
are rounded to the input dtype before their matmuls, as FA2 does. fp32 inputs use input_precision="ieee"
(no TF32: the tests hold fp32 to fp32 accuracy). For fp32/16-bit inputs scale·log2(e) is folded into the
scores and exp2 is used (FA2's Triton kernel); for fp64 the kernels use exp/log in fp64 and get the scale
as two fp32 words, since a Python float argument reaches a kernel as fp32.
The backward recomputes P = exp(S − lse) from the saved natural-log lse (converted to log2 units), so its
relative error grows like |lse|·ε, as FA2's does: with scores ~10³ (D = 32, randn inputs, scale = 300)
the fp32 gradients err by ~5e-4 where an eager softmax that keeps P errs by 3e-7 (dv) to 8e-5 (dk)
(measured); at the usual scale 1/√D the scores are O(10) and both stay at fp32 rounding level. The
forward is exact to fp32 rounding at any score size (the running max is subtracted before exp).

Head dims: BLOCK_D = next power of two ≥ max(D, 16) (16: tl.dot's minimum), the columns past D masked
(D = 40 and 80 are padded to 64 and 128). Lengths: any L ≥ 1, the tail rows masked.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .._autograd import register_attention_autograd
from .._loader import _C
from .._meta import attention_lse_empty, attention_output_empty
from .q_sample import _acc
from .scalars import join_float, split_float
from .target import launch, profile

LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(base, rows, stride_l, cols, L, D: tl.constexpr):
    # [rows, cols] tile of a (L, D) matrix with rows stride_l apart and columns contiguous; zeros outside
    ptrs = base + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
    return tl.load(ptrs, mask=(rows < L)[:, None] & (cols < D)[None, :], other=0)


@triton.jit
def _store_tile(base, rows, stride_l, cols, L, D: tl.constexpr, x):
    ptrs = base + rows.to(tl.int64)[:, None] * stride_l + cols[None, :]
    tl.store(ptrs, x.to(base.dtype.element_ty), mask=(rows < L)[:, None] & (cols < D)[None, :])


@triton.jit
def _exp(x, USE_EXP2: tl.constexpr):
    # USE_EXP2: x is in log2 units (scale·log2 e folded into the scores): one ex2 instruction per element
    if USE_EXP2:
        return tl.exp2(x)
    else:
        return tl.exp(x)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # acc + a·b with acc's dtype as the accumulation dtype: out_dtype must name it, since tl.dot's default
    # (fp32) does not match an fp64 accumulator and fails to compile for a GPU (the interpreter accepts it).
    # UPCAST (bf16 under the CPU interpreter only, whose tl.dot multiplies bf16's raw uint16 storage): the
    # operands go to fp32 first, which gives the same exact products and fp32 sums as the GPU's bf16 MMA.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=DOT_PRECISION,
                      out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)


@triton.jit
def _program_ids(L, BLOCK: tl.constexpr):
    # one flat grid of cdiv(L, BLOCK)·B·H programs (axis 0 allows 2^31 − 1, axis 1 only 65535 for B·H);
    # neighbouring programs share (b, h), so they read the same K, V (or Q, dO) tiles through L2
    blocks = tl.cdiv(L, BLOCK)
    pid = tl.program_id(0)
    return pid % blocks, pid // blocks


# --------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # q (B, H, Lq, D): (b, h, i, d) at b·sq_b + h·sq_h + i·sq_l + d
    k_ptr,  # k (B, H, Lk, D): (b, h, j, d) at b·sk_b + h·sk_h + j·sk_l + d
    v_ptr,  # v (B, H, Lk, D): (b, h, j, d) at b·sv_b + h·sv_h + j·sv_l + d
    out_ptr,  # out (B, H, Lq, D), in (B, Lq, H, D) memory: (b, h, i, d) at b·so_b + h·so_h + i·so_l + d
    lse_ptr,  # [B·H·Lq] ACC natural-log row logsumexp, contiguous: (b, h, i) at (b·H + h)·Lq + i
    sq_b, sq_h, sq_l,  # q strides (elements)
    sk_b, sk_h, sk_l,  # k strides
    sv_b, sv_h, sv_l,  # v strides
    so_b, so_h, so_l,  # out strides
    H, Lq, Lk,
    qk_hi, qk_lo,  # score multiplier as two fp32 words: scale·log2(e) when USE_EXP2, else scale
    HEAD_DIM: tl.constexpr,  # D (a constexpr: the column mask folds away when D = BLOCK_D)
    ACC: tl.constexpr,  # accumulation dtype: fp32, or fp64 for fp64 inputs
    USE_EXP2: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 inputs ("ieee": no TF32)
    UPCAST: tl.constexpr,  # bf16 under the interpreter: tl.dot on fp32 copies (see _dot)
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop iteration
    BLOCK_D: tl.constexpr,  # next power of two ≥ max(D, 16)
):
    pid_m, bh = _program_ids(Lq, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * sq_b + h * sq_h, rows, sq_l, cols, Lq, HEAD_DIM)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    qk_scale = join_float(qk_hi, qk_lo, ACC)
    # running row max m (−inf before the first block), row sum l of exp(S − m), unnormalised output acc
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, Lk, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, sk_l, cols, Lk, HEAD_DIM)
        v = _load_tile(v_base, keys, sv_l, cols, Lk, HEAD_DIM)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], ACC), DOT_PRECISION, UPCAST) * qk_scale
        s = tl.where((keys < Lk)[None, :], s, float("-inf"))  # tail keys get no weight
        # every block holds ≥ 1 real key, so m_new is finite and alpha = exp(−inf) = 0 at the first block
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = _exp(m_i - m_new, USE_EXP2)
        p = _exp(s - m_new[:, None], USE_EXP2)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
        m_i = m_new
    # FA2 §3.1.1: divide by l once, at the end
    _store_tile(out_ptr + b * so_b + h * so_h, rows, so_l, cols, Lq, HEAD_DIM, acc * (1.0 / l_i)[:, None])
    if USE_EXP2:
        lse = m_i * 0.6931471805599453 + tl.log(l_i)  # m is in log2 units: ln 2·m + ln l
    else:
        lse = m_i + tl.log(l_i)
    tl.store(lse_ptr + bh.to(tl.int64) * Lq + rows, lse, mask=rows < Lq)


# --------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _attn_bwd_delta_kernel(
    out_ptr,  # out (B, H, Lq, D): (b, h, i, d) at b·so_b + h·so_h + i·so_l + d
    do_ptr,  # grad_out (B, H, Lq, D): (b, h, i, d) at b·sdo_b + h·sdo_h + i·sdo_l + d
    delta_ptr,  # [B·H·Lq] ACC Δ_i = Σ_d dO_id·O_id, contiguous like lse
    so_b, so_h, so_l,  # out strides
    sdo_b, sdo_h, sdo_l,  # grad_out strides
    H, Lq,
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, bh = _program_ids(Lq, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    o = _load_tile(out_ptr + b * so_b + h * so_h, rows, so_l, cols, Lq, HEAD_DIM).to(ACC)
    do = _load_tile(do_ptr + b * sdo_b + h * sdo_h, rows, sdo_l, cols, Lq, HEAD_DIM).to(ACC)
    tl.store(delta_ptr + bh.to(tl.int64) * Lq + rows, tl.sum(o * do, 1), mask=rows < Lq)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # q (B, H, Lq, D): (b, h, i, d) at b·sq_b + h·sq_h + i·sq_l + d
    k_ptr,  # k (B, H, Lk, D): (b, h, j, d) at b·sk_b + h·sk_h + j·sk_l + d
    v_ptr,  # v (B, H, Lk, D): (b, h, j, d) at b·sv_b + h·sv_h + j·sv_l + d
    do_ptr,  # grad_out (B, H, Lq, D): (b, h, i, d) at b·sdo_b + h·sdo_h + i·sdo_l + d
    lse_ptr,  # [B·H·Lq] ACC natural-log logsumexp from the forward, contiguous
    delta_ptr,  # [B·H·Lq] ACC Δ from _attn_bwd_delta_kernel
    dk_ptr,  # dk (B, H, Lk, D) in (B, Lk, H, D) memory: (b, h, j, d) at b·sdk_b + h·sdk_h + j·sdk_l + d
    dv_ptr,  # dv, same shape and layout as dk: strides sdv_*
    sq_b, sq_h, sq_l,  # q strides
    sk_b, sk_h, sk_l,  # k strides
    sv_b, sv_h, sv_l,  # v strides
    sdo_b, sdo_h, sdo_l,  # grad_out strides
    sdk_b, sdk_h, sdk_l,  # dk strides
    sdv_b, sdv_h, sdv_l,  # dv strides
    H, Lq, Lk,
    qk_hi, qk_lo,  # score multiplier (scale·log2 e when USE_EXP2, else scale) as two fp32 words
    sm_hi, sm_lo,  # scale itself, as two fp32 words: dK = scale·dSᵀ·Q
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per loop iteration
    BLOCK_N: tl.constexpr,  # keys per program
    BLOCK_D: tl.constexpr,
):
    pid_n, bh = _program_ids(Lk, BLOCK_N)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    k = _load_tile(k_ptr + b * sk_b + h * sk_h, keys, sk_l, cols, Lk, HEAD_DIM)
    v = _load_tile(v_ptr + b * sv_b + h * sv_h, keys, sv_l, cols, Lk, HEAD_DIM)
    q_base = q_ptr + b * sq_b + h * sq_h
    do_base = do_ptr + b * sdo_b + h * sdo_h
    row_base = bh.to(tl.int64) * Lq
    qk_scale = join_float(qk_hi, qk_lo, ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    # the key block's tiles stay in registers while the query blocks stream past (FA2 Alg. 2's outer loop
    # over K, V blocks); everything is computed transposed ([keys, queries]) so that no transpose of the
    # accumulators is needed
    for start_m in range(0, Lq, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < Lq
        q = _load_tile(q_base, rows, sq_l, cols, Lq, HEAD_DIM)
        do = _load_tile(do_base, rows, sdo_l, cols, Lq, HEAD_DIM)
        lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0).to(ACC)
        delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0).to(ACC)
        if USE_EXP2:
            lse = lse * 1.4426950408889634  # into log2 units, as the scores
        s_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], ACC), DOT_PRECISION, UPCAST) * qk_scale
        # Pᵀ = exp(Sᵀ − lse): the softmax recomputed from the saved logsumexp (FA2 Alg. 2 line 11)
        p_t = tl.where(row_ok[None, :], _exp(s_t - lse[None, :], USE_EXP2), 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION, UPCAST)
        dp_t = _dot(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], ACC), DOT_PRECISION, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])  # dS = P∘(dP − Δ) (FA2 Alg. 2 line 14)
        dk = _dot(ds_t.to(q.dtype), q, dk, DOT_PRECISION, UPCAST)
    dk = dk * join_float(sm_hi, sm_lo, ACC)
    _store_tile(dk_ptr + b * sdk_b + h * sdk_h, keys, sdk_l, cols, Lk, HEAD_DIM, dk)
    _store_tile(dv_ptr + b * sdv_b + h * sdv_h, keys, sdv_l, cols, Lk, HEAD_DIM, dv)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # q (B, H, Lq, D): (b, h, i, d) at b·sq_b + h·sq_h + i·sq_l + d
    k_ptr,  # k (B, H, Lk, D): (b, h, j, d) at b·sk_b + h·sk_h + j·sk_l + d
    v_ptr,  # v (B, H, Lk, D): (b, h, j, d) at b·sv_b + h·sv_h + j·sv_l + d
    do_ptr,  # grad_out (B, H, Lq, D): (b, h, i, d) at b·sdo_b + h·sdo_h + i·sdo_l + d
    lse_ptr,  # [B·H·Lq] ACC natural-log logsumexp from the forward, contiguous
    delta_ptr,  # [B·H·Lq] ACC Δ from _attn_bwd_delta_kernel
    dq_ptr,  # dq (B, H, Lq, D) in (B, Lq, H, D) memory: (b, h, i, d) at b·sdq_b + h·sdq_h + i·sdq_l + d
    sq_b, sq_h, sq_l,  # q strides
    sk_b, sk_h, sk_l,  # k strides
    sv_b, sv_h, sv_l,  # v strides
    sdo_b, sdo_h, sdo_l,  # grad_out strides
    sdq_b, sdq_h, sdq_l,  # dq strides
    H, Lq, Lk,
    qk_hi, qk_lo,  # score multiplier (scale·log2 e when USE_EXP2, else scale) as two fp32 words
    sm_hi, sm_lo,  # scale itself: dQ = scale·dS·K
    HEAD_DIM: tl.constexpr, ACC: tl.constexpr, USE_EXP2: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop iteration
    BLOCK_D: tl.constexpr,
):
    pid_m, bh = _program_ids(Lq, BLOCK_M)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Lq
    cols = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * sq_b + h * sq_h, rows, sq_l, cols, Lq, HEAD_DIM)
    do = _load_tile(do_ptr + b * sdo_b + h * sdo_h, rows, sdo_l, cols, Lq, HEAD_DIM)
    row_base = bh.to(tl.int64) * Lq
    lse = tl.load(lse_ptr + row_base + rows, mask=row_ok, other=0).to(ACC)
    delta = tl.load(delta_ptr + row_base + rows, mask=row_ok, other=0).to(ACC)
    if USE_EXP2:
        lse = lse * 1.4426950408889634
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    qk_scale = join_float(qk_hi, qk_lo, ACC)
    dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, Lk, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, keys, sk_l, cols, Lk, HEAD_DIM)
        v = _load_tile(v_base, keys, sv_l, cols, Lk, HEAD_DIM)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], ACC), DOT_PRECISION, UPCAST) * qk_scale
        # tail keys are zero rows of K: S = 0 there, so they must be masked, not just zero-filled
        p = tl.where((keys < Lk)[None, :], _exp(s - lse[:, None], USE_EXP2), 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], ACC), DOT_PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION, UPCAST)
    dq = dq * join_float(sm_hi, sm_lo, ACC)
    _store_tile(dq_ptr + b * sdq_b + h * sdq_h, rows, sdq_l, cols, Lq, HEAD_DIM, dq)


# --------------------------------------------------------------------------------------------------------
# tile sizes
# --------------------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages) on an H100 (sm_90), by kernel and BLOCK_D; BLOCK_M counts
# queries, BLOCK_N keys. No GPU was available to time them: they were chosen by compiling every kernel for
# sm_90a (triton.compile + ptxas -v, no device needed) and keeping FA2's Triton shapes (fwd 128×64, dK/dV
# 32 queries × 128 keys, dQ 128 × 32) where they fit in 255 registers without spills, shrinking the loop
# block where they did not. Spills (bytes) are noted where no shape tried avoided them. Retune on a GPU.
_GPU_TILES = {
    "fwd": {64: (128, 64, 8, 3), 128: (128, 32, 8, 3), 256: (64, 16, 4, 2)},
    "dkdv": {64: (32, 128, 8, 3), 128: (32, 64, 8, 2), 256: (32, 16, 4, 2)},
    "dq": {64: (128, 32, 8, 3), 128: (128, 32, 8, 2), 256: (32, 16, 8, 2)},  # dq 256: 64×16 spilled 704 B at D = 200
}
# fp32 runs tl.dot with input_precision="ieee" (FMA, not tensor cores: TF32 would miss fp32 accuracy), whose
# operand layouts need far more registers: 32×32 tiles spill in dK/dV at every D and in fwd from D = 80
# (up to 38 KB per thread at D = 256), 16×16 tiles do not; at D = 40 (masked to 64) 32×32 needs 8 warps, and
# the fwd at D = 256 needs 8 warps even at 16×16. fp64 is for checking, not speed: the smallest tiles, no
# pipelining, 8 warps from D = 128 (4 spilled 0.3–1.8 KB at D = 256). benchmarks/results/triton-sm90-
# resources.md has the registers of each; python_tests/test_triton_compile.py fails on any spill.
def _fp32_tiles(kind: str, bd: int) -> tuple[int, int, int, int]:
    if kind != "dkdv" and bd <= 64:
        return (32, 32, 4 if bd <= 32 else 8, 2)
    return (16, 16, 8 if bd >= 256 else 4, 2)


def _fp64_tiles(bd: int) -> tuple[int, int, int, int]:
    return (32, 32, 4, 1) if bd <= 64 else (16, 16, 8, 1)


# which block is spread over programs (the other is the loop): the one shrunk for small problems
_PARALLEL_AXIS = {"fwd": 0, "dkdv": 1, "dq": 0}
_MIN_BLOCK = 16  # tl.dot's smallest M, N, K
INTERPRETER_BLOCK = 64  # CPU interpreter: large tiles, few Python-level loop iterations


def _block_d(D: int) -> int:
    return max(_MIN_BLOCK, triton.next_power_of_2(D))


def _p2_cap(block: int, length: int) -> int:
    """block, or the smallest power of two ≥ length (≥ 16) when that is smaller: L = 7 gets 16-row tiles."""
    return max(_MIN_BLOCK, min(block, triton.next_power_of_2(length)))


def _tiles(kind: str, x: torch.Tensor, Lq: int, Lk: int, heads: int,
           block_m: Optional[int] = None, block_n: Optional[int] = None) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of one kernel; block_m/block_n override (tests)."""
    bd = _block_d(x.shape[-1])
    device = profile(x.device)
    if device.interpreter:
        m, n, warps, stages = INTERPRETER_BLOCK, INTERPRETER_BLOCK, 4, 1
    else:
        if x.dtype == torch.float32:
            m, n, warps, stages = _fp32_tiles(kind, bd)
        elif x.dtype == torch.float64:
            m, n, warps, stages = _fp64_tiles(bd)
        else:
            m, n, warps, stages = _GPU_TILES[kind][max(64, bd)]
    m, n = _p2_cap(m, Lq), _p2_cap(n, Lk)
    if not device.interpreter:
        # small problems: halve the parallel block until the programs cover the SMs (down to 32)
        sms = device.sm_count
        axis = _PARALLEL_AXIS[kind]
        length = Lq if axis == 0 else Lk
        par = full = (m, n)[axis]
        while par > 32 and triton.cdiv(length, par) * heads < sms:
            par //= 2
        m, n = (par, n) if axis == 0 else (m, par)
        # fewer warps for the smaller tile (8 warps over 32 or 64 rows spilled where 128 rows did not)
        warps = max(4, warps * par // full)
    if block_m is not None:
        m = block_m
    if block_n is not None:
        n = block_n
    return m, n, warps, stages


# --------------------------------------------------------------------------------------------------------
# host
# --------------------------------------------------------------------------------------------------------
def _head_dim_innermost(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(3) == 1 else t.contiguous()


def _bhl(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _numerics(q: torch.Tensor, scale: float) -> dict:
    """Kernel arguments shared by every launch: the accumulation dtype, exp2 or exp, the scales."""
    acc = _acc(q)
    use_exp2 = acc == tl.float32
    qk_hi, qk_lo = split_float(scale * LOG2E if use_exp2 else scale)
    upcast = q.dtype == torch.bfloat16 and profile(q.device).interpreter
    return dict(acc=acc, use_exp2=use_exp2, qk=(qk_hi, qk_lo), sm=split_float(scale), upcast=upcast)


def launch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
                     block_m: Optional[int] = None, block_n: Optional[int] = None):
    """(out, lse). block_m/block_n override the tile sizes (tests use them to reach many-block paths)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v = (_head_dim_innermost(t) for t in (q, k, v))
    out = attention_output_empty(q, Lq)
    lse = attention_lse_empty(q)
    if B * H * Lq * Lk == 0:  # SDPA's answer for Lk = 0; nothing to launch otherwise
        out.zero_()
        lse.fill_(-math.inf)
        return out, lse
    nm = _numerics(q, scale)
    bm, bn, warps, stages = _tiles("fwd", q, Lq, Lk, B * H, block_m, block_n)
    grid = (triton.cdiv(Lq, bm) * B * H,)
    launch(_attn_fwd_kernel, grid,
        q, k, v, out, lse, *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(out), H, Lq, Lk, *nm["qk"],
        HEAD_DIM=D, ACC=nm["acc"], USE_EXP2=nm["use_exp2"], DOT_PRECISION="ieee",
        UPCAST=nm["upcast"], BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_block_d(D), num_warps=warps, num_stages=stages)
    return out, lse


def launch_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, scale: float, *,
                              block_m: Optional[int] = None, block_n: Optional[int] = None):
    """(dq, dk, dv). block_m/block_n override the tile sizes of both gradient kernels (tests)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    do, q, k, v, out = (_head_dim_innermost(t) for t in (grad_out, q, k, v, out))
    lse = lse.contiguous()
    dq = attention_output_empty(q, Lq)
    dk = attention_output_empty(k, Lk)
    dv = attention_output_empty(v, Lk)
    if B * H * Lq * Lk == 0:
        for t in (dq, dk, dv):
            t.zero_()
        return dq, dk, dv
    nm = _numerics(q, scale)
    bd = _block_d(D)
    BH = B * H
    # 1. Δ = rowsum(dO∘O)
    delta = torch.empty_like(lse)
    # 32 rows for fp64 at head dims over 128: 64 × 256 doubles of O and dO spilled ~1 KB at D = 200 (sm_90)
    bm_delta = _p2_cap(32 if q.dtype == torch.float64 and bd > 128 else 64, Lq)
    launch(_attn_bwd_delta_kernel, (triton.cdiv(Lq, bm_delta) * BH,),
        out, do, delta, *_bhl(out), *_bhl(do), H, Lq, HEAD_DIM=D, ACC=nm["acc"], BLOCK_M=bm_delta, BLOCK_D=bd,
        num_warps=4 if bm_delta * bd < 4096 else 8)  # 4 warps over a 64×64 fp32 tile spilled 8 bytes
    flags = dict(HEAD_DIM=D, ACC=nm["acc"], USE_EXP2=nm["use_exp2"], DOT_PRECISION="ieee", UPCAST=nm["upcast"],
                 BLOCK_D=bd)
    # 2. dK, dV: a program per key block
    bm, bn, warps, stages = _tiles("dkdv", q, Lq, Lk, BH, block_m, block_n)
    launch(_attn_bwd_dkdv_kernel, (triton.cdiv(Lk, bn) * BH,),
        q, k, v, do, lse, delta, dk, dv, *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do), *_bhl(dk), *_bhl(dv),
        H, Lq, Lk, *nm["qk"], *nm["sm"], **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    # 3. dQ: a program per query block
    bm, bn, warps, stages = _tiles("dq", q, Lq, Lk, BH, block_m, block_n)
    launch(_attn_bwd_dq_kernel, (triton.cdiv(Lq, bm) * BH,),
        q, k, v, do, lse, delta, dq, *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do), *_bhl(dq),
        H, Lq, Lk, *nm["qk"], *nm["sm"], **flags, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------------
# custom ops: the schemas of csrc/torch_bindings.cpp; the argument checks are the C++ ones (_C), so every
# backend rejects the same inputs with the same messages
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("diffusion_ext_triton::attention", mutates_args=(),
                         schema="(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)")
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _C.check_attention(q, k, v, scale)
    return launch_attention(q, k, v, scale)


@torch.library.custom_op(
    "diffusion_ext_triton::attention_backward", mutates_args=(),
    schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale)"
           " -> (Tensor, Tensor, Tensor)")
def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       out: torch.Tensor, lse: torch.Tensor, scale: float
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _C.check_attention_backward(grad_out, q, k, v, out, lse, scale)
    return launch_attention_backward(grad_out, q, k, v, out, lse, scale)


@attention.register_fake
def _(q, k, v, scale):
    return attention_output_empty(q, q.shape[2]), attention_lse_empty(q)


@attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return (attention_output_empty(q, q.shape[2]), attention_output_empty(k, k.shape[2]),
            attention_output_empty(v, v.shape[2]))


register_attention_autograd(attention, attention_backward)
