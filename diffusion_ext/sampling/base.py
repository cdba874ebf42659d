"""The step interface every sampler family implements (Sampler), the plan it walks (Step), and the eager
chain that walks it.

A sampler family turns a step count and a spacing into a plan, a list of Steps t -> t_prev (t_prev = −1:
the clean end, ᾱ = 1), each tagged with the fused update it runs (its `kind`: one CUDA graph per kind in
graphed.py). A step is one model call (model_call.predict) and one fused update (Sampler.update), which may
carry a state from step to step in tensors (the multistep DPM-Solver++ carries the last step's x̂0), so
that a CUDA graph can keep it in static buffers. Everything a step reads is a tensor: nothing reads a
device value on the host, so a graph can capture it.

Randomness: the chain starts from Philox stream (seed, 0) and step i draws its noise from stream
(seed, i + 1), so the same seed gives the same image on every backend (DESIGN.md, "Randomness").
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import Callable, ClassVar

import torch

from .. import reference
from ..schedule import NoiseSchedule
from .model_call import eval_mode, predict


@dataclasses.dataclass(frozen=True)
class Step:
    t: int
    t_prev: int  # −1: the clean end (ᾱ = 1)
    kind: str  # the fused update of this step (the family's names; one CUDA graph each)
    t_last: int = -1  # the timestep of the step before (multistep solvers read its x̂0); −1 at the first


State = tuple  # tensors a family carries from one step to the next (empty for memoryless samplers)


def check_sample_args(who: str, shape, guidance_scale: float | None, y: torch.Tensor | None,
                      cond: torch.Tensor | None) -> tuple[int, ...]:
    """The sample shape as a tuple of ints, after checking the arguments every sampler shares."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[0] < 1:
        raise ValueError(f"{who}: shape must be (B, C, ...) with B >= 1, got {shape}")
    if guidance_scale is not None and y is None:
        raise ValueError(f"{who}: guidance_scale needs class labels y (guidance contrasts y with the null class)")
    if y is not None and y.shape != (shape[0],):
        raise ValueError(f"{who}: y must have shape ({shape[0]},), got {tuple(y.shape)}")
    if cond is not None and (cond.dim() != len(shape) or cond.shape[0] != shape[0] or cond.shape[2:] != shape[2:]):
        raise ValueError(f"{who}: cond must be (B, Cc, ...) matching shape {shape}, got {tuple(cond.shape)}")
    return shape


def on_device(schedule: NoiseSchedule, device) -> NoiseSchedule:
    """The schedule with its tables on `device` (moved there when they are not: moving drops its cached
    tables); "cuda" is the current CUDA device, as tensors report it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if schedule.device != device:
        schedule.to(device)
    return schedule


def initial_noise(shape: tuple[int, ...], seed: int, dtype: torch.dtype, device) -> torch.Tensor:
    """x_T ~ N(0, I): Philox stream (seed, 0), the generator of the kernels."""
    return reference.philox_normal(math.prod(shape), seed, 0, dtype, device).view(shape)


class Sampler(abc.ABC):
    """A sampler family over a schedule and a prediction type. clip_range: x̂0 is clipped to [−r, r] at every
    step and so is the result (the data range: 1 for images in [−1, 1]; None for latents, which are
    unbounded). `who` names the caller in error messages."""

    name: ClassVar[str]
    default_spacing: ClassVar[str] = "leading"

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", *, clip_range: float | None = 1.0,
                 who: str = "Sampler"):
        self.schedule, self.prediction_type, self.clip_range, self.who = schedule, prediction_type, clip_range, who

    # -- the plan -------------------------------------------------------------------------------------------
    def default_steps(self) -> int:
        return min(50, self.schedule.num_timesteps)

    def check_steps(self, steps: int | None) -> int:
        T = self.schedule.num_timesteps
        steps = self.default_steps() if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise ValueError(f"{self.who}: steps = {steps!r}; expected an int in 1..{T}")
        return steps

    @abc.abstractmethod
    def timesteps(self, steps: int, spacing: str) -> list[int]:
        """The descending timesteps of the model calls, `steps` of them."""

    @abc.abstractmethod
    def kind(self, i: int, t: int, t_prev: int) -> str:
        """The fused update of step i, t -> t_prev."""

    def plan(self, steps: int | None = None, spacing: str | None = None) -> list[Step]:
        """The steps of the chain: `steps` model calls (the family's default when None) at the timesteps of
        NoiseSchedule.timesteps with `spacing` (the family's default when None), the last step to t_prev = −1."""
        ts = self.timesteps(self.check_steps(steps), spacing or self.default_spacing)
        prev = ts[1:] + [-1]
        return [Step(t, p, self.kind(i, t, p), ts[i - 1] if i else -1) for i, (t, p) in enumerate(zip(ts, prev))]

    # -- one step -------------------------------------------------------------------------------------------
    def needs_noise(self, kind: str) -> bool:
        """Whether a step of this kind adds noise (a CUDA graph draws it with torch.randn)."""
        return False

    def initial_state(self, x: torch.Tensor) -> State:
        return ()

    @abc.abstractmethod
    def update(self, kind: str, x: torch.Tensor, out: torch.Tensor, uncond: torch.Tensor | None, t: torch.Tensor,
               t_prev: torch.Tensor, t_last: torch.Tensor, state: State, *, guidance_scale: float | None,
               noise: torch.Tensor | None, seed: int, offset: int) -> tuple[torch.Tensor, State]:
        """x_{t_prev} and the new state from the model's output at x_t: one fused op. t, t_prev, t_last are
        (B,) timesteps; the noise is given or made from Philox stream (seed, offset)."""

    def step_kwargs(self, guidance_scale: float | None, uncond: torch.Tensor | None, seed: int, offset: int) -> dict:
        """The keyword arguments every fused step of NoiseSchedule shares."""
        clip = self.clip_range is not None
        return dict(seed=seed, offset=offset, clip_sample=clip, clip_range=self.clip_range if clip else 1.0,
                    prediction_type=self.prediction_type, guidance_scale=guidance_scale, model_output_uncond=uncond)

    def step(self, model, x: torch.Tensor, t: torch.Tensor, t_prev: torch.Tensor, t_last: torch.Tensor, kind: str,
             state: State = (), *, guidance_scale: float | None = None, y: torch.Tensor | None = None,
             cond: torch.Tensor | None = None, noise: torch.Tensor | None = None, seed: int = 0,
             offset: int = 0) -> tuple[torch.Tensor, State]:
        """One step of the chain: 1. the model's prediction at x_t (both halves under guidance), 2. the
        fused update, which applies the guidance ε̃ = ε_∅ + w·(ε_y − ε_∅) itself."""
        out, uncond = predict(model, x, t, y=y, cond=cond, guidance_scale=guidance_scale, who=self.who)
        return self.update(kind, x, out, uncond, t, t_prev, t_last, state, guidance_scale=guidance_scale,
                           noise=noise, seed=seed, offset=offset)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The result in the data range."""
        return x if self.clip_range is None else x.clamp(-self.clip_range, self.clip_range)

    # -- the eager chain ------------------------------------------------------------------------------------
    def run(self, model, x: torch.Tensor, plan: list[Step], *, guidance_scale: float | None = None,
            y: torch.Tensor | None = None, cond: torch.Tensor | None = None, seed: int = 0, progress: bool = False,
            callback: Callable[[int, int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """The reverse chain x_T -> … -> x_0 of `plan` from x = x_T, step i drawing its noise from Philox
        stream (seed, i + 1); callback(i, t, x_{t_prev}) after step i. Returns finish(x_0)."""
        steps = enumerate(plan)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, total=len(plan), desc=f"{self.name} sampling")
        state = self.initial_state(x)
        B = x.shape[0]

        def full(v):
            return torch.full((B,), v, dtype=torch.long, device=x.device)

        with eval_mode(model):
            for i, s in steps:
                x, state = self.step(model, x, full(s.t), full(s.t_prev), full(s.t_last), s.kind, state,
                                     guidance_scale=guidance_scale, y=y, cond=cond, seed=seed, offset=i + 1)
                if callback is not None:
                    callback(i, s.t, x)
        return self.finish(x)
