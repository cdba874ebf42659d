"""The fused group norm + activation over a third-party nn.GroupNorm's own parameters, read at call time.

Reading weight, bias, eps and num_groups from the module on every call (rather than copying them into a
GroupNormAct) keeps one set of parameters: .to(), load_state_dict(assign=True), DDP's broadcasts and
optimizers all act on the tensors the fused op reads.
"""
from __future__ import annotations


import torch

from .. import ops
from ..backend import KERNEL_DEVICES, KERNEL_DTYPES
from ..nn.group_norm_act import match_autocast

# the dtypes and device types the kernels take (backend.py); anything else runs the library's own code
FUSED_DTYPES = KERNEL_DTYPES
FUSED_DEVICES = KERNEL_DEVICES

# The activation modules the kernel fuses, by class, and the op's name for each.
ACTIVATIONS = {torch.nn.SiLU: "silu", torch.nn.ReLU: "relu"}


def fused_activation(module) -> str | None:
    """The op's activation for an activation module (None: the kernel has none like it)."""
    return ACTIVATIONS.get(type(module))


def runs_fused(x: torch.Tensor) -> bool:
    """Whether the kernels take this tensor (dtype and device); decided per call, traced as a guard."""
    return x.dtype in FUSED_DTYPES and x.device.type in FUSED_DEVICES


def group_norm_act(norm: torch.nn.GroupNorm, x: torch.Tensor, activation: str, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None) -> torch.Tensor:
    """act(norm(x)) in one pass; with scale, shift (N, C): act(norm(x)·(1 + scale) + shift). Under autocast,
    GroupNormAct's dtype rule (nn.group_norm_act.match_autocast)."""
    x, weight, bias = match_autocast(x, norm.weight, norm.bias)
    if scale is None:
        return ops.group_norm_act(x, norm.num_groups, weight, bias, norm.eps, activation)
    return ops.group_norm_act(x, norm.num_groups, weight, bias, norm.eps, activation, scale=scale.to(x.dtype),
                              shift=shift.to(x.dtype))
