"""group_norm_act in Triton: y = act(γ_c·(x − μ_ng)·rstd_ng + β_c) (Wu & He 2018, eq. 1 with groups), and its
backward, which recomputes z = γ·x̂ + β from x, μ and rstd instead of saving it.

x (N, C, *spatial) is seen as (N, C, HW) in one of two layouts, read without a copy (csrc/group_norm_args.h):
  channels_first (contiguous): (n, c, s) at n·C·HW + c·HW + s — a group is one contiguous run of Cg·HW;
  channels_last (C innermost): (n, c, s) at n·HW·C + s·C + c, s in memory order — a group is HW rows of
  Cg contiguous channels, C apart.
Anything else is made contiguous first. Every output is written in the layout that was read.

Forward (two or three launches):
  1. _gn_fwd_stats_kernel, grid (N·G, SPLIT): Welford moments of one chunk of a group. SPLIT > 1 when
     N·G programs alone would leave the GPU idle; each chunk then stores its (count, mean, M2) and
  2. _gn_fwd_combine_kernel, grid (N·G), merges them (Chan et al.) into μ and rstd = 1/√(σ²+ε)
     (with SPLIT = 1 the stats kernel writes μ and rstd itself);
  3. _gn_fwd_apply_kernel, grid (N·⌈C/BLOCK_C⌉, SPLIT_S): y over (channel × spatial) tiles.
Backward (per group, M = Cg·HW; dz = dy·act'(z), x̂ = (x − μ)·rstd):
  1. _gn_bwd_reduce_kernel, same tiles as the apply: per-(n, c) partial sums Σ dz·x̂ and Σ dz per chunk;
  2. _gn_bwd_coef_kernel, grid (N·G): a = Σ_group dz·γ / M, b = Σ_group dz·γ·x̂ / M;
  3. _gn_bwd_dx_kernel, same tiles: dx = rstd·(dz·γ − a − x̂·b);
  4. _gn_bwd_param_kernel, grid (⌈C/BLOCK_C⌉): dγ_c = Σ_n Σ dz·x̂, dβ_c = Σ_n Σ dz (no atomics: deterministic).
FiLM (optional (N, C) scale s and shift t, csrc/common/film.h): z = (γ·x̂ + β)·(1 + s) + t, i.e. the per-(n, c)
γ' = γ·(1 + s), β' = β·(1 + s) + t in every element-wise kernel and in step 2 (HAS_S, HAS_T: loaded once per
program, outside the loops), and after step 1 _gn_bwd_film_kernel, grid (N, ⌈C/BLOCK_C⌉): ds = γ·Σ dz·x̂ + β·Σ dz,
dt = Σ dz, and with a scale the sums folded with (1 + s) into [N, 1, C], on which step 4 runs unchanged.
All sums accumulate in fp32 (fp64 for fp64 x).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .._autograd import register_group_norm_autograd
from .._loader import _C
from .._meta import (group_norm_act_backward_empty, group_norm_channels_last, group_norm_empty_like,
                     group_norm_film_grad_empty, group_norm_stats_empty)
from .q_sample import _acc
from .scalars import join_float, split_float
from .target import launch, profile

_ACTIVATION = {"none": 0, "silu": 1, "relu": 2}
TILE = 2048  # elements of x per program and loop iteration
MAX_SPLIT = 512  # chunks per group / spatial chunks per (n, channel tile): bounds the combine tiles


# --------------------------------------------------------------------------------------------------------
# activations (csrc/common/activations.h): 0 none, 1 SiLU z·σ(z), 2 ReLU
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _sigmoid(z):
    e = tl.exp(-tl.abs(z))  # never overflows (masked lanes may hold z = −μ·rstd, far from 0)
    r = 1.0 / (1.0 + e)
    return tl.where(z >= 0.0, r, e * r)


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 1:
        return z * _sigmoid(z)
    elif ACT == 2:
        return tl.where(z < 0.0, 0.0, z)  # NaN passes, as torch.relu
    else:
        return z


@triton.jit
def _act_backward(dy, z, ACT: tl.constexpr):
    # dz = dy·act'(z): SiLU' = σ(z)·(1 + z·(1 − σ(z))), ReLU' = [z > 0]
    if ACT == 1:
        s = _sigmoid(z)
        return dy * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 2:
        return tl.where(z > 0.0, dy, 0.0)
    else:
        return dy


# --------------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _gn_fwd_stats_kernel(
    x_ptr,  # x in its layout; group (n, g) starts at n·stride_n + g·stride_g and is read as rows:
    #         FULL_ROWS (channels_first, or channels_last with G = 1): its Cg·HW elements cut in rows of BLOCK_W;
    #         else (channels_last): HW rows of Cg channels, C apart
    mean_ptr,  # [N·G] ACC μ, written here when SPLIT = 1
    rstd_ptr,  # [N·G] ACC rstd, written here when SPLIT = 1
    part_cnt_ptr,  # [N·G, SPLIT] ACC element count of each chunk, written when SPLIT > 1
    part_mean_ptr,  # [N·G, SPLIT] ACC mean of each chunk − K (K stored in mean_ptr)
    part_m2_ptr,  # [N·G, SPLIT] ACC Σ (x − mean)² of each chunk
    G,
    stride_n,  # elements between samples: C·HW
    stride_g,  # elements between groups of a sample: Cg·HW (FULL_ROWS) or Cg
    row_stride,  # elements between rows of a group: BLOCK_W (FULL_ROWS) or C
    row_len,  # columns of a row inside the group: Cg; ignored when FULL_ROWS
    group_end,  # (row r, column j) is inside the group iff r·row_stride + j < group_end
    num_rows,  # rows of a group
    rows_per_prog,  # rows of one chunk, a multiple of BLOCK_R
    eps_hi, eps_lo,  # ε = eps_hi + eps_lo, two fp32 words so fp64 keeps its ε exactly
    FULL_ROWS: tl.constexpr,  # the group is one contiguous run: no column mask (lets loads vectorise)
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    ng = tl.program_id(0)
    k = tl.program_id(1)
    n = ng // G
    g = ng % G
    base = x_ptr + n.to(tl.int64) * stride_n + g.to(tl.int64) * stride_g
    r_lo = k.to(tl.int64) * rows_per_prog  # int64: a channel of 2^31 or more rows would wrap in int32
    r_hi = tl.minimum(r_lo + rows_per_prog, num_rows)
    rr = tl.arange(0, BLOCK_R)
    jj = tl.arange(0, BLOCK_W)
    # 1. Welford per lane on x − K, K = the group's first element: the lane means stay small, so μ = K + μ'
    #    is rounded once (x = 1000 + noise keeps its digits). A lane inside the group at iteration i was
    #    inside at every earlier one (rows only grow), so its count is i + 1: one scalar reciprocal, no division.
    shift = tl.load(base).to(ACC)
    cnt = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    mean = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    m2 = tl.zeros([BLOCK_R, BLOCK_W], dtype=ACC)
    for i in range(0, tl.cdiv(r_hi - r_lo, BLOCK_R)):
        r = r_lo + i * BLOCK_R + rr
        off = r.to(tl.int64)[:, None] * row_stride + jj[None, :]
        ok = (r < r_hi)[:, None] & (off < group_end)
        if not FULL_ROWS:
            ok = ok & (jj < row_len)[None, :]
        xv = tl.load(base + off, mask=ok, other=0).to(ACC) - shift
        inv = tl.full([], 1.0, ACC) / (i + 1)
        d = tl.where(ok, xv - mean, 0.0)
        mean += d * inv
        m2 += d * (xv - mean)
        cnt += ok.to(ACC)
    # 2. the lanes merged exactly (Chan et al.): M2 = Σ M2_l + Σ n_l·(mean_l − mean)²
    total = tl.sum(cnt)
    mu = tl.sum(cnt * mean) / tl.maximum(total, 1.0)
    dev = mean - mu
    m2_all = tl.sum(m2) + tl.sum(cnt * dev * dev)
    if tl.num_programs(1) == 1:
        var = tl.maximum(m2_all / tl.maximum(total, 1.0), 0.0)
        tl.store(mean_ptr + ng, shift + mu)
        tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(var + join_float(eps_hi, eps_lo, ACC)))
    else:  # chunk means stay shifted by K, which waits in mean_ptr for the combine kernel
        p = ng.to(tl.int64) * tl.num_programs(1) + k
        tl.store(part_cnt_ptr + p, total)
        tl.store(part_mean_ptr + p, mu)
        tl.store(part_m2_ptr + p, m2_all)
        if k == 0:
            tl.store(mean_ptr + ng, shift)


@triton.jit
def _gn_fwd_combine_kernel(
    part_cnt_ptr,  # [N·G, split] ACC chunk counts
    part_mean_ptr,  # [N·G, split] ACC chunk means − K
    part_m2_ptr,  # [N·G, split] ACC chunk M2
    mean_ptr,  # [N·G] ACC: in, the shift K of the chunk means; out, μ
    rstd_ptr,  # [N·G] ACC rstd
    split,
    eps_hi, eps_lo,
    ACC: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    ng = tl.program_id(0)
    kk = tl.arange(0, BLOCK_K)
    ok = kk < split
    p = ng.to(tl.int64) * split + kk
    cnt = tl.load(part_cnt_ptr + p, mask=ok, other=0)
    mu_k = tl.load(part_mean_ptr + p, mask=ok, other=0)
    m2_k = tl.load(part_m2_ptr + p, mask=ok, other=0)
    total = tl.maximum(tl.sum(cnt), 1.0)
    mu = tl.sum(cnt * mu_k) / total
    dev = mu_k - mu
    var = tl.maximum((tl.sum(m2_k) + tl.sum(cnt * dev * dev)) / total, 0.0)
    tl.store(mean_ptr + ng, tl.load(mean_ptr + ng) + mu)
    tl.store(rstd_ptr + ng, 1.0 / tl.sqrt(var + join_float(eps_hi, eps_lo, ACC)))


@triton.jit
def _channel_params(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, c_ok, G, Cg,
                    HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACC: tl.constexpr):
    # μ, rstd of each channel's group and γ, β of each channel (γ = 1, β = 0 when absent)
    ng = n * G + c // Cg
    mean = tl.load(mean_ptr + ng, mask=c_ok, other=0).to(ACC)
    rstd = tl.load(rstd_ptr + ng, mask=c_ok, other=0).to(ACC)
    if HAS_W:
        gamma = tl.load(w_ptr + c, mask=c_ok, other=0).to(ACC)
    else:
        gamma = tl.full(c.shape, 1.0, ACC)
    if HAS_B:
        beta = tl.load(b_ptr + c, mask=c_ok, other=0).to(ACC)
    else:
        beta = tl.zeros(c.shape, ACC)
    return ng, mean, rstd, gamma, beta


@triton.jit
def _film_params(w_ptr, b_ptr, s_ptr, t_ptr, mean_ptr, rstd_ptr, n, c, c_ok, G, Cg, s_stride, t_stride,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
                 ACC: tl.constexpr):
    # _channel_params with FiLM: γ' = γ·(1 + s), β' = β·(1 + s) + t of sample n (film.h, F1); s at n·s_stride + c
    ng, mean, rstd, gamma, beta = _channel_params(w_ptr, b_ptr, mean_ptr, rstd_ptr, n, c, c_ok, G, Cg,
                                                  HAS_W, HAS_B, ACC)
    if HAS_S:
        k = 1.0 + tl.load(s_ptr + n.to(tl.int64) * s_stride + c, mask=c_ok, other=0).to(ACC)
        gamma = gamma * k
        beta = beta * k
    if HAS_T:
        beta = beta + tl.load(t_ptr + n.to(tl.int64) * t_stride + c, mask=c_ok, other=0).to(ACC)
    return ng, mean, rstd, gamma, beta


@triton.jit
def _gn_fwd_apply_kernel(
    x_ptr,  # x: (n, c, s) at n·C·HW + c·stride_c + s·stride_s
    y_ptr,  # y, same layout
    w_ptr,  # [C] γ, read when HAS_W
    b_ptr,  # [C] β, read when HAS_B
    s_ptr,  # [N, C] FiLM scale at n·s_stride + c, read when HAS_S
    t_ptr,  # [N, C] FiLM shift at n·t_stride + c, read when HAS_T
    mean_ptr,  # [N·G] ACC μ
    rstd_ptr,  # [N·G] ACC rstd
    C, HW, G, Cg,
    stride_c,  # HW (channels_first) or 1 (channels_last)
    stride_s,  # 1 (channels_first) or C (channels_last)
    c_tiles,  # channel tiles per sample: program_id(0) = n·c_tiles + tile
    s_per_prog,  # spatial positions per program along program_id(1), a multiple of BLOCK_S
    s_stride, t_stride,  # row strides of scale and shift
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // c_tiles
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    _, mean, rstd, gamma, beta = _film_params(w_ptr, b_ptr, s_ptr, t_ptr, mean_ptr, rstd_ptr, n, c, c_ok, G, Cg,
                                              s_stride, t_stride, HAS_W, HAS_B, HAS_S, HAS_T, ACC)
    scale = (rstd * gamma)[:, None]
    mean = mean[:, None]
    beta = beta[:, None]
    sample = n.to(tl.int64) * C * HW
    c_off = sample + c.to(tl.int64) * stride_c
    s_lo = tl.program_id(1).to(tl.int64) * s_per_prog  # int64: HW of 2^31 or more would wrap in int32
    s_hi = tl.minimum(s_lo + s_per_prog, HW)
    x_rows = (x_ptr + c_off)[:, None]
    y_rows = (y_ptr + c_off)[:, None]
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        s_off = (s.to(tl.int64) * stride_s)[None, :]
        ok = c_ok[:, None] & (s < HW)[None, :]  # s_per_prog is a multiple of BLOCK_S: s < s_hi too
        xv = tl.load(x_rows + s_off, mask=ok, other=0).to(ACC)
        z = (xv - mean) * scale + beta  # x − μ first: exact for x ≫ σ
        tl.store(y_rows + s_off, _act(z, ACT).to(y_ptr.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------------
@triton.jit
def _gn_bwd_reduce_kernel(
    x_ptr,  # x: (n, c, s) at n·C·HW + c·stride_c + s·stride_s
    dy_ptr,  # grad_y, same layout
    w_ptr,  # [C] γ, read when HAS_W
    b_ptr,  # [C] β, read when HAS_B
    s_ptr,  # [N, C] FiLM scale at n·s_stride + c, read when HAS_S
    t_ptr,  # [N, C] FiLM shift at n·t_stride + c, read when HAS_T
    mean_ptr,  # [N·G] ACC μ
    rstd_ptr,  # [N·G] ACC rstd
    part_ds_ptr,  # [N, SPLIT_S, C] ACC Σ_s dz·x̂ over this program's spatial chunk
    part_db_ptr,  # [N, SPLIT_S, C] ACC Σ_s dz
    C, HW, G, Cg,
    stride_c,  # HW or 1
    stride_s,  # 1 or C
    c_tiles,  # program_id(0) = n·c_tiles + tile
    s_per_prog,  # a multiple of BLOCK_S
    s_stride, t_stride,  # row strides of scale and shift
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // c_tiles
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    _, mean, rstd, gamma, beta = _film_params(w_ptr, b_ptr, s_ptr, t_ptr, mean_ptr, rstd_ptr, n, c, c_ok, G, Cg,
                                              s_stride, t_stride, HAS_W, HAS_B, HAS_S, HAS_T, ACC)
    mean = mean[:, None]
    rstd = rstd[:, None]
    gamma = gamma[:, None]
    beta = beta[:, None]
    c_off = n.to(tl.int64) * C * HW + c.to(tl.int64) * stride_c
    s_lo = tl.program_id(1).to(tl.int64) * s_per_prog
    s_hi = tl.minimum(s_lo + s_per_prog, HW)
    acc_ds = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    acc_db = tl.zeros([BLOCK_C, BLOCK_S], dtype=ACC)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        off = c_off[:, None] + s.to(tl.int64)[None, :] * stride_s
        ok = c_ok[:, None] & (s < HW)[None, :]  # s_per_prog is a multiple of BLOCK_S: s < s_hi too
        xv = tl.load(x_ptr + off, mask=ok, other=0).to(ACC)
        dy = tl.load(dy_ptr + off, mask=ok, other=0).to(ACC)
        xh = (xv - mean) * rstd
        dz = tl.where(ok, _act_backward(dy, xh * gamma + beta, ACT), 0.0)
        acc_ds += dz * xh
        acc_db += dz
    row = (n.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)) * C
    tl.store(part_ds_ptr + row + c, tl.sum(acc_ds, axis=1), mask=c_ok)
    tl.store(part_db_ptr + row + c, tl.sum(acc_db, axis=1), mask=c_ok)


@triton.jit
def _gn_bwd_coef_kernel(
    w_ptr,  # [C] γ, read when HAS_W
    s_ptr,  # [N, C] FiLM scale at n·s_stride + c, read when HAS_S: γ' = γ·(1 + s)
    part_ds_ptr,  # [N, split, C] ACC partial Σ dz·x̂
    part_db_ptr,  # [N, split, C] ACC partial Σ dz
    coef_a_ptr,  # [N·G] ACC a = Σ_group dz·γ / M
    coef_b_ptr,  # [N·G] ACC b = Σ_group dz·γ·x̂ / M
    C, G, Cg,
    split,
    group_size,  # M = Cg·HW
    s_stride,
    HAS_W: tl.constexpr, HAS_S: tl.constexpr, ACC: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_CG: tl.constexpr,
):
    ng = tl.program_id(0)
    n = ng // G
    g = ng % G
    acc_a = tl.zeros([BLOCK_K, BLOCK_CG], dtype=ACC)
    acc_b = tl.zeros([BLOCK_K, BLOCK_CG], dtype=ACC)
    for j0 in range(0, Cg, BLOCK_CG):
        j = j0 + tl.arange(0, BLOCK_CG)
        c = g * Cg + j
        c_ok = j < Cg
        if HAS_W:
            gamma = tl.load(w_ptr + c, mask=c_ok, other=0).to(ACC)[None, :]
        else:
            gamma = tl.full([1, BLOCK_CG], 1.0, ACC)
        if HAS_S:  # γ' of the element-wise kernels (the same product, so dz·γ' − a cancels exactly when M = 1)
            gamma = gamma * (1.0 + tl.load(s_ptr + n.to(tl.int64) * s_stride + c, mask=c_ok, other=0).to(ACC))[None, :]
        for k0 in range(0, split, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            off = ((n.to(tl.int64) * split + k) * C)[:, None] + c[None, :]
            ok = (k < split)[:, None] & c_ok[None, :]
            acc_a += tl.load(part_db_ptr + off, mask=ok, other=0) * gamma
            acc_b += tl.load(part_ds_ptr + off, mask=ok, other=0) * gamma
    inv_m = tl.full([], 1.0, ACC) / group_size  # group_size may arrive as the constexpr 1
    tl.store(coef_a_ptr + ng, tl.sum(acc_a) * inv_m)
    tl.store(coef_b_ptr + ng, tl.sum(acc_b) * inv_m)


@triton.jit
def _gn_bwd_dx_kernel(
    x_ptr,  # x: (n, c, s) at n·C·HW + c·stride_c + s·stride_s
    dy_ptr,  # grad_y, same layout
    dx_ptr,  # grad_x, same layout
    w_ptr,  # [C] γ, read when HAS_W
    b_ptr,  # [C] β, read when HAS_B
    s_ptr,  # [N, C] FiLM scale at n·s_stride + c, read when HAS_S
    t_ptr,  # [N, C] FiLM shift at n·t_stride + c, read when HAS_T
    mean_ptr,  # [N·G] ACC μ
    rstd_ptr,  # [N·G] ACC rstd
    coef_a_ptr,  # [N·G] ACC a
    coef_b_ptr,  # [N·G] ACC b
    C, HW, G, Cg,
    stride_c,  # HW or 1
    stride_s,  # 1 or C
    c_tiles,  # program_id(0) = n·c_tiles + tile
    s_per_prog,  # a multiple of BLOCK_S
    s_stride, t_stride,  # row strides of scale and shift
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_S: tl.constexpr, HAS_T: tl.constexpr,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    n = pid // c_tiles
    c = (pid % c_tiles) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ng, mean, rstd, gamma, beta = _film_params(w_ptr, b_ptr, s_ptr, t_ptr, mean_ptr, rstd_ptr, n, c, c_ok, G, Cg,
                                               s_stride, t_stride, HAS_W, HAS_B, HAS_S, HAS_T, ACC)
    a = tl.load(coef_a_ptr + ng, mask=c_ok, other=0)[:, None]
    b = tl.load(coef_b_ptr + ng, mask=c_ok, other=0)[:, None]
    mean = mean[:, None]
    rstd = rstd[:, None]
    gamma = gamma[:, None]
    beta = beta[:, None]
    c_off = n.to(tl.int64) * C * HW + c.to(tl.int64) * stride_c
    s_lo = tl.program_id(1).to(tl.int64) * s_per_prog
    s_hi = tl.minimum(s_lo + s_per_prog, HW)
    for s0 in range(s_lo, s_hi, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        off = c_off[:, None] + s.to(tl.int64)[None, :] * stride_s
        ok = c_ok[:, None] & (s < HW)[None, :]  # s_per_prog is a multiple of BLOCK_S: s < s_hi too
        xv = tl.load(x_ptr + off, mask=ok, other=0).to(ACC)
        dy = tl.load(dy_ptr + off, mask=ok, other=0).to(ACC)
        xh = (xv - mean) * rstd
        dz = _act_backward(dy, xh * gamma + beta, ACT)
        dx = rstd * (dz * gamma - a - xh * b)
        tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _column_sums(a_ptr, b_ptr, row0, rows, c, c_ok, C, WANT_A: tl.constexpr, WANT_B: tl.constexpr, ACC: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # Σ over rows [row0, row0 + rows) of the [*, C] ACC tables a and b, at the BLOCK_C columns c (in a fixed
    # order: no atomics)
    acc_a = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    acc_b = tl.zeros([BLOCK_R, BLOCK_C], dtype=ACC)
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        off = ((row0 + r).to(tl.int64) * C)[:, None] + c[None, :]
        ok = (r < rows)[:, None] & c_ok[None, :]
        if WANT_A:
            acc_a += tl.load(a_ptr + off, mask=ok, other=0)
        if WANT_B:
            acc_b += tl.load(b_ptr + off, mask=ok, other=0)
    return tl.sum(acc_a, axis=0), tl.sum(acc_b, axis=0)


@triton.jit
def _gn_bwd_film_kernel(
    part_ds_ptr,  # [N, split, C] ACC partial Σ dz·x̂ (S2)
    part_db_ptr,  # [N, split, C] ACC partial Σ dz (S1)
    w_ptr,  # [C] γ, read when HAS_W
    b_ptr,  # [C] β, read when HAS_B
    s_ptr,  # [N, C] FiLM scale at n·s_stride + c, read when FOLD
    dscale_ptr,  # [N, C] grad_scale, written when WANT_DS
    dshift_ptr,  # [N, C] grad_shift, written when WANT_DT
    fold_ds_ptr,  # [N, C] ACC (1 + s)·S2, written when FOLD
    fold_db_ptr,  # [N, C] ACC (1 + s)·S1, written when FOLD
    C, split, s_stride,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, WANT_DS: tl.constexpr, WANT_DT: tl.constexpr,
    FOLD: tl.constexpr, ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # per (n, c): S1, S2 over the split chunks; ∂s = γ·S2 + β·S1, ∂t = S1 (film.h, F2); (1 + s)·(S1, S2) (F3)
    n = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    s2, s1 = _column_sums(part_ds_ptr, part_db_ptr, n.to(tl.int64) * split, split, c, c_ok, C, True, True, ACC,
                          BLOCK_K, BLOCK_C)
    nc = n.to(tl.int64) * C + c
    if WANT_DS:
        ds = s2
        if HAS_W:
            ds = ds * tl.load(w_ptr + c, mask=c_ok, other=0).to(ACC)
        if HAS_B:
            ds += s1 * tl.load(b_ptr + c, mask=c_ok, other=0).to(ACC)
        tl.store(dscale_ptr + nc, ds.to(dscale_ptr.dtype.element_ty), mask=c_ok)
    if WANT_DT:
        tl.store(dshift_ptr + nc, s1.to(dshift_ptr.dtype.element_ty), mask=c_ok)
    if FOLD:
        k1 = 1.0 + tl.load(s_ptr + n.to(tl.int64) * s_stride + c, mask=c_ok, other=0).to(ACC)
        tl.store(fold_ds_ptr + nc, k1 * s2, mask=c_ok)
        tl.store(fold_db_ptr + nc, k1 * s1, mask=c_ok)


@triton.jit
def _gn_bwd_param_kernel(
    part_ds_ptr,  # [rows = N·split, C] ACC partial Σ dz·x̂
    part_db_ptr,  # [rows, C] ACC partial Σ dz
    dw_ptr,  # [C] grad_weight, written when WANT_DW
    db_ptr,  # [C] grad_bias, written when WANT_DB
    C, rows,
    WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dw, db = _column_sums(part_ds_ptr, part_db_ptr, 0, rows, c, c_ok, C, WANT_DW, WANT_DB, ACC, BLOCK_R, BLOCK_C)
    if WANT_DW:
        tl.store(dw_ptr + c, dw.to(dw_ptr.dtype.element_ty), mask=c_ok)
    if WANT_DB:
        tl.store(db_ptr + c, db.to(db_ptr.dtype.element_ty), mask=c_ok)


# --------------------------------------------------------------------------------------------------------
# host
# --------------------------------------------------------------------------------------------------------
def _target_programs(device: torch.device) -> int:
    """Programs that keep the device busy: 4 per SM (the interpreter's profile has one "SM": 4 programs,
    enough to reach the split paths)."""
    return 4 * profile(device).sm_count


def _p2(n: int) -> int:
    return triton.next_power_of_2(max(1, n))


def _warps(elements: int) -> int:
    return max(1, min(8, elements // 256))


def _split(blocks: int, programs: int, target: int) -> tuple[int, int]:
    """(blocks per program, programs along the split axis) so that programs·split ≈ target."""
    blocks = max(blocks, 1)
    split = max(1, min(blocks, MAX_SPLIT, triton.cdiv(target, max(programs, 1))))
    per = triton.cdiv(blocks, split)
    return per, triton.cdiv(blocks, per)


class _Geometry:
    """The (N, C, HW) view of x and the (channel × spatial) tiles of the apply and backward kernels."""

    def __init__(self, x: torch.Tensor, num_groups: int, channels_last: bool, tile: int, target: int):
        self.N, self.C = x.shape[0], x.shape[1]
        self.HW = x.numel() // (self.N * self.C) if self.N * self.C else 0
        self.G = num_groups
        self.Cg = self.C // num_groups
        self.channels_last = channels_last
        self.stride_c, self.stride_s = (1, self.C) if channels_last else (self.HW, 1)
        if channels_last:  # C is the contiguous axis
            self.BLOCK_C = min(_p2(self.C), 128, tile)
            self.BLOCK_S = min(_p2(self.HW), max(1, tile // self.BLOCK_C))
        else:
            self.BLOCK_S = min(_p2(self.HW), tile)
            self.BLOCK_C = min(_p2(self.C), max(1, tile // self.BLOCK_S))
        self.c_tiles = triton.cdiv(self.C, self.BLOCK_C)
        per, self.split_s = _split(triton.cdiv(self.HW, self.BLOCK_S), self.N * self.c_tiles, target)
        self.s_per_prog = per * self.BLOCK_S
        self.grid = (self.N * self.c_tiles, self.split_s)
        self.num_warps = _warps(self.BLOCK_C * self.BLOCK_S)

    def tile_args(self):
        return (self.C, self.HW, self.G, self.Cg, self.stride_c, self.stride_s, self.c_tiles, self.s_per_prog)


def _layout(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """x as the kernels read it, and whether that is channels_last (csrc/group_norm_args.cpp's rule)."""
    if group_norm_channels_last(x):
        return x, True
    return x.contiguous(), False


class _Film:
    """The FiLM inputs as the kernels take them: pointer arguments (x stands in for an absent one), row strides
    and the HAS_S / HAS_T flags. A view with unit channel stride is read as it is (csrc/group_norm_args.cpp
    film_operand)."""

    def __init__(self, x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]):
        scale, shift = (t if t is None or t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()
                        for t in (scale, shift))
        self.scale, self.shift = scale, shift
        self.ptrs = tuple(x if t is None else t for t in (scale, shift))
        self.strides = tuple(0 if t is None else t.stride(0) for t in (scale, shift))
        self.flags = dict(HAS_S=scale is not None, HAS_T=shift is not None)


def launch_group_norm_act(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor],
                          bias: Optional[torch.Tensor], eps: float, activation: str,
                          scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None, *,
                          tile: int = TILE, target_programs: Optional[int] = None):
    """(y, mean, rstd). tile and target_programs size the programs (tests shrink them to reach the
    multi-block and split paths on small inputs)."""
    x, channels_last = _layout(x)
    y = group_norm_empty_like(x)
    mean = group_norm_stats_empty(x, num_groups)
    rstd = torch.empty_like(mean)
    target = target_programs if target_programs is not None else _target_programs(x.device)
    geo = _Geometry(x, num_groups, channels_last, tile, target)
    N, C, HW, G, Cg = geo.N, geo.C, geo.HW, geo.G, geo.Cg
    L = Cg * HW
    if N == 0:
        return y, mean, rstd
    if L == 0:  # empty groups: μ = 0, σ² = 0, as the C++ kernels
        mean.zero_()
        rstd.fill_(eps ** -0.5)
        return y, mean, rstd
    acc = _acc(x)
    eps_hi, eps_lo = split_float(eps)
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    # 1. statistics: the group as rows (channels_last with G > 1: HW rows of Cg; else one contiguous run)
    full_rows = not (channels_last and G > 1)
    if full_rows:
        block_w = min(_p2(L), tile)
        row_stride, group_end, num_rows, stride_g = block_w, L, triton.cdiv(L, block_w), L
    else:
        block_w = _p2(Cg)
        row_stride, group_end, num_rows, stride_g = C, HW * C, HW, Cg
    block_r = min(_p2(num_rows), max(1, tile // block_w))
    per, split = _split(triton.cdiv(num_rows, block_r), N * G, target)
    part = torch.empty((3, N * G, split), dtype=mean.dtype, device=x.device) if split > 1 else (mean,) * 3
    launch(_gn_fwd_stats_kernel, (N * G, split),
        x, mean, rstd, part[0], part[1], part[2], G, C * HW, stride_g, row_stride, Cg, group_end,
        num_rows, per * block_r, eps_hi, eps_lo, FULL_ROWS=full_rows, ACC=acc, BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=_warps(block_r * block_w))
    if split > 1:
        launch(_gn_fwd_combine_kernel, (N * G,), part[0], part[1], part[2], mean, rstd, split, eps_hi, eps_lo,
               ACC=acc, BLOCK_K=_p2(split), num_warps=_warps(_p2(split)))
    # 2. y = act((x − μ)·rstd·γ + β), with FiLM's γ', β'
    film = _Film(x, scale, shift)
    launch(_gn_fwd_apply_kernel, geo.grid,
        x, y, x if weight is None else weight, x if bias is None else bias, *film.ptrs, mean, rstd,
        *geo.tile_args(), *film.strides, ACT=_ACTIVATION[activation], HAS_W=weight is not None,
        HAS_B=bias is not None, **film.flags, ACC=acc, BLOCK_C=geo.BLOCK_C, BLOCK_S=geo.BLOCK_S,
        num_warps=geo.num_warps)
    return y, mean, rstd


def launch_group_norm_act_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                                   weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                                   activation: str, output_mask, scale: Optional[torch.Tensor] = None,
                                   shift: Optional[torch.Tensor] = None, scale_shift_mask=(True, True), *,
                                   tile: int = TILE, target_programs: Optional[int] = None):
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift), None where the mask (output_mask,
    scale_shift_mask) is false or the input is absent."""
    x, channels_last = _layout(x)
    dy = grad_y if grad_y.stride() == x.stride() else torch.empty_like(x).copy_(grad_y)  # x's layout
    want_dx = bool(output_mask[0])
    want_dw = weight is not None and bool(output_mask[1])
    want_db = bias is not None and bool(output_mask[2])
    dx = group_norm_empty_like(x) if want_dx else None
    target = target_programs if target_programs is not None else _target_programs(x.device)
    geo = _Geometry(x, num_groups, channels_last, tile, target)
    N, C, HW, G, Cg = geo.N, geo.C, geo.HW, geo.G, geo.Cg
    # in the parameters' dtype: x's, or float32 with a half x (mixed precision, csrc/group_norm_args.cpp)
    dw = torch.zeros((C,), dtype=weight.dtype, device=x.device) if want_dw else None
    db = torch.zeros((C,), dtype=bias.dtype, device=x.device) if want_db else None
    want_ds = scale is not None and bool(scale_shift_mask[0])
    want_dt = shift is not None and bool(scale_shift_mask[1])
    dscale = group_norm_film_grad_empty(x).zero_() if want_ds else None
    dshift = group_norm_film_grad_empty(x).zero_() if want_dt else None
    if N * C * HW == 0 or not (want_dx or want_dw or want_db or want_ds or want_dt):
        return dx, dw, db, dscale, dshift
    acc = _acc(x)
    mean, rstd = mean.contiguous(), rstd.contiguous()
    weight = None if weight is None else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    w_arg, b_arg = (x if weight is None else weight), (x if bias is None else bias)
    film = _Film(x, scale, shift)
    flags = dict(ACT=_ACTIVATION[activation], HAS_W=weight is not None, HAS_B=bias is not None, **film.flags, ACC=acc)
    # 1. per (n, spatial chunk, c): Σ dz·x̂ and Σ dz
    part = torch.empty((2, N, geo.split_s, C), dtype=mean.dtype, device=x.device)
    launch(_gn_bwd_reduce_kernel, geo.grid,
        x, dy, w_arg, b_arg, *film.ptrs, mean, rstd, part[0], part[1], *geo.tile_args(), *film.strides, **flags,
        BLOCK_C=geo.BLOCK_C, BLOCK_S=geo.BLOCK_S, num_warps=geo.num_warps)
    # FiLM: ∂s, ∂t; with a scale, the sums folded with (1 + s) into [N, 1, C] for step 4
    sums, split = part, geo.split_s
    fold = scale is not None and (want_dw or want_db)
    if want_ds or want_dt or fold:
        folded = torch.empty((2, N, 1, C), dtype=mean.dtype, device=x.device) if fold else part
        block_c = min(_p2(C), 256)
        block_k = min(_p2(split), max(1, tile // block_c))
        launch(_gn_bwd_film_kernel, (N, triton.cdiv(C, block_c)),
            part[0], part[1], w_arg, b_arg, film.ptrs[0], x if dscale is None else dscale,
            x if dshift is None else dshift, folded[0], folded[1], C, split, film.strides[0],
            HAS_W=weight is not None, HAS_B=bias is not None, WANT_DS=want_ds, WANT_DT=want_dt, FOLD=fold, ACC=acc,
            BLOCK_K=block_k, BLOCK_C=block_c, num_warps=_warps(block_k * block_c))
        if fold:
            sums, split = folded, 1
    if want_dx:
        # 2. a, b per (n, g); 3. grad_x
        coef = torch.empty((2, N * G), dtype=mean.dtype, device=x.device)
        block_k = min(_p2(geo.split_s), 64)
        block_cg = min(_p2(Cg), max(1, tile // block_k))
        launch(_gn_bwd_coef_kernel, (N * G,),
            w_arg, film.ptrs[0], part[0], part[1], coef[0], coef[1], C, G, Cg, geo.split_s, Cg * HW,
            film.strides[0], HAS_W=weight is not None, HAS_S=film.flags["HAS_S"], ACC=acc, BLOCK_K=block_k,
            BLOCK_CG=block_cg, num_warps=_warps(block_k * block_cg))
        launch(_gn_bwd_dx_kernel, geo.grid,
            x, dy, dx, w_arg, b_arg, *film.ptrs, mean, rstd, coef[0], coef[1], *geo.tile_args(), *film.strides,
            **flags, BLOCK_C=geo.BLOCK_C, BLOCK_S=geo.BLOCK_S, num_warps=geo.num_warps)
    if want_dw or want_db:
        # 4. grad_weight, grad_bias: the partials summed over (n, chunk)
        block_c = min(_p2(C), 256)
        rows = N * split
        block_r = min(_p2(rows), max(1, tile // block_c))
        launch(_gn_bwd_param_kernel, (triton.cdiv(C, block_c),),
            sums[0], sums[1], x if dw is None else dw, x if db is None else db, C, rows,
            WANT_DW=want_dw, WANT_DB=want_db, ACC=acc, BLOCK_R=block_r, BLOCK_C=block_c,
            num_warps=_warps(block_r * block_c))
    return dx, dw, db, dscale, dshift


# --------------------------------------------------------------------------------------------------------
# custom ops: the schemas of csrc/torch_bindings.cpp, given verbatim (an inferred schema cannot return
# None for an undefined gradient)
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "diffusion_ext_triton::group_norm_act", mutates_args=(),
    schema="(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, str activation,"
           " Tensor? scale=None, Tensor? shift=None) -> (Tensor y, Tensor mean, Tensor rstd)")
def group_norm_act(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                   eps: float, activation: str, scale: Optional[torch.Tensor] = None,
                   shift: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _C.check_group_norm_act(x, num_groups, weight, bias, eps, activation, scale, shift)
    return launch_group_norm_act(x, num_groups, weight, bias, eps, activation, scale, shift)


@torch.library.custom_op(
    "diffusion_ext_triton::group_norm_act_backward", mutates_args=(),
    schema="(Tensor grad_y, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, Tensor? bias, int num_groups,"
           " str activation, bool[3] output_mask, Tensor? scale=None, Tensor? shift=None,"
           " bool[2] scale_shift_mask=[True, True]) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def group_norm_act_backward(grad_y: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
                            weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], num_groups: int,
                            activation: str, output_mask: list[bool], scale: Optional[torch.Tensor] = None,
                            shift: Optional[torch.Tensor] = None, scale_shift_mask: list[bool] = (True, True)):
    _C.check_group_norm_act_backward(grad_y, x, mean, rstd, weight, bias, num_groups, activation, output_mask,
                                     scale, shift, scale_shift_mask)
    return launch_group_norm_act_backward(grad_y, x, mean, rstd, weight, bias, num_groups, activation, output_mask,
                                          scale, shift, scale_shift_mask)


@group_norm_act.register_fake
def _(x, num_groups, weight, bias, eps, activation, scale=None, shift=None):
    return group_norm_empty_like(x), group_norm_stats_empty(x, num_groups), group_norm_stats_empty(x, num_groups)


@group_norm_act_backward.register_fake
def _(grad_y, x, mean, rstd, weight, bias, num_groups, activation, output_mask, scale=None, shift=None,
      scale_shift_mask=(True, True)):
    return group_norm_act_backward_empty(x, weight, bias, scale, shift, output_mask, scale_shift_mask)


register_group_norm_autograd(group_norm_act, group_norm_act_backward)
