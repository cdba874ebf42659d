"""Hugging Face diffusers models, schedulers and pipelines on diffusion_ext's fused kernels, in one call.

    from diffusion_ext.integrations import diffusers as dxd
    report = dxd.patch(pipe)      # a DiffusionPipeline, or a UNet2DModel / UNet2DConditionModel /
                                  # AutoencoderKL / any nn.Module holding diffusers blocks, or a
                                  # DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler
    print(report)                 # what was fused, per kind and count; what runs diffusers' code, and why
    dxd.unpatch(pipe)             # diffusers' own code again

What is fused (each module keeps its class, parameters, buffers, submodules and state_dict keys; the new
forwards are bound per instance, as Liger-Kernel's monkey patches do):
- ResnetBlock2D (every UNet block, mid-block and VAE encoder/decoder block): norm1→act and norm2→act as
  group_norm_act (diffusers_resnet.py); conv_norm_out + conv_act of UNet2DModel, UNet2DConditionModel and
  the VAE's Encoder/Decoder likewise; its dropout (p > 0) with the mask made in the kernel (ops.dropout);
- Attention: a processor running the layer's group norm and diffusion_ext's flash attention, self- and
  cross-attention (diffusers_attention.py);
- DDPMScheduler / DDIMScheduler: add_noise and step on the fused schedule ops; DPMSolverMultistepScheduler
  (DPM-Solver++ and its SDE variant, first and second order): step on dpmpp_2m_step (diffusers_schedulers.py);
- UNet2DModel, UNet2DConditionModel and the VAE's Encoder/Decoder, when sampling on a CPU (gradients
  off): the convolutions on channels_last activations, converted on entry and back on exit
  (diffusers_layout.py).
Tested with diffusers 0.42.
"""
from __future__ import annotations

try:
    import diffusers as _diffusers
except ImportError as e:  # pragma: no cover - exercised by a test that hides diffusers
    raise ImportError(
        "diffusion_ext.integrations.diffusers needs Hugging Face diffusers, which is not installed: "
        "pip install 'diffusion_ext[diffusers]' (or pip install diffusers)"
    ) from e

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D, ResnetBlockCondNorm2D

from .diffusers_attention import FusedAttnProcessor, patch_attention, unpatch_attention
from .diffusers_layout import LAYOUT_MODELS, patch_layout, unpatch_layout
from .diffusers_report import PatchReport
from .diffusers_resnet import (patch_dropout, patch_norm_out, patch_resnet, unpatch_dropout, unpatch_norm_out,
                               unpatch_resnet)
from .diffusers_schedulers import patch_scheduler, unpatch_scheduler

TESTED_VERSIONS = ("0.42",)
# the parents whose forward calls conv_norm_out then conv_act and nothing else between them
_NORM_OUT_PARENTS = ("UNet2DModel", "UNet2DConditionModel", "Encoder", "Decoder")

__all__ = ["patch", "unpatch", "PatchReport", "FusedAttnProcessor", "TESTED_VERSIONS"]


def _check_flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"diffusion_ext.integrations.diffusers.patch: {name} must be True or False, got "
                        f"{type(value).__name__}")
    return value


def _components(obj) -> list[tuple[str, object]]:
    """(name, component) of what patch works on: a pipeline's modules and scheduler, or the object itself."""
    if isinstance(obj, _diffusers.DiffusionPipeline):
        return [(n, c) for n, c in obj.components.items() if isinstance(c, torch.nn.Module) or
                isinstance(c, _diffusers.SchedulerMixin)]
    if isinstance(obj, (torch.nn.Module, _diffusers.SchedulerMixin)):
        return [("", obj)]
    raise TypeError(f"diffusion_ext.integrations.diffusers.patch: obj must be a diffusers model, pipeline or "
                    f"scheduler (or an nn.Module holding diffusers blocks), got {type(obj).__name__}")


def _enclosing_block(names: dict[str, torch.nn.Module], path: str) -> str:
    """The class of the nearest enclosing module that is not a container ("AttnDownBlock2D", ...)."""
    parts = path.split(".")
    for k in range(len(parts) - 1, 0, -1):
        m = names.get(".".join(parts[:k]))
        if m is not None and not isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)):
            return type(m).__name__
    return type(names[""]).__name__ if path else ""


def _patch_module(model: torch.nn.Module, report: PatchReport, group_norm: bool, attention: bool,
                  dropout: bool, channels_last: bool) -> None:
    names = dict(model.named_modules())
    for path, m in names.items():
        where = _enclosing_block(names, path) if path else ""
        if type(m) is ResnetBlock2D:
            if group_norm:
                patch_resnet(m, path, where, report)
            if dropout:
                patch_dropout(m, path, where, report)
        elif isinstance(m, ResnetBlockCondNorm2D) and group_norm:
            norm = type(m.norm1).__name__
            report.add_kept(path, "ResnetBlockCondNorm2D", f"{norm} (ada/spatial group norm) has no fused kernel",
                            where)
        elif isinstance(m, Attention) and attention:
            patch_attention(m, path, where, report)
        if group_norm and type(m).__name__ in _NORM_OUT_PARENTS:
            patch_norm_out(m, path, report)
        if channels_last and type(m).__name__ in LAYOUT_MODELS:
            patch_layout(m, path, report)
    if group_norm:
        report.note("tensors of a dtype or on a device the kernels do not take (they take float32/64, float16, "
                    "bfloat16 on CPU and CUDA)")
    if attention:
        report.note("Attention calls with an attention_mask (the fused kernel has no mask)")


def patch(obj, group_norm: bool = True, attention: bool = True, scheduler: bool = True,
          dropout: bool = True, channels_last: bool = True) -> PatchReport:
    """Runs obj's ResnetBlock2D norms and dropout, Attention layers and DDPM/DDIM/DPM-Solver++ scheduler steps on
    diffusion_ext's fused kernels (see the module docstring); returns the report. Patching twice changes
    nothing more.

    group_norm, attention, scheduler, dropout, channels_last: False leaves that part to diffusers
    (dropout=False keeps torch's generator drawing the dropout masks, e.g. to reproduce an unpatched
    training run's masks; channels_last=False keeps the caller's layout when sampling on a CPU)."""
    flags = {n: _check_flag(n, v) for n, v in (("group_norm", group_norm), ("attention", attention),
                                                 ("scheduler", scheduler), ("dropout", dropout),
                                                 ("channels_last", channels_last))}
    report = PatchReport(type(obj).__name__, _diffusers.__version__)
    for name, comp in _components(obj):
        part = PatchReport(type(comp).__name__, report.diffusers_version)
        if isinstance(comp, _diffusers.SchedulerMixin):
            if flags["scheduler"]:
                patch_scheduler(comp, part)
        else:
            _patch_module(comp, part, flags["group_norm"], flags["attention"], flags["dropout"],
                          flags["channels_last"])
        if name:
            report.merge(part, name)
        else:
            report = part
    return report


def unpatch(obj) -> int:
    """Puts diffusers' own forwards, processors and scheduler methods back; returns how many it restored."""
    restored = 0
    for _, comp in _components(obj):
        if isinstance(comp, _diffusers.SchedulerMixin):
            restored += unpatch_scheduler(comp)
            continue
        for m in comp.modules():
            if type(m) is ResnetBlock2D:
                restored += unpatch_resnet(m) + unpatch_dropout(m)
            elif isinstance(m, Attention):
                restored += unpatch_attention(m)
            if type(m).__name__ in _NORM_OUT_PARENTS:
                restored += unpatch_norm_out(m)
            if type(m).__name__ in LAYOUT_MODELS:
                restored += unpatch_layout(m)
    return restored
