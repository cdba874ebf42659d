"""Autograd of the Triton group_norm_act, attention and dropout ops (diffusion_ext_triton::*), registered by their
modules in diffusion_ext/triton/ when the ops are defined — so never while torch.compile traces a first call.

The C++ ops have the same formulas in C++ (csrc/autograd.cpp): there, torch.library.register_autograd's
Python wrapper cost ~60 µs per forward and ~200 µs per backward on the CPU, as much as the kernel of a
U-Net's small map; the Triton ops run on a GPU, where that host time hides behind the kernels.
"""
from __future__ import annotations

import torch


# ----------------------------------------------------------------------------------------------------
# autograd of group_norm_act: the backward op recomputes the activation from x, mean and rstd, so only
# x (not y, not z) is kept for it, with the (N, C) FiLM scale and shift when given. Double backward is
# refused with a clear error.
# ----------------------------------------------------------------------------------------------------
def register_group_norm_autograd(forward_op, backward_op):
    def setup_context(ctx, inputs, output):
        x, num_groups, weight, bias, eps, activation, scale, shift = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, mean, rstd, weight, bias, scale, shift)
        ctx.num_groups, ctx.activation = num_groups, activation
        ctx.mark_non_differentiable(mean, rstd)
        ctx.set_materialize_grads(False)  # no zeros made for mean's and rstd's gradients (never used)

    def backward(ctx, grad_y, _grad_mean, _grad_rstd):
        if torch.is_grad_enabled():
            raise RuntimeError("diffusion_ext.group_norm_act: double backward (create_graph=True) is not supported")
        if grad_y is None:  # nothing flowed back into y: no gradients, as eager gives
            return (None,) * 8
        x, mean, rstd, weight, bias, scale, shift = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], weight is not None and need[2], bias is not None and need[3]]
        film_mask = [scale is not None and need[6], shift is not None and need[7]]
        grad_x, grad_w, grad_b, grad_scale, grad_shift = backward_op(
            grad_y, x, mean, rstd, weight, bias, ctx.num_groups, ctx.activation, mask, scale, shift, film_mask)
        return grad_x, None, grad_w, grad_b, None, None, grad_scale, grad_shift

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


# ----------------------------------------------------------------------------------------------------
# autograd of attention (FlashAttention-2): the forward keeps q, k, v, out and the row logsumexp; the
# backward recomputes the score tiles from them. Nothing of size Lq×Lk is stored.
# ----------------------------------------------------------------------------------------------------
def register_attention_autograd(forward_op, backward_op):
    def setup_context(ctx, inputs, output):
        q, k, v, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale = scale
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zeros made for lse's gradient (never used)

    def backward(ctx, grad_out, _grad_lse):
        if torch.is_grad_enabled():
            raise RuntimeError("diffusion_ext.attention: double backward (create_graph=True) is not supported")
        if grad_out is None:  # nothing flowed back into out: no gradients, as eager gives
            return (None,) * 4
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, ctx.scale)
        return dq, dk, dv, None

    torch.library.register_autograd(forward_op, backward, setup_context=setup_context)


# ----------------------------------------------------------------------------------------------------
# autograd of dropout: linear in x with a mask regenerated from (seed, offset), so the backward is the
# same op on the gradient, arranged in the output's layout (the mask follows memory order).
# ----------------------------------------------------------------------------------------------------
def register_dropout_autograd(op):
    def setup_context(ctx, inputs, output):
        _, ctx.p, ctx.seed, ctx.offset = inputs
        ctx.strides = output.stride()

    def backward(ctx, grad_y):
        # the mask follows memory order: copy unless the strides agree on every dim of size > 1 (a size-1
        # dim's stride never moves an element)
        if any(n > 1 and s != t for n, s, t in zip(grad_y.shape, grad_y.stride(), ctx.strides)):
            grad_y = torch.empty_strided(grad_y.shape, ctx.strides, dtype=grad_y.dtype,
                                         device=grad_y.device).copy_(grad_y)
        return op(grad_y, ctx.p, ctx.seed, ctx.offset), None, None, None

    torch.library.register_autograd(op, backward, setup_context=setup_context)
