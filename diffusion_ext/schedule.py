"""NoiseSchedule: the β/ᾱ tables of a diffusion process and its fused forward and reverse steps.

Timesteps are 0-indexed, 0..T-1, as in diffusers. The tables are computed in float64 and the kernels get
the float64 ᾱ whatever the samples' dtype: they form each sample's coefficients in float64 and round them
once (csrc/common/schedule_math.h), so no step converts or copies a table, and the steps near t = 0 keep
the accuracy that 1 − ᾱ and β_t = 1 − ᾱ_t/ᾱ_{t−1} lose when formed from a float32 ᾱ.
"""
from __future__ import annotations

import math

import torch

from . import ops

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")
SPACINGS = ("leading", "trailing", "linspace", "karras")


def make_betas(num_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float) -> torch.Tensor:
    T = num_timesteps
    if beta_schedule == "linear":  # Ho et al. 2020
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if beta_schedule == "scaled_linear":  # Stable Diffusion / latent diffusion
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if beta_schedule == "cosine":
        # Nichol & Dhariwal 2021, eq. 17: ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2), s = 0.008,
        # β_t = 1 − ᾱ(t+1)/ᾱ(t) capped at 0.999 to avoid a singularity at t = T.
        s = 0.008
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"NoiseSchedule: beta_schedule {beta_schedule!r} is unknown; expected one of {BETA_SCHEDULES}")


def _as_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"NoiseSchedule: {name} must be an int, got {type(v).__name__}")
    return v


class NoiseSchedule:
    """A discrete diffusion schedule with T steps and the fused ops that use it.

    >>> sched = NoiseSchedule(1000, "linear", 1e-4, 0.02).to("cuda")
    >>> x_t, eps = sched.q_sample_with_noise(x0, t, seed=step)
    """

    def __init__(self, num_timesteps: int = 1000, beta_schedule: str = "linear", beta_start: float = 1e-4,
                 beta_end: float = 0.02):
        num_timesteps = _as_int("num_timesteps", num_timesteps)
        if num_timesteps < 1:
            raise ValueError(f"NoiseSchedule: num_timesteps = {num_timesteps}; expected at least 1")
        if beta_schedule != "cosine" and not (0 < beta_start <= beta_end < 1):
            raise ValueError(
                f"NoiseSchedule: beta_start = {beta_start}, beta_end = {beta_end}; expected 0 < beta_start <= beta_end < 1"
            )
        self.beta_schedule = beta_schedule
        self._set_alphas_cumprod(torch.cumprod(1 - make_betas(num_timesteps, beta_schedule, beta_start, beta_end), 0))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor) -> "NoiseSchedule":
        """A schedule from a given ᾱ table (1-D, finite, in (0, 1], strictly decreasing)."""
        self = cls.__new__(cls)
        self.beta_schedule = "custom"
        self._set_alphas_cumprod(torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64))
        return self

    def _set_alphas_cumprod(self, ac: torch.Tensor) -> None:
        if ac.dim() != 1 or ac.numel() < 1:
            raise ValueError(f"NoiseSchedule: alphas_cumprod must be a non-empty 1-D table, got shape {tuple(ac.shape)}")
        if not torch.isfinite(ac).all():
            raise ValueError("NoiseSchedule: alphas_cumprod holds non-finite values")
        if not ((ac > 0) & (ac <= 1)).all():
            raise ValueError("NoiseSchedule: alphas_cumprod must lie in (0, 1]")
        if ac.numel() > 1 and not (ac[1:] < ac[:-1]).all():
            i = int(torch.nonzero(ac[1:] >= ac[:-1])[0])
            raise ValueError(
                f"NoiseSchedule: alphas_cumprod must be strictly decreasing, but ᾱ[{i + 1}] = {ac[i + 1].item()} >= "
                f"ᾱ[{i}] = {ac[i].item()}"
            )
        self.num_timesteps = ac.numel()
        self.alphas_cumprod = ac
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        self.alphas_cumprod_prev = prev
        self.alphas = ac / prev
        self.betas = 1 - self.alphas
        self.sqrt_alphas_cumprod = ac.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - ac).sqrt()
        # q(x_{t-1} | x_t, x0) of Ho et al. 2020, eqs. 6-7
        self.posterior_variance = self.betas * (1 - prev) / (1 - ac)

    _DERIVED = ("alphas_cumprod", "alphas_cumprod_prev", "alphas", "betas", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "posterior_variance")

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    def to(self, device) -> "NoiseSchedule":
        """Moves the tables to `device` (like nn.Module.to: in place, returns self)."""
        for name in self._DERIVED:
            setattr(self, name, getattr(self, name).to(device))
        return self

    def __repr__(self) -> str:
        return f"NoiseSchedule(num_timesteps={self.num_timesteps}, beta_schedule={self.beta_schedule!r}, device={self.device})"

    # ------------------------------------------------------------------------------------------------
    def _table(self, x: torch.Tensor) -> torch.Tensor:
        if x.device != self.device:
            raise ValueError(
                f"NoiseSchedule: the schedule is on {self.device} but the tensor is on {x.device}; call sched.to(device)"
            )
        return self.alphas_cumprod

    def _timesteps(self, op: str, name: str, t, x: torch.Tensor, lowest: int = 0) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            return t
        t = _as_int(name, t)
        if not lowest <= t < self.num_timesteps:
            raise ValueError(f"diffusion_ext.{op}: {name} = {t} is outside [{lowest}, {self.num_timesteps - 1}]")
        return torch.full((x.shape[0] if x.dim() else 0,), t, dtype=torch.long, device=x.device)

    @staticmethod
    def _draw_seed() -> int:
        # From torch's default generator, so torch.manual_seed makes sampling reproducible.
        return int(torch.randint(0, 2**62, (1,)).item())

    # ------------------------------------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise; t a LongTensor [B] or an int for the whole batch."""
        return ops.q_sample(x0, self._timesteps("q_sample", "t", t, x0), noise, self._table(x0))

    def q_sample_with_noise(self, x0: torch.Tensor, t, seed: int, offset: int = 0,
                            per_sample_streams: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """q_sample with the noise made in the kernel from (seed, offset); returns (x_t, noise).
        per_sample_streams: sample b's noise is stream (seed, offset + b), the noise it would get alone
        (the trainer's rule: a sample's noise does not depend on the batch or rank it lands in). As with
        one stream, elements are numbered in the batch's memory order when it is dense (contiguous or
        channels_last); another strided batch is numbered as its contiguous copy."""
        t = self._timesteps("q_sample_with_noise", "t", t, x0)
        return ops.q_sample_with_noise(x0, t, self._table(x0), _as_int("seed", seed), _as_int("offset", offset),
                                       bool(per_sample_streams))

    def ddpm_step(self, model_output: torch.Tensor, t, x_t: torch.Tensor, noise: torch.Tensor | None = None, *,
                  seed: int | None = None, offset: int = 0, clip_sample: bool = True, clip_range: float = 1.0,
                  variance: str = "fixed_small", prediction_type: str = "epsilon", guidance_scale: float | None = None,
                  model_output_uncond: torch.Tensor | None = None) -> torch.Tensor:
        """One DDPM reverse step x_t → x_{t−1}; noise given, or made in the kernel from seed (drawn from
        torch's generator when neither is given)."""
        t = self._timesteps("ddpm_step", "t", t, x_t)
        if noise is None and seed is None:
            seed = self._draw_seed()
        return ops.ddpm_step(model_output, t, x_t, self._table(x_t), noise, 0 if seed is None else _as_int("seed", seed),
                             _as_int("offset", offset), clip_sample, clip_range, variance, prediction_type,
                             guidance_scale, model_output_uncond)

    def ddim_step(self, model_output: torch.Tensor, t, t_prev, x_t: torch.Tensor, eta: float = 0.0,
                  noise: torch.Tensor | None = None, *, seed: int | None = None, offset: int = 0,
                  clip_sample: bool = False, clip_range: float = 1.0, prediction_type: str = "epsilon",
                  guidance_scale: float | None = None, model_output_uncond: torch.Tensor | None = None) -> torch.Tensor:
        """One DDIM step x_t → x_{t_prev} (t_prev = −1: the clean end, ᾱ_prev = 1)."""
        t = self._timesteps("ddim_step", "t", t, x_t)
        t_prev = self._timesteps("ddim_step", "t_prev", t_prev, x_t, lowest=-1)
        if not isinstance(eta, (int, float)) or isinstance(eta, bool):
            raise TypeError(f"diffusion_ext.ddim_step: eta must be a number, got {type(eta).__name__}")
        if eta > 0 and noise is None and seed is None:
            seed = self._draw_seed()
        return ops.ddim_step(model_output, t, t_prev, x_t, self._table(x_t), eta, noise,
                             0 if seed is None else _as_int("seed", seed), _as_int("offset", offset), clip_sample,
                             clip_range, prediction_type, guidance_scale, model_output_uncond)

    def dpmpp_2m_step(self, model_output: torch.Tensor, t, t_prev, x_t: torch.Tensor,
                      x0_last: torch.Tensor | None = None, t_last=None, *, sde: bool = False,
                      noise: torch.Tensor | None = None, seed: int | None = None, offset: int = 0,
                      clip_sample: bool = False, clip_range: float = 1.0, prediction_type: str = "epsilon",
                      guidance_scale: float | None = None,
                      model_output_uncond: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DPM-Solver++ step x_t → x_{t_prev} (t_prev = −1: the clean end); second order (2M) given the
        last step's x̂0 and timestep (x0_last, t_last), else first order; sde: the SDE variant, its noise
        given or made in the kernel from seed (drawn from torch's generator when neither is given).
        Returns (x_prev, x̂0): pass x̂0 and t as the next step's x0_last and t_last."""
        t = self._timesteps("dpmpp_2m_step", "t", t, x_t)
        t_prev = self._timesteps("dpmpp_2m_step", "t_prev", t_prev, x_t, lowest=-1)
        if t_last is not None:
            t_last = self._timesteps("dpmpp_2m_step", "t_last", t_last, x_t)
        if sde and noise is None and seed is None:
            seed = self._draw_seed()
        return ops.dpmpp_2m_step(model_output, t, t_prev, x_t, self._table(x_t), x0_last, t_last, bool(sde), noise,
                                 0 if seed is None else _as_int("seed", seed), _as_int("offset", offset), clip_sample,
                                 clip_range, prediction_type, guidance_scale, model_output_uncond)

    def timesteps(self, num_inference_steps: int, spacing: str = "leading", *, clean_end: bool = False) -> torch.Tensor:
        """The descending sampling sequence of num_inference_steps timesteps, as diffusers spaces them (Lin et
        al. 2024, "Common diffusion noise schedules and sample steps are flawed", table 2). The chain's last
        step goes from the last of them to the clean end (ᾱ = 1).

        clean_end=False: the n timesteps themselves are spaced over 0..T−1, as diffusers' DDPM and DDIM
        schedulers do ("linspace" and "leading" end at t = 0). clean_end=True: n + 1 points are spaced with
        the clean end as the last and the first n returned, as its DPMSolverMultistepScheduler does, so no
        model call is spent at t = 0 ("trailing" is the same either way). "karras": the timesteps nearest
        (in log σ, σ = √((1−ᾱ)/ᾱ)) to the noise levels σ_i = (σ_max^{1/ρ} + i/(n−1)·(σ_min^{1/ρ} −
        σ_max^{1/ρ}))^ρ, ρ = 7, of Karras et al. 2022, eq. 5, from σ(T−1) down to σ(0), which spend more
        steps at low noise; as diffusers' use_karras_sigmas, but rounded to the table's timesteps (the ops
        take integer t), so steps that round to one timestep are an error."""
        n, T = _as_int("num_inference_steps", num_inference_steps), self.num_timesteps
        if not 1 <= n <= T:
            raise ValueError(f"NoiseSchedule.timesteps: num_inference_steps = {n}; expected 1..{T}")
        grid = n + 1 if clean_end else n  # points spaced; with clean_end the last (t = 0 or below) is dropped
        if spacing == "leading":
            ts = torch.arange(grid, dtype=torch.float64) * (T // grid)
        elif spacing == "trailing":
            ts = torch.arange(T, 0, -T / n, dtype=torch.float64).round().flip(0) - 1
        elif spacing == "linspace":
            ts = torch.linspace(0, T - 1, grid, dtype=torch.float64)
        elif spacing == "karras":
            return self._karras_timesteps(n)
        else:
            raise ValueError(f"NoiseSchedule.timesteps: spacing {spacing!r} is unknown; expected one of {SPACINGS}")
        ts = ts.round().long().flip(0)
        return ts[:n] if clean_end else ts

    def _karras_timesteps(self, n: int) -> torch.Tensor:
        if self.num_timesteps == 1:
            return torch.zeros(1, dtype=torch.long)
        log_sigma = (0.5 * ((1 - self.alphas_cumprod) / self.alphas_cumprod).log()).cpu()  # increasing in t
        rho = 7.0
        ramp = torch.linspace(0, 1, n, dtype=torch.float64)
        hi, lo = log_sigma[-1].exp() ** (1 / rho), log_sigma[0].exp() ** (1 / rho)
        target = ((hi + ramp * (lo - hi)) ** rho).log()
        # the fractional timestep by linear interpolation of log σ between neighbouring timesteps, rounded
        i = torch.searchsorted(log_sigma, target).clamp(1, self.num_timesteps - 1)
        w = ((target - log_sigma[i - 1]) / (log_sigma[i] - log_sigma[i - 1])).clamp(0, 1)
        ts = ((i - 1) + w).round().long()
        if (ts[1:] >= ts[:-1]).any():
            j = int(torch.nonzero(ts[1:] >= ts[:-1])[0])
            raise ValueError(f"NoiseSchedule.timesteps: {n} karras steps round two noise levels to timestep "
                             f"{int(ts[j])} of this {self.num_timesteps}-step table; use fewer steps or another "
                             f"spacing")
        return ts
