"""Output metadata of the ops, shared by their fake (meta) implementations of every backend.

The kernels walk all tensors of one call as one flat array when they share a dense, batch-outermost
layout (contiguous or channels_last alike) and then write outputs in that layout; otherwise they work on
contiguous copies. `flat_batch_empty_like` states that rule once, as csrc/checks.cpp
share_flat_batch_layout does for C++.
"""
from __future__ import annotations

import torch


def dense_non_overlapping(x: torch.Tensor) -> bool:
    """torch's is_non_overlapping_and_dense: sizes sorted by stride tile memory exactly (size-1 dims may
    have any stride)."""
    dims = sorted((d for d in range(x.dim()) if x.size(d) != 1), key=lambda d: x.stride(d))
    expected = 1
    for d in dims:
        if x.stride(d) != expected:
            return False
        expected *= x.size(d)
    return True


def share_flat_batch_layout(*tensors: torch.Tensor | None) -> bool:
    ts = [t for t in tensors if t is not None]
    first = ts[0]
    if not dense_non_overlapping(first):
        return False
    if first.numel() > 0 and first.size(0) > 1 and first.stride(0) != first.numel() // first.size(0):
        return False
    return all(t.stride() == first.stride() for t in ts)


def flat_batch_empty_like(x: torch.Tensor, *others: torch.Tensor | None) -> torch.Tensor:
    if share_flat_batch_layout(x, *others):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def dense_empty_like(x: torch.Tensor) -> torch.Tensor:
    """dropout's output (csrc/dropout_args.h): x's layout when x is dense, else contiguous."""
    if dense_non_overlapping(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def group_norm_channels_last(x: torch.Tensor) -> bool:
    """group_norm_act reads x without a copy when contiguous or when C is innermost with the batch
    outermost (NHWC, NDHWC, (N, C, L) from (N, L, C)); csrc/group_norm_args.cpp states the same rule."""
    if x.dim() < 3 or x.size(1) == 1 or x.is_contiguous() or x.stride(1) != 1:
        return False
    return dense_non_overlapping(x.movedim(1, -1)) and (x.size(0) == 1 or x.stride(0) == x.numel() // x.size(0))


def group_norm_empty_like(x: torch.Tensor) -> torch.Tensor:
    if group_norm_channels_last(x):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


def group_norm_stats_empty(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.empty((x.shape[0], num_groups), dtype=acc, device=x.device)


def group_norm_film_grad_empty(x: torch.Tensor) -> torch.Tensor:
    """The gradient of a FiLM scale or shift: (N, C) contiguous, whatever the layout of the input."""
    return torch.empty(x.shape[:2], dtype=x.dtype, device=x.device)


def group_norm_act_backward_empty(x, weight, bias, scale, shift, output_mask, scale_shift_mask):
    """(grad_x, grad_weight, grad_bias, grad_scale, grad_shift) of group_norm_act_backward, None where the mask
    is false or the input absent (csrc/group_norm_args.cpp prepare_group_norm_act_backward allocates the same)."""
    return (group_norm_empty_like(x) if output_mask[0] else None,
            torch.empty_like(weight) if weight is not None and output_mask[1] else None,
            torch.empty_like(bias) if bias is not None and output_mask[2] else None,
            group_norm_film_grad_empty(x) if scale is not None and scale_shift_mask[0] else None,
            group_norm_film_grad_empty(x) if shift is not None and scale_shift_mask[1] else None)


def attention_output_empty(like: torch.Tensor, length: int) -> torch.Tensor:
    """An empty (B, H, L, D) tensor in (B, L, H, D) memory order: the layout of every attention output
    (out, dq, dk, dv), as csrc/attention_args.cpp attention_output_empty allocates it."""
    B, H, _, D = like.shape
    return torch.empty((B, length, H, D), dtype=like.dtype, device=like.device).transpose(1, 2)


def attention_lse_empty(q: torch.Tensor) -> torch.Tensor:
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return torch.empty(q.shape[:3], dtype=acc, device=q.device)
