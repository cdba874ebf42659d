"""DDIM (Song et al. 2021, eq. 12): `steps` timesteps (50 by default) with σ_t(η) of eq. 16; η = 0 is
deterministic, η = 1 is DDPM's posterior on the respaced chain."""
from __future__ import annotations

import math

import torch

from .base import Sampler, State


class DDIM(Sampler):
    name = "ddim"

    def __init__(self, *args, eta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (math.isfinite(eta) and eta >= 0):
            raise ValueError(f"{self.who}: eta = {eta}; expected eta >= 0")
        self.eta = float(eta)

    def timesteps(self, steps: int, spacing: str) -> list[int]:
        return self.schedule.timesteps(steps, spacing).tolist()

    def kind(self, i: int, t: int, t_prev: int) -> str:
        return "ddim"

    def needs_noise(self, kind: str) -> bool:
        return self.eta > 0

    def update(self, kind, x, out, uncond, t, t_prev, t_last, state, *, guidance_scale, noise, seed,
               offset) -> tuple[torch.Tensor, State]:
        kw = self.step_kwargs(guidance_scale, uncond, seed, offset)
        return self.schedule.ddim_step(out, t, t_prev, x, self.eta, noise, **kw), state
