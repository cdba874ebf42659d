"""Dropout whose mask is made inside the kernel (ops.dropout) instead of drawn by torch's generator.

On a CPU, torch's dropout draws its Bernoulli mask through the generator at ~7 ms per million elements
here, and the U-Net's ResBlocks apply dropout to every second activation: `bernoulli_` took ~5% of a
training step, more than group norm, SiLU and attention together. ops.dropout makes the mask from
(seed, offset) of the counter-based generator in the same pass that applies it, and its backward
regenerates the mask rather than storing it.

Each call draws its 63-bit seed from torch's default (CPU) generator, so torch.manual_seed governs it,
the trainer's checkpoints (which keep that generator's state) resume it exactly, and drawing it costs no
device synchronisation. It also advances that generator, so other CPU draws that use it without a
generator of their own (a DataLoader's shuffle or base seed) come out differently than with torch's
dropout on a GPU, which draws from the CUDA generator. While torch.compile traces, while a CUDA graph is
being captured (a host seed would be frozen into the graph: every replay the same mask; torch's dropout
is graph-safe), and for dtypes or devices the kernels do not take, torch's own dropout runs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..backend import KERNEL_DEVICES, KERNEL_DTYPES


def new_seed() -> int:
    """A fresh key for ops.dropout from torch's default CPU generator."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """F.dropout(x, p, training) with the mask made in the kernel (see the module docstring); the same
    distribution, a different random stream."""
    if not training or p == 0:
        return x
    if p >= 1 or torch.compiler.is_compiling() or x.dtype not in KERNEL_DTYPES or \
            x.device.type not in KERNEL_DEVICES or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return F.dropout(x, p, training)
    return ops.dropout(x, p, new_seed())


class Dropout(torch.nn.Dropout):
    """nn.Dropout on ops.dropout. `inplace` is accepted for nn.Dropout's signature; the output is always a
    new tensor (the backward needs no copy of the input either way)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
