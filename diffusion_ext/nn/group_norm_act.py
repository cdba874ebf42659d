"""GroupNormAct: nn.Sequential(nn.GroupNorm(G, C), nn.SiLU()) as one fused op, with optional FiLM."""
from __future__ import annotations

import torch

from .. import ops, reference

ACTIVATIONS = ("silu", "relu", "none")


def match_autocast(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None):
    """(x, weight, bias) as group_norm_act takes them: x's dtype, or fp32 parameters with half activations
    (the op's mixed precision). Outside autocast they are returned as given (a mismatch stays the op's
    error, as for F.group_norm).

    Mixed precision: low-precision activations from autocast's convs, fp32 parameters. They go to the op as
    they come: the op normalises in fp32 whatever x is, reads fp32 γ, β and returns their gradients in fp32,
    so neither a cast of γ, β per call (and of their gradients back) nor autocast's upcast of the
    activations (twice the memory traffic for the same statistics) is needed. Any other mismatch under
    autocast (say fp32 activations into a model cast to bf16) takes x to the parameters' dtype."""
    if weight is not None and weight.dtype != x.dtype and torch.is_autocast_enabled(x.device.type):
        if weight.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
            return x, weight, bias
        return x.to(weight.dtype), weight, bias
    return x, weight, bias


class GroupNormAct(torch.nn.Module):
    """GroupNorm (Wu & He 2018) followed by an activation, fused. Its state_dict holds `weight` and
    `bias` exactly as nn.GroupNorm's, so an nn.GroupNorm checkpoint loads into it and back."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 activation: str = "silu", fused: bool = True, device=None, dtype=None):
        super().__init__()
        if num_groups < 1 or num_channels % num_groups != 0:
            raise ValueError(f"GroupNormAct: num_channels = {num_channels} is not divisible by num_groups = {num_groups}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"GroupNormAct: activation {activation!r} is unknown; expected one of {ACTIVATIONS}")
        if not eps > 0:
            raise ValueError(f"GroupNormAct: eps = {eps}; expected eps > 0")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.affine, self.activation, self.fused = affine, activation, fused
        if affine:
            self.weight = torch.nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = torch.nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        """act(GroupNorm(x)), or with the optional (N, C) FiLM scale and shift act(GroupNorm(x)·(1 + scale) + shift)
        (ops.group_norm_act)."""
        if not self.fused:
            return reference.group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, self.activation,
                                            scale, shift)
        x, weight, bias = match_autocast(x, self.weight, self.bias)
        if torch.is_autocast_enabled(x.device.type):
            # scale and shift (an autocast Linear's output, or fp32) follow x as γ and β do
            scale, shift = (None if t is None else t.to(x.dtype) for t in (scale, shift))
        return ops.group_norm_act(x, self.num_groups, weight, bias, self.eps, self.activation, scale, shift)

    def extra_repr(self) -> str:
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"activation={self.activation!r}, fused={self.fused}")
