"""Modules built on the fused ops, with the parameter names of their PyTorch equivalents so that a
checkpoint moves between the fused and the eager model (fused=False builds the eager one)."""
from .attention import SpatialSelfAttention  # noqa: F401
from .dropout import Dropout  # noqa: F401
from .group_norm_act import GroupNormAct  # noqa: F401

__all__ = ["Dropout", "GroupNormAct", "SpatialSelfAttention"]
