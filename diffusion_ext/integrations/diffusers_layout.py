"""Sampling on a CPU with a diffusers model's convolutions on channels_last (NHWC) activations.

The patched forward of UNet2DModel, UNet2DConditionModel and the VAE's Encoder/Decoder converts its `sample` to
channels_last on entry and its output back to contiguous on exit (both a few hundred KB at 64×64×3) when
nn.layout.runs_channels_last says so (a CPU, gradients off, fp32/bf16; that module has why and the
measurements): everything between follows the convolutions' output layout (group_norm_act and the attention
processor read it natively). That layout was most of torch.compile's lead over the patched model on a bf16
pipeline (benchmarks/results/cpu-2026-12-02-diffusers-channels-last.md). The parameters keep their layout;
the output has the values the unpatched model gives to oneDNN's rounding, which differs between its layouts
as it does between thread counts.
"""
from __future__ import annotations

import dataclasses

import torch

from .binding import bind, patch_function, taken_by_someone_else, unbind
from ..nn.layout import runs_channels_last

CHANNELS_LAST_KIND = "inference on a CPU: convolutions on channels_last activations"
# the models whose forward takes the image (or latent) `sample` first and returns one of the same shape
LAYOUT_MODELS = ("UNet2DModel", "UNet2DConditionModel", "Encoder", "Decoder")


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
