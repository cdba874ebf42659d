"""When a model's forward runs its convolutions on channels_last (NHWC) activations: sampling on a CPU.

oneDNN, which runs torch's CPU convolutions, computes in a channels-last blocked layout: given NCHW
activations it reorders them in and the result back out on every convolution, given channels_last ones it
reads them as they are, and a convolution's output follows its input's layout, so converting a network's
input is enough (its weights may stay as they are). torch.compile's inductor makes the same choice for CPU
convolutions (its layout optimisation). On the 2-core AMX Xeon (benchmarks/results/
cpu-2026-12-02-diffusers-channels-last.md), a forward of the report's 64×64 diffusers UNet2DModel under bf16
autocast took 358 ms on NCHW input and 267 ms on channels_last input (batch 8; fp32 637 → 610 ms; batch 1
113 → 84 ms bf16, 114 → 104 ms fp32); the AVX2 EPYC sampled faster in channels_last too (README).

Only when it helps and nothing can notice:
- a CPU tensor, float32 or bfloat16 (fp16 and fp64 convolutions were not measured), 4-D, not already
  channels_last;
- gradients off (torch.no_grad / inference_mode: sampling, pipelines, evaluation). Training keeps the
  caller's layout: oneDNN's channels_last convolution backward made a training step 15-35 % slower on the
  AVX2 EPYC and faster on the AMX Xeon (README), so there the choice depends on the CPU and stays the user's.
The caller converts the output back to contiguous, the layout of the input it converted. CUDA
tensors keep their layout: no GPU has measured cuDNN's layouts for these models yet.
"""
from __future__ import annotations

import torch

LAYOUT_DTYPES = (torch.float32, torch.bfloat16)


def runs_channels_last(x) -> bool:
    """Whether a forward given `x` converts it to channels_last (decided per call; guards under torch.compile)."""
    return (isinstance(x, torch.Tensor) and x.dim() == 4 and x.device.type == "cpu" and
            x.dtype in LAYOUT_DTYPES and not torch.is_grad_enabled() and
            not x.is_contiguous(memory_format=torch.channels_last))
