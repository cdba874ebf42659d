"""diffusion_ext: fused kernels for diffusion-model training and sampling.

The ops are registered with the PyTorch dispatcher as torch.ops.diffusion_ext.*; diffusion_ext.ops wraps
them with backend choice, and NoiseSchedule is the user-facing API of the schedule ops.
"""
from ._loader import build_info  # noqa: F401  (loads _C first: registers the ops)
from .backend import BackendUnavailable, available_backends, use_backend  # noqa: F401
from . import nn, ops  # noqa: F401
from .schedule import NoiseSchedule  # noqa: F401

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "nn", "ops", "build_info", "use_backend", "available_backends", "BackendUnavailable"]
