"""The trainer: pixel, VAE, latent and depth diffusion models, on one process or many (DDP).

Reproducibility is the organising rule. Everything random in a step comes from integers, not from
the state of a process:

- data order: position p of the sample stream is item perm_e[p mod N] of epoch e = p // N, perm_e a
  permutation drawn from (seed, e); optimizer step s, micro-batch m takes the global positions
  [s·B + m·B/A, ...) (B the global batch, A the accumulation steps), and rank r of W takes the r-th W-th
  of them (as DistributedSampler does, but resumable at any step);
- timesteps and label drops: drawn for the whole global batch of step s from torch.Generator seeded
  by (seed, s); each micro-batch and rank takes its slice;
- noise: the q_sample kernel's Philox stream (seed, p) for the sample at stream position p.

So one process with batch B, two with B/2 each, or one with A = 2 see the same samples, timesteps and
noise, and their parameters agree to rounding; and a run resumed at step s continues exactly as the
uninterrupted run (on CPU; cuDNN/cuBLAS may be non-deterministic on GPU). Only dropout and the VAE's
reparameterisation draw from torch's generator, whose state (per rank) the checkpoint keeps.

This is why the pixel/latent/depth loss is computed here (`diffusion_loss`), not by
Diffusion.training_loss: that one draws t and ε for the batch it is given, from one seed, so its noise
depends on how the global batch is split across ranks. The objective is the same (Ho et al. 2020, eq. 14).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import distributed as dist_utils
from .checkpoint import CheckpointError, export_weights, load_any, load_checkpoint, save_checkpoint, VAE_PREFIX
from .cpu_features import native_bf16
from .ema import EMA
from .logging_utils import JsonlLog, progress_bar, read_jsonl
from .run_folder import CHECKPOINT_NAME, LOG_NAME, config_differences, prepare_new_run, written_at

TASKS = ("pixel", "vae", "latent", "depth")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BACKBONES = ("native", "diffusers")
LR_DECAYS = ("none", "cosine")
# what may differ between a run and its resumption (its length, bookkeeping and where it runs; `out` is
# the run's folder itself, wherever it now lives)
RESUME_OVERRIDES = ("steps", "quiet", "ckpt_every", "log_every", "sample_every", "num_samples", "sample_steps",
                    "sample_sampler", "sample_spacing", "save_format", "num_workers", "device", "compile",
                    "max_bad_fraction", "progress_every")


@dataclass
class TrainConfig:
    task: str = "pixel"
    data: str = "builtin:shapes"
    out: str = "runs/train"
    image_size: int = 64
    data_size: int | None = None         # number of items of a builtin data set (None: its default)
    max_bad_fraction: float | None = None  # image folders: most unreadable files allowed (None: 0.1)
    # model (None: the task's default)
    base_channels: int = 64
    channel_mults: tuple | None = None   # UNet (1, 2, 2, 2); VAE (1, 2, 4)
    num_res_blocks: int = 2
    attention_resolutions: tuple | None = None  # UNet: (16,) when that resolution occurs, else none
    dropout: float = 0.1
    head_dim: int = 32
    num_groups: int = 32
    latent_channels: int = 4             # vae
    class_cond: bool = False             # condition on the data set's labels (classifier-free guidance)
    p_uncond: float = 0.1                # label drop probability when class_cond
    fused: bool = True
    backbone: str = "native"             # pixel: "diffusers" trains a diffusers UNet2DModel (integrations/)
    # diffusion
    num_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    snr_gamma: float | None = None       # Min-SNR-γ loss weighting (Hang et al. 2023; 5 there), None: L_simple
    kl_weight: float = 1e-3              # vae
    vae: str | None = None               # latent: the trained VAE checkpoint
    scale_batches: int = 8               # latent: batches of `batch_size` for the scale factor
    # optimisation
    steps: int = 10_000
    batch_size: int = 64                 # global batch per optimizer step (all ranks, all micro-batches)
    grad_accum: int = 1
    lr: float = 1e-4
    lr_warmup: int = 0                   # linear warm-up steps
    lr_decay: str = "none"               # after the warm-up: "none" (constant) or "cosine" (to 0 at `steps`;
                                         # resuming with more steps stretches what is left of the curve)
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    clip_grad: float = 1.0               # max global grad norm (0: no clipping)
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    precision: str = "auto"              # auto: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU
    compile: bool = False
    channels_last: bool = False
    seed: int = 0
    device: str | None = None
    num_workers: int = 0
    # output
    ckpt_every: int = 1000
    log_every: int = 1
    sample_every: int = 1000             # 0: only at the end
    num_samples: int = 16
    sample_steps: int = 50               # sampler steps of the sample grids
    sample_sampler: str = "ddim"         # the grids' sampler: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde
    sample_spacing: str | None = None    # the grids' timestep spacing (schedule.SPACINGS; None: the sampler's)
    save_format: str = "pt"              # exported EMA weights: pt or safetensors
    quiet: bool = False
    progress_every: float = 30.0         # seconds between plain progress lines when stdout is not a terminal

    def validate(self) -> "TrainConfig":
        def bad(msg):
            raise ValueError(f"TrainConfig: {msg}")

        if self.task not in TASKS:
            bad(f"task {self.task!r} is unknown; expected one of {TASKS}")
        if self.precision not in PRECISIONS:
            bad(f"precision {self.precision!r} is unknown; expected one of {PRECISIONS}")
        if self.save_format not in ("pt", "safetensors"):
            bad(f"save_format {self.save_format!r}; expected 'pt' or 'safetensors'")
        for name in ("steps", "batch_size", "grad_accum", "ckpt_every", "log_every", "image_size", "num_samples",
                     "sample_steps", "num_timesteps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(f"{name} = {v!r}; expected an int >= 1")
        if self.sample_every < 0:
            bad(f"sample_every = {self.sample_every}; expected >= 0")
        if not self.progress_every > 0:
            bad(f"progress_every = {self.progress_every}; expected seconds > 0")
        if self.max_bad_fraction is not None and not 0.0 <= self.max_bad_fraction <= 1.0:
            bad(f"max_bad_fraction = {self.max_bad_fraction}; expected a fraction in [0, 1]")
        from .sampling import SAMPLERS

        if self.sample_sampler not in SAMPLERS:
            bad(f"sample_sampler {self.sample_sampler!r} is unknown; expected one of {tuple(SAMPLERS)}")
        from .schedule import SPACINGS

        if self.sample_spacing is not None and self.sample_spacing not in SPACINGS:
            bad(f"sample_spacing {self.sample_spacing!r} is unknown; expected None or one of {SPACINGS}")
        if self.batch_size % self.grad_accum:
            bad(f"batch_size = {self.batch_size} is not divisible by grad_accum = {self.grad_accum}")
        if not self.lr > 0:
            bad(f"lr = {self.lr}; expected > 0")
        if self.lr_decay not in LR_DECAYS:
            bad(f"lr_decay {self.lr_decay!r} is unknown; expected one of {LR_DECAYS}")
        if self.snr_gamma is not None and not 0 < self.snr_gamma < float("inf"):
            bad(f"snr_gamma = {self.snr_gamma}; expected None (L_simple) or a positive number (5 in Hang et al. 2023)")
        if self.backbone not in BACKBONES:
            bad(f"backbone {self.backbone!r} is unknown; expected one of {BACKBONES}")
        if self.backbone == "diffusers" and self.task != "pixel":
            bad(f"backbone 'diffusers' trains the pixel task's UNet2DModel; task {self.task!r} uses the native models")
        if self.task == "latent" and not self.vae:
            bad("task 'latent' needs vae: the path of a trained VAE checkpoint (--vae CKPT, from train --task vae)")
        if self.channel_mults is not None:
            self.channel_mults = tuple(self.channel_mults)
        if self.attention_resolutions is not None:
            self.attention_resolutions = tuple(self.attention_resolutions)
        self.adam_betas = tuple(self.adam_betas)
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ----------------------------------------------------------------------------------------------------
# determinism helpers
# ----------------------------------------------------------------------------------------------------
def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser over each value): distinct inputs, distinct
    generators, independent of process and rank."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class SampleStream:
    """Item index of each position of the endless sample stream: epoch e = p // N is a permutation drawn
    from (seed, e). Random access, so a resumed run starts at any position."""

    def __init__(self, num_items: int, seed: int):
        if num_items < 1:
            raise ValueError("SampleStream: the data set is empty")
        self.n, self.seed = num_items, seed
        self._perms: dict[int, list[int]] = {}

    def perm(self, epoch: int) -> list[int]:
        p = self._perms.get(epoch)
        if p is None:
            if len(self._perms) > 2:
                self._perms.clear()
            g = torch.Generator().manual_seed(mix_seed(self.seed, 0xDA7A, epoch))
            p = self._perms[epoch] = torch.randperm(self.n, generator=g).tolist()
        return p

    def indices(self, start: int, count: int) -> list[int]:
        return [self.perm(q // self.n)[q % self.n] for q in range(start, start + count)]


@dataclass(frozen=True)
class Layout:
    """How a global batch is cut: micro-batches (accumulation) and ranks."""
    batch_size: int
    grad_accum: int
    world_size: int
    rank: int

    @property
    def micro(self) -> int:
        return self.batch_size // self.grad_accum

    @property
    def local(self) -> int:
        return self.micro // self.world_size

    def first_position(self, step: int, micro: int) -> int:
        """Stream position of this rank's first sample of micro-batch `micro` of optimizer step `step`."""
        return step * self.batch_size + micro * self.micro + self.rank * self.local


class BatchPlan:
    """The local batches of this rank from optimizer step `start` on, as a DataLoader batch_sampler."""

    def __init__(self, stream: SampleStream, layout: Layout, start: int, stop: int):
        self.stream, self.layout, self.start, self.stop = stream, layout, start, stop

    def __iter__(self):
        L = self.layout
        for s in range(self.start, self.stop):
            for m in range(L.grad_accum):
                yield self.stream.indices(L.first_position(s, m), L.local)

    def __len__(self) -> int:
        return (self.stop - self.start) * self.layout.grad_accum


def step_randomness(cfg: TrainConfig, layout: Layout, step: int, micro: int, num_timesteps: int):
    """(t, drop) for this rank's slice of micro-batch (step, micro): drawn for the whole global batch
    of the step from (seed, step), so that they depend neither on the number of ranks nor on the
    accumulation steps."""
    g = torch.Generator().manual_seed(mix_seed(cfg.seed, 0x7135, step))
    t = torch.randint(0, num_timesteps, (layout.batch_size,), generator=g)
    drop = torch.rand(layout.batch_size, generator=g) < cfg.p_uncond
    lo = layout.first_position(step, micro) - step * layout.batch_size
    return t[lo:lo + layout.local], drop[lo:lo + layout.local]


def diffusion_loss(diffusion, model, x0: torch.Tensor, t: torch.Tensor, first_position: int, noise_seed: int, *,
                   y: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
    """L_simple (Ho et al. 2020, eq. 14) for the samples at stream positions first_position + i, the noise
    of sample i from the Philox stream (noise_seed, first_position + i) — the same noise whichever batch
    or rank the sample lands in."""
    # x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, ε made in the kernel, one stream per sample, one launch (eq. 4)
    x_t, eps = diffusion.schedule.q_sample_with_noise(x0, t, seed=noise_seed, offset=first_position,
                                                      per_sample_streams=True)
    return diffusion.loss_at(model, x0, t, x_t, eps, y=y, cond=cond)


# ----------------------------------------------------------------------------------------------------
# building blocks from a config
# ----------------------------------------------------------------------------------------------------
def build_dataset_for(cfg: TrainConfig, split: str = "train"):
    from .data import build_dataset

    kw = {}
    if cfg.data_size is not None and cfg.data.startswith("builtin:"):
        kw["size"] = cfg.data_size
    if cfg.max_bad_fraction is not None:
        kw["max_bad_fraction"] = cfg.max_bad_fraction
    ds = build_dataset(cfg.data, image_size=cfg.image_size, split=split, seed=cfg.seed, **kw)
    want = "depth" if cfg.task == "depth" else "image"
    if getattr(ds, "kind", "image") != want:
        raise ValueError(f"train --task {cfg.task}: data {cfg.data!r} is a {ds.kind!r} data set; the task needs "
                         f"a {want!r} one (depth: builtin:depth-scenes or NYU Depth V2)")
    return ds


def model_spec(cfg: TrainConfig, num_classes: int | None, vae_config: dict | None = None) -> tuple[str, dict]:
    """(model kind, model config) for the task."""
    if cfg.task == "vae":
        return "vae", dict(in_channels=3, latent_channels=cfg.latent_channels, base_channels=cfg.base_channels,
                           channel_mults=list(cfg.channel_mults or (1, 2, 4)), num_groups=cfg.num_groups)
    size, cin, cout = cfg.image_size, 3, 3
    if cfg.task == "latent":
        f = 2 ** len(vae_config["channel_mults"])
        if size % f:
            raise ValueError(f"train --task latent: image_size = {size} is not divisible by the VAE's downsampling {f}")
        size, cin, cout = size // f, vae_config["latent_channels"], vae_config["latent_channels"]
    elif cfg.task == "depth":
        cin, cout = 4, 1  # RGB conditioning image + noisy depth in, depth ε out
    mults = tuple(cfg.channel_mults or (1, 2, 2, 2))
    resolutions = [size // 2 ** i for i in range(len(mults))]
    attn = cfg.attention_resolutions
    if attn is None:
        attn = (16,) if 16 in resolutions else ()
    spec = dict(in_channels=cin, out_channels=cout, base_channels=cfg.base_channels, channel_mults=list(mults),
                num_res_blocks=cfg.num_res_blocks, attention_resolutions=list(attn), image_size=size,
                dropout=cfg.dropout, head_dim=cfg.head_dim, num_groups=cfg.num_groups,
                num_classes=num_classes if cfg.class_cond else None)
    if cfg.backbone == "diffusers":  # the same options as a diffusers UNet2DModel
        from .integrations.diffusers_backbone import spec_from_unet

        return spec_from_unet(spec)
    return "unet", spec


def build_network(kind: str, config: dict, fused: bool = True) -> torch.nn.Module:
    """models.build_model(kind, config), or the diffusers backbone for its kind (diffusers imported only then)."""
    if kind.startswith("diffusers"):
        from .integrations.diffusers_backbone import build

        return build(config, fused=fused)
    from .models import build_model

    return build_model(kind, config, fused=fused)


def build_diffusion(config: dict, device):
    from . import NoiseSchedule
    from .diffusion import Diffusion

    sched = NoiseSchedule(config["num_timesteps"], config["beta_schedule"], config["beta_start"],
                          config["beta_end"]).to(device)
    return Diffusion(sched, config["prediction_type"], config.get("snr_gamma"))


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: fp32, no autocast). bf16 on a CPU without native bf16 runs as asked, with a
    warning: PyTorch emulates its convolutions there, ~50× slower than fp32 (cpu_features.native_bf16)."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("train: --precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    if precision == "bf16" and device.type == "cpu" and not native_bf16():
        warnings.warn("train: --precision bf16 on a CPU without native bf16 (no avx512_bf16 or amx_bf16 in "
                      "/proc/cpuinfo): PyTorch emulates bf16 convolutions there, far slower than fp32 (a 3×3 "
                      "convolution ~50× on an AVX2 CPU); --precision fp32 (or auto) trains faster", stacklevel=2)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def rng_state() -> dict:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached": float(cached)}}


def set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached"]))


# ----------------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------------
class Trainer:
    """One training run. `Trainer(cfg).run()` trains from scratch into the folder cfg.out (refusing one
    that holds a run, unless overwrite=True moves that run aside), or, with resume=True, continues the run
    in cfg.out (resume=PATH: from that checkpoint, writing into cfg.out)."""

    def __init__(self, cfg: TrainConfig, resume: bool | str = False, overrides: dict | None = None, log=print,
                 overwrite: bool = False):
        self.log_msg = log
        main = dist_utils.env_rank() == 0  # the process group is not up yet
        ckpt = None
        if resume:
            if overwrite:
                raise ValueError("train: --overwrite starts a new run and --resume continues one; give one of them")
            ckpt, cfg = self._resume_config(cfg, resume, overrides, main)
        else:
            if not isinstance(cfg.data, str) or not cfg.data.startswith("builtin:"):
                # a path that stays valid when the run is resumed from another folder
                cfg = dataclasses.replace(cfg, data=os.path.abspath(os.path.expanduser(cfg.data)))
            moved = prepare_new_run(cfg.out, overwrite, main)
            if moved:
                log(f"moved the run that was in {cfg.out} to {moved}")
        self.cfg = cfg = cfg.validate()
        self.dist = dist_utils.setup((cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0])
        try:
            self._build(cfg, ckpt)
        except BaseException:  # a failed set-up leaves no process group behind (an in-process caller may retry)
            dist_utils.teardown(self.dist)
            raise

    def _build(self, cfg: TrainConfig, ckpt: dict | None) -> None:
        """Everything after the process group: device, layout, data, models, optimizer, state."""
        self.device = dist_utils.device_for(self.dist, cfg.device)
        W = self.dist.world_size
        if (cfg.batch_size // cfg.grad_accum) % W:
            raise ValueError(f"train: the micro-batch batch_size / grad_accum = {cfg.batch_size // cfg.grad_accum} is "
                             f"not divisible by the {W} processes")
        self.layout = Layout(cfg.batch_size, cfg.grad_accum, W, self.dist.rank)
        self.autocast_dtype = resolve_precision(cfg.precision, self.device)
        torch.manual_seed(mix_seed(cfg.seed, 0x1417, self.dist.rank))  # init is rank-independent below

        # data
        self.dataset = build_dataset_for(cfg)
        self.num_classes = getattr(self.dataset, "num_classes", None)
        if cfg.class_cond and not self.num_classes:
            raise ValueError(f"train: --class-cond, but data {cfg.data!r} has no classes")
        self.stream = SampleStream(len(self.dataset), cfg.seed)

        # latent: the frozen VAE (its EMA weights) and the latent scale factor
        self.vae, self.vae_record, self.scale_factor = None, None, None
        if cfg.task == "latent":
            self._setup_vae(ckpt)

        # model (same initial weights on every rank: seeded from cfg.seed alone), EMA, optimizer
        self.model_kind, self.model_config = model_spec(cfg, self.num_classes,
                                                        self.vae_record["config"] if self.vae_record else None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(cfg.seed, 0x1A17))
            model = build_network(self.model_kind, self.model_config, fused=cfg.fused)
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup)
        # fused: one kernel for all parameters (CPU and CUDA): the demo's Adam step 1.9 ms against 9.0 ms for
        # torch's default per-tensor loop on the CPU (1.1 M parameters, 2 threads)
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas,
                                           weight_decay=cfg.weight_decay, **fused) if cfg.weight_decay else \
            torch.optim.Adam(self.model.parameters(), lr=cfg.lr, betas=cfg.adam_betas, **fused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.autocast_dtype == torch.float16)
        self.diffusion = build_diffusion(cfg.to_dict(), self.device) if cfg.task != "vae" else None
        self.noise_seed = mix_seed(cfg.seed, 0x9015E)

        self.step = 0
        if ckpt is not None:
            self._load_state(ckpt)

        # the module that runs forward: DDP, then torch.compile, around the bare model
        net = self.model
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)
        self.net = net
        self._stop = False
        self._signal = signal.SIGINT  # the signal that stopped the run (another rank's: SIGINT)

    # -- set-up ------------------------------------------------------------------------------------------
    def _resume_config(self, cfg: TrainConfig, resume: bool | str, overrides: dict | None,
                       main: bool) -> tuple[dict, TrainConfig]:
        """The checkpoint to continue and the configuration of the resumed run: the checkpoint's, with only
        its length, output and bookkeeping changed (overrides, e.g. the options given on the command line)."""
        path = resume if isinstance(resume, str) else os.path.join(cfg.out, CHECKPOINT_NAME)
        if resume is True and not os.path.isfile(path):
            raise CheckpointError(f"train --resume: {path}: no such file; {cfg.out} holds no run to continue "
                                  f"(start one without --resume, or give --out the run's folder)")
        if isinstance(resume, str) and os.path.realpath(os.path.dirname(path)) != os.path.realpath(cfg.out):
            prepare_new_run(cfg.out, overwrite=False)  # continuing a checkpoint into another run's folder
        ckpt = load_checkpoint(path)
        saved = ckpt["config"]
        if overrides is None:
            overrides = {k: getattr(cfg, k) for k in RESUME_OVERRIDES}
        defaults = TrainConfig().to_dict()
        diff = config_differences(saved, overrides, defaults, RESUME_OVERRIDES)
        if diff:
            raise ValueError(f"train --resume: {path} was trained with another configuration: {'; '.join(diff)}. "
                             f"A resumed run keeps the configuration that shapes training (only "
                             f"{', '.join(RESUME_OVERRIDES)} may change): leave these options out to continue "
                             f"it, or start a new run with another --out")
        cfg = TrainConfig.from_dict({**saved, **{k: v for k, v in overrides.items() if k in RESUME_OVERRIDES},
                                     "out": cfg.out})
        step = int(ckpt["step"])
        if cfg.steps < step:
            raise ValueError(f"train --resume: --steps {cfg.steps} is below the checkpoint's step {step} "
                             f"({path}); give --steps above {step} to train longer")
        if main:
            left = "" if cfg.steps > step else ": nothing left to train; writing its final samples and weights"
            self.log_msg(f"resuming {cfg.out} at step {step} of {cfg.steps} (checkpoint written "
                         f"{written_at(ckpt, path)}){left}")
        return ckpt, cfg

    def _setup_vae(self, ckpt: dict | None) -> None:
        from .diffusion import measure_scale_factor
        from .models import build_model

        if ckpt is not None:  # resume: the VAE and its scale factor are in the checkpoint
            rec = ckpt["vae"]
            self.scale_factor = float(ckpt["scale_factor"])
        else:
            info = load_any(self.cfg.vae)
            if info["meta"]["task"] != "vae":
                raise CheckpointError(f"checkpoint {self.cfg.vae}: --vae needs a checkpoint of --task vae, but this "
                                      f"one was trained with --task {info['meta']['task']}")
            rec = {"path": os.path.abspath(self.cfg.vae), "config": info["meta"]["model_config"],
                   "state_dict": info["weights"]}
        vae = build_model("vae", rec["config"], fused=self.cfg.fused)
        vae.load_state_dict(rec["state_dict"])
        self.vae = vae.to(self.device).eval().requires_grad_(False)
        self.vae_record = rec
        if self.scale_factor is None:
            # 1/std of the latents of the first scale_batches·batch_size items (the same on every rank)
            n = min(len(self.dataset), self.cfg.scale_batches * self.cfg.batch_size)
            bs = self.cfg.batch_size
            collate = torch.utils.data.default_collate

            def batches():
                for i in range(0, n, bs):
                    yield collate([self.dataset[j] for j in range(i, min(n, i + bs))])["image"]

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.cfg.seed, 0x5CA1E))
                self.scale_factor = measure_scale_factor(self.vae, batches())
            self.log_msg(f"latent scale factor {self.scale_factor:.5f} (1/std of the VAE latents over {n} images)")

    def _load_state(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        states = ckpt["rng"]
        if len(states) != self.dist.world_size and self.dist.is_main:
            self.log_msg(f"note: the checkpoint was written by {len(states)} processes, this run has "
                         f"{self.dist.world_size}; data, timesteps and noise are unaffected, dropout streams differ")
        set_rng_state(states[self.dist.rank % len(states)])

    # -- one step ----------------------------------------------------------------------------------------
    def micro_loss(self, batch: dict, micro: int) -> tuple[torch.Tensor, dict]:
        """The loss of this rank's part of micro-batch `micro` of the current step."""
        cfg, dev = self.cfg, self.device
        mf = torch.channels_last if cfg.channels_last else torch.contiguous_format
        image = batch["image"].to(dev, non_blocking=True).contiguous(memory_format=mf)
        if cfg.task == "vae":
            return self._vae_loss(image)
        t, drop = step_randomness(cfg, self.layout, self.step, micro, self.diffusion.num_timesteps)
        t = t.to(dev)
        first = self.layout.first_position(self.step, micro)  # this rank's samples are first, first + 1, ...
        y = cond = None
        if cfg.class_cond:
            y = torch.where(drop, self.num_classes, batch["label"]).to(dev)
        if cfg.task == "pixel":
            x0 = image
        elif cfg.task == "latent":
            with torch.no_grad():
                mu, logvar = self.vae.encode(image)
                x0 = (self.vae.reparameterize(mu, logvar) * self.scale_factor).contiguous(memory_format=mf)
        else:  # depth: denoise the depth map, conditioned on the RGB image
            x0 = batch["depth"].to(dev, non_blocking=True).contiguous(memory_format=mf)
            cond = image
        loss = diffusion_loss(self.diffusion, self.net, x0, t, first, self.noise_seed, y=y, cond=cond)
        return loss, {}

    def _vae_loss(self, image):
        # through self.net (DDP/compile) so that gradients are synchronised: the VAE's loss, spelled out
        x_hat, mu, logvar = self.net(image, sample=True)
        recon = F.mse_loss(x_hat.float(), image.float())
        mu, logvar = mu.float(), logvar.float()
        kl = 0.5 * (mu.square() + logvar.exp() - logvar - 1).mean()
        return recon + self.cfg.kl_weight * kl, {"recon": recon.detach(), "kl": kl.detach()}

    def lr_at(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): linear warm-up over lr_warmup steps, then
        constant, or with lr_decay "cosine" half a cosine from lr towards 0 at `steps` (Loshchilov & Hutter
        2017, SGDR, without restarts) — a short run ends on settled weights instead of mid-stride."""
        cfg = self.cfg
        if cfg.lr_warmup and step < cfg.lr_warmup:
            return cfg.lr * (step + 1) / cfg.lr_warmup
        if cfg.lr_decay == "cosine":
            span = max(1, cfg.steps - cfg.lr_warmup)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.lr_warmup) / span)))
        return cfg.lr

    def train_step(self, batches) -> dict:
        """One optimizer step (grad_accum micro-batches): returns the step's mean loss (this rank's,
        a tensor), its grad norm and extra terms."""
        cfg = self.cfg
        self.model.train()
        for g in self.optimizer.param_groups:
            g["lr"] = self.lr_at(self.step)
        self.optimizer.zero_grad(set_to_none=True)
        total, extras = torch.zeros((), device=self.device), {}
        for m in range(cfg.grad_accum):
            batch = next(batches)
            sync = m == cfg.grad_accum - 1 or not self.dist.enabled
            ctx = contextlib.nullcontext() if sync else self._ddp().no_sync()
            with ctx:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    loss, parts = self.micro_loss(batch, m)
                # the mean over the global batch: 1/A here, 1/W from DDP's gradient averaging
                self.scaler.scale(loss / cfg.grad_accum).backward()
            total += loss.detach() / cfg.grad_accum
            for k, v in parts.items():
                extras[k] = extras.get(k, 0) + v / cfg.grad_accum
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   cfg.clip_grad if cfg.clip_grad > 0 else float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.update(self.model)
        self.step += 1
        return {"loss": total, "grad_norm": grad_norm, **extras}

    def _ddp(self):
        net = self.net
        return getattr(net, "_orig_mod", net)

    # -- sampling hooks and evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, path: str) -> dict:
        """The EMA model's samples (pixel, latent), reconstructions (vae) or depth predictions (depth) as a
        PNG grid; returns evaluation numbers where the data set has a checker (shapes)."""
        from .images import depth_to_rgb, save_grid

        cfg, n, ema = self.cfg, self.cfg.num_samples, self.ema.module
        stats = {}
        if cfg.task == "vae":
            x = torch.utils.data.default_collate([self.dataset[i] for i in range(min(n, len(self.dataset)))])["image"]
            x = x.to(self.device)
            x_hat = ema(x, sample=False)[0].float()
            stats["recon_mse"] = float(F.mse_loss(x_hat, x))
            grid = torch.cat([x, x_hat])  # first rows the inputs, then their reconstructions
            save_grid(grid, path, nrow=min(n, 8) if n > 8 else n)
            return stats
        kw = dict(sampler=cfg.sample_sampler, steps=min(cfg.sample_steps, cfg.num_timesteps), seed=cfg.seed,
                  device=self.device, spacing=cfg.sample_spacing)
        if cfg.task == "depth":
            items = [self.dataset[i] for i in range(min(n, len(self.dataset)))]
            b = torch.utils.data.default_collate(items)
            img = b["image"].to(self.device)
            pred = self.diffusion.sample(ema, (img.shape[0], 1, *img.shape[2:]), cond=img, **kw)
            gt = b["depth"].to(self.device)
            colour = depth_to_rgb(torch.cat([gt, pred]).cpu(), -1.0, 1.0)
            rows = torch.stack([img.cpu(), colour[:len(gt)], colour[len(gt):]], 1).flatten(0, 1)
            save_grid(rows, path, nrow=3)  # image | ground truth | prediction per row
            stats["depth_mse"] = float(F.mse_loss(pred.float(), gt.float()))
            return stats
        y = None
        if cfg.class_cond:
            y = torch.arange(n, device=self.device) % self.num_classes
        if cfg.task == "latent":
            from .diffusion import LatentDiffusion

            images = LatentDiffusion(self.vae, self.diffusion, self.scale_factor).sample(ema, n, y=y, **kw)
        else:
            images = self.diffusion.sample(ema, (n, 3, cfg.image_size, cfg.image_size), y=y, **kw)
        save_grid(images.float().cpu(), path)
        if cfg.data == "builtin:shapes":
            from .data.shapes import valid_fraction

            stats["valid_fraction"] = float(valid_fraction(images.float().cpu()))
        return stats

    # -- checkpoints ---------------------------------------------------------------------------------------
    def state(self, rng_states: list) -> dict:
        vae = self.vae_record
        return {"step": self.step, "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "rng": rng_states, "config": self.cfg.to_dict(), "model_kind": self.model_kind,
                "model_config": self.model_config, "num_classes": self.num_classes,
                "scale_factor": self.scale_factor, "world_size": self.dist.world_size, "written_at": time.time(),
                "vae": None if vae is None else {"path": vae["path"], "config": vae["config"],
                                                 "state_dict": vae["state_dict"]}}

    def save(self) -> str | None:
        """Every rank calls this (the RNG states are gathered); rank 0 writes."""
        states = dist_utils.gather_objects(rng_state(), self.dist)
        path = os.path.join(self.cfg.out, CHECKPOINT_NAME)
        if self.dist.is_main:
            save_checkpoint(path, self.state(states))
        dist_utils.barrier(self.dist)
        return path

    def export(self) -> str:
        """The EMA weights (+ the VAE's for latent) as weights.pt or weights.safetensors."""
        from .checkpoint import checkpoint_meta

        meta = checkpoint_meta(self.state([]))
        sd = dict(self.ema.module.state_dict())
        if self.vae_record is not None:
            sd.update({VAE_PREFIX + k: v for k, v in self.vae_record["state_dict"].items()})
        path = os.path.join(self.cfg.out, "weights." + self.cfg.save_format)
        export_weights(path, sd, meta, self.cfg.save_format)
        return path

    # -- the loop ------------------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._stop:  # a second Ctrl-C: stop now, losing the current step
            raise KeyboardInterrupt
        self._stop, self._signal = True, signal.Signals(signum)
        print(f"\n{signal.Signals(signum).name}: finishing step {self.step + 1}, then saving a checkpoint "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def run(self) -> dict:
        cfg, main = self.cfg, self.dist.is_main
        os.makedirs(cfg.out, exist_ok=True)
        resumed_from = self.step
        if main:
            with open(os.path.join(cfg.out, "config.json"), "w") as f:
                json.dump({**cfg.to_dict(), "model_kind": self.model_kind, "model_config": self.model_config,
                           "world_size": self.dist.world_size, "scale_factor": self.scale_factor}, f, indent=1)
        log = JsonlLog(os.path.join(cfg.out, LOG_NAME), resume_step=self.step if self.step else None) if main else None
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=BatchPlan(self.stream, self.layout, self.step, max(self.step, cfg.steps)),
            num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
            # its own generator: making the iterator draws a worker base seed, which must not consume
            # torch's default generator (dropout's), or a resumed run would be one draw off
            generator=torch.Generator().manual_seed(mix_seed(cfg.seed, 0x10AD, self.step, self.dist.rank)))
        batches = iter(loader)
        bar = progress_bar(cfg.steps, self.step, main and not cfg.quiet, every_s=cfg.progress_every)
        handlers = {}
        if threading_main():
            for s in (signal.SIGINT, signal.SIGTERM):
                handlers[s] = signal.signal(s, self._on_signal)
        interrupted = False
        try:
            while self.step < cfg.steps:
                t0 = time.perf_counter()
                out = self.train_step(batches)
                step = self.step
                log_now = step % cfg.log_every == 0 or step == cfg.steps
                if log_now:
                    loss = dist_utils.all_reduce_mean(out["loss"], self.dist)
                    loss_v = float(loss)  # synchronises the device: step_time is honest
                    dt = time.perf_counter() - t0
                    if main:
                        rec = {"step": step, "loss": loss_v, "lr": self.lr_at(step - 1), "step_time": dt,
                               "grad_norm": float(out["grad_norm"]), "ema_decay": self.ema.decay if not
                               self.ema.warmup else min(self.ema.decay, (1 + step) / (10 + step))}
                        rec.update({k: float(v) for k, v in out.items() if k not in ("loss", "grad_norm")})
                        if self.scaler.is_enabled():
                            rec["grad_scale"] = float(self.scaler.get_scale())
                        log.write(rec)
                        bar.set_postfix(loss=loss_v)
                bar.update(1)
                if cfg.sample_every and step % cfg.sample_every == 0 and step != cfg.steps:
                    self._sample_hook(log)
                stop = dist_utils.any_rank(self._stop, self.dist, self.device)
                if step % cfg.ckpt_every == 0 or step == cfg.steps or stop:
                    self.save()
                if stop:
                    interrupted = True
                    break
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
            bar.close()
        summary = {"step": self.step, "interrupted": interrupted, "out": cfg.out, "resumed_from": resumed_from,
                   # a stopped run exits as a shell reports a process ended by that signal (Ctrl-C: 130)
                   "exit_code": 128 + int(self._signal) if interrupted else 0}
        if main:
            if not interrupted:
                summary.update(self._sample_hook(log))
                summary["weights"] = self.export()
            summary["loss_curve"] = self.loss_curve()
            log.close()
            summary["checkpoint"] = os.path.join(cfg.out, CHECKPOINT_NAME)
        return summary

    def _sample_hook(self, log) -> dict:
        if not self.dist.is_main:
            return {}
        path = os.path.join(self.cfg.out, "samples", f"step_{self.step:07d}.png")
        stats = self.sample_grid(path)
        if log is not None:
            log.write({"step": self.step, "event": "samples", "path": path, **stats})
        return {"samples": path, **stats}

    def loss_curve(self) -> str:
        from .images import save_loss_curve

        recs = [r for r in read_jsonl(os.path.join(self.cfg.out, LOG_NAME)) if "loss" in r]
        path = os.path.join(self.cfg.out, "loss.png")
        save_loss_curve([r["step"] for r in recs], [r["loss"] for r in recs], path,
                        title=f"{self.cfg.task} training loss ({self.cfg.data})")
        return path

    def close(self, finished: bool = False) -> None:
        """finished: the run ended normally on this rank, so every rank is on its way here (a barrier)."""
        dist_utils.teardown(self.dist, wait_for_every_rank=finished)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def train(cfg: TrainConfig, resume: bool | str = False, overrides: dict | None = None, log=print,
          overwrite: bool = False) -> dict:
    """Builds a Trainer, runs it, tears down the process group; returns a summary."""
    trainer = Trainer(cfg, resume=resume, overrides=overrides, log=log, overwrite=overwrite)
    finished = False
    try:
        summary = trainer.run()
        finished = True
        return summary
    finally:
        trainer.close(finished)


# ----------------------------------------------------------------------------------------------------
# inference from a checkpoint or exported weights
# ----------------------------------------------------------------------------------------------------
@dataclass
class Trained:
    task: str
    model: torch.nn.Module        # the EMA weights
    diffusion: object | None
    latent: object | None         # LatentDiffusion for task latent
    meta: dict = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.meta["config"]


MEMORY_FORMATS = ("auto", "channels_last", "contiguous")


def sampling_memory_format(memory_format: str, device: torch.device) -> torch.memory_format:
    """The layout of a model loaded to sample. "auto": channels_last on a CPU, where oneDNN's convolutions are
    faster in it for inference (measured on this project's 2-core AVX2 machine, fp32, interleaved: the fused
    64×64 UNet's sampling step 1.07× at batch 8 and 1.34× at batch 64, the eager one 1.12×, small 16/32-px
    UNets 1.08–1.23×, the VAE's decoder 1.26–1.41×; `benchmarks/results/cpu-2026-12-01-diffusers-layouts.md`);
    contiguous on a GPU (not measured there). Training keeps its own --channels-last: its backward
    convolutions are slower in channels_last on that CPU."""
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"load_trained: memory_format {memory_format!r} is unknown; expected one of {MEMORY_FORMATS}")
    if memory_format == "auto":
        memory_format = "channels_last" if torch.device(device).type == "cpu" else "contiguous"
    return torch.channels_last if memory_format == "channels_last" else torch.contiguous_format


def load_trained(path: str, device="cpu", fused: bool = True, memory_format: str = "auto") -> Trained:
    """The EMA model of a training checkpoint or of exported weights, ready to sample; its convolutions in
    `memory_format` (sampling_memory_format: "auto" is channels_last on a CPU). Inputs may come in either
    layout: the first convolution's output follows its weights."""
    from .models import build_model

    fmt = sampling_memory_format(memory_format, device)
    info = load_any(path)
    meta = info["meta"]
    model = build_network(meta["model_kind"], meta["model_config"], fused=fused)
    try:
        model.load_state_dict(info["weights"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path}: its weights do not fit its model config: "
                              f"{str(e).splitlines()[0]}") from None
    model = model.to(device, memory_format=fmt).eval().requires_grad_(False)
    diffusion = latent = None
    if meta["task"] != "vae":
        diffusion = build_diffusion(meta["config"], device)
    if meta["task"] == "latent":
        from .diffusion import LatentDiffusion

        vae = build_model("vae", info["vae"]["config"], fused=fused)
        vae.load_state_dict(info["vae"]["state_dict"])
        vae = vae.to(device, memory_format=fmt).eval().requires_grad_(False)
        latent = LatentDiffusion(vae, diffusion, meta["scale_factor"])
    return Trained(meta["task"], model, diffusion, latent, meta)


def summarize_loss(log_path: str) -> tuple[float, float]:
    """(mean loss of the first 10 %, of the last 10 %) of a JSONL log."""
    losses = [r["loss"] for r in read_jsonl(log_path) if "loss" in r]
    k = max(1, len(losses) // 10)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


__all__ = ["TrainConfig", "Trainer", "train", "load_trained", "diffusion_loss", "SampleStream", "Layout", "mix_seed"]
