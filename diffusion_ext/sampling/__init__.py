"""Samplers: one module per sampler family behind one step interface (base.Sampler), and the CUDA-graph
runner (graphed.py). Adding a sampler is one module and one line in registry.SAMPLERS.

Nothing here imports diffusion.py or its users: Diffusion.sample, the trainer's sample grids, depth
prediction and the command line come here.
"""
from __future__ import annotations

from .base import Sampler, Step, check_sample_args, initial_noise, on_device  # noqa: F401
from .graphed import GraphedSampler  # noqa: F401
from .model_call import call_model, eval_mode, null_class, predict  # noqa: F401
from .registry import SAMPLERS, make  # noqa: F401

