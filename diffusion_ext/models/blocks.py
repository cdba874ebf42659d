"""The building blocks of the U-Net and the VAE, each with fused=True (diffusion_ext kernels) or
fused=False (eager PyTorch) and the same parameters either way."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import Dropout, GroupNormAct, SpatialSelfAttention
from ._config import one_of

# How a ResBlock takes the time embedding: "default" adds it before the second norm (Ho et al. 2020);
# "scale_shift" modulates the second norm with it, AdaGN (Nichol & Dhariwal 2021; diffusers'
# resnet_time_scale_shift="scale_shift").
TIME_EMBEDDING_NORMS = ("default", "scale_shift")


class ResBlock(torch.nn.Module):
    """The residual block of the DDPM U-Net (Ho et al. 2020, App. B; Dhariwal & Nichol 2021):
    h = conv1(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv2(dropout(SiLU(GN(h)))); out = skip(x) + h.
    With time_embedding_norm="scale_shift" (AdaGN, Nichol & Dhariwal 2021, sec. 3.1), Linear(SiLU(emb)) gives
    2·out_channels, split as (scale, shift), and the second norm becomes h = conv2(dropout(SiLU(GN(h)·(1 + scale)
    + shift))) with h = conv1(SiLU(GN(x))): one fused group_norm_act when fused.

    conv2 starts at zero, so a new block is the identity on its skip path (Ho et al.'s init_scale=0,
    Dhariwal & Nichol's zero_module): training starts from a well-conditioned network.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0,
                 num_groups: int = 32, fused: bool = True, time_embedding_norm: str = "default"):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.time_embedding_norm = one_of("ResBlock", "time_embedding_norm", time_embedding_norm,
                                          TIME_EMBEDDING_NORMS)
        self.norm1 = GroupNormAct(num_groups, in_channels, activation="silu", fused=fused)
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1)
        scale_shift = time_embedding_norm == "scale_shift"
        self.emb_proj = torch.nn.Linear(emb_dim, 2 * out_channels if scale_shift else out_channels)
        self.norm2 = GroupNormAct(num_groups, out_channels, activation="silu", fused=fused)
        self.dropout = (Dropout if fused else torch.nn.Dropout)(dropout)  # fused: the mask made in the kernel
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1)
        torch.nn.init.zeros_(self.conv2.weight)
        torch.nn.init.zeros_(self.conv2.bias)
        self.skip = (torch.nn.Identity() if in_channels == out_channels
                     else torch.nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # 1. h = conv1(SiLU(GroupNorm(x)))
        h = self.conv1(self.norm1(x))
        emb_out = self.emb_proj(F.silu(emb))
        if self.time_embedding_norm == "scale_shift":
            # 2-3. h = conv2(dropout(SiLU(GroupNorm(h)·(1 + scale) + shift))), (scale, shift) = the time (and
            #      class) embedding's two halves (AdaGN, Nichol & Dhariwal 2021, sec. 3.1)
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.conv2(self.dropout(self.norm2(h, scale, shift)))
        else:
            # 2. add the time (and class) embedding, one bias per channel
            h = h + emb_out[:, :, None, None]
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
