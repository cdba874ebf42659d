"""The building blocks of the U-Net and the VAE, each with fused=True (diffusion_ext kernels) or
fused=False (eager PyTorch) and the same parameters either way."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import GroupNormAct, SpatialSelfAttention


class ResBlock(torch.nn.Module):
    """The residual block of the DDPM U-Net (Ho et al. 2020, App. B; Dhariwal & Nichol 2021):
    h = conv1(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv2(dropout(SiLU(GN(h)))); out = skip(x) + h.

    conv2 starts at zero, so a new block is the identity on its skip path (Ho et al.'s init_scale=0,
    Dhariwal & Nichol's zero_module): training starts from a well-conditioned network.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0,
                 num_groups: int = 32, fused: bool = True):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = GroupNormAct(num_groups, in_channels, activation="silu", fused=fused)
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = torch.nn.Linear(emb_dim, out_channels)
        self.norm2 = GroupNormAct(num_groups, out_channels, activation="silu", fused=fused)
        self.dropout = torch.nn.Dropout(dropout)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        torch.nn.init.zeros_(self.conv2.weight)
        torch.nn.init.zeros_(self.conv2.bias)
        self.skip = (torch.nn.Identity() if in_channels == out_channels
                     else torch.nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # 1. h = conv1(SiLU(GroupNorm(x)))
        h = self.conv1(self.norm1(x))
        # 2. add the time (and class) embedding, one bias per channel
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        # 3. h = conv2(dropout(SiLU(GroupNorm(h))))
        h = self.conv2(self.dropout(self.norm2(h)))
        # 4. residual
        return self.skip(x) + h


class AttentionBlock(SpatialSelfAttention):
    """SpatialSelfAttention that accepts (and ignores) the embedding, so it sits in a TimestepSequential."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        return super().forward(x)


class Downsample(torch.nn.Module):
    """A 3×3 convolution with stride 2: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        return self.conv(x)


class Upsample(torch.nn.Module):
    """Nearest-neighbour ×2, then a 3×3 convolution (no checkerboard artefacts; Odena et al. 2016)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepSequential(torch.nn.Sequential):
    """nn.Sequential whose layers all take (x, emb)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb)
        return x


class VAEResBlock(torch.nn.Module):
    """The VAE's residual block: (conv 3×3, GroupNorm, ReLU) ×2 plus a skip (1×1 conv when the channel
    count changes): out = skip(x) + ReLU(GN(conv2(ReLU(GN(conv1(x))))))."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32, fused: bool = True):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = GroupNormAct(num_groups, out_channels, activation="relu", fused=fused)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = GroupNormAct(num_groups, out_channels, activation="relu", fused=fused)
        self.skip = (torch.nn.Identity() if in_channels == out_channels
                     else torch.nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # 1. h = ReLU(GroupNorm(conv1(x)))
        h = self.norm1(self.conv1(x))
        # 2. h = ReLU(GroupNorm(conv2(h)))
        h = self.norm2(self.conv2(h))
        # 3. residual
        return self.skip(x) + h
