"""Diffusion: the training objective and the sampling entry points of a denoising diffusion model, on top
of NoiseSchedule's fused ops and the samplers of diffusion_ext.sampling; LatentDiffusion: the same in the
latent space of a trained VAE.

Randomness is reproducible from integer seeds: the training noise is made inside the q_sample kernel from
(seed, 0), the timesteps and label drops come from torch.Generator().manual_seed(seed); a sample starts
from Philox stream (seed, 0) and step i of the sampler draws its noise from stream (seed, i + 1), so the
same seed gives the same image on every backend (DESIGN.md, "Randomness").
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from . import sampling
from .sampling.model_call import call_model, eval_mode, null_class, with_condition
from .schedule import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
SAMPLERS = tuple(sampling.SAMPLERS)


class Diffusion:
    """A diffusion process over a NoiseSchedule whose model predicts ε ("epsilon"), x0 ("sample") or
    v = √ᾱ·ε − √(1−ᾱ)·x0 ("v_prediction", Salimans & Ho 2022).

    >>> diff = Diffusion(NoiseSchedule(1000))
    >>> loss = diff.training_loss(unet, x0, seed=step)
    >>> images = diff.sample(unet, (16, 3, 64, 64), sampler="ddim", steps=50, seed=0)
    """

    def __init__(self, schedule: NoiseSchedule, prediction_type: str = "epsilon", snr_gamma: float | None = None):
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"Diffusion: schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"Diffusion: prediction_type {prediction_type!r} is unknown; expected one of "
                             f"{PREDICTION_TYPES}")
        if snr_gamma is not None and (isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float))
                                      or not 0 < snr_gamma < math.inf):
            raise ValueError(f"Diffusion: snr_gamma = {snr_gamma!r}; expected None (no weighting) or a positive "
                             "finite number (5 in Hang et al. 2023)")
        self.schedule, self.prediction_type = schedule, prediction_type
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def __repr__(self) -> str:
        gamma = "" if self.snr_gamma is None else f", snr_gamma={self.snr_gamma}"
        return f"Diffusion({self.schedule!r}, prediction_type={self.prediction_type!r}{gamma})"

    def _on(self, device) -> NoiseSchedule:
        return sampling.on_device(self.schedule, device)

    # ------------------------------------------------------------------------------------------------
    def training_loss(self, model, x0: torch.Tensor, *, y: torch.Tensor | None = None,
                      cond: torch.Tensor | None = None, seed: int | None = None, p_uncond: float = 0.0) -> torch.Tensor:
        """The simplified objective L_simple = E_{t, x0, ε} ‖target − model(x_t, t)‖² (Ho et al. 2020, eq. 14),
        a scalar (the mean over every element).

        t = torch.randint(0, T, (B,), generator=torch.Generator().manual_seed(seed)); then, when p_uncond > 0,
        drop = torch.rand(B, generator=<the same generator>) < p_uncond; ε is the in-kernel noise of stream
        (seed, 0) (reference.noise_like(x0, seed)). seed=None draws one from torch's default generator.
        cond (B, Cc, S, S) is concatenated to x_t on channels (the conditioning image of depth prediction).
        """
        if x0.dim() < 2 or x0.shape[0] < 1:
            raise ValueError(f"Diffusion.training_loss: x0 must be a batch (B, C, ...), got shape {tuple(x0.shape)}")
        if not 0.0 <= p_uncond <= 1.0:
            raise ValueError(f"Diffusion.training_loss: p_uncond = {p_uncond}; expected a probability in [0, 1]")
        B, device = x0.shape[0], x0.device
        sched = self._on(device)
        if seed is None:
            seed = NoiseSchedule._draw_seed()
        gen = torch.Generator().manual_seed(seed)
        # 1. t ~ Uniform{0, …, T−1} (Ho et al. 2020, Alg. 1, line 3)
        t = torch.randint(0, self.num_timesteps, (B,), generator=gen).to(device)
        # 2. replace the label by the null class with probability p_uncond (Ho & Salimans 2022, Alg. 1)
        if p_uncond > 0:
            null = null_class(model, "Diffusion.training_loss")
            drop = (torch.rand(B, generator=gen) < p_uncond).to(device)
            y = torch.where(drop, null, y) if y is not None else None
        # 3. x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε with ε made in the kernel (eq. 4)
        x_t, eps = sched.q_sample_with_noise(x0, t, seed=seed)
        return self.loss_at(model, x0, t, x_t, eps, y=y, cond=cond)

    def loss_at(self, model, x0: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, eps: torch.Tensor, *,
                y: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """‖target − model(x_t, t)‖² for x_t already drawn from q(x_t | x0) with noise eps: the part of
        L_simple shared by training_loss and the trainer (which draws its noise per sample); with snr_gamma,
        sample i's squared error is weighted by min_snr_weight(t_i)."""
        # 1. the regression target of the parameterisation (ᾱ_t only where the target or the weights need it)
        a = None
        if self.prediction_type == "v_prediction" or self.snr_gamma is not None:
            a = self.schedule.alphas_cumprod[t].to(torch.float32).view(-1, *([1] * (x0.dim() - 1)))
        if self.prediction_type == "epsilon":
            target = eps
        elif self.prediction_type == "sample":
            target = x0
        else:  # v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022, §4)
            target = a.sqrt() * eps.float() - (1 - a).sqrt() * x0.float()
        # 2. the model's prediction from x_t (and the conditioning image on channels), then the mean squared error
        out = call_model(model, with_condition(x_t, cond), t, y)
        if out.shape != x0.shape:
            raise ValueError(f"Diffusion.training_loss: the model returned shape {tuple(out.shape)}; expected x0's "
                             f"{tuple(x0.shape)}")
        if self.snr_gamma is None:
            return F.mse_loss(out.float(), target.float())
        err = (out.float() - target.float()).square().flatten(1).mean(1)
        return (err * self.min_snr_weight(a.flatten())).mean()

    def min_snr_weight(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
        Strategy"): each timestep's loss counts as min(SNR_t, γ)·‖x0 − x̂0‖², SNR_t = ᾱ_t/(1 − ᾱ_t),
        so that the easy low-noise timesteps stop dominating the gradient. In the model's own
        parameterisation ‖x0 − x̂0‖² is SNR_t⁻¹·‖ε − ε̂‖² and (SNR_t + 1)⁻¹·‖v − v̂‖², hence the weight on
        its squared error: min(SNR, γ)/SNR (ε), min(SNR, γ) (x0), min(SNR, γ)/(SNR + 1) (v)."""
        a = alpha_bar.to(torch.float32)
        snr = a / (1 - a)
        if self.prediction_type == "epsilon":   # min(1, γ/SNR): 1, not 0/0, where SNR is 0 (zero terminal SNR)
            return torch.clamp(self.snr_gamma / snr, max=1.0)
        clipped = torch.clamp(snr, max=self.snr_gamma)
        return clipped if self.prediction_type == "sample" else clipped / (snr + 1)

    # ------------------------------------------------------------------------------------------------
    def sampler(self, name: str = "ddim", *, eta: float = 0.0, clip_range: float | None = 1.0,
                who: str = "Diffusion.sample") -> sampling.Sampler:
        """The sampler family `name` (diffusion_ext.sampling: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde) over this
        schedule and prediction type."""
        return sampling.make(name, self.schedule, self.prediction_type, eta=eta, clip_range=clip_range, who=who)

    def sample_step(self, model, x: torch.Tensor, t: int, t_prev: int, *, sampler: str = "ddim", eta: float = 0.0,
                    guidance_scale: float | None = None, y: torch.Tensor | None = None,
                    cond: torch.Tensor | None = None, seed: int = 0, offset: int = 0,
                    clip_range: float | None = 1.0) -> torch.Tensor:
        """One reverse step x_t -> x_{t_prev} as the first step of a chain: one model call (on the doubled
        batch [cond; uncond] under guidance) and one fused step (DPM-Solver++'s first-order one), its noise
        from Philox stream (seed, offset)."""
        if not -1 <= t_prev < t < self.num_timesteps:
            raise ValueError(f"Diffusion.sample_step: (t, t_prev) = ({t}, {t_prev}); expected −1 <= t_prev < t <= "
                             f"{self.num_timesteps - 1}")
        s = self.sampler(sampler, eta=eta, clip_range=clip_range, who="Diffusion.sample_step")
        tt, tp = (torch.full((x.shape[0],), v, dtype=torch.long, device=x.device) for v in (t, t_prev))
        x, _ = s.step(model, x, tt, tp, tp, s.kind(0, t, t_prev), s.initial_state(x), guidance_scale=guidance_scale,
                      y=y, cond=cond, seed=seed, offset=offset)
        return x

    @torch.no_grad()
    def sample(self, model, shape, *, sampler: str = "ddim", steps: int | None = None, eta: float = 0.0,
               guidance_scale: float | None = None, y: torch.Tensor | None = None, cond: torch.Tensor | None = None,
               seed: int = 0, device="cpu", dtype: torch.dtype = torch.float32, progress: bool = False,
               callback: Callable[[int, int, torch.Tensor], None] | None = None, spacing: str | None = None,
               clip_range: float | None = 1.0, cuda_graph: bool = False) -> torch.Tensor:
        """Draws x0 ~ p_θ(x0 | y, cond) of the given shape (B, C, S, S).

        sampler (diffusion_ext.sampling): "ddpm": all T steps when steps is None (or T), else `steps`
        timesteps with DDIM η = 1; "ddim": `steps` timesteps (50 when None) with the given eta;
        "dpmpp_2m": DPM-Solver++(2M), `steps` timesteps (20 when None); "dpmpp_2m_sde": its SDE variant.
        spacing: NoiseSchedule.timesteps' (None: the sampler's default, "leading" for DDPM and DDIM,
        "linspace" for DPM-Solver++ as in diffusers). guidance_scale w (None: no guidance) needs labels y
        and a class-conditional model. clip_range: x̂0 is clipped to [−r, r] at every step and so is the
        result (the data range: 1 for images in [−1, 1]; None for latents, which are unbounded).
        callback(i, t, x_{t_prev}) runs after step i. cuda_graph (CUDA only): each kind of step is captured
        once and replayed (sampling.GraphedSampler; the same x_T, noise from torch's CUDA generator instead
        of the kernels' Philox streams).
        """
        who = "Diffusion.sample"
        shape = sampling.check_sample_args(who, shape, guidance_scale, y, cond)
        device = torch.device(device)
        if cuda_graph:
            if device.type != "cuda" or progress or callback is not None:
                raise ValueError(f"{who}: cuda_graph=True needs a CUDA device (got {device}) and runs "
                                 f"the chain without progress bar or callback")
            return sampling.GraphedSampler(self, model, shape, sampler=sampler, steps=steps, eta=eta,
                                           guidance_scale=guidance_scale, y=y, cond=cond, clip_range=clip_range,
                                           spacing=spacing, dtype=dtype, device=device)(seed)
        s = self.sampler(sampler, eta=eta, clip_range=clip_range, who=who)
        plan = s.plan(steps, spacing)
        self._on(device)
        x_T = sampling.initial_noise(shape, seed, dtype, device)
        return s.run(model, x_T, plan, guidance_scale=guidance_scale, y=None if y is None else y.to(device),
                     cond=None if cond is None else cond.to(device), seed=seed, progress=progress, callback=callback)


# ----------------------------------------------------------------------------------------------------
def _images(batch) -> torch.Tensor:
    if isinstance(batch, dict):
        return batch["image"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@torch.no_grad()
def measure_scale_factor(vae, batches: Iterable) -> float:
    """1 / std of the VAE's reparameterised latents over the given batches (tensors, or dicts with "image"),
    the factor that gives the diffusion model unit-variance inputs (Rombach et al. 2022, §4.3.2 and
    App. G; their 0.18215 for Stable Diffusion's VAE is this number). Store it with the checkpoint."""
    p = next(iter(vae.parameters()))
    n, s, s2 = 0, 0.0, 0.0
    with eval_mode(vae):
        for batch in batches:
            x = _images(batch).to(p.device, p.dtype)
            mu, logvar = vae.encode(x)
            z = vae.reparameterize(mu, logvar).double()
            n, s, s2 = n + z.numel(), s + z.sum().item(), s2 + z.square().sum().item()
    if n < 2:
        raise ValueError("measure_scale_factor: batches held no images")
    var = (s2 - s * s / n) / (n - 1)
    if not var > 0:
        raise ValueError(f"measure_scale_factor: the latents have variance {var}; the VAE collapsed")
    return 1.0 / math.sqrt(var)


class LatentDiffusion:
    """Diffusion in the latent space of a trained, frozen VAE (Rombach et al. 2022): z = scale_factor·(μ +
    σ·ε) of the encoder, diffused like an image, decoded by the VAE after sampling."""

    measure_scale_factor = staticmethod(measure_scale_factor)

    def __init__(self, vae, diffusion: Diffusion, scale_factor: float):
        if not isinstance(diffusion, Diffusion):
            raise TypeError(f"LatentDiffusion: diffusion must be a Diffusion, got {type(diffusion).__name__}")
        if isinstance(scale_factor, bool) or not isinstance(scale_factor, (int, float)) or \
                not math.isfinite(scale_factor) or scale_factor <= 0:
            raise ValueError(f"LatentDiffusion: scale_factor = {scale_factor!r}; expected a finite number > 0 "
                             f"(measure it with measure_scale_factor)")
        self.vae, self.diffusion, self.scale_factor = vae, diffusion, float(scale_factor)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) -> scaled latents scale_factor·z, z = μ + σ·ε (reparameterised)."""
        mu, logvar = self.vae.encode(x)
        return self.vae.reparameterize(mu, logvar) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in (−1, 1)."""
        return self.vae.decode(z / self.scale_factor)

    def training_loss(self, model, x0: torch.Tensor, **kw) -> torch.Tensor:
        """Diffusion.training_loss on the scaled latents of the images x0."""
        return self.diffusion.training_loss(model, self.encode(x0), **kw)

    def latent_shape(self, model, num: int, image_size: int | None = None) -> tuple[int, int, int, int]:
        """(num, latent_channels, s, s): s = image_size / the VAE's downsampling, or the denoiser's
        config["image_size"] when image_size is None."""
        if image_size is None:
            s = model.config["image_size"]
        else:
            f = self.vae.downsample_factor
            if image_size % f:
                raise ValueError(f"LatentDiffusion.sample: image_size = {image_size} is not divisible by the VAE's "
                                 f"downsampling factor {f}")
            s = image_size // f
        return (num, self.vae.latent_channels, s, s)

    def sample(self, model, num: int, *, image_size: int | None = None, **kw) -> torch.Tensor:
        """num images: Diffusion.sample in latent space (no clipping: latents are unbounded), then decode."""
        kw.setdefault("clip_range", None)
        z = self.diffusion.sample(model, self.latent_shape(model, num, image_size), **kw)
        return self.decode(z)
