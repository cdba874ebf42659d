"""DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models"): the multistep second-order solver in data-prediction form, DPM-Solver++(2M) (Algorithm 2), and
its SDE variant, as diffusers' DPMSolverMultistepScheduler runs them (solver_order=2, solver_type="midpoint",
final_sigmas_type="zero").

The timesteps are spaced as diffusers' DPM-Solver spaces them (NoiseSchedule.timesteps with clean_end=True:
no model call is spent at t = 0; "linspace" by default, as diffusers). Each step is one fused dpmpp_2m_step,
which also returns its x̂0: the state carried to the next step. Lower orders where the paper and diffusers
take them: the first step is first order (no x̂0 of a step before exists), and so is the last, to the clean
end σ = 0, where h = ∞ (the op forces that itself, csrc/common/schedule_math.h; diffusers' lower_order_final
changes nothing more for order 2 with a final σ of 0).
"""
from __future__ import annotations

import torch

from .base import Sampler, State


class DPMSolverPP(Sampler):
    name = "dpmpp_2m"
    default_spacing = "linspace"
    sde = False

    def default_steps(self) -> int:
        return min(20, self.schedule.num_timesteps)

    def timesteps(self, steps: int, spacing: str) -> list[int]:
        return self.schedule.timesteps(steps, spacing, clean_end=True).tolist()

    def kind(self, i: int, t: int, t_prev: int) -> str:
        return "first_order" if i == 0 or t_prev == -1 else "second_order"

    def needs_noise(self, kind: str) -> bool:
        return self.sde

    def initial_state(self, x: torch.Tensor) -> State:
        return (torch.zeros_like(x),)  # x̂0 of the step before; read only by second-order steps

    def update(self, kind, x, out, uncond, t, t_prev, t_last, state, *, guidance_scale, noise, seed,
               offset) -> tuple[torch.Tensor, State]:
        kw = self.step_kwargs(guidance_scale, uncond, seed, offset)
        last = (state[0], t_last) if kind == "second_order" else (None, None)
        x_prev, x0 = self.schedule.dpmpp_2m_step(out, t, t_prev, x, *last, sde=self.sde, noise=noise, **kw)
        return x_prev, (x0,)


class DPMSolverPPSDE(DPMSolverPP):
    """SDE-DPM-Solver++(2M): the same exponential integrator on the reverse SDE, which adds noise at every
    step but the last (diffusers' algorithm_type="sde-dpmsolver++")."""

    name = "dpmpp_2m_sde"
    sde = True
