"""Modules built on the fused ops, with the parameter names of their PyTorch equivalents so that a
checkpoint moves between the fused and the eager model."""
from .group_norm_act import GroupNormAct  # noqa: F401

__all__ = ["GroupNormAct"]
