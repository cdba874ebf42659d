"""The networks: UNet (the denoiser) and VAE (the first stage of latent diffusion), each built with
fused=True (diffusion_ext kernels) or fused=False (eager PyTorch) from the same config and state_dict."""
from __future__ import annotations

import torch

from .unet import UNet
from .vae import VAE

MODELS = {"unet": UNet, "vae": VAE}


def build_model(kind: str, config: dict, *, fused: bool = True) -> torch.nn.Module:
    """MODELS[kind](**config, fused=fused); config is a model's `config` (e.g. from a checkpoint)."""
    if kind not in MODELS:
        raise ValueError(f"build_model: kind {kind!r} is unknown; expected one of {sorted(MODELS)}")
    if not isinstance(config, dict):
        raise TypeError(f"build_model: config must be a dict, got {type(config).__name__}")
    cfg = dict(config)
    if "fused" in cfg:  # a config may carry it; the argument wins
        cfg.pop("fused")
    try:
        return MODELS[kind](**cfg, fused=fused)
    except TypeError as e:
        raise ValueError(f"build_model: bad config for {kind!r}: {e}") from None


__all__ = ["UNet", "VAE", "build_model", "MODELS"]
