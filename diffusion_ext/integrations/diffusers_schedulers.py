"""DDPMScheduler and DDIMScheduler `add_noise` and `step`, and DPMSolverMultistepScheduler `step`, on the fused
ops, with the scheduler's own config.

- add_noise(x0, ε, t) = √ᾱ_t·x0 + √(1−ᾱ_t)·ε (Ho et al. 2020, eq. 4) is one q_sample pass with the given ε.
- DDPM step (Ho et al. 2020, eqs. 6-7, 15; diffusers' numbered steps 1-6) is one ddpm_step pass. The kernel
  steps from position i to i − 1 of its ᾱ table, so a respaced chain (set_timesteps(n < T), custom
  timesteps) gets the table of its own timesteps, ascending: the same ᾱ_t, ᾱ_prev, β_t = 1 − ᾱ_t/ᾱ_prev as
  diffusers' previous_timestep() gives, without its per-step search of the timestep list. When the chain
  ends at t > 0 (trailing spacing, steps_offset), diffusers still adds noise at its last step (ᾱ_prev = 1):
  a leading 1 in the table puts that step at position 1, so the kernel adds it too.
- DDIM step (Song et al. 2021, eqs. 12 and 16) is one ddim_step pass, t_prev = t − T // n as diffusers
  computes it, ᾱ_prev = final_alpha_cumprod below 0 (1, or ᾱ_0 when set_alpha_to_one is off).
- pred_original_sample (x̂0, clipped as configured) is one more ddim_step pass to t_prev = −1 with η = 0,
  where x_prev = √1·x̂0 + √0·ε̂ = x̂0.
- DPM-Solver++ step (Lu et al. 2022b: first order, §4.1; 2M, Algorithm 2, diffusers' "midpoint" form; the SDE
  variant "sde-dpmsolver++") is one dpmpp_2m_step pass that also returns this step's x̂0, which goes into the
  scheduler's model_outputs as diffusers' convert_model_output would put it; its σs are those of the integer
  timesteps (σ² = (1 − ᾱ)/ᾱ), so the kernel's ᾱ table gives them, and a final σ of 0 (final_sigmas_type
  "zero") is t_prev = −1, σ_min is t_prev = 0. diffusers' order rules are kept: first order at the first step
  and where lower_order_final / euler_at_final / a final σ of 0 ask for it. diffusers computes this step in
  fp32 (its sample upcast, the result cast to the dtype of model output and sample together); the kernel
  does too (fp64 for fp64 samples).

Noise: `step` draws it with diffusers' randn_tensor, the same call with the same generator under the same
condition as diffusers (DDPM: t > 0; DDIM: η > 0), so a seeded pipeline gives the same images patched or
not. Nothing is read back from the device per step: timesteps given as Python ints or CPU tensors (what
DDPMPipeline and DDIMPipeline pass) are read on the host for free; a timestep on the GPU is looked up on the
GPU (a DDPM step then always draws its noise, which the kernel zeroes at the last step: the generator
advances once more than diffusers' — whose own `if t > 0` on a GPU tensor is a host sync).

Whatever the fused ops do not express runs diffusers' code: dynamic thresholding, learned or log
variances, use_clipped_model_output with clipping, dtypes and devices the kernels do not take; for
DPM-Solver the noise-prediction algorithms ("dpmsolver", "sde-dpmsolver"), third order, the "heun" solver
type, σ schedules between the training timesteps (Karras, exponential, beta, Lu λ, flow σ) and flow
prediction.
"""
from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_ddim import DDIMSchedulerOutput
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput
from diffusers.schedulers.scheduling_utils import SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from .. import ops
from .binding import bind, patch_function, taken_by_someone_else, unbind
from .fused_norm import runs_fused

SCHEDULERS = (DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_VARIANCES = ("fixed_small", "fixed_large")
DPM_ALGORITHMS = {"dpmsolver++": False, "sde-dpmsolver++": True}  # algorithm_type -> sde
DPM_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                       "use_flow_sigmas", "use_dynamic_shifting")
_THRESHOLDING = "thresholding=True (dynamic thresholding's per-sample quantile is not in the fused step)"
_CACHE = "_diffusion_ext_tables"
METHODS = ("add_noise", "step")


# ----------------------------------------------------------------------------------------------------
# tables: ᾱ per (device, accumulation dtype), rebuilt when the scheduler's tensors change
# ----------------------------------------------------------------------------------------------------
class _Tables:
    """The ᾱ tables and timestep maps the kernels index, made once per scheduler state and device."""

    def __init__(self, sched):
        self.alphas, self.timesteps = sched.alphas_cumprod, sched.timesteps
        self.respaced = isinstance(sched, DDPMScheduler) and bool(sched.custom_timesteps or sched.num_inference_steps)
        self.key = (sched.num_inference_steps, getattr(sched, "custom_timesteps", None))
        ac = self.alphas.detach().to("cpu", torch.float64)
        self.ddpm_index: dict[int, int] = {}
        chain = ac
        if self.respaced:  # the chain's own ᾱ, ascending in t (one read of the timesteps per set_timesteps)
            ts = sorted(int(t) for t in self.timesteps.detach().cpu().tolist())
            lead = ts[0] > 0  # the last step is at t > 0: diffusers adds noise there, towards ᾱ_prev = 1
            chain = torch.cat([ac.new_ones(int(lead)), ac[ts]])
            self.ddpm_index = {t: i + int(lead) for i, t in enumerate(ts)}
        self._host = {"alphas": ac, "chain": chain}
        self._on: dict[tuple, torch.Tensor] = {}
        self._host_timesteps: list[int] | None = None

    def host_timesteps(self) -> list[int]:
        """The chain's timesteps as ints (one read from their device per set_timesteps)."""
        if self._host_timesteps is None:
            self._host_timesteps = [int(t) for t in self.timesteps.detach().cpu().tolist()]
        return self._host_timesteps

    def fresh(self, sched) -> bool:
        return self.alphas is sched.alphas_cumprod and self.timesteps is sched.timesteps and \
            self.key == (sched.num_inference_steps, getattr(sched, "custom_timesteps", None))

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Table `name` on like's device, fp64 for fp64 samples and fp32 otherwise (the kernels' rule)."""
        acc = torch.float64 if like.dtype == torch.float64 else torch.float32
        key = (name, like.device, acc)
        t = self._on.get(key)
        if t is None:
            t = self._on[key] = self._host[name].to(like.device, acc)
        return t

    def ddpm_index_on(self, device: torch.device) -> torch.Tensor:
        """t -> its position in the chain table, on `device` (−1 for a t outside the chain)."""
        key = ("index", device, torch.long)
        t = self._on.get(key)
        if t is None:
            n = self._host["alphas"].numel()
            idx = torch.arange(n) if not self.respaced else torch.full((n,), -1, dtype=torch.long)
            for ts, i in self.ddpm_index.items():
                idx[ts] = i
            t = self._on[key] = idx.to(device)
        return t


def _tables(sched) -> _Tables:
    tables = vars(sched).get(_CACHE)
    if tables is None or not tables.fresh(sched):
        tables = vars(sched)[_CACHE] = _Tables(sched)
    return tables


def _on_host(timestep) -> bool:
    return not isinstance(timestep, torch.Tensor) or timestep.device.type == "cpu"


def _batch_t(value, like: torch.Tensor) -> torch.Tensor:
    """A (B,) int64 timestep tensor on like's device from a host int (a fill, no copy from the host)."""
    return torch.full((like.shape[0],), value, dtype=torch.long, device=like.device)


def _step_args_ok(sched, model_output: torch.Tensor, sample: torch.Tensor) -> bool:
    return (runs_fused(sample) and runs_fused(model_output) and model_output.shape == sample.shape
            and model_output.device == sample.device and sample.dim() >= 1 and sample.shape[0] > 0
            and sched.config.prediction_type in PREDICTION_TYPES and not sched.config.thresholding)


def _promoted(model_output: torch.Tensor, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in the dtype diffusers' arithmetic gives them (a bf16 model output under autocast meets an fp32
    sample in fp32): the kernels take one dtype."""
    dtype = torch.promote_types(model_output.dtype, sample.dtype)
    return model_output.to(dtype), sample.to(dtype)


def _noise_like(model_output: torch.Tensor, generator, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' draw (randn_tensor in the model output's dtype: the same numbers, the same generator state),
    in the dtype the step runs in."""
    return randn_tensor(model_output.shape, generator=generator, device=model_output.device,
                        dtype=model_output.dtype).to(dtype)


def _x0(sched, model_output, t, sample, table) -> torch.Tensor:
    """pred_original_sample: a DDIM step to ᾱ_prev = 1 with η = 0 is x̂0 itself (clipped as configured)."""
    cfg = sched.config
    return ops.ddim_step(model_output, t, torch.full_like(t, -1), sample, table, 0.0, clip_sample=cfg.clip_sample,
                         clip_range=cfg.clip_sample_range, prediction_type=cfg.prediction_type)


# ----------------------------------------------------------------------------------------------------
# add_noise
# ----------------------------------------------------------------------------------------------------
@patch_function
def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """√ᾱ_t·x0 + √(1−ᾱ_t)·noise in one pass, with exactly the given noise (Ho et al. 2020, eq. 4)."""
    x0 = original_samples
    t = timesteps if isinstance(timesteps, torch.Tensor) else None
    if t is None or t.is_floating_point() or t.is_complex() or not runs_fused(x0) or noise.shape != x0.shape or \
            noise.dtype != x0.dtype or noise.device != x0.device or x0.dim() < 1 or \
            t.numel() not in (1, x0.shape[0]):
        return type(self).add_noise(self, original_samples, noise, timesteps)
    t = t.to(x0.device).reshape(-1).long().expand(x0.shape[0])
    return ops.q_sample(x0, t, noise, _tables(self).get("alphas", x0))


# ----------------------------------------------------------------------------------------------------
# DDPM
# ----------------------------------------------------------------------------------------------------
@patch_function
def ddpm_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
              return_dict: bool = True):
    """DDPMScheduler.step as one ddpm_step pass (and one for pred_original_sample)."""
    cfg = self.config
    if not _step_args_ok(self, model_output, sample) or self.variance_type not in DDPM_VARIANCES:
        return type(self).step(self, model_output, timestep, sample, generator=generator, return_dict=return_dict)
    tables = _tables(self)
    if _on_host(timestep):
        t_host = int(timestep)
        i = tables.ddpm_index.get(t_host, t_host) if tables.respaced else t_host
        if not 0 <= i < tables.get("chain", sample).numel() or (tables.respaced and t_host not in tables.ddpm_index):
            # a timestep outside the chain: diffusers' code says what is wrong
            return type(self).step(self, model_output, timestep, sample, generator=generator, return_dict=return_dict)
        t, draw = _batch_t(i, sample), t_host > 0
    else:
        t = tables.ddpm_index_on(sample.device)[timestep.to(sample.device).long()].reshape(-1).expand(sample.shape[0])
        draw = True
    # 6. the noise, drawn exactly as diffusers draws it (the kernel scales it by σ_t, zero at the chain's end)
    drawn_from = model_output
    model_output, sample = _promoted(model_output, sample)
    noise = _noise_like(drawn_from, generator, sample.dtype) if draw else None
    chain = tables.get("chain", sample)
    # 1.-5. ᾱ_t, ᾱ_prev, β_t; x̂0 (clipped); the posterior mean μ̃(x_t, x̂0) of eq. 7; x_{t-1} = μ̃ + σ_t·z
    prev = ops.ddpm_step(model_output, t, sample, chain, noise, clip_sample=cfg.clip_sample,
                         clip_range=cfg.clip_sample_range, variance=self.variance_type,
                         prediction_type=cfg.prediction_type)
    x0 = _x0(self, model_output, t, sample, chain)
    if not return_dict:
        return prev, x0
    return DDPMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ----------------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------------
@patch_function
def ddim_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
              use_clipped_model_output: bool = False, generator=None, variance_noise: torch.Tensor | None = None,
              return_dict: bool = True):
    """DDIMScheduler.step as one ddim_step pass (and one for pred_original_sample)."""
    cfg = self.config
    clipped_eps = bool(use_clipped_model_output) and cfg.clip_sample  # ε̂ re-derived from the clipped x̂0
    if self.num_inference_steps is None or not _step_args_ok(self, model_output, sample) or clipped_eps or \
            not isinstance(eta, (int, float)) or (eta > 0 and generator is not None and variance_noise is not None) \
            or (variance_noise is not None and variance_noise.shape != sample.shape):
        return type(self).step(self, model_output, timestep, sample, eta, use_clipped_model_output, generator,
                               variance_noise, return_dict)
    T = cfg.num_train_timesteps
    ratio = T // self.num_inference_steps
    below = -1 if cfg.set_alpha_to_one else 0  # the table index of final_alpha_cumprod (−1: ᾱ_prev = 1)
    if _on_host(timestep):
        t_host = int(timestep)
        if not 0 <= t_host < T:
            return type(self).step(self, model_output, timestep, sample, eta, use_clipped_model_output, generator,
                                   variance_noise, return_dict)
        # 1. t_prev = t − T // n
        t, t_prev = _batch_t(t_host, sample), _batch_t(t_host - ratio if t_host >= ratio else below, sample)
    else:
        t = timestep.to(sample.device).long().reshape(-1).expand(sample.shape[0])
        t_prev = torch.where(t >= ratio, t - ratio, below)
    drawn_from = model_output
    model_output, sample = _promoted(model_output, sample)
    table = _tables(self).get("alphas", sample)
    noise = None
    if eta > 0:  # diffusers draws whenever η > 0
        noise = variance_noise.to(sample.dtype) if variance_noise is not None else \
            _noise_like(drawn_from, generator, sample.dtype)
    # 2.-7. ᾱ_t, ᾱ_prev; x̂0 (clipped), ε̂; σ_t(η) of eq. 16; x_prev = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε̂ + σ·z
    prev = ops.ddim_step(model_output, t, t_prev, sample, table, float(eta), noise, clip_sample=cfg.clip_sample,
                         clip_range=cfg.clip_sample_range, prediction_type=cfg.prediction_type)
    x0 = _x0(self, model_output, t, sample, table)
    if not return_dict:
        return prev, x0
    return DDIMSchedulerOutput(prev_sample=prev, pred_original_sample=x0)


# ----------------------------------------------------------------------------------------------------
# DPM-Solver++ (multistep)
# ----------------------------------------------------------------------------------------------------
def dpm_kept_because(sched) -> str | None:
    """Why DPMSolverMultistepScheduler.step keeps diffusers' code for this configuration, or None."""
    cfg = sched.config
    if cfg.algorithm_type not in DPM_ALGORITHMS:
        return f"algorithm_type={cfg.algorithm_type!r} (the fused step is DPM-Solver++: {', '.join(DPM_ALGORITHMS)})"
    if cfg.solver_order > 2:
        return f"solver_order={cfg.solver_order} (the fused step is of first or second order)"
    if cfg.solver_type != "midpoint":
        return f"solver_type={cfg.solver_type!r} (the fused second-order step is the 'midpoint' form)"
    on = [flag for flag in DPM_SIGMA_SCHEDULES if getattr(cfg, flag, False)]
    if on:
        return f"{on[0]}=True (σs between the training timesteps: the fused step reads ᾱ at integer timesteps)"
    if cfg.variance_type is not None:
        return f"variance_type={cfg.variance_type!r} (a model output with variance channels)"
    if cfg.prediction_type not in PREDICTION_TYPES:
        return f"prediction_type={cfg.prediction_type!r}"
    if cfg.thresholding:
        return _THRESHOLDING
    return None


@patch_function
def dpm_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
    """DPMSolverMultistepScheduler.step as one dpmpp_2m_step pass, with diffusers' state (step_index,
    model_outputs, lower_order_nums) kept as its own step keeps it."""
    cfg = self.config
    if self.num_inference_steps is None or not _step_args_ok(self, model_output, sample) or \
            dpm_kept_because(self) is not None or \
            (variance_noise is not None and variance_noise.shape != sample.shape):
        return type(self).step(self, model_output, timestep, sample, generator, variance_noise, return_dict)
    tables = _tables(self)
    ts = tables.host_timesteps()
    T = self.alphas_cumprod.numel()
    if self.step_index is None:
        self._init_step_index(timestep)  # diffusers' own lookup, as its step does
    i, n = self.step_index, len(ts)
    if i >= n:  # diffusers' code says what is wrong
        return type(self).step(self, model_output, timestep, sample, generator, variance_noise, return_dict)
    # diffusers' order rules: first order at the start, and at the end where the config asks for it
    first_at_end = i == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15)
                                   or cfg.final_sigmas_type == "zero")
    second = cfg.solver_order == 2 and self.lower_order_nums >= 1 and not first_at_end and \
        self.model_outputs[-1] is not None
    t_prev = ts[i + 1] if i + 1 < n else (-1 if cfg.final_sigmas_type == "zero" else 0)
    # The kernel steps down its ᾱ table: t_last > t > t_prev, all in the table (−1 only as the final σ = 0).
    # Custom timesteps outside it (diffusers clamps their σ), repeated or ascending ones (a step of h = 0,
    # or a chain ending at t = 0 under sigma_min) run diffusers' code.
    if not (0 <= ts[i] < T and (t_prev == -1 and i + 1 == n or 0 <= t_prev < ts[i])
            and (not second or ts[i] < ts[i - 1] < T)):
        return type(self).step(self, model_output, timestep, sample, generator, variance_noise, return_dict)
    # diffusers' dtypes: x̂0 as convert_model_output gives it (the model output itself for "sample", else model
    # output and sample promoted together); the update in fp32 (fp64 stays fp64 here), its noise drawn in
    # fp32; the result in x̂0's dtype (diffusers casts it to its converted model output's)
    x0_dtype = model_output.dtype if cfg.prediction_type == "sample" else \
        torch.promote_types(model_output.dtype, sample.dtype)
    work = torch.promote_types(x0_dtype, torch.float32)
    sde = DPM_ALGORITHMS[cfg.algorithm_type]
    noise = None
    if sde:
        noise = variance_noise if variance_noise is not None else \
            randn_tensor(model_output.shape, generator=generator, device=model_output.device, dtype=torch.float32)
        noise = noise.to(device=sample.device, dtype=work)
    x0_last = self.model_outputs[-1].to(work) if second else None
    x_t = sample.to(work)
    prev, x0 = ops.dpmpp_2m_step(model_output.to(work), _batch_t(ts[i], sample), _batch_t(t_prev, sample),
                                 x_t, tables.get("alphas", x_t), x0_last,
                                 _batch_t(ts[i - 1], sample) if second else None, sde=sde, noise=noise,
                                 prediction_type=cfg.prediction_type)
    for k in range(cfg.solver_order - 1):
        self.model_outputs[k] = self.model_outputs[k + 1]
    self.model_outputs[-1] = x0.to(x0_dtype)
    if self.lower_order_nums < cfg.solver_order:
        self.lower_order_nums += 1
    self._step_index += 1
    prev = prev.to(x0_dtype)
    return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)


# ----------------------------------------------------------------------------------------------------
# patch / unpatch
# ----------------------------------------------------------------------------------------------------
# each scheduler class's fused methods
_FUSED = {DDPMScheduler: {"add_noise": add_noise, "step": ddpm_step},
          DDIMScheduler: {"add_noise": add_noise, "step": ddim_step},
          DPMSolverMultistepScheduler: {"step": dpm_step}}


def patch_scheduler(sched, report, path: str = "") -> None:
    """Binds the fused add_noise and step on a DDPMScheduler or DDIMScheduler, and the fused step on a
    DPMSolverMultistepScheduler (their exact classes)."""
    name = type(sched).__name__
    prefix = f"{path}." if path else ""
    fused = _FUSED.get(type(sched))
    if fused is None:
        report.add_kept(path, name, "only DDPMScheduler, DDIMScheduler and DPMSolverMultistepScheduler have fused "
                                    "steps")
        return
    for method, fn in fused.items():
        if taken_by_someone_else(sched, method):
            report.add_kept(f"{prefix}{method}", f"{name}.{method}", "already replaced by another library")
            continue
        bind(sched, method, fn)
        report.add_fused(f"{prefix}{method}", f"{name}.{method}", name)
    if isinstance(sched, DPMSolverMultistepScheduler):
        why = dpm_kept_because(sched)
        if why is not None:
            report.add_kept(f"{prefix}step", f"{name}.step", why)
        report.add_kept(f"{prefix}add_noise", f"{name}.add_noise", "σ-indexed by the step index: diffusers' own")
        report.note("DPMSolverMultistepScheduler steps whose timesteps are not descending within the ᾱ table")
    elif sched.config.thresholding:
        report.add_kept(f"{prefix}step", f"{name}.step", _THRESHOLDING)
    if isinstance(sched, DDPMScheduler) and sched.variance_type not in DDPM_VARIANCES:
        report.add_kept(f"{prefix}step", f"{name}.step", f"variance_type={sched.variance_type!r} (the fused step "
                                                         f"has {', '.join(DDPM_VARIANCES)})")
    if isinstance(sched, DDIMScheduler):
        report.note("DDIMScheduler.step(use_clipped_model_output=True) with clip_sample=True")
    report.note("scheduler steps whose model_output and sample differ in shape or device")


def unpatch_scheduler(sched) -> bool:
    done = [unbind(sched, m) for m in METHODS]
    vars(sched).pop(_CACHE, None)
    return any(done)
