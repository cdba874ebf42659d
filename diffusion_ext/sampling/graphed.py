"""Sampling with each kind of step captured once in a CUDA graph and replayed for every step.

Why: a U-Net step is a few hundred small kernels. At sampling batch sizes the GPU runs them faster than
Python and the dispatcher can launch them, so an eager loop leaves the GPU idle between kernels; a CUDA
graph launches the whole step with one call (CUDA C++ Programming Guide, "CUDA Graphs").

What makes one graph serve every step of the chain:
- every input of a step lives in a static buffer: x, the sampler's state (the multistep DPM-Solver++'s
  last x̂0), the labels, the conditioning image, and the step index, a device scalar. The step gathers its
  t, t_prev and t_last from per-step tables by that index and increments it, all on the device, so no
  value of a step is frozen into the graph;
- nothing reads a device value on the host (Sampler.step is written that way);
- the noise of a noisy step (DDPM, DDIM with η > 0, SDE-DPM-Solver++) is drawn by torch.randn inside the
  graph. The fused kernels' (seed, offset) are ints and would be frozen into the graph, giving every step
  the same noise; torch's CUDA generator is graph-safe (each replay advances its Philox offset). So a
  graphed sample has the distribution of Diffusion.sample's but not the same draws; torch.cuda.manual_seed
  after the construction (whose warm-up and capture draw from that generator too) makes it reproducible.
  x_T is Philox stream (seed, 0), as in Diffusion.sample, so a chain that draws no noise (DDIM with η = 0,
  DPM-Solver++(2M)) gives Diffusion.sample's images.

One graph per kind of step the plan uses (a respaced "ddpm" chain mixes DDPM steps, t_prev = t − 1, with
DDIM η = 1 steps; DPM-Solver++ has a first-order and a second-order kind). With capture=False the same
step runs eagerly, on any device: that is how the CPU tests check it against Diffusion.sample.

>>> sampler = GraphedSampler(diffusion, unet, (16, 3, 64, 64), sampler="dpmpp_2m", steps=20, device="cuda")
>>> images = sampler(seed=0)       # 20 graph replays
"""
from __future__ import annotations

import contextlib

import torch

from ..schedule import NoiseSchedule
from .base import check_sample_args, initial_noise, on_device
from .model_call import eval_mode
from .registry import make


class GraphedSampler:
    """The reverse chain of Diffusion.sample for one shape, sampler and step count, its steps captured in
    CUDA graphs (capture=None: when the device is CUDA). `diffusion` is a Diffusion (anything with a
    NoiseSchedule `schedule` and a `prediction_type`). autocast_dtype runs the model under autocast (the
    autocast weight cache is off, as graph capture requires)."""

    def __init__(self, diffusion, model, shape, *, sampler: str = "ddpm", steps: int | None = None,
                 eta: float = 0.0, guidance_scale: float | None = None, y: torch.Tensor | None = None,
                 cond: torch.Tensor | None = None, clip_range: float | None = 1.0, spacing: str | None = None,
                 dtype: torch.dtype = torch.float32, device="cuda", capture: bool | None = None,
                 autocast_dtype: torch.dtype | None = None, warmup: int = 2):
        who = "GraphedSampler"
        if not isinstance(getattr(diffusion, "schedule", None), NoiseSchedule) or \
                not hasattr(diffusion, "prediction_type"):
            raise TypeError(f"{who}: diffusion must be a Diffusion (a NoiseSchedule and a prediction type), got "
                            f"{type(diffusion).__name__}")
        self.shape = check_sample_args(who, shape, guidance_scale, y, cond)
        self.device = torch.device(device)
        self.capture = self.device.type == "cuda" if capture is None else bool(capture)
        if self.capture and self.device.type != "cuda":
            raise ValueError(f"{who}: capture=True needs a CUDA device, got {self.device}")
        if self.capture and not torch.cuda.is_available():
            raise RuntimeError(f"{who}: capture=True but torch sees no CUDA device")
        self.sampler = make(sampler, diffusion.schedule, diffusion.prediction_type, eta=eta, clip_range=clip_range,
                            who=who)
        plan = self.sampler.plan(steps, spacing)
        self.model, self.guidance_scale, self.dtype = model, guidance_scale, dtype
        if autocast_dtype is None and self.device.type == "cuda" and torch.is_autocast_enabled("cuda"):
            # built inside the caller's autocast: keep its dtype, but capture with the weight-cast cache
            # off (a cached cast made during warm-up would be freed under the graph's feet)
            autocast_dtype = torch.get_autocast_dtype("cuda")
        self.autocast_dtype = autocast_dtype
        self.kinds = [s.kind for s in plan]
        on_device(diffusion.schedule, self.device)
        B = self.shape[0]
        # the static buffers: what a replay reads and writes
        self.x = torch.zeros(self.shape, dtype=dtype, device=self.device)
        self.state = self.sampler.initial_state(self.x)
        self.index = torch.zeros(1, dtype=torch.long, device=self.device)  # 1-D: index_select never syncs

        def table(values):  # (steps, B) per-step timesteps, gathered by index on the device
            return torch.tensor(values, dtype=torch.long).repeat_interleave(B).view(-1, B).to(self.device)

        self.t_table = table([s.t for s in plan])
        self.t_prev_table = table([s.t_prev for s in plan])
        self.t_last_table = table([s.t_last for s in plan])
        self.y = None if y is None else y.to(self.device, torch.long).clone()
        self.cond = None if cond is None else cond.to(self.device, dtype).clone()
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        if self.capture:
            with torch.cuda.device(self.device):
                self._capture(max(1, warmup))
        # A graph holds the addresses of what it read during capture. Everything it reads lives here, in the
        # model's parameters, or in the schedule's ᾱ table, which the schedule drops when it moves (and a
        # later Diffusion.sample may move it): the sampler keeps that table alive itself.
        self._captured_table = diffusion.schedule._table(self.x)

    # ------------------------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    def _step(self, kind: str) -> None:
        """Step `index` of the chain on the static buffers: (x, state) ← step(x, state), index ← index + 1."""
        t, t_prev, t_last = (tab.index_select(0, self.index).view(-1)  # gathered on the device
                             for tab in (self.t_table, self.t_prev_table, self.t_last_table))
        noise = torch.randn(self.shape, dtype=self.dtype, device=self.device) if self.sampler.needs_noise(kind) \
            else None
        with self._autocast():
            x, state = self.sampler.step(self.model, self.x, t, t_prev, t_last, kind, self.state,
                                         guidance_scale=self.guidance_scale, y=self.y, cond=self.cond, noise=noise)
        self.x.copy_(x)
        for buf, new in zip(self.state, state):
            buf.copy_(new)
        self.index.add_(1)

    def _first(self, kind: str) -> None:
        """index ← the first step of that kind: a step runs on its own plan entry (a second-order step at
        index 0 would read t_last = −1, which the kernels reject)."""
        self.index.fill_(self.kinds.index(kind))

    @torch.no_grad()
    def _capture(self, warmup: int) -> None:
        # Warm-up on a side stream (PyTorch's rule for capture): loads the kernels, compiles Triton, sizes
        # cuBLAS workspaces and the schedule's cached tables, none of which may happen during capture.
        self.x.normal_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with eval_mode(self.model), torch.cuda.stream(side):
            for _ in range(warmup):
                for kind in sorted(set(self.kinds)):
                    self._first(kind)
                    self._step(kind)
        torch.cuda.current_stream(self.device).wait_stream(side)
        # The graphs share one memory pool although they replay in any order: safe because no tensor made
        # during a capture outlives it (each step's results are copied into the static buffers, outside the
        # pool). Keep it so: a tensor cached across steps inside a step or the model would break this.
        pool = torch.cuda.graph_pool_handle()
        capture_stream = torch.cuda.Stream(self.device)  # torch.cuda.graph's default is tied to one device
        with eval_mode(self.model):
            for kind in sorted(set(self.kinds)):
                self._first(kind)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=capture_stream):
                    self._step(kind)
                self.graphs[kind] = graph
        self.index.zero_()

    # ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, seed: int = 0, *, x_T: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 cond: torch.Tensor | None = None) -> torch.Tensor:
        """Runs the chain from x_T (default: Philox stream (seed, 0), as Diffusion.sample) and returns x_0.
        y and cond replace the labels and the conditioning image of the construction (same shapes)."""
        who = "GraphedSampler"
        for name, new, static in (("y", y, self.y), ("cond", cond, self.cond)):
            if new is None:
                continue
            if static is None or new.shape != static.shape:
                raise ValueError(f"{who}: {name} must have the shape given at construction "
                                 f"{None if static is None else tuple(static.shape)}, got {tuple(new.shape)}")
            n = getattr(self.model, "num_classes", None)
            # checked here, on the host: inside a replay an out-of-range label is a fatal device assert
            if name == "y" and n is not None and bool(((new < 0) | (new > n)).any()):
                raise ValueError(f"{who}: y holds labels outside 0..num_classes = {n} (num_classes: the null class)")
            static.copy_(new)
        if x_T is None:
            x_T = initial_noise(self.shape, seed, self.dtype, self.device)
        elif tuple(x_T.shape) != self.shape:
            raise ValueError(f"{who}: x_T must have shape {self.shape}, got {tuple(x_T.shape)}")
        self.x.copy_(x_T)
        for buf in self.state:
            buf.zero_()
        self.index.zero_()
        if self.capture:
            with torch.cuda.device(self.device):
                for kind in self.kinds:
                    self.graphs[kind].replay()
        else:
            with eval_mode(self.model):
                for kind in self.kinds:
                    self._step(kind)
        return self.sampler.finish(self.x.clone())
