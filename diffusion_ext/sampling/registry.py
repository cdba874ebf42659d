"""The sampler families by name, for Diffusion.sample, the graphed runner and the command line."""
from __future__ import annotations

from ..schedule import NoiseSchedule
from .base import Sampler
from .ddim import DDIM
from .ddpm import DDPM
from .dpm_solver import DPMSolverPP, DPMSolverPPSDE

SAMPLERS: dict[str, type[Sampler]] = {c.name: c for c in (DDPM, DDIM, DPMSolverPP, DPMSolverPPSDE)}


def make(name: str, schedule: NoiseSchedule, prediction_type: str = "epsilon", *, eta: float = 0.0,
         clip_range: float | None = 1.0, who: str = "Diffusion.sample") -> Sampler:
    """The sampler `name` (ddpm, ddim, dpmpp_2m, dpmpp_2m_sde) over the schedule; eta is DDIM's η."""
    if name not in SAMPLERS:
        raise ValueError(f"{who}: sampler {name!r} is unknown; expected one of {tuple(SAMPLERS)}")
    if name == "ddim":
        return DDIM(schedule, prediction_type, eta=eta, clip_range=clip_range, who=who)
    if eta != 0:
        raise ValueError(f"{who}: eta = {eta} applies to the ddim sampler only (ddpm is η = 1; dpmpp_2m_sde is the "
                         f"stochastic DPM-Solver++)")
    return SAMPLERS[name](schedule, prediction_type, clip_range=clip_range, who=who)
