"""Inference on a CPU with a diffusers model's convolutions on channels_last (NHWC) activations.

oneDNN, which runs torch's CPU convolutions, computes in a channels-last blocked layout: given NCHW
activations it reorders them in and the result back out on every convolution, given channels_last ones it
reads them as they are. torch.compile's inductor makes the same choice for CPU convolutions (its layout
optimisation), and that was most of its lead over the patched model on a bf16 pipeline: on the 2-core AMX
Xeon (benchmarks/results/cpu-2026-12-02-diffusers-channels-last.md) a forward of the report's 64×64
UNet2DModel under bf16 autocast took 358 ms on NCHW input and 267 ms on channels_last input (batch 8;
fp32 637 → 610 ms; batch 1 113 → 84 ms bf16, 114 → 104 ms fp32), with the weights left as they are.

So the patched model's forward converts its `sample` to channels_last on entry and its output back to
contiguous on exit (both a few hundred KB at 64×64×3): everything between follows the convolutions'
output layout (group_norm_act and the attention processor read it natively). Only when it helps and
nothing can notice:
- a CPU tensor, float32 or bfloat16 (fp16 and fp64 convolutions were not measured), 4-D, not already
  channels_last;
- gradients off (torch.no_grad / inference_mode: sampling, pipelines, evaluation). Training keeps the
  caller's layout: oneDNN's channels_last convolution backward made a training step 15-35 % slower on an
  AVX2 EPYC and faster on the AMX Xeon (README), so that choice depends on the CPU and stays the user's
  (`model.to(memory_format=torch.channels_last)`).
The parameters keep their layout; the output has the values and layout the unpatched model gives (to
oneDNN's rounding, which differs between its layouts as it does between thread counts). CUDA tensors keep
their layout: no GPU has measured cuDNN's layouts for these models yet.
"""
from __future__ import annotations

import dataclasses

import torch

from .binding import bind, patch_function, taken_by_someone_else, unbind

CHANNELS_LAST_KIND = "inference on a CPU: convolutions on channels_last activations"
# the models whose forward takes the image (or latent) `sample` first and returns one of the same shape
LAYOUT_MODELS = ("UNet2DModel", "UNet2DConditionModel", "Encoder", "Decoder")
LAYOUT_DTYPES = (torch.float32, torch.bfloat16)


def runs_channels_last(sample) -> bool:
    """Whether this call converts `sample` (decided per call; traced as guards under torch.compile)."""
    return (isinstance(sample, torch.Tensor) and sample.dim() == 4 and sample.device.type == "cpu" and
            sample.dtype in LAYOUT_DTYPES and not torch.is_grad_enabled() and
            not sample.is_contiguous(memory_format=torch.channels_last))


def _contiguous(out):
    """The model's output (a tensor, a diffusers BaseOutput with .sample, or return_dict=False's tuple) with
    its sample contiguous, as the unpatched model returns it."""
    if isinstance(out, torch.Tensor):
        return out.contiguous()
    if isinstance(out, tuple):
        return (out[0].contiguous(),) + tuple(out[1:])
    return dataclasses.replace(out, sample=out.sample.contiguous())


@patch_function
def channels_last_forward(self, *args, **kwargs):
    """The model's own forward, on channels_last activations when runs_channels_last(sample)."""
    sample = args[0] if args else kwargs.get("sample")
    if not runs_channels_last(sample):
        return type(self).forward(self, *args, **kwargs)
    sample = sample.contiguous(memory_format=torch.channels_last)
    if args:
        args = (sample,) + args[1:]
    else:
        kwargs = {**kwargs, "sample": sample}
    return _contiguous(type(self).forward(self, *args, **kwargs))


def patch_layout(model, path: str, report) -> None:
    """Binds channels_last_forward on one of LAYOUT_MODELS, or records why its own forward stays."""
    kind = type(model).__name__
    if taken_by_someone_else(model, "forward"):
        report.add_kept(path, CHANNELS_LAST_KIND, "its forward was already replaced by another library", kind)
        return
    bind(model, "forward", channels_last_forward)
    report.add_fused(path, CHANNELS_LAST_KIND, kind)


def unpatch_layout(model) -> bool:
    return unbind(model, "forward")
