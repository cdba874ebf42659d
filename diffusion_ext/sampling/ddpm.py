"""DDPM: ancestral sampling (Ho et al. 2020, Alg. 2), every timestep by default. With fewer steps the chain
is respaced: a step with t_prev = t − 1 is DDPM's own, any other is DDIM's with η = 1, which is DDPM's
posterior q(x_{t_prev} | x_t, x̂0) on the respaced chain (Song et al. 2021, eq. 16)."""
from __future__ import annotations

import torch

from .base import Sampler, State


class DDPM(Sampler):
    name = "ddpm"

    def default_steps(self) -> int:
        return self.schedule.num_timesteps

    def timesteps(self, steps: int, spacing: str) -> list[int]:
        if steps == self.schedule.num_timesteps:
            return list(range(steps - 1, -1, -1))
        return self.schedule.timesteps(steps, spacing).tolist()

    def kind(self, i: int, t: int, t_prev: int) -> str:
        return "ddpm" if t_prev == t - 1 else "ddim"

    def needs_noise(self, kind: str) -> bool:
        return True

    def update(self, kind, x, out, uncond, t, t_prev, t_last, state, *, guidance_scale, noise, seed,
               offset) -> tuple[torch.Tensor, State]:
        kw = self.step_kwargs(guidance_scale, uncond, seed, offset)
        if kind == "ddpm":
            return self.schedule.ddpm_step(out, t, x, noise, **kw), state
        return self.schedule.ddim_step(out, t, t_prev, x, 1.0, noise, **kw), state
