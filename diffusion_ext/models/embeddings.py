"""Timestep and class embeddings of the U-Net."""
from __future__ import annotations

import math

import torch


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """The sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim), float32.

    Vaswani et al. 2017, §3.5, as used for the diffusion time by Ho et al. 2020 (App. B):
    e_t = [cos(t·ω_0), …, cos(t·ω_{h−1}), sin(t·ω_0), …, sin(t·ω_{h−1})], ω_i = max_period^(−i/h), h = dim/2;
    an odd dim gets one zero column. Computed in float32 whatever the model's dtype: t·ω reaches 1000 rad,
    where half precision has no digits left for the phase.
    """
    if t.dim() != 1:
        raise ValueError(f"timestep_embedding: t must be 1-D (B,), got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(torch.nn.Module):
    """t -> sinusoidal(t) -> Linear -> SiLU -> Linear: the time embedding MLP of the DDPM U-Net."""

    def __init__(self, channels: int, embed_dim: int):
        super().__init__()
        self.channels = channels
        self.linear_1 = torch.nn.Linear(channels, embed_dim)
        self.linear_2 = torch.nn.Linear(embed_dim, embed_dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.channels).to(self.linear_1.weight.dtype)
        return self.linear_2(torch.nn.functional.silu(self.linear_1(emb)))
