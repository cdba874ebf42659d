"""SpatialSelfAttention: the self-attention block of the DDPM U-Net and the VAE, over the H×W tokens."""
from __future__ import annotations

import torch

from .. import ops, reference
from .group_norm_act import GroupNormAct


class SpatialSelfAttention(torch.nn.Module):
    """x + proj_out(attention(qkv(GroupNorm(x)))) over the H·W positions of a (B, C, H, W) map (Ho et al.
    2020, App. B; the block of Dhariwal & Nichol 2021 with several heads).

    The 1×1 projections are nn.Linear over tokens: the normalised map is seen as (B, H·W, C), the packed
    qkv projection (B, L, 3, heads, head_dim) is sliced into q, k, v without a copy (the attention kernels
    read any strides with the head dim innermost), and the attention output, (B, L, heads, head_dim) in
    memory, merges its heads back for free. proj_out starts at zero, so a new block is the identity
    (Dhariwal & Nichol 2021, as in their zero_module).

    fused=True runs group_norm_act(activation="none") and the flash-style attention of diffusion_ext.ops;
    fused=False runs eager PyTorch (F.group_norm and softmax(q·kᵀ)·v with the scores materialised) with the
    same parameters and state_dict.
    """

    def __init__(self, channels: int, num_heads: int | None = None, head_dim: int | None = None,
                 num_groups: int = 32, eps: float = 1e-5, fused: bool = True):
        super().__init__()
        if num_heads is not None and head_dim is not None and num_heads * head_dim != channels:
            raise ValueError(f"SpatialSelfAttention: num_heads = {num_heads} × head_dim = {head_dim} != channels = "
                             f"{channels}; give one of them, or both with a product equal to channels")
        if head_dim is not None:
            if head_dim < 1 or channels % head_dim:
                raise ValueError(f"SpatialSelfAttention: channels = {channels} is not divisible by head_dim = {head_dim}")
            num_heads = channels // head_dim
        num_heads = num_heads or 1
        if num_heads < 1 or channels % num_heads:
            raise ValueError(f"SpatialSelfAttention: channels = {channels} is not divisible by num_heads = {num_heads}")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, channels // num_heads
        self.fused = fused
        self.norm = GroupNormAct(num_groups, channels, eps=eps, activation="none", fused=fused)
        self.qkv = torch.nn.Linear(channels, 3 * channels)
        self.proj_out = torch.nn.Linear(channels, channels)
        torch.nn.init.zeros_(self.proj_out.weight)
        torch.nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        spatial = x.shape[2:]
        # 1. normalise, then see the map as tokens (B, L, C)
        tokens = self.norm(x).flatten(2).transpose(1, 2)
        # 2. q, k, v = tokens·W_qkv, each (B, heads, L, head_dim) sliced from one (B, L, 3, heads, head_dim)
        qkv = self.qkv(tokens).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        # 3. softmax(q·kᵀ/√head_dim)·v (Vaswani et al. 2017, eq. 1)
        attn = ops.attention if self.fused else reference.attention
        out = attn(q, k, v, self.head_dim ** -0.5)
        # 4. merge heads (B, L, C), project, back to (B, C, *spatial), residual
        out = self.proj_out(out.transpose(1, 2).reshape(B, -1, C))
        return x + out.transpose(1, 2).reshape(B, C, *spatial)

    def extra_repr(self) -> str:
        return f"{self.channels}, num_heads={self.num_heads}, head_dim={self.head_dim}, fused={self.fused}"
